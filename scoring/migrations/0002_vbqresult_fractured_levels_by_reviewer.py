"""``VbqResult.fractured_levels_by_reviewer``: the reviewer's choice of fractured levels is
never recomputed (``scoring.fractured``). Existing results whose levels a reviewer chose are
marked: manual (corrected) results, and results named by a ``review_mark_fractured`` audit row.
"""

from django.db import migrations, models


def mark_reviewer_choices(apps, schema_editor):
    VbqResult = apps.get_model("scoring", "VbqResult")
    AuditEvent = apps.get_model("registry", "AuditEvent")
    VbqResult.objects.filter(source="manual").update(fractured_levels_by_reviewer=True)
    marked = {int(pk) for pk in AuditEvent.objects.filter(
        object_type="VbqResult", detail__review="fractured-levels").values_list(
        "object_id", flat=True) if pk.isdigit()}
    if marked:
        VbqResult.objects.filter(pk__in=marked).update(fractured_levels_by_reviewer=True)


class Migration(migrations.Migration):

    dependencies = [
        ("registry", "0004_birth_triggers_at_statement_end"),
        ("scoring", "0001_initial"),
    ]

    operations = [
        migrations.AddField(
            model_name="vbqresult",
            name="fractured_levels_by_reviewer",
            field=models.BooleanField(
                db_default=False, default=False,
                help_text="A reviewer chose the fractured levels: never recomputed "
                          "automatically (scoring.fractured)"),
        ),
        migrations.RunPython(mark_reviewer_choices, migrations.RunPython.noop),
    ]
