from django.contrib import admin

from integrations.models import InboundMessage


@admin.register(InboundMessage)
class InboundMessageAdmin(admin.ModelAdmin):
    list_display = ("id", "channel", "feed", "received_at", "size_bytes", "outcome", "status_code")
    list_filter = ("channel", "outcome")
    exclude = ("body",)  # raw payloads hold PHI: not shown in the admin list or form
