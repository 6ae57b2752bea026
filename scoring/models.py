"""Imaging studies, series and VBQ results (the engine itself lives in ``scoring.engine``)."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q

from registry.models import Patient, Procedure


class ImagingStudy(models.Model):
    """A DICOM study known to the registry (from a FHIR ImagingStudy, C-STORE or upload)."""

    class Source(models.TextChoices):
        FHIR = "fhir", "FHIR ImagingStudy"
        DICOM = "dicom", "DICOM C-STORE"
        UPLOAD = "upload", "Upload"
        DEMO = "demo", "Synthetic demo"

    patient = models.ForeignKey(
        Patient, null=True, blank=True, on_delete=models.CASCADE, related_name="imaging_studies"
    )
    study_instance_uid = models.CharField(max_length=64, unique=True)
    identifier_system = models.CharField(max_length=255, blank=True)
    identifier_value = models.CharField(max_length=255, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    started_on = models.DateField(null=True, blank=True, help_text="Clinic-local date")
    modality = models.CharField(max_length=16, blank=True)
    description = models.CharField(max_length=255, blank=True)
    source = models.CharField(max_length=10, choices=Source.choices)
    endpoint_url = models.CharField(max_length=500, blank=True, help_text="DICOMweb base URL")
    linked_procedure = models.ForeignKey(
        Procedure, null=True, blank=True, on_delete=models.SET_NULL, related_name="mri_studies"
    )
    link_reason = models.CharField(max_length=300, blank=True)
    record_status = models.CharField(max_length=20, default="active")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "imaging studies"
        indexes = [models.Index(fields=["patient", "started_on"])]

    def __str__(self) -> str:
        return f"ImagingStudy {self.pk}"


class ImagingSeries(models.Model):
    study = models.ForeignKey(ImagingStudy, on_delete=models.CASCADE, related_name="series")
    series_instance_uid = models.CharField(max_length=64, unique=True)
    number = models.IntegerField(null=True, blank=True)
    modality = models.CharField(max_length=16, blank=True)
    description = models.CharField(max_length=255, blank=True)
    body_part = models.CharField(max_length=64, blank=True)
    instance_count = models.PositiveIntegerField(null=True, blank=True)
    orientation = models.CharField(max_length=12, blank=True, help_text="sagittal|axial|coronal")
    repetition_time_ms = models.FloatField(null=True, blank=True)
    echo_time_ms = models.FloatField(null=True, blank=True)
    slice_thickness_mm = models.FloatField(null=True, blank=True)
    field_strength_t = models.FloatField(null=True, blank=True)
    local_path = models.CharField(max_length=500, blank=True, help_text="Folder of received files")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "imaging series"

    def __str__(self) -> str:
        return f"ImagingSeries {self.pk}"


class VbqResult(models.Model):
    """One VBQ computation. Unique on (series, algorithm version, source, revision)."""

    class Source(models.TextChoices):
        AUTO = "auto", "Automatic"
        MANUAL = "manual", "Manual ROIs"
        EXTERNAL_SEG = "external-seg", "External segmentation"
        ASSISTED = "assisted", "Assisted (one click)"
        IMPORTED = "imported", "Imported value"

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        NEEDS_REVIEW = "needs_review", "Needs review"
        FAILED = "failed", "Failed"

    class Review(models.TextChoices):
        PENDING = "pending", "Pending"
        ACCEPTED = "accepted", "Accepted"
        REJECTED = "rejected", "Rejected"

    series = models.ForeignKey(
        ImagingSeries, null=True, blank=True, on_delete=models.CASCADE, related_name="vbq_results"
    )
    patient = models.ForeignKey(Patient, on_delete=models.CASCADE, related_name="vbq_results")
    algorithm_version = models.CharField(max_length=30)
    source = models.CharField(max_length=15, choices=Source.choices)
    revision = models.PositiveIntegerField(default=0)
    status = models.CharField(max_length=15, choices=Status.choices, default=Status.QUEUED)
    review_status = models.CharField(
        max_length=10, choices=Review.choices, default=Review.PENDING
    )
    vbq_all_levels = models.FloatField(null=True, blank=True)
    vbq_excluding_fractured = models.FloatField(null=True, blank=True)
    csf_median_si = models.FloatField(null=True, blank=True)
    confidence = models.FloatField(null=True, blank=True)
    qc_flags = models.JSONField(default=list, blank=True)
    qc_clear = models.BooleanField(
        default=False, db_default=False,
        help_text="No QC flag of severity warning or refusal (scoring.trust.qc_clear): with "
                  "enough confidence an automatic result may move alerts without review")
    fractured_levels = models.JSONField(default=list, blank=True)
    fractured_levels_by_reviewer = models.BooleanField(
        default=False, db_default=False,
        help_text="A reviewer chose the fractured levels: never recomputed automatically "
                  "(scoring.fractured)")
    field_strength_t = models.FloatField(null=True, blank=True)
    measurement = models.JSONField(default=dict, blank=True, help_text="Engine JSON contract")
    error_code = models.CharField(max_length=50, blank=True)
    error_message = models.TextField(blank=True)
    attempts = models.PositiveSmallIntegerField(default=0)
    queued_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    reviewer = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    reviewed_at = models.DateTimeField(null=True, blank=True)
    review_note = models.CharField(max_length=500, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["series", "algorithm_version", "source", "revision"],
                name="vbq_result_unique_per_series_version_source",
            ),
            models.CheckConstraint(
                condition=Q(vbq_all_levels__isnull=True) | Q(vbq_all_levels__gt=0),
                name="vbq_all_levels_positive",
            ),
            models.CheckConstraint(
                condition=Q(confidence__isnull=True) | Q(confidence__gte=0, confidence__lte=1),
                name="vbq_confidence_0_1",
            ),
        ]
        indexes = [models.Index(fields=["status", "queued_at"])]

    def __str__(self) -> str:
        return f"VbqResult {self.pk} {self.status}"


class VbqLevel(models.Model):
    """Per-level measurement of a VbqResult (L1..L5, S1 and the CSF ROI)."""

    result = models.ForeignKey(VbqResult, on_delete=models.CASCADE, related_name="levels")
    level = models.CharField(max_length=4)
    median_si = models.FloatField()
    pixel_count = models.PositiveIntegerField()
    centroid = models.JSONField(default=dict, blank=True)
    roi = models.JSONField(default=dict, blank=True)
    fractured = models.BooleanField(default=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["result", "level"], name="vbq_level_unique"),
            models.CheckConstraint(
                condition=Q(level__in=["L1", "L2", "L3", "L4", "L5", "S1", "csf"]),
                name="vbq_level_valid",
            ),
        ]

    def __str__(self) -> str:
        return f"VbqLevel {self.level} of {self.result_id}"
