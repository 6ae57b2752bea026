"""FHIR ingestion through the real HTTP endpoint (Django test client, PostgreSQL in CI)."""

import copy
import json
from pathlib import Path

import pytest

from followup.sweep import followup_sweep
from integrations.models import HeldResource, InboundMessage
from registry.feeds import feed_create
from registry.models import Alert, Fracture, Patient, PatientIdentifier, Procedure, TherapyExposure
from scoring.models import ImagingStudy
from tests.registry.followup_helpers import high_vbq_patient

pytestmark = pytest.mark.django_db
FIXTURES = Path(__file__).parent / "fixtures"
FHIR = "application/fhir+json"


def _bundle(name="transaction-vertebroplasty.json"):
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture
def token(db):
    return feed_create(name="test-ehr")[1]


def post(client, token, body, path="/fhir", content_type=FHIR, **extra):
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return client.post(path, data=data, content_type=content_type,
                       HTTP_AUTHORIZATION=f"Bearer {token}", **extra)


def test_transaction_bundle_creates_every_resource_type(client, token):
    response = post(client, token, _bundle())
    body = response.json()
    assert response.status_code == 200, body
    assert body["type"] == "transaction-response"
    assert [e["response"]["status"] for e in body["entry"]] == ["201 Created"] * 5
    patient = PatientIdentifier.objects.get(value="SYN-F-0001").patient
    assert Procedure.objects.get(patient=patient).levels == ["L1"]
    assert Fracture.objects.get(patient=patient).site == "hip"
    therapy = TherapyExposure.objects.get(patient=patient)
    assert (therapy.agent, therapy.route, therapy.kind) == ("zoledronic_acid", "iv", "order")
    study = ImagingStudy.objects.get(patient=patient)
    assert study.endpoint_url == "http://127.0.0.1:8042/dicom-web"
    assert study.series.get().description == "SAG T1"


def test_replaying_the_bundle_three_times_creates_no_duplicates(client, token):
    for _ in range(3):
        assert post(client, token, _bundle()).status_code == 200
    assert Patient.objects.count() == 1
    assert Procedure.objects.count() == 1
    assert Fracture.objects.count() == 1
    assert TherapyExposure.objects.count() == 1
    assert ImagingStudy.objects.count() == 1
    assert InboundMessage.objects.count() == 3


class _WorkerKilled(BaseException):
    """What a worker killed mid-request looks like to the view: nothing after it runs."""


@pytest.mark.parametrize("path", ["/fhir/Patient", "/fhir"])
def test_a_request_cut_off_mid_write_leaves_its_raw_payload(client, token, monkeypatch, path):
    """Single resources and batch bundles commit their writes one by one: the payload is
    stored BEFORE them (outcome ``received``), so no committed row is left without it."""
    import integrations.fhir.ingest
    import integrations.fhir.views

    def killed(*args, **kwargs):
        raise _WorkerKilled

    for module in (integrations.fhir.views, integrations.fhir.ingest):
        monkeypatch.setattr(module, "apply_resource", killed)
    body = {"resourceType": "Patient", "gender": "female", "birthDate": "1950-01-01",
            "identifier": [{"system": "urn:syn", "value": "SYN-CUT-1"}]}
    if path == "/fhir":
        body = {"resourceType": "Bundle", "type": "batch", "entry": [{"resource": body}]}
    with pytest.raises(_WorkerKilled):
        client.post(path, data=json.dumps(body), content_type="application/fhir+json",
                    HTTP_AUTHORIZATION=f"Bearer {token}")
    message = InboundMessage.objects.get()
    assert json.loads(message.body) == body
    assert (message.outcome, message.status_code) == ("received", None)


def test_every_payload_is_stored_raw_before_parsing(client, token):
    post(client, token, "{not json")
    message = InboundMessage.objects.get()
    assert bytes(message.body) == b"{not json"
    assert message.outcome == "rejected"
    assert message.status_code == 400


def test_a_transaction_with_one_bad_entry_writes_nothing(client, token):
    bundle = _bundle()
    bundle["entry"][2]["resource"]["onsetDateTime"] = "not-a-date"
    response = post(client, token, bundle)
    outcome = response.json()
    assert response.status_code == 400
    assert outcome["resourceType"] == "OperationOutcome"
    assert "Bundle.entry[2]" in outcome["issue"][0]["expression"][0]
    assert Patient.objects.count() == 0
    assert Procedure.objects.count() == 0


def test_a_batch_writes_exactly_the_good_entries(client, token):
    bundle = _bundle()
    bundle["type"] = "batch"
    bundle["entry"][1]["resource"]["performedDateTime"] = "2999-01-01T10:00:00Z"  # future
    response = post(client, token, bundle)
    statuses = [e["response"]["status"] for e in response.json()["entry"]]
    assert response.status_code == 200
    assert statuses[1] == "422"
    assert statuses.count("201 Created") == 4
    assert Procedure.objects.count() == 0
    assert Fracture.objects.count() == 1


@pytest.mark.parametrize(
    ("mutate", "status", "where"),
    [
        (lambda b: b["entry"][1]["resource"].update(performedDateTime="1930-01-01T10:00:00Z"),
         422, "Bundle.entry[1]"),  # before birth
        (lambda b: b["entry"][1]["resource"].pop("subject"), 400, "Bundle.entry[1]"),
        (lambda b: b["entry"][1]["resource"].update(resourceType="Spaceship"), 400,
         "Bundle.entry[1]"),
        (lambda b: b["entry"][1]["resource"]["subject"].update(
            reference="urn:uuid:00000000-0000-4000-8000-000000000000"), 400, "Bundle.entry[1]"),
        (lambda b: b["entry"][3]["resource"].pop("intent"), 400, "Bundle.entry[3]"),
    ],
)
def test_bad_entries_answer_an_operation_outcome_naming_the_entry(client, token, mutate, status,
                                                                 where):
    bundle = _bundle()
    mutate(bundle)
    response = post(client, token, bundle)
    issue = response.json()["issue"][0]
    assert response.status_code == status
    assert issue["expression"][0].startswith(where)
    assert Patient.objects.count() == 0


def test_wrong_or_missing_token_is_refused(client):
    response = client.post("/fhir", data=json.dumps(_bundle()), content_type=FHIR,
                           HTTP_AUTHORIZATION="Bearer wrong")
    assert response.status_code == 401
    assert response.json()["resourceType"] == "OperationOutcome"
    assert client.post("/fhir", data="{}", content_type=FHIR).status_code == 401


def test_wrong_content_type_is_refused(client, token):
    response = post(client, token, json.dumps(_bundle()), content_type="text/plain")
    assert response.status_code == 415


def test_payload_over_the_size_limit_is_refused(client, token, settings):
    settings.FHIR_MAX_PAYLOAD_BYTES = 1000
    response = post(client, token, _bundle())
    assert response.status_code == 413
    assert Patient.objects.count() == 0


def test_a_feed_limited_to_some_types_cannot_send_others(client):
    _, limited = feed_create(name="adt-only", allowed_resource_types=["Patient"])
    response = post(client, limited, _bundle())
    assert response.status_code == 403
    assert Patient.objects.count() == 0


def test_unrelated_procedure_is_accepted_and_ignored_with_information(client, token):
    bundle = _bundle()
    bundle["entry"][1]["resource"]["code"] = {"coding": [
        {"system": "http://www.ama-assn.org/go/cpt", "code": "22558"}]}
    response = post(client, token, bundle)
    entry = response.json()["entry"][1]["response"]
    assert entry["status"] == "200 OK"
    assert entry["outcome"]["issue"][0]["severity"] == "information"
    assert Procedure.objects.count() == 0


def test_a_reference_to_an_unknown_patient_is_held_then_linked(client, token):
    procedure = copy.deepcopy(_bundle()["entry"][1]["resource"])
    procedure["subject"] = {"reference": "Patient/syn-pt-1"}
    response = post(client, token, procedure, path="/fhir/Procedure")
    assert response.status_code == 202
    assert HeldResource.objects.filter(applied_at__isnull=True).count() == 1
    patient = copy.deepcopy(_bundle()["entry"][0]["resource"])
    assert post(client, token, patient, path="/fhir/Patient").status_code == 201
    assert Procedure.objects.count() == 1
    assert HeldResource.objects.get().applied_at is not None


@pytest.mark.postgres
def test_a_held_resource_a_database_rule_refuses_stays_held_with_the_reason(
    client, token, monkeypatch
):
    """The Patient arrives, its held Procedure is dated before the birth (the Python check
    switched off: the database trigger refuses it). The Patient is written (201), the held
    Procedure stays unapplied with the rule's reason, and a resend of the Patient succeeds."""
    monkeypatch.setattr("registry.services._check_after_birth", lambda *args: None)
    procedure = copy.deepcopy(_bundle()["entry"][1]["resource"])
    procedure["subject"] = {"reference": "Patient/syn-pt-1"}
    procedure["performedDateTime"] = "1930-01-01T10:00:00Z"
    assert post(client, token, procedure, path="/fhir/Procedure").status_code == 202
    patient = copy.deepcopy(_bundle()["entry"][0]["resource"])
    assert post(client, token, patient, path="/fhir/Patient").status_code == 201
    held = HeldResource.objects.get()
    assert held.applied_at is None
    assert "before the patient's birth date" in held.error
    assert Procedure.objects.count() == 0
    assert post(client, token, patient, path="/fhir/Patient").status_code == 200


def test_put_by_id_and_read_back(client, token):
    patient = copy.deepcopy(_bundle()["entry"][0]["resource"])
    response = client.put("/fhir/Patient/syn-pt-1", data=json.dumps(patient), content_type=FHIR,
                          HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 201
    location = response["Location"]
    read = client.get(f"/fhir/{location}", HTTP_AUTHORIZATION=f"Bearer {token}").json()
    assert read["resourceType"] == "Patient"
    assert read["birthDate"] == "1948-04-12"


def test_conditional_create_returns_the_existing_resource(client, token):
    patient = copy.deepcopy(_bundle()["entry"][0]["resource"])
    post(client, token, patient, path="/fhir/Patient")
    response = post(client, token, patient, path="/fhir/Patient",
                    HTTP_IF_NONE_EXIST="identifier=https://vbq-registry.example.org/fhir/sid/"
                    "synthetic-mrn|SYN-F-0001")
    assert response.status_code == 200
    assert Patient.objects.count() == 1


def test_entered_in_error_marks_the_record(client, token):
    post(client, token, _bundle())
    bundle = _bundle()
    bundle["entry"][1]["resource"]["status"] = "entered-in-error"
    post(client, token, bundle)
    assert Procedure.objects.get().record_status == "entered-in-error"


def test_metadata_describes_the_supported_resources(client):
    body = client.get("/fhir/metadata").json()
    types = {r["type"] for r in body["rest"][0]["resource"]}
    assert body["resourceType"] == "CapabilityStatement"
    assert {"Patient", "Procedure", "MedicationRequest", "ImagingStudy"} <= types


def test_a_medication_request_through_fhir_resolves_the_open_alert(client, token):
    patient = high_vbq_patient(70, mrn="SYN-ALERT-1")
    followup_sweep()
    assert Alert.objects.get(patient=patient).status == "open"
    order = copy.deepcopy(_bundle()["entry"][3]["resource"])
    order["subject"] = {"identifier": {
        "system": "https://vbq-registry.example.org/fhir/sid/synthetic-mrn",
        "value": "SYN-ALERT-1"}}
    from registry.timeutil import clinic_today

    order["authoredOn"] = clinic_today().isoformat()
    response = post(client, token, order, path="/fhir/MedicationRequest")
    assert response.status_code == 201, response.json()
    from followup.sweep import followup_evaluate

    followup_evaluate([patient.pk])  # the worker does this on commit; see the worker test
    alert = Alert.objects.get(patient=patient)
    assert (alert.status, alert.resolution_reason) == ("resolved", "therapy-started")


def test_a_patient_link_replaced_by_merges_the_records(client, token):
    post(client, token, _bundle())
    survivor = {"resourceType": "Patient", "id": "syn-pt-2", "identifier": [
        {"system": "https://vbq-registry.example.org/fhir/sid/synthetic-mrn",
         "value": "SYN-F-0002"}], "gender": "female", "birthDate": "1948-04-12"}
    assert post(client, token, survivor, path="/fhir/Patient").status_code == 201
    old = copy.deepcopy(_bundle()["entry"][0]["resource"])
    old["link"] = [{"other": {"reference": "Patient/syn-pt-2"}, "type": "replaced-by"}]
    assert post(client, token, old, path="/fhir/Patient").status_code == 200
    target = PatientIdentifier.objects.get(value="SYN-F-0002").patient
    assert Procedure.objects.get().patient == target
    assert PatientIdentifier.objects.get(value="SYN-F-0001").patient == target
    assert Patient.objects.filter(merged_into=target).count() == 1
