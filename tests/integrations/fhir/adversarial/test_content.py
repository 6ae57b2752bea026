"""Adversarial FHIR content in transaction bundles: forbidden characters, unicode tricks,
strings longer than their columns, numbers out of range, extreme dates and time zones, ids,
contained resources, gender codes. A refused bundle writes NOTHING (its Patient neither);
an accepted one exactly its rows (SYNTHETIC data)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from registry.models import Patient, PatientIdentifier
from tests.integrations.fhir.adversarial.helpers import (
    MRN,
    assert_refused,
    bundle,
    condition,
    counts,
    delta,
    imaging,
    medication,
    patient,
    procedure,
)

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]

NEXT_YEAR = dt.date.today().year + 1


def _with(resource: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``resource`` with the element at dotted ``path`` (list indexes as numbers) set."""
    node: Any = resource
    parts = path.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node[part]
    last = parts[-1]
    if last.isdigit():
        node[int(last)] = value
    else:
        node[last] = value
    return resource


def _p(path: str, value: Any) -> dict[str, Any]:
    return _with(patient(), path, value)


def _proc(path: str, value: Any) -> dict[str, Any]:
    return _with(procedure(), path, value)


def _img(path: str, value: Any) -> dict[str, Any]:
    return _with(imaging(), path, value)


def _med(path: str, value: Any) -> dict[str, Any]:
    return _with(medication(), path, value)


LONG = "x" * 256

# (id, the second entry (None: the Patient alone, changed), the Patient, status, expression)
REFUSED: list[tuple[str, dict[str, Any] | None, dict[str, Any], int, str]] = [
    # characters FHIR forbids (PostgreSQL refuses NUL too)
    ("nul-family", None, _p("name.0.family", "SYN\u0000THETIC"), 400, "name[0].family"),
    ("nul-identifier-value", None, _p("identifier.0.value", "SYN\u0000"), 400,
     "identifier[0].value"),
    ("nul-identifier-system", None, _p("identifier.0.system", MRN + "\u0000"), 400,
     "identifier[0].system"),
    ("soh-given", None, _p("name.0.given", ["A\u0001"]), 400, "name[0].given[0]"),
    ("backspace-escape", None, _p("name.0.family", "SYN\bTHETIC"), 400, "family"),
    ("formfeed-escape", None, _p("name.0.family", "SYN\fTHETIC"), 400, "family"),
    ("unit-separator", None, _p("name.0.family", "SYN\u001f"), 400, "family"),
    ("escape-char", None, _p("name.0.family", "\u001b[31mSYN"), 400, "family"),
    ("vertical-tab", None, _p("name.0.family", "SYN\u000bTHETIC"), 400, "family"),
    ("lone-high-surrogate", None, _p("name.0.family", "SYN\ud800"), 400, "family"),
    ("lone-low-surrogate", None, _p("name.0.family", "\udc00SYN"), 400, "family"),
    ("nul-in-key", None, {**patient(), "fam\u0000ily": "x"}, 400, "resource"),
    ("nul-in-reference", _proc("subject", {"reference": "Patient/a\u0000b"}), patient(), 400,
     "subject.reference"),
    ("nul-in-display", _proc("code.coding.0.display", "Vertebro\u0000plasty"), patient(), 400,
     "display"),
    ("nul-in-contained", _med("contained.0.code.coding.0.display", "zol\u0000"), patient(),
     400, "contained[0]"),
    ("nul-in-extension", None, _p("extension", [{"url": "http://x.example/e",
                                                 "valueString": "\u0000"}]), 400,
     "extension[0].valueString"),
    # strings longer than their columns, numbers out of range
    ("identifier-system-256", None, _p("identifier.0.system", "urn:x:" + LONG), 422,
     "identifier.system"),
    ("identifier-value-256", None, _p("identifier.0.value", LONG), 422, "identifier.value"),
    ("identifier-use-type-code-21", None, _p("identifier.0.type", {"coding": [
        {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "M" * 21}]}),
     422, "identifier.type"),
    ("family-201", None, _p("name.0.family", "F" * 201), 422, "name.family"),
    ("given-201", None, _p("name.0.given", ["G" * 100, "H" * 100]), 422, "name.given"),
    ("procedure-identifier-256", _proc("identifier.0.value", LONG), patient(), 422,
     "identifier.value"),
    ("procedure-display-256", _proc("code.coding.0.display", LONG), patient(), 422,
     "code.coding.display"),
    ("procedure-system-256", _proc("identifier.0.system", "urn:x:" + LONG), patient(), 422,
     "identifier.system"),
    ("condition-display-256", _with(condition(), "code.coding.0.display", LONG), patient(),
     422, "code.coding.display"),
    ("study-uid-65", imaging(uid="2." + "5" * 63), patient(), 422, "identifier.value"),
    ("series-uid-65", _img("series.0.uid", "2." + "7" * 63), patient(), 422, "series.uid"),
    ("modality-list-17", _img("modality", [{"system": "x", "code": "MR"}] * 6), patient(), 422,
     "modality"),
    ("study-description-256", _img("description", LONG), patient(), 422, "description"),
    ("series-description-256", _img("series.0.description", LONG), patient(), 422,
     "series.description"),
    ("series-body-part-65", _img("series.0.bodySite", {"system": "x", "display": "B" * 65}),
     patient(), 422, "series.bodySite"),
    ("endpoint-address-501", imaging(address="http://pacs.example/" + "p" * 490), patient(),
     422, "contained.address"),
    ("series-number-2-31", _img("series.0.number", 2**31), patient(), 400,
     "series[0].number"),
    ("instances-2-31", _img("series.0.numberOfInstances", 2**31), patient(), 400,
     "series[0].numberOfInstances"),
    ("instances-negative", _img("series.0.numberOfInstances", -1), patient(), 400,
     "numberOfInstances"),
    ("rxnorm-code-21", _med("contained.0.code.coding.0.code", "1" * 21), patient(), 422,
     "medication.coding.code"),
    ("held-reference-key-401", _proc("subject", {"reference": "Patient/" + "a" * 64 + "/"
                                                 + "b" * 340}), patient(), 422,
     "subject.reference"),
    # dates and time zones
    ("year-9999-minus-12", _proc("performedDateTime", "9999-12-31T23:00:00-12:00"),
     patient(), 422, "performedDateTime"),
    ("year-1-plus-14", _proc("performedDateTime", "0001-01-01T00:30:00+14:00"), patient(),
     422, "performedDateTime"),
    ("birth-1700", None, _p("birthDate", "1700-01-01"), 422, "birthDate"),
    ("birth-2300", None, _p("birthDate", "2300-01-01"), 422, "birthDate"),
    ("birth-year-9999", None, _p("birthDate", "9999"), 422, "birthDate"),
    ("feb-29-2023", _proc("performedDateTime", "2023-02-29T10:00:00Z"), patient(), 400,
     "performedDateTime"),
    ("month-13", None, _p("birthDate", "1950-13-01"), 400, "birthDate"),
    ("hour-24", _proc("performedDateTime", "2024-01-01T24:00:00Z"), patient(), 400,
     "performedDateTime"),
    ("offset-plus-15", _proc("performedDateTime", "2024-01-01T10:00:00+15:00"), patient(), 400,
     "performedDateTime"),
    ("no-time-zone", _proc("performedDateTime", "2024-02-05T10:00:00"), patient(), 400,
     "performedDateTime"),
    ("before-birth", _proc("performedDateTime", "1930-01-01T10:00:00Z"), patient(), 422, None),
    ("future-procedure", _proc("performedDateTime", f"{NEXT_YEAR}-06-01T10:00:00Z"),
     patient(), 422, None),
    ("future-imaging", _img("started", f"{NEXT_YEAR}-06-01T10:00:00Z"), patient(), 422,
     "started"),
    ("medication-end-9999", {**medication(), "resourceType": "MedicationStatement",
                             "status": "active", "effectivePeriod": {
                                 "start": "2024-01-01", "end": "9999-12-31"},
                             "intent": None}, patient(), 400, None),
    ("imaging-started-year-1", _img("started", "0001-01-01T00:00:00+14:00"), patient(), 422,
     "started"),
    # ids, contained, codes
    ("id-65-chars", None, {**patient(), "id": "a" * 65}, 400, "id"),
    ("id-with-slash", None, {**patient(), "id": "a/b"}, 400, "id"),
    ("id-with-space", None, {**patient(), "id": "a b"}, 400, "id"),
    ("id-empty", None, {**patient(), "id": ""}, 400, "id"),
    ("id-number", None, {**patient(), "id": 42}, 400, "id"),
    ("id-unicode-digits", None, {**patient(), "id": "\u0661\u0662"}, 400, "id"),
    ("contained-nested", _med("contained.0.contained", [{"resourceType": "Medication",
                                                         "id": "inner"}]), patient(), 400,
     "contained[0].contained"),
    ("contained-broken-reference", _med("medicationReference", {"reference": "#nope"}),
     patient(), 400, "contained"),
    ("contained-missing-for-reference", {**_med("medicationReference", {"reference": "#med1"}),
                                         "contained": []}, patient(), 400, "contained"),
    ("contained-without-id", _med("contained.0", {"resourceType": "Medication", "code": {
        "text": "zoledronic acid"}}), patient(), 400, "contained[0].id"),
    ("contained-duplicate-ids", _med("contained", [{"resourceType": "Medication", "id": "m"},
                                                   {"resourceType": "Medication", "id": "m"}]),
     patient(), 400, "contained[1].id"),
    ("contained-not-a-list", _med("contained", {"resourceType": "Medication", "id": "med1"}),
     patient(), 400, "contained"),
    ("imaging-endpoint-broken-ref", _img("endpoint", [{"reference": "#elsewhere"}]), patient(),
     400, "contained"),
    ("gender-banana", None, _p("gender", "banana"), 400, "Patient.gender"),
    ("gender-uppercase", None, _p("gender", "UNKNOWN"), 400, "gender"),
    ("gender-number", None, _p("gender", 1), 400, "gender"),
    ("patient-without-identifier-or-id", None, {"resourceType": "Patient", "gender": "male"},
     400, "identifier"),
    ("unsupported-type", {"resourceType": "Observation", "status": "final",
                          "code": {"text": "x"}}, patient(), 400, "resourceType"),
    ("unknown-type", {"resourceType": "Pokemon"}, patient(), 400, "resourceType"),
    ("type-is-a-list", {"resourceType": ["Patient"]}, patient(), 400, "Bundle.entry[1]"),
    ("type-missing", {"identifier": [{"system": MRN, "value": "x"}]}, patient(), 400,
     "Bundle.entry[1]"),
    ("unknown-element", _proc("inventedElement", "x"), patient(), 400, "inventedElement"),
    ("status-wrong-type", _proc("status", ["completed"]), patient(), 400, "status"),
]


@pytest.mark.parametrize(("second", "the_patient", "status", "expression"),
                         [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_a_transaction_with_one_bad_element_is_refused_whole(
        send, second, the_patient, status, expression):
    resources = [the_patient] + ([second] if second is not None else [])
    before = counts()
    response = send("POST", "/fhir", bundle("transaction", *resources))
    issue = assert_refused(response, status, expression)
    assert any(e.startswith("Bundle.entry[") for e in issue.get("expression", [])) or (
        "Bundle.entry[" in issue["diagnostics"]), issue
    assert delta(before, counts()) == {}  # not even the Patient


ONE = {"registry.Patient": 1, "registry.PatientIdentifier": 1}

# (id, the Patient, a second resource or None, the rows written)
ACCEPTED: list[tuple[str, dict[str, Any], dict[str, Any] | None, dict[str, int]]] = [
    ("tab-newline-cr-allowed", _p("name.0.family", "SYN\tTHE\r\nTIC"), None, ONE),
    ("emoji-pair", _p("name.0.given", ["Ada \U0001F9B4"]), None, ONE),
    ("right-to-left-override", _p("name.0.family", "\u202eCITEHTNYS"), None, ONE),
    ("zero-width-space-is-another-identifier", _p("identifier.0.value", "SYN-ADV-0001\u200b"),
     None, ONE),
    ("fullwidth-letters", _p("identifier.0.value", "\uff33\uff39\uff2e"), None, ONE),
    ("c1-control-is-not-forbidden", _p("name.0.family", "SYN\u0085"), None, ONE),
    ("sql-in-family", _p("name.0.family", "'); DROP TABLE registry_patient; --"), None, ONE),
    ("sql-in-identifier", _p("identifier.0.value", "1' OR '1'='1"), None, ONE),
    ("json-escapes-in-strings", _p("name.0.family", '\\"}]{["'), None, ONE),
    ("exactly-255-identifier", _p("identifier.0.value", "v" * 255), None, ONE),
    ("exactly-200-family", _p("name.0.family", "F" * 200), None, ONE),
    ("id-64-chars", {**patient(), "id": "a" * 64}, None, {"registry.Patient": 1,
                                                         "registry.PatientIdentifier": 2}),
    ("id-with-dots-and-dashes", {**patient(), "id": "a.b-c"}, None, {
        "registry.Patient": 1, "registry.PatientIdentifier": 2}),
    ("gender-unknown-is-a-fhir-code", _p("gender", "unknown"), None, ONE),
    ("gender-other", _p("gender", "other"), None, ONE),
    ("gender-missing", {k: v for k, v in patient().items() if k != "gender"}, None, ONE),
    ("partial-birth-date", _p("birthDate", "1950-03"), None, ONE),
    ("birth-year-only", _p("birthDate", "1950"), None, ONE),
    ("leap-day-2024", patient(), _proc("performedDateTime", "2024-02-29T10:00:00Z"),
     {**ONE, "registry.Procedure": 1}),
    ("offset-plus-14", patient(), _proc("performedDateTime", "2024-03-01T01:00:00+14:00"),
     {**ONE, "registry.Procedure": 1}),
    ("offset-minus-12", patient(), _proc("performedDateTime", "2024-03-01T23:00:00-12:00"),
     {**ONE, "registry.Procedure": 1}),
    ("date-only-procedure", patient(), _proc("performedDateTime", "2024-03-01"),
     {**ONE, "registry.Procedure": 1}),
    ("fractional-seconds", patient(), _proc("performedDateTime",
                                            "2024-03-01T10:00:00.123456789Z"),
     {**ONE, "registry.Procedure": 1}),
    ("contained-medication", patient(), medication(), {**ONE, "registry.TherapyExposure": 1}),
    ("imaging-study-with-endpoint", patient(), imaging(),
     {**ONE, "scoring.ImagingStudy": 1, "scoring.ImagingSeries": 1}),
    ("not-a-vertebroplasty-is-ignored", patient(), _proc("code", {"coding": [
        {"system": "http://www.ama-assn.org/go/cpt", "code": "99213"}]}), ONE),
    ("unicode-in-display", patient(), _proc("code.coding.0.display", "Vertébroplastie \u2014 L1"),
     {**ONE, "registry.Procedure": 1}),
]


@pytest.mark.parametrize(("the_patient", "second", "written"), [c[1:] for c in ACCEPTED],
                         ids=[c[0] for c in ACCEPTED])
def test_an_odd_but_valid_transaction_is_written_exactly(send, the_patient, second, written):
    resources = [the_patient] + ([second] if second is not None else [])
    before = counts()
    response = send("POST", "/fhir", bundle("transaction", *resources))
    assert response.status_code == 200, response.content[:600]
    assert delta(before, counts()) == written


def test_strings_are_stored_exactly_as_sent(send):
    family = "'); DROP TABLE registry_patient; -- \u202e \U0001F9B4"
    response = send("POST", "/fhir", bundle("transaction", _p("name.0.family", family)))
    assert response.status_code == 200, response.content
    assert Patient.objects.get().family_name == family


def test_unknown_gender_is_stored_as_the_fhir_code_unknown(send):
    assert send("POST", "/fhir", bundle("transaction", _p("gender", "unknown"))
                ).status_code == 200
    assert Patient.objects.get().sex == "unknown"


def test_a_refused_gender_writes_no_identifier(send):
    assert_refused(send("POST", "/fhir/Patient", _p("gender", "f")), 400, "Patient.gender")
    assert not PatientIdentifier.objects.exists()
