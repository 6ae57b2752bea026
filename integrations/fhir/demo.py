"""SYNTHETIC demo cohort as FHIR transaction bundles (one per patient), as an EHR would send.

Pure apart from the registry's demo generator: ``demo_bundles(cohort)`` returns plain dicts.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from registry import codes
from registry.demo import SYNTHETIC_MRN_SYSTEM, SYNTHETIC_SOURCE_SYSTEM, DemoPatient

SYNTHETIC_TAG = {"system": "urn:vbq-registry:test", "code": "SYNTHETIC"}
ICD10_BY_SITE = {"hip": "S72.001A", "wrist": "S52.501A", "humerus": "S42.201A",
                 "pelvis": "S32.401A", "rib": "S22.31XA"}
# ICD-10-CM S22.08- is "fracture of T11–T12 vertebra" (one code for the pair): the Condition's
# bodySite names which of the two (registry.codes.resolve_fracture_level).
ICD10_VERTEBRAL = {"T11": "S22.080A", "T12": "S22.080A", "L1": "S32.010A", "L2": "S32.020A",
                   "L3": "S32.030A", "L4": "S32.040A"}
ROUTE = {"oral": ("26643006", "Oral route"), "iv": ("47625008", "Intravenous route"),
         "sc": ("34206005", "Subcutaneous route")}


def _at(day: dt.date, hour: int) -> str:
    return f"{day.isoformat()}T{hour:02d}:00:00-05:00"


def demo_bundle(p: DemoPatient) -> dict[str, Any]:
    patient_url = f"urn:uuid:00000000-0000-4000-8000-{int(p.key[4:]):012d}"
    entries: list[dict[str, Any]] = [{
        "fullUrl": patient_url,
        "resource": {
            "resourceType": "Patient", "id": p.key.lower(), "meta": {"tag": [SYNTHETIC_TAG]},
            "identifier": [{"use": "usual", "type": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
                "system": SYNTHETIC_MRN_SYSTEM, "value": p.key}],
            "name": [{"use": "official", "family": p.family_name, "given": [p.given_name]}],
            "gender": p.sex, "birthDate": p.birth_date.isoformat(),
            **({"deceasedDateTime": p.deceased_on.isoformat()} if p.deceased_on else {}),
        },
        "request": {"method": "PUT", "url": f"Patient?identifier={SYNTHETIC_MRN_SYSTEM}|{p.key}"},
    }]
    subject = {"reference": patient_url}
    entries.append({"resource": {
        "resourceType": "Procedure",
        "identifier": [{"system": SYNTHETIC_SOURCE_SYSTEM, "value": f"{p.key}-PROC1"}],
        "status": "completed",
        "code": {"coding": [{"system": codes.CPT, "code": p.procedure_code,
                             "display": p.procedure_kind.title()}]},
        "subject": subject, "performedDateTime": _at(p.index_date, 10),
        "bodySite": [{"text": p.index_level}],
    }, "request": {"method": "POST", "url": "Procedure"}})
    mri_day = p.index_date + dt.timedelta(days=p.mri_day_offset)
    uid = f"2.25.{int(p.key[4:]) + 10**12}"
    entries.append({"resource": {
        "resourceType": "ImagingStudy",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
        "status": "available", "subject": subject, "started": _at(mri_day, 9),
        "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "MR"}],
        "description": "SYNTHETIC MR lumbar spine",
        "series": [{"uid": f"{uid}.1", "number": 1, "description": "SYNTHETIC SAG T1",
                    "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM",
                                 "code": "MR"}}],
    }, "request": {"method": "POST", "url": "ImagingStudy"}})
    for fx in p.fractures:
        code = ICD10_VERTEBRAL.get(fx.level, "S32.010A") if fx.site == "vertebral" \
            else ICD10_BY_SITE[fx.site]
        entries.append({"resource": {
            "resourceType": "Condition",
            "identifier": [{"system": SYNTHETIC_SOURCE_SYSTEM, "value": fx.key}],
            "verificationStatus": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status",
                "code": "confirmed"}]},
            "code": {"coding": [{"system": codes.ICD10CM, "code": code}]},
            "bodySite": [{"text": fx.level}] if fx.level else [],
            "subject": subject,
            "onsetDateTime": _at(p.index_date + dt.timedelta(days=fx.day_offset), 12),
        }, "request": {"method": "POST", "url": "Condition"}})
    for rx in p.therapies:
        agent = codes.AGENTS[rx.agent]
        resource_type = {"order": "MedicationRequest", "dispense": "MedicationDispense",
                         "administration": "MedicationAdministration"}[rx.kind]
        day = p.index_date + dt.timedelta(days=rx.day_offset)
        concept = {"coding": [{"system": codes.ATC, "code": agent.atc_codes[0]}],
                   "text": agent.display}
        if agent.rxnorm_ingredient:
            concept["coding"].insert(0, {"system": codes.RXNORM,
                                         "code": agent.rxnorm_ingredient})
        route_code, route_display = ROUTE[rx.route]
        route = {"coding": [{"system": "http://snomed.info/sct", "code": route_code,
                             "display": route_display}]}
        resource: dict[str, Any] = {
            "resourceType": resource_type,
            "identifier": [{"system": SYNTHETIC_SOURCE_SYSTEM, "value": rx.key}],
            "medicationCodeableConcept": concept, "subject": subject,
        }
        if resource_type == "MedicationRequest":
            resource.update(status="active", intent="order", authoredOn=day.isoformat(),
                            dosageInstruction=[{"route": route}])
        elif resource_type == "MedicationDispense":
            resource.update(status="completed", whenHandedOver=_at(day, 11),
                            dosageInstruction=[{"route": route}])
        else:
            resource.update(status="completed", effectiveDateTime=_at(day, 11),
                            dosage={"route": route})
        entries.append({"resource": resource,
                        "request": {"method": "POST", "url": resource_type}})
    return {"resourceType": "Bundle", "type": "transaction", "meta": {"tag": [SYNTHETIC_TAG]},
            "entry": entries}


def demo_bundles(cohort: list[DemoPatient]) -> list[dict[str, Any]]:
    return [demo_bundle(p) for p in cohort]
