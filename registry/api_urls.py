"""Non-FHIR JSON API (mounted at /api/)."""

from django.urls import path

from registry import apis

urlpatterns = [
    path("alerts/", apis.AlertListApi.as_view(), name="api-alert-list"),
    path("alerts/<int:alert_id>/acknowledge/", apis.AlertAcknowledgeApi.as_view(),
         name="api-alert-acknowledge"),
    path("alerts/<int:alert_id>/resolve/", apis.AlertResolveApi.as_view(),
         name="api-alert-resolve"),
    path("alerts/<int:alert_id>/snooze/", apis.AlertSnoozeApi.as_view(),
         name="api-alert-snooze"),
    path("alerts/<int:alert_id>/assign/", apis.AlertAssignApi.as_view(),
         name="api-alert-assign"),
    path("alerts/<int:alert_id>/notes/", apis.AlertNoteApi.as_view(), name="api-alert-note"),
    path("alerts/<int:alert_id>/reopen/", apis.AlertReopenApi.as_view(),
         name="api-alert-reopen"),
]
