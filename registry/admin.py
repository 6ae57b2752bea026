"""Admin: read-mostly views of the registry for administrators."""

from django.contrib import admin

from registry.models import (
    Alert,
    AuditEvent,
    Feed,
    Fracture,
    Patient,
    PatientIdentifier,
    Procedure,
    TherapyExposure,
)


class IdentifierInline(admin.TabularInline):
    model = PatientIdentifier
    extra = 0


@admin.register(Patient)
class PatientAdmin(admin.ModelAdmin):
    list_display = ("id", "sex", "birth_date", "care_team", "is_synthetic", "created_at")
    list_filter = ("sex", "is_synthetic", "care_team")
    search_fields = ("identifiers__value",)
    inlines = [IdentifierInline]
    list_per_page = 100


@admin.register(Procedure)
class ProcedureAdmin(admin.ModelAdmin):
    list_display = ("id", "patient_id", "kind", "code", "performed_on", "record_status")
    list_filter = ("kind", "record_status")
    raw_id_fields = ("patient",)


@admin.register(Fracture)
class FractureAdmin(admin.ModelAdmin):
    list_display = ("id", "patient_id", "site", "vertebral_level", "diagnosed_on")
    list_filter = ("site", "record_status")
    raw_id_fields = ("patient",)


@admin.register(TherapyExposure)
class TherapyExposureAdmin(admin.ModelAdmin):
    list_display = ("id", "patient_id", "agent", "kind", "status", "start_on", "end_on")
    list_filter = ("agent", "kind", "status")
    raw_id_fields = ("patient",)


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin):
    list_display = ("id", "patient_id", "rule_id", "status", "opened_at", "due_on")
    list_filter = ("rule_id", "status")
    raw_id_fields = ("patient", "assignee")


@admin.register(Feed)
class FeedAdmin(admin.ModelAdmin):
    list_display = ("name", "token_prefix", "is_active", "last_used_at", "token_rotated_at")
    readonly_fields = ("token_hash", "token_prefix", "last_used_at", "token_rotated_at")


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    list_display = ("at", "action", "object_type", "object_id", "patient_id", "actor", "via")
    list_filter = ("action", "object_type", "via")
    date_hierarchy = "at"

    def has_change_permission(self, request, obj=None) -> bool:  # append-only
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def has_add_permission(self, request) -> bool:
        return False
