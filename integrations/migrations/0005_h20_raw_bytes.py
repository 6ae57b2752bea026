"""InboundMessage.body holds the payload's bytes as received (``bytea``), not text:
PostgreSQL's text cannot hold a NUL, and a gzip or UTF-16 body is not text at all, so such a
payload was not stored. Rows already stored are converted losslessly (their text, UTF-8).
The column keeps lz4 compression where 0003 set it (re-applied: a type change rewrites it).
HeldResource.parked_at: a held resource that cannot be applied is parked with its reason."""

from django.db import migrations, models

TABLE = "integrations_inboundmessage"


def to_bytes(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(
            f"ALTER TABLE {TABLE} ALTER COLUMN body TYPE bytea "
            "USING convert_to(body, 'UTF8')")
        schema_editor.execute(
            "DO $$ BEGIN "
            f"ALTER TABLE {TABLE} ALTER COLUMN body SET COMPRESSION lz4; "
            "EXCEPTION WHEN feature_not_supported THEN NULL; END $$")
        return
    model = apps.get_model("integrations", "InboundMessage")
    old = models.TextField()
    old.set_attributes_from_name("body")
    new = models.BinaryField()
    new.set_attributes_from_name("body")
    schema_editor.alter_field(model, old, new)


def to_text(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(
            f"ALTER TABLE {TABLE} ALTER COLUMN body TYPE text "
            "USING convert_from(body, 'UTF8')")
        return
    model = apps.get_model("integrations", "InboundMessage")
    old = models.BinaryField()
    old.set_attributes_from_name("body")
    new = models.TextField()
    new.set_attributes_from_name("body")
    schema_editor.alter_field(model, old, new)


class Migration(migrations.Migration):

    dependencies = [
        ("integrations", "0004_h22_dicom_export"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[migrations.RunPython(to_bytes, to_text)],
            state_operations=[
                migrations.AlterField(
                    model_name="inboundmessage",
                    name="body",
                    field=models.BinaryField(),
                ),
            ],
        ),
        migrations.AlterField(
            model_name="inboundmessage",
            name="sha256",
            field=models.CharField(db_index=True, help_text="of the bytes received",
                                   max_length=64),
        ),
        migrations.AddField(
            model_name="heldresource",
            name="parked_at",
            field=models.DateTimeField(blank=True, db_index=True, null=True),
        ),
    ]
