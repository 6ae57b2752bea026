"""Replays and concurrent senders never duplicate (PostgreSQL)."""

import json
import threading
from pathlib import Path

import pytest
import requests

from registry.feeds import feed_create
from registry.models import Fracture, Patient, PatientIdentifier, Procedure, TherapyExposure
from scoring.models import ImagingStudy

FIXTURES = Path(__file__).parent / "fixtures"
FHIR = "application/fhir+json"


def _counts():
    return (Patient.objects.count(), Procedure.objects.count(), Fracture.objects.count(),
            TherapyExposure.objects.count(), ImagingStudy.objects.count())


@pytest.mark.django_db
def test_replaying_every_fixture_bundle_three_times_keeps_one_row_per_identifier(client):
    """The generated SYNTHETIC demo bundles (60 patients) plus the hand-written fixtures."""
    _, token = feed_create(name="replay-ehr")
    bundles = json.loads((FIXTURES / "demo-cohort-bundles.json").read_text())
    bundles.append(json.loads((FIXTURES / "transaction-vertebroplasty.json").read_text()))
    bundles.append(json.loads((FIXTURES / "transaction-hl7-example-shapes.json").read_text()))
    counts = []
    for _ in range(3):
        for bundle in bundles:
            response = client.post("/fhir", data=json.dumps(bundle), content_type=FHIR,
                                   HTTP_AUTHORIZATION=f"Bearer {token}")
            assert response.status_code == 200, response.json()
        counts.append(_counts())
    assert counts[0] == counts[1] == counts[2]
    assert counts[0][0] == 62
    assert PatientIdentifier.objects.filter(system__endswith="synthetic-mrn").count() == 62
    for model in (Procedure, Fracture, TherapyExposure):  # one row per business identifier
        assert model.objects.values("identifier_system", "identifier_value").distinct().count() \
            == model.objects.count()


@pytest.mark.postgres
@pytest.mark.parametrize("fixture", ["transaction-vertebroplasty.json",
                                     "transaction-hl7-example-shapes.json"])
def test_eight_concurrent_clients_sending_the_same_transaction_create_one_row_each(
    live_server, transactional_db, fixture
):
    _, token = feed_create(name="concurrent-ehr")
    bundle = json.loads((FIXTURES / fixture).read_text())
    statuses: list[int] = []
    barrier = threading.Barrier(8)

    def send():
        barrier.wait()
        response = requests.post(f"{live_server.url}/fhir", data=json.dumps(bundle),
                                 headers={"Content-Type": FHIR,
                                          "Authorization": f"Bearer {token}"}, timeout=60)
        statuses.append(response.status_code)

    threads = [threading.Thread(target=send) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert all(s in (200, 409) for s in statuses), statuses
    assert statuses.count(200) >= 1
    assert _counts() == (1, 1, 1, 1, 1)


@pytest.mark.postgres
def test_outside_a_test_transaction_the_raw_payload_is_stored_with_its_outcome(
    live_server, transactional_db
):
    """Through a real server (no enclosing transaction): the raw payload is stored with its
    outcome once the request is handled (the token is checked first). A good token stores it
    byte for byte with its feed and outcome; a wrong token stores nothing; a payload that
    fails parsing is stored and marked rejected; the size limit still answers 413 without
    storing."""
    from django.test import override_settings

    from integrations.models import InboundMessage

    feed, token = feed_create(name="raw-ehr")
    payload = (FIXTURES / "transaction-vertebroplasty.json").read_text()

    def send(body, bearer=token):
        return requests.post(f"{live_server.url}/fhir", data=body.encode(), timeout=60,
                             headers={"Content-Type": FHIR, "Authorization": f"Bearer {bearer}"})

    assert send(payload).status_code == 200
    message = InboundMessage.objects.get()
    assert (bytes(message.body), message.feed_id, message.outcome, message.status_code) == (
        payload.encode(), feed.pk, "accepted", 200)
    assert send(payload, bearer="wrong-token").status_code == 401
    assert InboundMessage.objects.count() == 1
    assert send("{not json").status_code == 400
    rejected = InboundMessage.objects.latest("pk")
    assert (bytes(rejected.body), rejected.outcome, rejected.status_code) == (
        b"{not json", "rejected", 400)
    with override_settings(FHIR_MAX_PAYLOAD_BYTES=100):
        assert send(payload).status_code == 413
    # the refusal is recorded, without the body that was not read
    too_large = InboundMessage.objects.latest("pk")
    assert (bytes(too_large.body), too_large.size_bytes, too_large.status_code) == (
        b"", len(payload.encode()), 413)
