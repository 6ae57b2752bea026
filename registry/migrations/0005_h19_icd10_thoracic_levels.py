"""Re-read the vertebral level of fractures coded S22.0- (ICD-10-CM thoracic vertebra).

Until issue 19 the code's level was read as S22.02 T3, S22.03 T5, S22.04 T7, S22.05 T9,
S22.06 T11 (the classification has S22.02 T2, S22.03 T3, S22.04 T4, S22.05 T5–T6, S22.06
T7–T8, S22.07 T9–T10, S22.08 T11–T12) and overrode the body site. Single-level codes get
their level; for a pair of vertebrae a stored level that is one of the pair came from the
body site and is kept, any other becomes unknown (""). Thoracic levels never enter the VBQ
(L1–L4), so no stored VBQ changes; index / secondary classification is computed on read.
"""

from django.db import migrations

from registry.codes import ICD10CM, fracture_levels_from_code


def forwards(apps, schema_editor):
    Fracture = apps.get_model("registry", "Fracture")
    for fracture in Fracture.objects.filter(code_system=ICD10CM, site="vertebral",
                                            code__istartswith="S22").iterator():
        allowed = fracture_levels_from_code(ICD10CM, fracture.code)
        if not allowed:
            continue
        if len(allowed) == 1:
            level = allowed[0]
        else:
            level = fracture.vertebral_level if fracture.vertebral_level in allowed else ""
        if level != fracture.vertebral_level:
            Fracture.objects.filter(pk=fracture.pk).update(vertebral_level=level)


class Migration(migrations.Migration):
    dependencies = [("registry", "0004_birth_triggers_at_statement_end")]
    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]
