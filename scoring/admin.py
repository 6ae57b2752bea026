from django.contrib import admin

from scoring.models import ImagingSeries, ImagingStudy, VbqLevel, VbqResult


@admin.register(ImagingStudy)
class ImagingStudyAdmin(admin.ModelAdmin):
    list_display = ("id", "patient_id", "modality", "started_on", "source", "linked_procedure")
    list_filter = ("source", "modality")
    raw_id_fields = ("patient", "linked_procedure")


@admin.register(ImagingSeries)
class ImagingSeriesAdmin(admin.ModelAdmin):
    list_display = ("id", "study_id", "modality", "orientation", "instance_count")
    raw_id_fields = ("study",)


class VbqLevelInline(admin.TabularInline):
    model = VbqLevel
    extra = 0


@admin.register(VbqResult)
class VbqResultAdmin(admin.ModelAdmin):
    list_display = (
        "id", "patient_id", "source", "status", "review_status", "vbq_all_levels",
        "vbq_excluding_fractured", "algorithm_version", "queued_at", "finished_at",
    )
    list_filter = ("status", "review_status", "source", "algorithm_version")
    raw_id_fields = ("series", "patient", "reviewer")
    inlines = [VbqLevelInline]
