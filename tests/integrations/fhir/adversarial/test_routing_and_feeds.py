"""Adversarial FHIR requests, paths, methods, authentication, feed scopes and feed
namespaces: unmatched paths and ids that name nothing answer a 404 OperationOutcome, read
and search need the feed's scope for the type, and one feed cannot write identifiers in
another feed's ``urn:vbq-registry:feed:<feed>:`` namespace (SYNTHETIC data)."""

from __future__ import annotations

import pytest

from registry.feeds import feed_create
from registry.models import AuditEvent, PatientIdentifier
from tests.integrations.fhir.adversarial.helpers import (
    FHIR,
    MRN,
    assert_refused,
    bundle,
    counts,
    delta,
    outcome_of,
    patient,
    procedure,
)

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]


@pytest.fixture
def known(send):
    """A SYNTHETIC patient of feed adv-ehr (and its logical id)."""
    response = send("POST", "/fhir", bundle("transaction", {**patient(), "id": "p1"}))
    assert response.status_code == 200, response.content
    return PatientIdentifier.objects.get(value="SYN-ADV-0001").patient


PATHS = [
    ("GET", "/fhir/Patient/not-a-uuid", 404),
    ("GET", "/fhir/Patient/..", 404),
    ("GET", "/fhir/Patient/.", 404),
    ("GET", "/fhir/Patient/00000000-0000-0000-0000-000000000000", 404),
    ("GET", "/fhir/Procedure/abc", 404),
    ("GET", "/fhir/Procedure/99999999999999999999", 404),
    ("GET", "/fhir/Procedure/-1", 404),
    ("GET", "/fhir/Condition/1.5", 404),
    ("GET", "/fhir/ImagingStudy/0x10", 404),
    ("GET", "/fhir/Patient/" + "a" * 65, 404),
    ("GET", "/fhir/Pokemon/1", 404),
    ("GET", "/fhir/patient/1", 404),
    ("GET", "/fhir/Patient/1/_history", 404),
    ("GET", "/fhir/Patient/1/_history/2", 404),
    ("GET", "/fhir/foo/bar/baz", 404),
    ("GET", "/fhir/$export", 404),
    ("GET", "/fhir/Patient/%00", 404),
    ("GET", "/fhir/Patient/..%2f..%2fetc%2fpasswd", 404),
    ("PUT", "/fhir/Patient/" + "b" * 65, 404),
    ("POST", "/fhir/metadata", 405),
    ("PUT", "/fhir/metadata", 405),
    ("DELETE", "/fhir/metadata", 405),
    ("DELETE", "/fhir/Patient/p1", 405),
    ("PATCH", "/fhir/Patient/p1", 405),
    ("DELETE", "/fhir/Patient", 405),
    ("GET", "/fhir", 405),
    ("PUT", "/fhir", 405),
    ("GET", "/fhir/Pokemon", 404),
    ("POST", "/fhir/Pokemon", 404),
]


@pytest.mark.parametrize(("method", "path", "status"), PATHS,
                         ids=[f"{m} {p[:40]}" for m, p, _ in PATHS])
def test_an_unknown_path_method_or_id_is_an_operation_outcome(send, known, method, path,
                                                              status):
    before = counts()
    body = patient() if method in {"POST", "PUT", "PATCH"} else None
    response = send(method, path, body)
    assert_refused(response, status)
    assert delta(before, counts()) == {}


def test_metadata_is_still_readable(send):
    response = send("GET", "/fhir/metadata", bearer="")
    assert response.status_code == 200
    assert response.json()["resourceType"] == "CapabilityStatement"


@pytest.mark.parametrize("bearer", ["", "wrong", "vbqf_" + "x" * 43, "Bearer", "\u00e9\u00e9"])
def test_a_missing_or_wrong_token_is_401_and_nothing_is_read_or_stored(send, bearer):
    before = counts()
    if bearer == "\u00e9\u00e9":  # a non-ASCII header value, as a broken client sends it
        response = send("POST", "/fhir", bundle("transaction", patient()), bearer="",
                        HTTP_AUTHORIZATION="Bearer \u00e9\u00e9")
    else:
        response = send("POST", "/fhir", bundle("transaction", patient()), bearer=bearer)
    assert_refused(response, 401)
    assert delta(before, counts()) == {}


@pytest.fixture
def procedure_only(db):
    return feed_create(name="proc-only", allowed_resource_types=["Procedure"])[1]


READS = [
    "/fhir/Patient?identifier=" + MRN + "|SYN-ADV-0001",
    "/fhir/Patient?identifier=SYN-ADV-0001",
    "/fhir/Patient/{pk}",
    "/fhir/Condition?identifier=x|y",
    "/fhir/ImagingStudy/1",
]


@pytest.mark.parametrize("path", READS)
def test_a_procedure_only_feed_cannot_read_or_search_other_types(send, known, procedure_only,
                                                                path):
    audits = AuditEvent.objects.count()
    response = send("GET", path.format(pk=known.pk), bearer=procedure_only)
    issue = assert_refused(response, 403, code="forbidden")
    assert "SYN-ADV-0001" not in response.content.decode()
    assert "may not read" in issue["diagnostics"]
    assert AuditEvent.objects.count() == audits


def test_a_procedure_only_feed_can_search_procedures(send, known, procedure_only):
    response = send("GET", "/fhir/Procedure?identifier=x|y", bearer=procedure_only)
    assert response.status_code == 200
    assert response.json()["total"] == 0


def test_a_procedure_only_feed_cannot_write_a_patient(send, procedure_only):
    before = counts()
    assert_refused(send("POST", "/fhir/Patient", patient(), bearer=procedure_only), 403)
    assert_refused(send("POST", "/fhir", bundle("transaction", patient()),
                        bearer=procedure_only), 403)
    assert delta(before, counts()) == {}


def test_a_feed_reads_its_patient(send, known):
    response = send("GET", f"/fhir/Patient/{known.pk}")
    assert response.status_code == 200
    assert response.json()["id"] == str(known.pk)


NAMESPACE_ATTACKS = [
    ("patient-identifier", lambda: patient(identifier=[
        {"system": "urn:vbq-registry:feed:other-ehr:Patient", "value": "p9"}])),
    ("second-identifier", lambda: patient(identifier=[
        {"system": MRN, "value": "SYN-ADV-0002"},
        {"system": "urn:vbq-registry:feed:other-ehr:Patient", "value": "p9"}])),
    ("upper-case", lambda: patient(identifier=[
        {"system": "URN:VBQ-REGISTRY:FEED:other-ehr:Patient", "value": "p9"}])),
    ("leading-space", lambda: patient(identifier=[
        {"system": " urn:vbq-registry:feed:other-ehr:Patient", "value": "p9"}])),
    ("prefix-of-own-name", lambda: patient(identifier=[
        {"system": "urn:vbq-registry:feed:adv-ehr:x:Patient", "value": "p9"}])),
    ("bare-namespace", lambda: patient(identifier=[
        {"system": "urn:vbq-registry:feed:", "value": "p9"}])),
    ("procedure-identifier", lambda: procedure(identifier=[
        {"system": "urn:vbq-registry:feed:other-ehr:Procedure", "value": "x"}])),
    ("subject-identifier", lambda: procedure(subject={"identifier": {
        "system": "urn:vbq-registry:feed:other-ehr:Patient", "value": "p9"}})),
    ("type-coding-system", lambda: patient(identifier=[
        {"system": MRN, "value": "SYN-ADV-0003", "type": {"coding": [
            {"system": "urn:vbq-registry:feed:other-ehr:x", "code": "MR"}]}}])),
]


@pytest.mark.parametrize("make", [a[1] for a in NAMESPACE_ATTACKS],
                         ids=[a[0] for a in NAMESPACE_ATTACKS])
@pytest.mark.parametrize("via", ["transaction", "batch", "single"])
def test_a_feed_cannot_write_in_another_feeds_namespace(send, other_token, make, via):
    resource = make()
    before = counts()
    if via == "single":
        response = send("POST", f"/fhir/{resource['resourceType']}", resource)
        assert_refused(response, 403, "system", code="forbidden")
    else:
        response = send("POST", "/fhir", bundle(via, patient(), resource))
        assert_refused(response, 403, "system", code="forbidden")
    assert delta(before, counts()) == {}


def test_a_feed_writes_its_own_namespace_and_the_other_feed_keeps_its_patient(
        send, other_token):
    theirs = send("POST", "/fhir", bundle("transaction", {**patient("SYN-ADV-9"), "id": "p9"}),
                  bearer=other_token)
    assert theirs.status_code == 200
    ours = send("POST", "/fhir", bundle("transaction", patient(identifier=[
        {"system": "urn:vbq-registry:feed:adv-ehr:Patient", "value": "p9"}])))
    assert ours.status_code == 200, ours.content
    owners = {i.system: i.patient_id for i in PatientIdentifier.objects.filter(value="p9")}
    assert len(set(owners.values())) == 2  # two patients: nothing was taken over


def test_an_unmatched_path_is_json_not_html(client):
    response = client.get("/fhir/nothing/here")
    assert response.status_code == 404
    assert outcome_of(response)["issue"][0]["code"] == "not-found"
    assert response["Content-Type"].startswith(FHIR)
