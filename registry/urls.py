from django.urls import path

from registry import ui_views, views

urlpatterns = [
    path("", views.home, name="home"),
    path("patients/", views.patient_list, name="patient-list"),
    path("worklist/", ui_views.worklist, name="worklist"),
    path("worklist/<int:alert_id>/<slug:action>/", ui_views.worklist_action,
         name="worklist-action"),
    path("patients/<uuid:patient_id>/", views.patient_detail, name="patient-detail"),
    path("ops/worker-probe/", views.ops_worker_probe, name="ops-worker-probe"),
    path(
        "ops/worker-probe/<int:probe_id>/",
        views.ops_worker_probe_status,
        name="ops-worker-probe-status",
    ),
]
