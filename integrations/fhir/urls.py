"""FHIR endpoints (mounted at /fhir)."""

from django.urls import path, re_path

from integrations.fhir import views

urlpatterns = [
    path("fhir", views.root, name="fhir-root"),
    path("fhir/", views.root, name="fhir-root-slash"),
    path("fhir/metadata", views.metadata, name="fhir-metadata"),
    re_path(r"^fhir/(?P<resource_type>[A-Z][A-Za-z]+)$", views.type_level, name="fhir-type"),
    re_path(r"^fhir/(?P<resource_type>[A-Z][A-Za-z]+)/(?P<logical_id>[A-Za-z0-9\-\.]{1,64})$",
            views.instance_level, name="fhir-instance"),
    re_path(r"^fhir/(?P<rest>.*)$", views.not_found, name="fhir-not-found"),
]
