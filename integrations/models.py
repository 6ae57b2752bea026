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
