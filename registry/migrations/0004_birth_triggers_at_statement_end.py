"""The birth-date triggers of 0002 fire at the END of the statement (PostgreSQL).

0002's row-level BEFORE triggers look the patient up while the statement is still running: a
patient inserted by a sibling data-modifying CTE of the same statement (the FHIR bundle fast
path inserts new patients with their clinical rows) is not visible yet, so the check was
silently skipped for new patients. AFTER triggers fire when the whole statement is done, and
then see every row it wrote (PostgreSQL guarantees it); they are not deferred, so the error
still comes from the offending statement (a savepoint or a test's transaction sees it).

- procedure / fracture / therapy: one statement-level AFTER INSERT and one AFTER UPDATE trigger
  each, over the statement's transition table (``new_rows``): one query per statement, a
  primary-key probe of the patient per row (cheaper than a PL/pgSQL call per row);
- patient: a statement-level AFTER INSERT trigger (a patient inserted AFTER its clinical rows,
  in a later statement of the transaction: its uuid is chosen by the client) and 0002's
  function as a row-level AFTER UPDATE OF birth_date trigger.

Same errors as 0002: SQLSTATE 23514 (check_violation, Django's ``IntegrityError``), same
messages. SQLite: nothing changes (its statements write one table; 0002's triggers hold).
"""

from django.db import migrations

EVENTS = [
    ("registry_procedure", "performed_on"),
    ("registry_fracture", "diagnosed_on"),
    ("registry_therapyexposure", "start_on"),
]

EVENT_FUNCTION = """
CREATE OR REPLACE FUNCTION {table}_not_before_birth() RETURNS trigger AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM new_rows e WHERE e.{column} <
             (SELECT p.birth_date FROM registry_patient p WHERE p.id = e.patient_id)) THEN
    RAISE EXCEPTION 'registry: {column} on {table} is before the patient''s birth date'
      USING ERRCODE = '23514';
  END IF;
  RETURN NULL;
END $$ LANGUAGE plpgsql;
"""

NEW_PATIENTS_FUNCTION = """
CREATE OR REPLACE FUNCTION registry_new_patients_not_after_events() RETURNS trigger AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM new_rows p WHERE p.birth_date IS NOT NULL AND (
      EXISTS (SELECT 1 FROM registry_procedure
              WHERE patient_id = p.id AND performed_on < p.birth_date)
   OR EXISTS (SELECT 1 FROM registry_fracture
              WHERE patient_id = p.id AND diagnosed_on < p.birth_date)
   OR EXISTS (SELECT 1 FROM registry_therapyexposure
              WHERE patient_id = p.id AND start_on < p.birth_date))) THEN
    RAISE EXCEPTION 'registry: birth date is after recorded clinical events'
      USING ERRCODE = '23514';
  END IF;
  RETURN NULL;
END $$ LANGUAGE plpgsql;
"""

PATIENT_UPDATE = "registry_patient_birth_not_after_events"
PATIENT_INSERT = "registry_patient_new_not_after_events"


def _run(schema_editor, sql: str) -> None:
    """Raw: the function bodies hold '%' literals (RAISE formats), which a Django cursor with
    no params leaves alone but ``schema_editor.execute`` may not."""
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(sql)


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for table, column in EVENTS:
        _run(schema_editor, f"DROP TRIGGER IF EXISTS {table}_not_before_birth ON {table}")
        _run(schema_editor, EVENT_FUNCTION.format(table=table, column=column))
        for op in ("INSERT", "UPDATE"):
            _run(schema_editor,
                 f"CREATE TRIGGER {table}_not_before_birth_{op.lower()} AFTER {op} ON {table} "
                 "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT "
                 f"EXECUTE FUNCTION {table}_not_before_birth()")
    _run(schema_editor, "DROP FUNCTION IF EXISTS registry_event_not_before_birth()")
    _run(schema_editor, NEW_PATIENTS_FUNCTION)
    _run(schema_editor,
         f"CREATE TRIGGER {PATIENT_INSERT} AFTER INSERT ON registry_patient "
         "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT "
         "EXECUTE FUNCTION registry_new_patients_not_after_events()")
    _run(schema_editor, f"DROP TRIGGER IF EXISTS {PATIENT_UPDATE} ON registry_patient")
    _run(schema_editor,
         f"CREATE TRIGGER {PATIENT_UPDATE} AFTER UPDATE OF birth_date ON registry_patient "
         "FOR EACH ROW EXECUTE FUNCTION registry_birth_not_after_events()")


def backwards(apps, schema_editor):
    """Back to 0002's row-level BEFORE triggers (and its functions)."""
    if schema_editor.connection.vendor != "postgresql":
        return
    from importlib import import_module

    m0002 = import_module("registry.migrations.0002_event_not_before_birth_triggers")
    _run(schema_editor, m0002.PG_FUNCTION)  # CREATE OR REPLACE of both 0002 functions
    for table, column in EVENTS:
        for op in ("insert", "update"):
            _run(schema_editor, f"DROP TRIGGER IF EXISTS {table}_not_before_birth_{op} ON {table}")
        _run(schema_editor, f"DROP FUNCTION IF EXISTS {table}_not_before_birth()")
        _run(schema_editor,
             f"CREATE TRIGGER {table}_not_before_birth BEFORE INSERT OR UPDATE ON {table} "
             f"FOR EACH ROW EXECUTE FUNCTION registry_event_not_before_birth('{column}')")
    _run(schema_editor, f"DROP TRIGGER IF EXISTS {PATIENT_INSERT} ON registry_patient")
    _run(schema_editor, "DROP FUNCTION IF EXISTS registry_new_patients_not_after_events()")
    _run(schema_editor, f"DROP TRIGGER IF EXISTS {PATIENT_UPDATE} ON registry_patient")
    _run(schema_editor,
         f"CREATE TRIGGER {PATIENT_UPDATE} BEFORE UPDATE OF birth_date ON registry_patient "
         "FOR EACH ROW EXECUTE FUNCTION registry_birth_not_after_events()")


class Migration(migrations.Migration):
    dependencies = [("registry", "0003_followup_outbox")]
    operations = [migrations.RunPython(forwards, backwards, elidable=False)]
