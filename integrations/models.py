"""Raw inbound payloads, kept before parsing so nothing received is ever lost."""

from django.db import models

from registry.models import Feed


class InboundMessage(models.Model):
    class Outcome(models.TextChoices):
        RECEIVED = "received", "Received"
        ACCEPTED = "accepted", "Accepted"
        PARTIAL = "partial", "Partially accepted"
        REJECTED = "rejected", "Rejected"

    feed = models.ForeignKey(Feed, null=True, blank=True, on_delete=models.SET_NULL)
    channel = models.CharField(max_length=30, help_text="fhir-rest | fhir-bulk | dicom | ...")
    received_at = models.DateTimeField(auto_now_add=True, db_index=True)
    content_type = models.CharField(max_length=100, blank=True)
    sha256 = models.CharField(max_length=64, db_index=True, help_text="of the bytes received")
    size_bytes = models.PositiveBigIntegerField()
    # The bytes exactly as received (compressed, UTF-16, with NULs: whatever was sent), so
    # that a refused payload is kept as faithfully as an accepted one.
    body = models.BinaryField()
    outcome = models.CharField(max_length=10, choices=Outcome.choices, default="received")
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    summary = models.JSONField(default=dict, blank=True)

    def __str__(self) -> str:
        return f"InboundMessage {self.pk} {self.outcome}"


class HeldResource(models.Model):
    """A resource that referenced a patient the registry did not know yet. Kept, not dropped,
    and applied when that Patient arrives (``integrations.fhir.ingest.release_held``), or
    parked with the reason when it then cannot be applied."""

    feed = models.ForeignKey(Feed, null=True, blank=True, on_delete=models.SET_NULL)
    reference_key = models.CharField(max_length=400, db_index=True)
    resource_type = models.CharField(max_length=40)
    resource = models.JSONField()
    received_at = models.DateTimeField(auto_now_add=True)
    applied_at = models.DateTimeField(null=True, blank=True)
    # Set when applying it failed (``error`` says why): not tried again by later deliveries
    # of the patient; clearing it (admin action) lets the next delivery try again.
    parked_at = models.DateTimeField(null=True, blank=True, db_index=True)
    error = models.CharField(max_length=500, blank=True)

    def __str__(self) -> str:
        return f"HeldResource {self.pk} {self.resource_type}"


class DicomExport(models.Model):
    """Outbox row: a VBQ result's SR and overlay SC to be stored in a PACS (STOW-RS).

    Written in the transaction that stores or accepts the result (``integrations.dicom.
    export``), sent by ``integrations.dicom_exports_send`` with retries. ``report`` is the
    snapshot the DICOM objects are built from, so every send of a row builds the same
    instances with the same UIDs; a result whose reported content changes gets a new row
    (``content_sha``) whose SR names the earlier one as its predecessor."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        SENDING = "sending", "Sending"
        SENT = "sent", "Sent"
        FAILED = "failed", "Failed (gave up)"

    result = models.ForeignKey("scoring.VbqResult", on_delete=models.CASCADE,
                               related_name="dicom_exports")
    endpoint_url = models.CharField(max_length=500, help_text="DICOMweb base URL of the PACS")
    content_sha = models.CharField(max_length=64)
    report = models.JSONField(help_text="integrations.dicom.vbq_sr.VbqReport as JSON")
    study_instance_uid = models.CharField(max_length=64)
    series_instance_uid = models.CharField(max_length=64, help_text="The source series")
    sr_series_instance_uid = models.CharField(max_length=64)
    sr_sop_instance_uid = models.CharField(max_length=64)
    sc_series_instance_uid = models.CharField(max_length=64)
    sc_sop_instance_uid = models.CharField(max_length=64)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveSmallIntegerField(default=0)
    next_attempt_at = models.DateTimeField()
    claimed_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["result", "endpoint_url", "content_sha"],
                                    name="dicom_export_unique_per_result_endpoint_content"),
        ]
        indexes = [models.Index(fields=["status", "next_attempt_at"])]

    def __str__(self) -> str:
        return f"DicomExport {self.pk} {self.status}"
