from django.contrib import admin

from integrations.models import DicomExport, InboundMessage


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
        from integrations.dicom.export import dicom_export_resend

        for pk in queryset.values_list("pk", flat=True):
            dicom_export_resend(export_id=pk)
