"""A write that a database rule refuses (SQLSTATE 23514: the registry's birth-date triggers, or
a CHECK constraint) answers 422 ``business-rule`` with the rule's own message, on every FHIR
path, with nothing written and no retry; a plain concurrent-writer conflict stays 409. The
Python validation that would answer first is switched off: these tests are about the
database's own rules (PostgreSQL). SYNTHETIC data only."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from registry.feeds import feed_create
from registry.models import Patient, Procedure

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]

FIXTURE = Path(__file__).parent / "fixtures" / "transaction-hl7-example-shapes.json"
MRN = {"system": "https://vbq-registry.example.org/fhir/sid/synthetic-mrn",
       "value": "SYN-HL7-0001"}


@pytest.fixture
def fhir(client, monkeypatch):
    monkeypatch.setattr("registry.services._check_after_birth", lambda *args: None)
    token = feed_create(name="rule-ehr")[1]

    def post(path: str, body: dict):
        return client.post(path, data=json.dumps(body), content_type="application/fhir+json",
                           HTTP_AUTHORIZATION=f"Bearer {token}")
    return post


def _bundle(kind: str, performed: str) -> dict:
    bundle = json.loads(FIXTURE.read_text())
    bundle["type"] = kind
    entries = bundle["entry"][:2]  # the Patient (born 1944-12-25) and a Procedure
    entries[1]["resource"]["performedDateTime"] = performed
    bundle["entry"] = entries
    return bundle


def _assert_refused_by_the_birth_rule(issue: dict) -> None:
    assert issue["code"] == "business-rule"
    assert "before the patient's birth date" in issue["diagnostics"]
    assert "1930" not in issue["diagnostics"]  # the rule's message, not the row's values


def test_a_transaction_bundle_refused_by_a_database_rule_is_422_not_retried(fhir, caplog):
    response = fhir("/fhir", _bundle("transaction", "1930-01-01T10:00:00Z"))
    assert response.status_code == 422, response.content
    _assert_refused_by_the_birth_rule(response.json()["issue"][0])
    assert not Patient.objects.exists()
    assert not Procedure.objects.exists()
    assert "transaction bundle retry" not in caplog.text  # the same data fails the same way


def test_a_batch_entry_refused_by_a_database_rule_is_422_and_the_others_are_written(fhir):
    bundle = _bundle("batch", "2024-02-05T10:00:00Z")
    bundle["entry"][1]["resource"]["subject"] = {"identifier": MRN}
    late = copy.deepcopy(bundle["entry"][1])
    late.pop("fullUrl", None)  # (a bundle's fullUrls are unique)
    late["resource"]["identifier"][0]["value"] = "SYN-HL7-PROC-EARLY"
    late["resource"]["performedDateTime"] = "1930-01-01T10:00:00Z"
    bundle["entry"].append(late)
    response = fhir("/fhir", bundle)
    assert response.status_code == 200, response.content
    statuses = [e["response"]["status"] for e in response.json()["entry"]]
    assert [s.split()[0] for s in statuses] == ["201", "201", "422"], statuses
    issue = response.json()["entry"][2]["response"]["outcome"]["issue"][0]
    _assert_refused_by_the_birth_rule(issue)
    assert issue["expression"][0].startswith("Bundle.entry[2]")
    assert list(Procedure.objects.values_list("identifier_value", flat=True)) == [
        "SYN-HL7-PROC-1"]


def test_a_single_resource_refused_by_a_database_rule_is_422_not_500(fhir):
    assert fhir("/fhir", _bundle("transaction", "2024-02-05T10:00:00Z")).status_code == 200
    procedure = _bundle("transaction", "1930-01-01T10:00:00Z")["entry"][1]["resource"]
    procedure["identifier"][0]["value"] = "SYN-HL7-PROC-EARLY"
    procedure["subject"] = {"identifier": MRN}
    response = fhir("/fhir/Procedure", procedure)
    assert response.status_code == 422, response.content
    _assert_refused_by_the_birth_rule(response.json()["issue"][0])
    assert list(Procedure.objects.values_list("identifier_value", flat=True)) == [
        "SYN-HL7-PROC-1"]


def test_an_integrity_error_that_is_not_a_rule_stays_a_conflict():
    from django.db import IntegrityError, connection, transaction

    from integrations.fhir.errors import rule_violation

    with connection.cursor() as cursor:
        cursor.execute("CREATE TEMP TABLE vbq_t (id int PRIMARY KEY)")
        with pytest.raises(IntegrityError) as caught, transaction.atomic():
            cursor.execute("INSERT INTO vbq_t VALUES (1), (1)")
    assert rule_violation(caught.value) is None  # unique violation (23505): the caller's 409
