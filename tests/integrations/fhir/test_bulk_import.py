"""`manage.py fhir_import` streams NDJSON through the same mappers, idempotently."""

import json
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from registry.models import Patient, Procedure

FIXTURES = Path(__file__).parent / "fixtures"
pytestmark = pytest.mark.django_db


def _write_ndjson(folder: Path) -> None:
    bundles = json.loads((FIXTURES / "demo-cohort-bundles.json").read_text())[:10]
    by_type: dict[str, list[str]] = {}
    for bundle in bundles:
        for entry in bundle["entry"]:
            resource = dict(entry["resource"])
            if resource["resourceType"] != "Patient":  # bulk files reference Patient/<id>
                patient_id = bundle["entry"][0]["resource"]["id"]
                resource["subject"] = {"reference": f"Patient/{patient_id}"}
            by_type.setdefault(resource["resourceType"], []).append(json.dumps(resource))
    for resource_type, lines in by_type.items():
        (folder / f"{resource_type}.ndjson").write_text("\n".join(lines) + "\n")
    (folder / "Condition.ndjson").open("a").write("{broken json\n")


def test_bulk_import_loads_a_folder_and_a_rerun_duplicates_nothing(tmp_path):
    _write_ndjson(tmp_path)
    out = StringIO()
    # The broken line is reported and the command exits non-zero, after importing the rest.
    with pytest.raises(CommandError, match="1 line"):
        call_command("fhir_import", str(tmp_path), verbosity=0, stdout=out, stderr=StringIO())
    with pytest.raises(CommandError, match="1 line"):
        call_command("fhir_import", str(tmp_path), verbosity=0, stdout=StringIO(),
                     stderr=StringIO())
    assert Patient.objects.count() == 10
    assert Procedure.objects.count() == 10
    assert "400: 1" in out.getvalue()


def test_bulk_import_refuses_a_missing_path(tmp_path):
    with pytest.raises(CommandError, match="does not exist"):
        call_command("fhir_import", str(tmp_path / "nope"))


@pytest.mark.postgres
def test_a_line_refused_by_a_database_rule_is_reported_and_the_import_goes_on(
    tmp_path, monkeypatch
):
    """A line the database refuses (here the birth-date trigger, the Python check switched
    off) is counted 422 with the rule's message; the lines after it are still imported."""
    monkeypatch.setattr("registry.services._check_after_birth", lambda *args: None)
    _write_ndjson(tmp_path)
    procedures = (tmp_path / "Procedure.ndjson").read_text().splitlines()
    early = json.loads(procedures[0])
    early["identifier"] = [{"system": "urn:syn-bulk", "value": "SYN-EARLY"}]
    early["performedDateTime"] = "1900-01-01T10:00:00Z"
    (tmp_path / "Procedure.ndjson").write_text("\n".join([json.dumps(early), *procedures]) + "\n")
    out, err = StringIO(), StringIO()
    with pytest.raises(CommandError, match="2 line"):  # this one and the broken JSON line
        call_command("fhir_import", str(tmp_path), verbosity=0, stdout=out, stderr=err)
    assert "422: 1" in out.getvalue()
    assert "before the patient's birth date" in err.getvalue()
    assert Procedure.objects.count() == 10  # every other procedure, none dated 1900
    assert not Procedure.objects.filter(identifier_value="SYN-EARLY").exists()
