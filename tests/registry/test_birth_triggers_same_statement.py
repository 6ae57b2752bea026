"""The database refuses a clinical event dated before the birth date of a patient written in the
SAME statement or transaction (registry/migrations/0004): the FHIR bundle fast path inserts new
patients with their clinical rows in one data-modifying CTE, which the row-level BEFORE
triggers of 0002 could not see. The Python validation is bypassed where it would answer first:
these tests are about the database's own check (PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path

import pytest
from django.db import IntegrityError, connection, transaction

from registry import codes
from registry.feeds import feed_create
from registry.models import AuditEvent, Fracture, Patient, PatientIdentifier, Procedure
from registry.services import Identifier
from registry.services_bulk import patient_upsert_many, sourced_record_many
from tests.factories import MRN_SYSTEM, PatientFactory

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]

BORN = dt.date(1950, 1, 1)
FHIR_FIXTURES = Path(__file__).parent.parent / "integrations" / "fhir" / "fixtures"

PATIENT_SQL = (
    "INSERT INTO registry_patient (id, family_name, given_name, birth_date, sex, care_team, "
    "is_synthetic, created_at, updated_at) "
    "VALUES (%s, 'SYNTHETIC', 'Trig', %s, 'female', '', true, now(), now())")
PROCEDURE_SQL = (
    "INSERT INTO registry_procedure (identifier_system, identifier_value, record_status, "
    "created_at, updated_at, kind, code_system, code, code_display, performed_at, "
    "performed_on, levels, patient_id) VALUES ('https://ehr.example.org/procedure', %s, "
    "'active', now(), now(), 'vertebroplasty', 'x', '22511', '', now(), %s, '[]', %s)")


def _one_statement(patient_id: uuid.UUID, performed_on: dt.date) -> None:
    """One statement: a new patient born ``BORN`` and a procedure of theirs, each a
    data-modifying CTE. The patient's CTE is not read by the main query, so PostgreSQL runs it
    after the procedure's, as in the bundle fast path (``sourced_record_many(extra=...)``)."""
    with connection.cursor() as cursor:
        cursor.execute(f"WITH procedure AS ({PROCEDURE_SQL} RETURNING id), "  # noqa: S608
                       f"patient AS ({PATIENT_SQL}) SELECT id FROM procedure",
                       ["SYN-TRIG-1", performed_on, patient_id, patient_id, BORN])


def test_a_new_patient_and_a_procedure_before_their_birth_in_one_statement_are_refused():
    patient_id = uuid.uuid4()
    with pytest.raises(IntegrityError, match="before the patient's birth date"), \
            transaction.atomic():
        _one_statement(patient_id, BORN - dt.timedelta(days=1))
    assert not Patient.objects.filter(pk=patient_id).exists()
    assert not Procedure.objects.filter(patient_id=patient_id).exists()


def test_a_new_patient_and_a_procedure_on_their_birth_date_in_one_statement_are_written():
    patient_id = uuid.uuid4()
    _one_statement(patient_id, BORN)
    assert Procedure.objects.get(patient_id=patient_id).performed_on == BORN


def test_a_patient_inserted_after_their_earlier_procedure_is_refused():
    """The other order, in one transaction: the patient's uuid is chosen by the client, so the
    procedure can be written (foreign key checked at commit) before the patient."""
    patient_id = uuid.uuid4()

    def procedure_then_patient() -> None:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(PROCEDURE_SQL, ["SYN-TRIG-2", BORN - dt.timedelta(days=1), patient_id])
            cursor.execute(PATIENT_SQL, [patient_id, BORN])

    with pytest.raises(IntegrityError, match="birth date is after recorded clinical events"):
        procedure_then_patient()
    assert not Procedure.objects.filter(patient_id=patient_id).exists()


def test_a_birth_date_moved_after_a_fracture_of_the_same_statement_is_refused():
    patient = PatientFactory(birth_date=BORN)
    with pytest.raises(IntegrityError), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            "WITH moved AS (UPDATE registry_patient SET birth_date = %s WHERE id = %s) "
            "INSERT INTO registry_fracture (identifier_system, identifier_value, record_status, "
            "created_at, updated_at, site, vertebral_level, code_system, code, code_display, "
            "diagnosed_at, diagnosed_on, patient_id) VALUES ('https://ehr.example.org/c', "
            "'SYN-TRIG-3', 'active', now(), now(), 'hip', '', 'x', 'S72.001A', '', now(), %s, %s)",
            [dt.date(1960, 1, 1), patient.pk, dt.date(1955, 1, 1), patient.pk])
    patient.refresh_from_db()
    assert patient.birth_date == BORN
    assert not Fracture.objects.filter(patient=patient).exists()


def _skip_python_birth_check(monkeypatch) -> None:
    """What a bug in (or a future path around) the services' validation would do."""
    monkeypatch.setattr("registry.services._check_after_birth", lambda *args: None)


def test_the_bulk_services_new_patient_statement_is_refused_by_the_database(monkeypatch):
    """``patient_upsert_many(deferred=...)`` + ``sourced_record_many(extra=...)``: the new
    patient and their procedures in ONE statement, as the FHIR bundle fast path does."""
    _skip_python_birth_check(monkeypatch)

    def bundle_write() -> None:
        deferred = []
        with transaction.atomic():
            [(patient, created)] = patient_upsert_many(items=[{
                "identifiers": [Identifier(MRN_SYSTEM, "SYN-TRIG-BULK")], "birth_date": BORN,
                "sex": "female", "family_name": "SYNTHETIC", "is_synthetic": True}],
                deferred=deferred)
            assert created
            assert len(deferred) == 1  # the patient's INSERT joins the next statement
            items = [{"patient": patient, "code_system": codes.CPT, "code": "22511",
                      "identifier": Identifier("https://ehr.example.org/p", value),
                      "performed_at": dt.datetime(year, 6, 1, 10, tzinfo=dt.UTC)}
                     for value, year in (("SYN-TRIG-P1", 2020), ("SYN-TRIG-P2", 1949))]
            sourced_record_many(groups={"procedure": items}, extra={"patients": deferred[0]})

    with pytest.raises(IntegrityError, match="before the patient's birth date"):
        bundle_write()
    assert not PatientIdentifier.objects.filter(value="SYN-TRIG-BULK").exists()
    assert not Procedure.objects.filter(identifier_value__startswith="SYN-TRIG-P").exists()


def test_a_fhir_transaction_bundle_refused_by_the_database_gets_an_operation_outcome(
    client, monkeypatch
):
    """The trigger's error (SQLSTATE 23514, an IntegrityError) maps to an OperationOutcome,
    not a 500, and nothing of the bundle is written."""
    _skip_python_birth_check(monkeypatch)
    token = feed_create(name="trigger-ehr")[1]
    bundle = json.loads((FHIR_FIXTURES / "transaction-hl7-example-shapes.json").read_text())
    procedure = bundle["entry"][1]["resource"]
    assert procedure["resourceType"] == "Procedure"
    procedure["performedDateTime"] = "1930-01-01T10:00:00Z"  # the patient was born in 1944
    response = client.post("/fhir", data=json.dumps(bundle), content_type="application/fhir+json",
                           HTTP_AUTHORIZATION=f"Bearer {token}")
    body = response.json()
    assert response.status_code == 422, body  # business-rule, not retried into a 409
    assert body["resourceType"] == "OperationOutcome"
    assert Patient.objects.count() == 0
    assert Procedure.objects.count() == 0
    assert AuditEvent.objects.filter(via="fhir").count() == 0
