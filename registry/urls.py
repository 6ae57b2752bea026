from django.contrib.auth import views as auth_views
from django.urls import path, reverse_lazy

from config.auth_views import RateLimitedPasswordResetView
from registry import ui_views, views
from scoring import views as scoring_views
from scoring import views_assist

urlpatterns = [
    path("", views.home, name="home"),
    # Password reset by email (Django's views: no account enumeration, one-time tokens),
    # rate limited per IP + address (config.ratelimit).
    path("accounts/password-reset/", RateLimitedPasswordResetView.as_view(
        success_url=reverse_lazy("password_reset_done")), name="password_reset"),
    path("accounts/password-reset/sent/", auth_views.PasswordResetDoneView.as_view(),
         name="password_reset_done"),
    path("accounts/reset/<uidb64>/<token>/", auth_views.PasswordResetConfirmView.as_view(
        success_url=reverse_lazy("password_reset_complete")), name="password_reset_confirm"),
    path("accounts/reset/done/", auth_views.PasswordResetCompleteView.as_view(),
         name="password_reset_complete"),
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
    path("vbq/review/<int:result_id>/assist/", views_assist.review_assist_view,
         name="vbq-review-assist"),
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
