from django.contrib import admin

from integrations.dicom.export import dicom_export_resend
from integrations.models import DicomExport, HeldResource, InboundMessage


@admin.register(InboundMessage)
class InboundMessageAdmin(admin.ModelAdmin):
    list_display = ("id", "channel", "feed", "received_at", "size_bytes", "outcome", "status_code")
    list_filter = ("channel", "outcome")
    exclude = ("body",)  # raw payloads hold PHI: not shown in the admin list or form


@admin.register(DicomExport)
class DicomExportAdmin(admin.ModelAdmin):
    """The PACS export outbox: status, attempts and the last error of each SR/SC send."""

    list_display = ("id", "result", "status", "attempts", "next_attempt_at", "sent_at",
                    "last_error")
    list_filter = ("status",)
    readonly_fields = [f.name for f in DicomExport._meta.fields if f.name != "report"]
    exclude = ("report",)  # the snapshot carries the reviewer's name; ids are enough here
    actions = ["send_again"]

    @admin.action(description="Send again (same UIDs: the PACS keeps one copy)")
    def send_again(self, request, queryset) -> None:  # type: ignore[no-untyped-def]
        for pk in queryset.values_list("pk", flat=True):
            dicom_export_resend(export_id=pk)
@admin.register(HeldResource)
class HeldResourceAdmin(admin.ModelAdmin):
    """Resources waiting for their patient, and those PARKED because applying them failed
    (``error`` says why): an admin fixes the cause and retries them (the next delivery of
    that patient applies them)."""

    list_display = ("id", "resource_type", "feed", "received_at", "applied_at", "parked_at",
                    "error")
    list_filter = ("resource_type", ("parked_at", admin.EmptyFieldListFilter),
                   ("applied_at", admin.EmptyFieldListFilter))
    exclude = ("resource",)  # the resource holds PHI: not shown
    readonly_fields = ("feed", "reference_key", "resource_type", "received_at", "applied_at",
                       "parked_at", "error")
    actions = ("retry",)

    @admin.action(description="Retry at the next delivery of the patient (un-park)")
    def retry(self, request, queryset):  # type: ignore[no-untyped-def]
        count = queryset.filter(applied_at__isnull=True).update(parked_at=None)
        self.message_user(request, f"{count} held resource(s) will be tried again")
