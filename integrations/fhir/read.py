"""Read side: registry rows as FHIR JSON. ``READERS`` maps resourceType → function(id);
other apps register more (e.g. scoring adds ``Observation`` for VBQ results)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from registry import codes
from registry.models import Fracture, Patient, PatientIdentifier, Procedure, TherapyExposure


def _identifiers(system: str, value: str) -> list[dict[str, str]]:
    return [{"system": system, "value": value}] if value else []


def patient(pk: str) -> dict[str, Any] | None:
    p = Patient.objects.filter(pk=pk).prefetch_related("identifiers").first()
    if p is None:
        return None
    body: dict[str, Any] = {
        "resourceType": "Patient", "id": str(p.pk),
        "identifier": [{"system": i.system, "value": i.value} for i in p.identifiers.all()],
        "gender": p.sex,
    }
    if p.family_name or p.given_name:
        body["name"] = [{"family": p.family_name, "given": p.given_name.split()}]
    if p.birth_date:
        body["birthDate"] = p.birth_date.isoformat()
    if p.deceased_on:
        body["deceasedDateTime"] = p.deceased_on.isoformat()
    if p.merged_into_id:
        body["link"] = [{"other": {"reference": f"Patient/{p.merged_into_id}"},
                         "type": "replaced-by"}]
    return body


def procedure(pk: str) -> dict[str, Any] | None:
    p = Procedure.objects.filter(pk=pk).first() if pk.isdigit() else None
    if p is None:
        return None
    return {
        "resourceType": "Procedure", "id": str(p.pk),
        "identifier": _identifiers(p.identifier_system, p.identifier_value),
        "status": "entered-in-error" if p.record_status == "entered-in-error" else "completed",
        "code": {"coding": [{"system": p.code_system, "code": p.code,
                             "display": p.code_display or p.kind}]},
        "subject": {"reference": f"Patient/{p.patient_id}"},
        "performedDateTime": p.performed_at.isoformat(),
        "bodySite": [{"text": level} for level in p.levels],
    }


def condition(pk: str) -> dict[str, Any] | None:
    f = Fracture.objects.filter(pk=pk).first() if pk.isdigit() else None
    if f is None:
        return None
    return {
        "resourceType": "Condition", "id": str(f.pk),
        "identifier": _identifiers(f.identifier_system, f.identifier_value),
        "code": {"coding": [{"system": f.code_system, "code": f.code,
                             "display": f.code_display}] if f.code else [],
                 "text": f"{f.site} fracture {f.vertebral_level}".strip()},
        "subject": {"reference": f"Patient/{f.patient_id}"},
        "onsetDateTime": f.diagnosed_at.isoformat(),
        "verificationStatus": {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
            "code": "entered-in-error" if f.record_status == "entered-in-error"
            else "confirmed"}]},
    }


def medication(resource_type: str) -> Callable[[str], dict[str, Any] | None]:
    def reader(pk: str) -> dict[str, Any] | None:
        t = TherapyExposure.objects.filter(pk=pk).first() if pk.isdigit() else None
        if t is None:
            return None
        agent = codes.AGENTS.get(t.agent)
        coding = []
        if t.rxnorm_code:
            coding.append({"system": codes.RXNORM, "code": t.rxnorm_code})
        if t.atc_code:
            coding.append({"system": codes.ATC, "code": t.atc_code})
        return {
            "resourceType": resource_type, "id": str(t.pk),
            "identifier": _identifiers(t.identifier_system, t.identifier_value),
            "status": t.status,
            "medicationCodeableConcept": {"coding": coding,
                                          "text": agent.display if agent else t.agent},
            "subject": {"reference": f"Patient/{t.patient_id}"},
            "effectivePeriod": {"start": t.start_on.isoformat(),
                                **({"end": t.end_on.isoformat()} if t.end_on else {})},
        }

    return reader


def imaging_study(pk: str) -> dict[str, Any] | None:
    from scoring.models import ImagingStudy

    s = ImagingStudy.objects.filter(pk=pk).prefetch_related("series").first() \
        if pk.isdigit() else None
    if s is None:
        return None
    body: dict[str, Any] = {
        "resourceType": "ImagingStudy", "id": str(s.pk),
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{s.study_instance_uid}"}],
        "status": "available", "description": s.description,
        "series": [{"uid": x.series_instance_uid, "modality": {
            "system": "http://dicom.nema.org/resources/ontology/DCM", "code": x.modality or "MR"},
            "description": x.description} for x in s.series.all()],
    }
    if s.patient_id:
        body["subject"] = {"reference": f"Patient/{s.patient_id}"}
    if s.started_at:
        body["started"] = s.started_at.isoformat()
    return body


READERS: dict[str, Callable[[str], dict[str, Any] | None]] = {
    "Patient": patient,
    "Procedure": procedure,
    "Condition": condition,
    "MedicationRequest": medication("MedicationRequest"),
    "MedicationDispense": medication("MedicationDispense"),
    "MedicationAdministration": medication("MedicationAdministration"),
    "MedicationStatement": medication("MedicationStatement"),
    "ImagingStudy": imaging_study,
}


def read(location: str) -> dict[str, Any] | None:
    resource_type, _, pk = location.partition("/")
    reader = READERS.get(resource_type)
    return reader(pk) if reader and pk else None


def find_by_identifier(resource_type: str, token: str) -> str | None:
    """Location of the resource holding business identifier ``system|value``, if any."""
    system, sep, value = token.partition("|")
    if not sep or not value:
        return None
    if resource_type == "Patient":
        ident = PatientIdentifier.objects.filter(system=system, value=value).first()
        return f"Patient/{ident.patient_id}" if ident else None
    model = {"Procedure": Procedure, "Condition": Fracture, "Encounter": Fracture}.get(
        resource_type, TherapyExposure if resource_type.startswith("Medication") else None)
    if model is None:
        return None
    obj = model.objects.filter(identifier_system=system, identifier_value=value).first()
    shown = "Condition" if resource_type == "Encounter" else resource_type
    return f"{shown}/{obj.pk}" if obj else None


def search(resource_type: str, token: str) -> dict[str, Any]:
    location = find_by_identifier(resource_type, token) if token else None
    entries = []
    if location:
        body = read(location)
        if body:
            entries.append({"fullUrl": location, "resource": body})
    return {"resourceType": "Bundle", "type": "searchset", "total": len(entries),
            "entry": entries}
