"""Operational URLs owned by deployment/hardening: API schema + docs, the audit report.

Included from ``config/urls.py`` before the app URLs.
"""

from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from registry import audit_views

urlpatterns = [
    # The OpenAPI schema of the non-FHIR API and a Swagger UI page; both need a login.
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path(
        "api/docs/",
        SpectacularSwaggerSplitView.as_view(url_name="api-schema"),
        name="api-docs",
    ),
    path("audit/", audit_views.audit_event_list, name="audit-event-list"),
]
