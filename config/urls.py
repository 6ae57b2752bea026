"""URL configuration. Login is required everywhere except health checks and token-auth feeds."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_not_required
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic import RedirectView

from config.auth_views import RateLimitedLoginView
from registry import cds
from registry import views as registry_views

urlpatterns = [
    path("healthz", registry_views.healthz, name="healthz"),
    # Browsers ask for /favicon.ico on pages that name no icon (admin, API docs).
    path("favicon.ico", login_not_required(RedirectView.as_view(
        url=static("img/favicon.svg"), permanent=True)), name="favicon"),
    path("readyz", registry_views.readyz, name="readyz"),
    path("admin/", admin.site.urls),
    path("accounts/login/", RateLimitedLoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    # API schema + docs, audit report (deployment/hardening).
    path("", include("config.ops_urls")),
    path("reports/", include("registry.reports.urls")),
    path("api/", include("registry.api_urls")),
    path("api/imaging/", include("scoring.urls")),
    path("", include("integrations.fhir.urls")),
    path("cds-services", cds.discovery, name="cds-discovery"),
    path("cds-services/vbq-followup", cds.patient_view, name="cds-patient-view"),
    path("", include("registry.urls")),
]

handler403 = "config.error_views.permission_denied"
handler404 = "config.error_views.page_not_found"
handler500 = "config.error_views.server_error"
