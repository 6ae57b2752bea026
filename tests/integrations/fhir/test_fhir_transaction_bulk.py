"""Transaction bundles go through the bulk write path: the HL7 example shapes, repeated
identifiers inside one bundle, held references, audit rows and follow-up marks (PostgreSQL)."""

import copy
import json
from pathlib import Path

import pytest

from integrations.models import HeldResource
from registry.feeds import feed_create
from registry.models import (
    AuditEvent,
    Fracture,
    Patient,
    PatientIdentifier,
    Procedure,
    TherapyExposure,
)
from registry.timeutil import clinic_today
from scoring.models import ImagingSeries, ImagingStudy

pytestmark = pytest.mark.django_db
FIXTURES = Path(__file__).parent / "fixtures"
FHIR = "application/fhir+json"


def _hl7():
    return json.loads((FIXTURES / "transaction-hl7-example-shapes.json").read_text())


@pytest.fixture
def token(db):
    return feed_create(name="bulk-ehr")[1]


def post(client, token, body):
    return client.post("/fhir", data=json.dumps(body), content_type=FHIR,
                       HTTP_AUTHORIZATION=f"Bearer {token}")


def _statuses(response):
    return [e["response"]["status"] for e in response.json()["entry"]]


def test_the_hl7_example_shapes_become_registry_rows_and_the_other_examples_are_ignored(
    client, token
):
    response = post(client, token, _hl7())
    assert response.status_code == 200, response.json()
    # Patient, vertebroplasty, appendectomy (ignored), fracture, burn (ignored), order, MRI
    assert _statuses(response) == ["201 Created", "201 Created", "200 OK", "201 Created",
                                   "200 OK", "201 Created", "201 Created"]
    ignored = response.json()["entry"][2]["response"]["outcome"]["issue"][0]
    assert ignored["severity"] == "information"
    patient = PatientIdentifier.objects.get(value="SYN-HL7-0001").patient
    assert (patient.birth_date.isoformat(), patient.sex) == ("1944-12-25", "female")
    assert sorted(patient.identifiers.values_list("value", flat=True)) == [
        "SYN-738472983", "SYN-HL7-0001", "syn-hl7-pat"]
    procedure = Procedure.objects.get(patient=patient)
    assert (procedure.kind, procedure.levels, procedure.code) == (
        "vertebroplasty", ["L2"], "392010000")
    fracture = Fracture.objects.get(patient=patient)
    assert (fracture.site, fracture.vertebral_level) == ("vertebral", "L2")
    therapy = TherapyExposure.objects.get(patient=patient)
    assert (therapy.agent, therapy.route, therapy.kind, therapy.rxnorm_code) == (
        "alendronate", "oral", "order", "46041")
    assert therapy.start_on.isoformat() == "2024-04-02"  # the dosage's boundsPeriod.start
    study = ImagingStudy.objects.get(patient=patient)
    assert study.study_instance_uid == "2.25.318927364530917365214011"
    assert study.endpoint_url == "http://127.0.0.1:8042/dicom-web"
    assert sorted(study.series.values_list("description", "body_part")) == [
        ("AX T2", "Lumbar spine"), ("SAG T1", "Lumbar spine")]
    locations = [e["response"].get("location") for e in response.json()["entry"]]
    assert locations[1] == f"Procedure/{procedure.pk}"
    assert locations[6] == f"ImagingStudy/{study.pk}"


def test_replaying_the_hl7_bundle_three_times_updates_the_same_rows(client, token):
    for attempt in range(3):
        response = post(client, token, _hl7())
        assert response.status_code == 200, response.json()
        if attempt:
            assert set(_statuses(response)) == {"200 OK"}
    assert Patient.objects.count() == 1
    assert PatientIdentifier.objects.count() == 3
    assert (Procedure.objects.count(), Fracture.objects.count(),
            TherapyExposure.objects.count(), ImagingStudy.objects.count(),
            ImagingSeries.objects.count()) == (1, 1, 1, 1, 2)


def test_every_written_resource_has_an_audit_row_and_its_patient_is_due_for_follow_up(
    client, token
):
    post(client, token, _hl7())
    patient = PatientIdentifier.objects.get(value="SYN-HL7-0001").patient
    created = AuditEvent.objects.filter(patient=patient, action="create", via="fhir")
    assert sorted(created.values_list("object_type", flat=True)) == [
        "Fracture", "ImagingStudy", "Patient", "Procedure", "TherapyExposure"]
    assert Patient.objects.get(pk=patient.pk).followup_next_check_on == clinic_today()
    post(client, token, _hl7())
    assert AuditEvent.objects.filter(patient=patient, action="update").count() == 5


def test_the_same_identifier_twice_in_one_bundle_is_one_row_with_the_later_values(
    client, token
):
    bundle = _hl7()
    later = copy.deepcopy(bundle["entry"][1])
    later.pop("fullUrl", None)  # (a bundle's fullUrls are unique)
    later["resource"]["bodySite"] = [{"text": "L3"}]
    later["resource"]["code"]["text"] = "Vertebroplasty L3"
    bundle["entry"].append(later)
    response = post(client, token, bundle)
    assert response.status_code == 200, response.json()
    statuses = _statuses(response)
    assert (statuses[1], statuses[-1]) == ("201 Created", "200 OK")
    assert Procedure.objects.get().levels == ["L3"]


def test_a_transaction_entry_naming_an_unknown_patient_is_held_then_applied(client, token):
    bundle = _hl7()
    order = copy.deepcopy(bundle["entry"][5])
    order["resource"]["identifier"][0]["value"] = "SYN-HL7-RX-LATER"
    order["resource"]["subject"] = {"reference": "Patient/syn-hl7-later"}
    held = {"resourceType": "Bundle", "type": "transaction", "entry": [order]}
    response = post(client, token, held)
    assert _statuses(response) == ["202 Accepted"]
    assert HeldResource.objects.filter(applied_at__isnull=True).count() == 1
    patient = copy.deepcopy(bundle["entry"][0])
    patient["resource"].update(id="syn-hl7-later", identifier=[{
        "system": "https://vbq-registry.example.org/fhir/sid/synthetic-mrn",
        "value": "SYN-HL7-0002"}])
    assert post(client, token, {"resourceType": "Bundle", "type": "transaction",
                                "entry": [patient]}).status_code == 200
    therapy = TherapyExposure.objects.get(identifier_value="SYN-HL7-RX-LATER")
    assert therapy.patient == PatientIdentifier.objects.get(value="SYN-HL7-0002").patient
    assert HeldResource.objects.get().applied_at is not None


@pytest.mark.parametrize(
    ("entry", "mutate", "status"),
    [
        (5, lambda r: r.update(authoredOn="1930-01-01") or r["dosageInstruction"][0].pop(
            "timing"), 422),  # therapy before birth: found while writing the therapy group
        (6, lambda r: r.update(started="2999-01-01T10:00:00Z"), 422),  # study in the future
        (3, lambda r: r.update(onsetDateTime="2024-01-20T10:00:00"), 400),  # no time zone
    ],
)
def test_a_bad_entry_found_in_the_bulk_write_names_its_index_and_writes_nothing(
    client, token, entry, mutate, status
):
    bundle = _hl7()
    mutate(bundle["entry"][entry]["resource"])
    response = post(client, token, bundle)
    body = response.json()
    assert response.status_code == status, body
    assert body["issue"][0]["expression"][0].startswith(f"Bundle.entry[{entry}]")
    assert Patient.objects.count() == 0
    assert AuditEvent.objects.filter(via="fhir").count() == 0


def _subject():
    return {"reference": "urn:uuid:5f0c1b2e-7d3a-4c11-9a60-000000000101"}


def test_encounter_medication_statement_and_dispense_are_recorded(client, token):
    bundle = _hl7()
    bundle["entry"] = [
        bundle["entry"][0],
        {"resource": {
            "resourceType": "Encounter", "id": "syn-enc-1", "status": "finished",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                      "code": "EMER", "display": "emergency"},
            "identifier": [{"system": "https://ehr.example.org/fhir/sid/encounter",
                            "value": "SYN-ENC-1"}],
            "subject": _subject(),
            "period": {"start": "2024-06-01T08:10:00-04:00",
                       "end": "2024-06-01T13:00:00-04:00"},
            "reasonCode": [{"coding": [
                {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "S52.501A",
                 "display": "Unspecified fracture of the lower end of right radius"},
                {"system": "http://snomed.info/sct", "code": "263225007",
                 "display": "Fracture of distal end of radius"}]}]},
         "request": {"method": "POST", "url": "Encounter"}},
        {"resource": {
            "resourceType": "MedicationStatement", "id": "syn-ms-1", "status": "active",
            "identifier": [{"system": "https://ehr.example.org/fhir/sid/med-statement",
                            "value": "SYN-MS-1"}],
            "medicationCodeableConcept": {"coding": [
                {"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "993449",
                 "display": "denosumab"}], "text": "Prolia 60 mg every 6 months"},
            "subject": _subject(),
            "effectivePeriod": {"start": "2024-07-01", "end": "2024-12-31"},
            "dosage": [{"route": {"coding": [{"system": "http://snomed.info/sct",
                                              "code": "34206005",
                                              "display": "Subcutaneous route"}]}}]},
         "request": {"method": "POST", "url": "MedicationStatement"}},
        {"resource": {
            "resourceType": "MedicationDispense", "id": "syn-md-1", "status": "completed",
            "identifier": [{"system": "https://ehr.example.org/fhir/sid/dispense",
                            "value": "SYN-MD-1"}],
            "contained": [{"resourceType": "Medication", "id": "m1", "code": {"coding": [
                {"system": "http://www.whocc.no/atc", "code": "M05BA07"}]}}],
            "medicationReference": {"reference": "#m1"},
            "subject": _subject(), "whenHandedOver": "2024-08-03T10:00:00-04:00"},
         "request": {"method": "POST", "url": "MedicationDispense"}},
        {"resource": {
            "resourceType": "Procedure", "status": "completed",
            "identifier": [{"system": "https://ehr.example.org/fhir/sid/procedure",
                            "value": "SYN-PROC-LOCAL"}],
            "code": {"coding": [{"system": "urn:oid:1.2.3.4.5.SYNTHETIC-local-codes",
                                 "code": "VP-1", "display": "vertebroplasty (local code)"}]},
            "subject": _subject(), "performedDateTime": "2024-02-05"},
         "request": {"method": "POST", "url": "Procedure"}},
    ]
    response = post(client, token, bundle)
    assert response.status_code == 200, response.json()
    assert _statuses(response) == ["201 Created"] * 4 + ["200 OK"]
    unknown = response.json()["entry"][4]["response"]["outcome"]["issue"][0]
    assert unknown["severity"] == "information"  # an unknown code system: recorded as ignored
    patient = PatientIdentifier.objects.get(value="SYN-HL7-0001").patient
    fracture = Fracture.objects.get(patient=patient)
    assert (fracture.site, fracture.identifier_value) == ("wrist", "SYN-ENC-1")
    therapies = {t.identifier_value: t for t in TherapyExposure.objects.filter(patient=patient)}
    statement, dispense = therapies["SYN-MS-1"], therapies["SYN-MD-1"]
    assert (statement.agent, statement.kind, statement.route) == ("denosumab", "statement", "sc")
    assert statement.end_on.isoformat() == "2024-12-31"
    assert (dispense.agent, dispense.kind) == ("risedronate", "dispense")
    assert not Procedure.objects.exists()


def test_a_patient_merge_inside_a_transaction_moves_the_records_to_the_survivor(client, token):
    assert post(client, token, _hl7()).status_code == 200
    survivor = {"resourceType": "Patient", "id": "syn-hl7-survivor", "identifier": [
        {"system": "https://vbq-registry.example.org/fhir/sid/synthetic-mrn",
         "value": "SYN-HL7-0009"}], "gender": "female", "birthDate": "1944-12-25"}
    old = copy.deepcopy(_hl7()["entry"][0]["resource"])
    old["link"] = [{"other": {"reference": "Patient/syn-hl7-survivor"}, "type": "replaced-by"}]
    response = post(client, token, {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": survivor, "request": {"method": "POST", "url": "Patient"}},
        {"resource": old, "request": {"method": "PUT", "url": "Patient/syn-hl7-pat"}}]})
    assert response.status_code == 200, response.json()
    target = PatientIdentifier.objects.get(value="SYN-HL7-0009").patient
    assert Procedure.objects.get().patient == target
    assert PatientIdentifier.objects.get(value="SYN-HL7-0001").patient == target
    assert Patient.objects.filter(merged_into=target).count() == 1


@pytest.mark.postgres  # TOAST compression is PostgreSQL's
def test_a_large_raw_payload_is_stored_lz4_compressed_and_reads_back_byte_for_byte(client, token):
    from django.db import connection

    from integrations.models import InboundMessage

    bundle = _hl7()
    patient = next(e["resource"] for e in bundle["entry"]
                   if e["resource"]["resourceType"] == "Patient")
    # SYNTHETIC narrative, non-ASCII, large enough to be TOASTed and compressed
    patient["text"] = {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">'
                       + "Patiente synthétique — données fictives. " * 400 + "</div>"}
    payload = json.dumps(bundle, ensure_ascii=False, indent=1)
    response = client.post("/fhir", data=payload.encode(), content_type=FHIR,
                           HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 200, response.content
    message = InboundMessage.objects.get()
    assert bytes(message.body) == payload.encode()
    assert message.size_bytes == len(payload.encode())
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_column_compression(body) FROM integrations_inboundmessage "
                       "WHERE id = %s", [message.pk])
        assert cursor.fetchone()[0] == "lz4"


@pytest.mark.parametrize("path", ["transaction", "single"])
def test_a_fhir_patient_update_keeps_the_care_team_and_other_registry_only_fields(
    client, token, path
):
    """A FHIR Patient carries no care team, BMI, last contact or SYNTHETIC flag: an update
    (a transaction bundle: bulk path; PUT /fhir/Patient/<id>: single path) keeps them, while
    it changes what it does carry (the name)."""
    import datetime as dt
    from decimal import Decimal

    bundle = json.loads((FIXTURES / "transaction-vertebroplasty.json").read_text())
    assert post(client, token, bundle).status_code == 200
    patient = PatientIdentifier.objects.get(value="SYN-F-0001").patient
    assert patient.care_team == ""  # a new patient: the defaults
    Patient.objects.filter(pk=patient.pk).update(
        care_team="fracture-liaison", bmi_kg_m2=Decimal("21.5"),
        last_contact_on=dt.date(2026, 1, 5), is_synthetic=True)
    resource = copy.deepcopy(bundle["entry"][0]["resource"])
    resource["name"][0]["given"] = ["Renamed"]
    if path == "transaction":
        response = post(client, token, {"resourceType": "Bundle", "type": "transaction",
                                         "entry": [{"fullUrl": bundle["entry"][0]["fullUrl"],
                                                    "resource": resource}]})
    else:
        response = client.put(f"/fhir/Patient/{resource['id']}", data=json.dumps(resource),
                              content_type=FHIR, HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 200, response.content
    patient.refresh_from_db()
    assert patient.given_name == "Renamed"
    assert (patient.care_team, patient.bmi_kg_m2, patient.last_contact_on,
            patient.is_synthetic) == ("fracture-liaison", Decimal("21.5"),
                                      dt.date(2026, 1, 5), True)


@pytest.mark.parametrize("subject", ["identifier", "logical id"])
def test_an_entry_naming_a_new_patient_of_the_same_bundle_by_identifier_is_linked_not_held(
    client, token, subject
):
    """New patients are inserted with the other entries' statement; an entry that names one
    of them by business identifier or Patient/<id> (not its fullUrl) still finds it."""
    bundle = _hl7()
    patient = bundle["entry"][0]["resource"]
    ident = next(i for i in patient["identifier"] if i["system"].endswith("synthetic-mrn"))
    for entry in bundle["entry"][1:]:
        if "subject" in entry["resource"]:
            entry["resource"]["subject"] = (
                {"identifier": {"system": ident["system"], "value": ident["value"]}}
                if subject == "identifier" else {"reference": f"Patient/{patient['id']}"})
    response = post(client, token, bundle)
    assert response.status_code == 200, response.json()
    assert "202 Accepted" not in _statuses(response)
    assert not HeldResource.objects.exists()
    owner = PatientIdentifier.objects.get(value=ident["value"]).patient
    assert Procedure.objects.get().patient == owner
    assert ImagingStudy.objects.get().patient == owner


def test_a_bundle_of_new_patients_only_is_written(client, token):
    bundle = _hl7()
    bundle["entry"] = bundle["entry"][:1]
    response = post(client, token, bundle)
    assert _statuses(response) == ["201 Created"]
    assert PatientIdentifier.objects.get(value="SYN-HL7-0001").patient.birth_date is not None
