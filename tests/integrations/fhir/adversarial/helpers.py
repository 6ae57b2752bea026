"""Shared SYNTHETIC resources and assertions of the adversarial FHIR suite.

Every case asserts the HTTP status, the OperationOutcome (and the element it names) and the
registry's row counts before and after: a refused request writes nothing (no partial
write), an accepted one exactly what it says."""

from __future__ import annotations

import copy
import json
from typing import Any

from django.apps import apps

FHIR = "application/fhir+json"
MRN = "https://hospital.example.org/fhir/sid/synthetic-mrn"  # SYNTHETIC identifier system
PROC_SYSTEM = "https://ehr.example.org/fhir/sid/procedure"
CPT = "http://www.ama-assn.org/go/cpt"
DCM = "http://dicom.nema.org/resources/ontology/DCM"

COUNTED = ("registry.Patient", "registry.PatientIdentifier", "registry.Procedure",
           "registry.Fracture", "registry.TherapyExposure", "scoring.ImagingStudy",
           "scoring.ImagingSeries", "integrations.HeldResource")


def counts() -> dict[str, int]:
    """Row counts of every table a FHIR write can touch (clinical rows and held resources)."""
    return {name: apps.get_model(name).objects.count() for name in COUNTED}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in before if after[k] != before[k]}


def patient(key: str = "SYN-ADV-0001", **extra: Any) -> dict[str, Any]:
    """A SYNTHETIC Patient."""
    return {"resourceType": "Patient",
            "identifier": [{"system": MRN, "value": key}],
            "name": [{"family": "SYNTHETIC", "given": ["Adversaria"]}],
            "gender": "female", "birthDate": "1950-03-04", **extra}


def procedure(key: str = "SYN-ADV-PROC-1", patient_key: str = "SYN-ADV-0001",
              performed: str = "2024-02-05T10:00:00Z", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Procedure", "status": "completed",
            "identifier": [{"system": PROC_SYSTEM, "value": key}],
            "code": {"coding": [{"system": CPT, "code": "22511",
                                 "display": "Percutaneous vertebroplasty"}]},
            "subject": {"identifier": {"system": MRN, "value": patient_key}},
            "performedDateTime": performed, **extra}


def condition(key: str = "SYN-ADV-COND-1", patient_key: str = "SYN-ADV-0001",
              onset: str = "2024-09-02T14:00:00-04:00", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "Condition",
            "identifier": [{"system": "https://ehr.example.org/fhir/sid/condition",
                            "value": key}],
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm",
                                 "code": "S72.001A", "display": "Fracture of femur neck"}]},
            "subject": {"identifier": {"system": MRN, "value": patient_key}},
            "onsetDateTime": onset, **extra}


def medication(key: str = "SYN-ADV-RX-1", patient_key: str = "SYN-ADV-0001",
               **extra: Any) -> dict[str, Any]:
    return {"resourceType": "MedicationRequest", "status": "active", "intent": "order",
            "identifier": [{"system": "https://ehr.example.org/fhir/sid/order", "value": key}],
            "contained": [{"resourceType": "Medication", "id": "med1", "code": {"coding": [
                {"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "1161631",
                 "display": "zoledronic acid 5 MG in 100 ML Injection"}]}}],
            "medicationReference": {"reference": "#med1"},
            "subject": {"identifier": {"system": MRN, "value": patient_key}},
            "authoredOn": "2024-09-20", **extra}


def imaging(uid: str = "2.25.77001", patient_key: str = "SYN-ADV-0001",
            address: str = "http://127.0.0.1:8042/dicom-web", **extra: Any) -> dict[str, Any]:
    return {"resourceType": "ImagingStudy", "status": "available",
            "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
            "contained": [{"resourceType": "Endpoint", "id": "pacs", "status": "active",
                           "connectionType": {"system": "http://terminology.hl7.org/"
                                              "CodeSystem/endpoint-connection-type",
                                              "code": "dicom-wado-rs"},
                           "payloadType": [{"text": "DICOM"}], "address": address}],
            "endpoint": [{"reference": "#pacs"}],
            "modality": [{"system": DCM, "code": "MR"}],
            "subject": {"identifier": {"system": MRN, "value": patient_key}},
            "started": "2024-01-20T08:15:00-05:00", "description": "SYNTHETIC MRI L-SPINE",
            "series": [{"uid": f"{uid}.1", "number": 3, "description": "SAG T1",
                        "modality": {"system": DCM, "code": "MR"}, "numberOfInstances": 15}],
            **extra}


def bundle(kind: str, *resources: dict[str, Any], requests: bool = True) -> dict[str, Any]:
    """A Bundle of ``resources`` (POST entries), each with a unique urn:uuid fullUrl."""
    entries = []
    for n, resource in enumerate(resources):
        entry: dict[str, Any] = {"fullUrl": f"urn:uuid:5e1f0000-0000-4000-8000-{n:012d}",
                                 "resource": copy.deepcopy(resource)}
        if requests:
            entry["request"] = {"method": "POST", "url": resource.get("resourceType", "")}
        entries.append(entry)
    return {"resourceType": "Bundle", "type": kind, "entry": entries}


def encode(body: Any) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return json.dumps(body).encode()


def outcome_of(response: Any) -> dict[str, Any]:
    assert response["Content-Type"].startswith(FHIR), response["Content-Type"]
    body = json.loads(response.content)
    assert body["resourceType"] == "OperationOutcome", body
    return body


def assert_refused(response: Any, status: int, expression: str | None = None,
                   code: str | None = None) -> dict[str, Any]:
    """The request is answered ``status`` with an OperationOutcome whose first issue is an
    error naming ``expression`` (a substring of one of its FHIRPath expressions)."""
    assert response.status_code == status, response.content[:600]
    body = outcome_of(response)
    issue = body["issue"][0]
    assert issue["severity"] in {"error", "fatal"}, issue
    assert issue["diagnostics"], issue
    if code is not None:
        assert issue["code"] == code, issue
    if expression is not None:
        assert any(expression in e for e in issue.get("expression", [])), issue
    return issue
