from django.urls import path

from scoring import apis

urlpatterns = [
    path("jobs/", apis.JobListApi.as_view(), name="api-vbq-job-list"),
    path("jobs/<int:result_id>/", apis.JobDetailApi.as_view(), name="api-vbq-job-detail"),
    path("patients/<uuid:patient_id>/dicom/", apis.DicomUploadApi.as_view(),
         name="api-dicom-upload"),
]
