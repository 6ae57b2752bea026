"""URL configuration. Login is required everywhere except health checks and token-auth feeds."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from registry import views as registry_views

urlpatterns = [
    path("healthz", registry_views.healthz, name="healthz"),
    path("readyz", registry_views.readyz, name="readyz"),
    path("admin/", admin.site.urls),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("reports/", include("registry.reports.urls")),
    path("", include("registry.urls")),
]
