"""Quality-improvement report URLs (mounted at /reports/)."""

from django.urls import path

from registry.reports import views

urlpatterns = [
    path("", views.report_page, name="report"),
    path("api/", views.ReportApi.as_view(), name="report-api"),
    path("summary/", views.report_summary, name="report-summary"),
    path("cohort.csv", views.cohort_csv, name="report-cohort-csv"),
    path("plot/<slug:name>.<str:fmt>", views.report_plot, name="report-plot"),
]
