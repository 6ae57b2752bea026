"""``VbqResult.qc_clear``: no QC flag of severity warning or refusal (``scoring.trust``). Stored
so the trust rule is one indexed-column test in the ORM and in the sweep's SQL. Existing rows
are computed from their flags."""

from django.db import migrations, models


def qc_clear(flags):
    """``scoring.trust.qc_clear`` as of this migration (frozen here)."""
    for flag in flags or ():
        if not isinstance(flag, dict):
            return False
        if flag.get("severity", "warning") != "info" and (
                flag.get("code", "") != "all-levels-fractured"):
            return False
    return True


def compute_qc_clear(apps, schema_editor):
    VbqResult = apps.get_model("scoring", "VbqResult")
    clear = [pk for pk, flags in VbqResult.objects.values_list("pk", "qc_flags").iterator(
        chunk_size=2000) if qc_clear(flags)]
    for start in range(0, len(clear), 5000):
        VbqResult.objects.filter(pk__in=clear[start:start + 5000]).update(qc_clear=True)


class Migration(migrations.Migration):

    dependencies = [
        ("scoring", "0003_h17b_assisted_source"),
    ]

    operations = [
        migrations.AddField(
            model_name="vbqresult",
            name="qc_clear",
            field=models.BooleanField(
                db_default=False, default=False,
                help_text="No QC flag of severity warning or refusal (scoring.trust.qc_clear): "
                          "with enough confidence an automatic result may move alerts without "
                          "review"),
        ),
        migrations.RunPython(compute_qc_clear, migrations.RunPython.noop),
    ]
