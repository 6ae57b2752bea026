from django.urls import path

from registry import ui_views, views
from scoring import views as scoring_views

urlpatterns = [
    path("", views.home, name="home"),
    path("patients/", views.patient_list, name="patient-list"),
    path("worklist/", ui_views.worklist, name="worklist"),
    path("worklist/<int:alert_id>/<slug:action>/", ui_views.worklist_action,
         name="worklist-action"),
    path("patients/<uuid:patient_id>/", views.patient_detail, name="patient-detail"),
    path("patients/<uuid:patient_id>/imaging/upload/", scoring_views.upload_page,
         name="imaging-upload"),
    path("vbq/review/", scoring_views.review_queue, name="vbq-review-queue"),
    path("vbq/review/<int:result_id>/", scoring_views.review_page, name="vbq-review"),
    path("vbq/review/<int:result_id>/image.png", scoring_views.review_image,
         name="vbq-review-image"),
    path("vbq/review/<int:result_id>/preview/", scoring_views.review_preview,
         name="vbq-review-preview"),
    path("vbq/review/<int:result_id>/save/", scoring_views.review_save, name="vbq-review-save"),
    path("vbq/review/<int:result_id>/<slug:action>/", scoring_views.review_action,
         name="vbq-review-action"),
    path("vbq/jobs/", scoring_views.job_list, name="vbq-jobs"),
    path("ops/worker-probe/", views.ops_worker_probe, name="ops-worker-probe"),
    path(
        "ops/worker-probe/<int:probe_id>/",
        views.ops_worker_probe_status,
        name="ops-worker-probe-status",
    ),
]
