"""Database triggers for a rule that spans tables: no clinical event before the birth date.

CheckConstraints cannot look at another table, so PostgreSQL and SQLite each get a trigger on
procedure / fracture / therapy rows (and one on the patient for a changed birth date).
"""

from django.db import migrations

EVENTS = [
    ("registry_procedure", "performed_on"),
    ("registry_fracture", "diagnosed_on"),
    ("registry_therapyexposure", "start_on"),
]

PG_FUNCTION = """
CREATE OR REPLACE FUNCTION registry_event_not_before_birth() RETURNS trigger AS $$
DECLARE born date;
BEGIN
  SELECT birth_date INTO born FROM registry_patient WHERE id = NEW.patient_id;
  IF born IS NOT NULL AND (to_jsonb(NEW) ->> TG_ARGV[0])::date < born THEN
    RAISE EXCEPTION 'registry: % on % is before the patient''s birth date', TG_ARGV[0], TG_TABLE_NAME
      USING ERRCODE = '23514';
  END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE OR REPLACE FUNCTION registry_birth_not_after_events() RETURNS trigger AS $$
BEGIN
  IF NEW.birth_date IS NOT NULL AND (
      EXISTS (SELECT 1 FROM registry_procedure WHERE patient_id = NEW.id AND performed_on < NEW.birth_date)
   OR EXISTS (SELECT 1 FROM registry_fracture WHERE patient_id = NEW.id AND diagnosed_on < NEW.birth_date)
   OR EXISTS (SELECT 1 FROM registry_therapyexposure WHERE patient_id = NEW.id AND start_on < NEW.birth_date)) THEN
    RAISE EXCEPTION 'registry: birth date is after recorded clinical events' USING ERRCODE = '23514';
  END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql;
"""


def forwards(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        with schema_editor.connection.cursor() as cursor:  # raw: the SQL holds '%' literals
            cursor.execute(PG_FUNCTION)
        for table, column in EVENTS:
            schema_editor.execute(
                f"CREATE TRIGGER {table}_not_before_birth BEFORE INSERT OR UPDATE ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION registry_event_not_before_birth('{column}')"
            )
        schema_editor.execute(
            "CREATE TRIGGER registry_patient_birth_not_after_events BEFORE UPDATE OF birth_date "
            "ON registry_patient FOR EACH ROW EXECUTE FUNCTION registry_birth_not_after_events()"
        )
    elif vendor == "sqlite":
        for table, column in EVENTS:
            for op in ("INSERT", "UPDATE"):
                schema_editor.execute(
                    f"CREATE TRIGGER {table}_not_before_birth_{op.lower()} BEFORE {op} ON {table} "
                    f"FOR EACH ROW WHEN (SELECT birth_date FROM registry_patient "
                    f"WHERE id = NEW.patient_id) > NEW.{column} "
                    f"BEGIN SELECT RAISE(ABORT, 'registry: {column} is before the patient''s "
                    f"birth date'); END"
                )


def backwards(apps, schema_editor):
    vendor = schema_editor.connection.vendor
    for table, _column in EVENTS:
        if vendor == "postgresql":
            schema_editor.execute(f"DROP TRIGGER IF EXISTS {table}_not_before_birth ON {table}")
        elif vendor == "sqlite":
            for op in ("insert", "update"):
                schema_editor.execute(f"DROP TRIGGER IF EXISTS {table}_not_before_birth_{op}")
    if vendor == "postgresql":
        schema_editor.execute(
            "DROP TRIGGER IF EXISTS registry_patient_birth_not_after_events ON registry_patient"
        )
        schema_editor.execute("DROP FUNCTION IF EXISTS registry_event_not_before_birth()")
        schema_editor.execute("DROP FUNCTION IF EXISTS registry_birth_not_after_events()")


class Migration(migrations.Migration):
    dependencies = [("registry", "0001_initial")]
    operations = [migrations.RunPython(forwards, backwards, elidable=False)]
