"""Read side: registry rows as FHIR JSON. ``READERS`` maps resourceType → function(id);
other apps register more (e.g. scoring adds ``Observation`` for VBQ results)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

from django.db.models import Q

from integrations.fhir.errors import FhirError
from integrations.fhir.guard import check_query
from registry import codes
from registry.models import Fracture, Patient, PatientIdentifier, Procedure, TherapyExposure
from scoring.models import ImagingStudy


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
    """The resource at ``Type/id``, or ``None`` (unknown type, or an id that cannot name a
    row: not a UUID for a Patient, not a number for the others)."""
    resource_type, _, pk = location.partition("/")
    reader = READERS.get(resource_type)
    if reader is None or not pk:
        return None
    if resource_type == "Patient":
        try:
            uuid.UUID(pk)
        except ValueError:
            return None
    elif not (pk.isascii() and pk.isdigit() and len(pk) <= 18):
        return None
    return reader(pk)


# --- conditions and searches: ``identifier`` tokens only ---------------------------------------
SEARCHABLE = ("Patient", "Procedure", "Condition", "Encounter", "MedicationRequest",
              "MedicationDispense", "MedicationAdministration", "MedicationStatement",
              "ImagingStudy")


def parse_condition(query: str, where: str, *, search: bool = False
                    ) -> list[tuple[str | None, str | None]]:
    """The ``identifier`` tokens of a condition or search query (``If-None-Exist``, a
    conditional update's query string, a search): ``system|value``, ``value`` (any system),
    ``|value`` (no system), ``system|`` (any value). Any other parameter, or none, is 400
    (``FhirError``): a condition the server cannot evaluate must not silently match nothing.
    ``search``: result parameters (``_format``, ``_count``...) are ignored."""
    params = parse_qsl(query, keep_blank_values=True)
    if not params:
        raise FhirError.single(400, "invalid", "the condition must be identifier=system|value",
                               where)
    tokens: list[tuple[str | None, str | None]] = []
    for name, token in params:
        if search and name.startswith("_"):  # _format, _count, ...: a search may ignore them
            continue
        if name != "identifier":
            raise FhirError.single(400, "not-supported", f"the search parameter {name[:40]!r} "
                                   "is not supported here (identifier only)", where)
        check_query(token, where)
        if not token:
            raise FhirError.single(400, "invalid", "identifier needs a value", where)
        system, sep, value = token.partition("|")
        tokens.append((system, value or None) if sep else (None, token))
    return tokens


def _token_filter(system_field: str, value_field: str, system: str | None,
                  value: str | None) -> Q:
    q = Q()
    if system is not None:
        q &= Q(**{system_field: system})
    if value is not None:
        q &= Q(**{value_field: value})
    return q


def _matches(resource_type: str, system: str | None, value: str | None,
             limit: int) -> list[str]:
    if resource_type == "Patient":
        ids = (PatientIdentifier.objects.filter(_token_filter("system", "value", system, value))
               .values_list("patient_id", flat=True).distinct()[:limit])
        return [f"Patient/{pk}" for pk in ids]
    if resource_type == "ImagingStudy":

        q = _token_filter("identifier_system", "identifier_value", system, value)
        if system == "urn:dicom:uid" and value is not None:
            q |= Q(study_instance_uid=value.removeprefix("urn:oid:"))
        ids = ImagingStudy.objects.filter(q).values_list("pk", flat=True)[:limit]
        return [f"ImagingStudy/{pk}" for pk in ids]
    model = {"Procedure": Procedure, "Condition": Fracture, "Encounter": Fracture}.get(
        resource_type, TherapyExposure if resource_type.startswith("Medication") else None)
    if model is None:
        return []
    ids = model.objects.filter(_token_filter("identifier_system", "identifier_value", system,
                                             value)).values_list("pk", flat=True)[:limit]
    shown = "Condition" if resource_type == "Encounter" else resource_type
    return [f"{shown}/{pk}" for pk in ids]


def find_matches(resource_type: str, tokens: list[tuple[str | None, str | None]],
                 limit: int = 2) -> list[str]:
    """Locations of the resources matching EVERY token (several ``identifier`` parameters
    are AND), at most ``limit``: a conditional create or update needs to know 0, 1 or more."""
    each = limit if len(tokens) == 1 else 10_000
    found: list[str] | None = None
    for system, value in tokens:
        matches = _matches(resource_type, system, value, each)
        found = matches if found is None else [m for m in found if m in set(matches)]
    return (found or [])[:limit]


def find_by_identifier(resource_type: str, token: str) -> str | None:
    """Location of the resource holding business identifier ``system|value``, if any."""
    system, sep, value = token.partition("|")
    if not sep or not value:
        return None
    found = find_matches(resource_type, [(system, value)], limit=1)
    return found[0] if found else None


def search(resource_type: str, query: str, limit: int = 50) -> dict[str, Any]:
    """``GET /fhir/<Type>?identifier=system|value``: a searchset Bundle (no parameter:
    empty). A search names whole identifiers (both parts): a partial token (``value``,
    ``system|``) would let a feed list the registry's patients, so it is 400."""
    entries = []
    if query.strip("&"):
        tokens = parse_condition(query, f"{resource_type}?identifier", search=True)
        if any(not (system and value) for system, value in tokens):
            raise FhirError.single(400, "not-supported", "a search needs "
                                   "identifier=system|value", f"{resource_type}?identifier")
        for location in find_matches(resource_type, tokens, limit):
            body = read(location)
            if body:
                entries.append({"fullUrl": location, "resource": body})
    return {"resourceType": "Bundle", "type": "searchset", "total": len(entries),
            "entry": entries}
