"""Adversarial references and shapes a broken EHR interface sends: empty or foreign
references, missing dates, a Patient linked to itself, contained Patients, empty UIDs.
Never a 5xx; a refused transaction writes nothing (SYNTHETIC data)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integrations.fhir.adversarial.helpers import (
    MRN,
    bundle,
    counts,
    delta,
    imaging,
    medication,
    patient,
    procedure,
)

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]


def _proc(**changes: Any) -> dict[str, Any]:
    return {**procedure(), **changes}


CASES = [
    ("empty-patient-id", _proc(subject={"reference": "Patient/"}), 400),
    ("group-subject", _proc(subject={"reference": "Group/1"}), 400),
    ("contained-patient-subject", _proc(subject={"reference": "#p"}, contained=[
        {"resourceType": "Patient", "id": "p"}]), 400),
    ("subject-neither", _proc(subject={"display": "SYNTHETIC"}), 400),
    ("subject-missing", {k: v for k, v in procedure().items() if k != "subject"}, 400),
    ("urn-uuid-not-in-bundle", _proc(subject={
        "reference": "urn:uuid:0000dead-0000-4000-8000-000000000000"}), 400),
    ("performed-missing", {k: v for k, v in procedure().items() if k != "performedDateTime"},
     400),
    ("performed-period-end-only", {**{k: v for k, v in procedure().items()
                                      if k != "performedDateTime"},
                                   "performedPeriod": {"end": "2024-01-01"}}, 400),
    ("medication-no-date", {k: v for k, v in medication().items() if k != "authoredOn"}, 400),
    ("encounter-no-period", {"resourceType": "Encounter", "status": "finished",
                             "class": {"code": "AMB"},
                             "reasonCode": [{"coding": [{
                                 "system": "http://hl7.org/fhir/sid/icd-10-cm",
                                 "code": "S72.001A"}]}],
                             "subject": {"identifier": {"system": MRN,
                                                        "value": "SYN-ADV-0001"}}}, 400),
    ("imaging-empty-uid", {**imaging(), "identifier": [{"system": "urn:dicom:uid",
                                                        "value": "urn:oid:"}]}, 400),
    ("imaging-no-uid", {**imaging(), "identifier": []}, 400),
    ("imaging-series-without-uid", {**imaging(), "series": [{"modality": {"code": "MR"}}]},
     400),
    ("absolute-foreign-reference", _proc(subject={
        "reference": "https://elsewhere.example/fhir/Patient/x" + "y" * 500}), 422),
]


@pytest.mark.parametrize(("resource", "status"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_a_broken_reference_or_shape_is_a_4xx_and_writes_nothing(send, resource, status):
    before = counts()
    response = send("POST", "/fhir", bundle("transaction", patient(), resource))
    assert response.status_code == status, response.content[:500]
    assert response.json()["resourceType"] == "OperationOutcome"
    assert delta(before, counts()) == {}


def test_a_patient_linked_to_itself_is_refused_without_a_5xx(send):
    assert send("POST", "/fhir/Patient", patient()).status_code == 201
    linked = patient(link=[{"type": "replaced-by", "other": {
        "identifier": {"system": MRN, "value": "SYN-ADV-0001"}}}])
    before = counts()
    response = send("POST", "/fhir/Patient", linked)
    assert response.status_code < 500, response.content
    assert delta(before, counts()) == {}
