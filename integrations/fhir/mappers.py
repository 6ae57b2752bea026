"""One mapper per resourceType: a validated fhir.resources model → registry services.

Each mapper returns a ``MapResult`` (what was written, or an informational reason it was
ignored). It raises ``FhirError`` for invalid content, or ``HeldReference`` when the resource
names a patient the registry does not know yet (the caller stores it and applies it when that
Patient arrives). Upserts go by business identifier; a resource without one gets a feed-scoped
identifier from its logical id, so a resend updates rather than duplicates. The shared write
path and the ingest's context are ``integrations.fhir.context``.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from typing import Any

from integrations.fhir.context import (
    LEVEL_RE,
    Context,
    HeldReference,
    MapResult,
    business_error,
    business_identifier,
    codings_of,
    concept_text,
    fhir_moment,
    flush_pending,
    logical_id_system,
    resolve_patient,
    write_resource,
)
from integrations.fhir.errors import FhirError
from integrations.fhir.parse import fhir_datetime
from registry import codes
from registry.models import ExposureStatus, RecordStatus
from registry.services import (
    Identifier,
    RegistryValidationError,
    patient_merge,
)
from registry.timeutil import clinic_date, clinic_today
from scoring.services import SeriesInput

# --- Patient ------------------------------------------------------------------------------------
GENDER = {"male": "male", "female": "female", "other": "other", "unknown": "unknown"}


def map_patient(resource: Any, ctx: Context) -> MapResult:
    identifiers = [Identifier(str(i.system), str(i.value), str(i.use or ""),
                              _type_code(i)) for i in (resource.identifier or [])
                   if i.system and i.value]
    if resource.id:
        identifiers.append(Identifier(logical_id_system(ctx, "Patient"), str(resource.id)))
    if not identifiers:
        raise FhirError.single(400, "required",
                               "a Patient needs an identifier with system and value, or an id",
                               "Patient.identifier")
    name = next((n for n in resource.name or [] if n.use == "official"),
                (resource.name or [None])[0])
    deceased = fhir_datetime(resource.deceasedDateTime, "Patient.deceasedDateTime")
    gender = str(resource.gender) if resource.gender is not None else "unknown"
    if gender not in GENDER:  # (fhir.resources checks a code's form, not its value set)
        raise FhirError.single(400, "code-invalid", f"gender {gender[:40]!r} is not in FHIR's "
                               "AdministrativeGender (male | female | other | unknown)",
                               "Patient.gender")
    kwargs = {
        "identifiers": identifiers,
        "family_name": str(name.family or "") if name else "",
        "given_name": " ".join(name.given or []) if name else "",
        "birth_date": fhir_datetime(resource.birthDate, "Patient.birthDate"),
        "sex": GENDER[gender],
        "deceased_on": deceased.date() if isinstance(deceased, dt.datetime) else deceased,
    }
    links = [link for link in resource.link or []
             if str(link.type) == "replaced-by" and link.other is not None]
    if not links:
        return write_resource(ctx, "Patient", "patient", kwargs)
    if ctx.pending is not None:  # a merge needs the earlier patients written first
        flush_pending(ctx)
        pending, ctx.pending = ctx.pending, None
        try:
            return map_patient(resource, ctx)
        finally:
            ctx.pending = pending
    patient = write_resource(ctx, "Patient", "patient", kwargs).patient
    try:
        target = resolve_patient(ctx, links[0].other, "Patient.link.other")
    except HeldReference as exc:
        raise FhirError.single(422, "not-found", "the replacing Patient is not in the "
                               "registry; send it first", "Patient.link.other") from exc
    try:
        patient_merge(source=patient, target=target, actor=ctx.actor)
    except RegistryValidationError as exc:
        raise business_error(exc, "Patient") from exc
    return MapResult("Patient", str(target.pk), False, patient=target)


def _type_code(ident: Any) -> str:
    for _system, code, _ in codings_of(ident.type):
        if code:
            return code
    return ""


# --- Procedure ----------------------------------------------------------------------------------
def _levels(*texts: str) -> list[str]:
    found: list[str] = []
    for text in texts:
        found.extend(m for m in LEVEL_RE.findall(text or "") if m not in found)
    return found


def map_procedure(resource: Any, ctx: Context) -> MapResult:
    coding = next(((s, c, d) for s, c, d in codings_of(resource.code)
                   if codes.procedure_kind(s, c)), None)
    if coding is None:
        return MapResult("Procedure", ignored_reason="not a vertebroplasty/kyphoplasty code "
                         "(CPT 22510–22515 or SNOMED CT); ignored")
    status = str(resource.status)
    if status not in {"completed", "entered-in-error"}:
        return MapResult("Procedure", ignored_reason=f"status {status!r}: only completed "
                         "procedures are recorded; ignored")
    patient = resolve_patient(ctx, resource.subject, "Procedure.subject")
    performed = resource.performedDateTime or (
        resource.performedPeriod.start if resource.performedPeriod else None)
    at = fhir_moment(performed, "Procedure.performedDateTime")
    levels = _levels(*(concept_text(b) for b in resource.bodySite or []),
                     concept_text(resource.code))
    return write_resource(ctx, "Procedure", "procedure", {
        "patient": patient, "code_system": coding[0], "code": coding[1],
        "code_display": coding[2], "performed_at": at, "levels": levels,
        "identifier": business_identifier(resource, ctx),
        "record_status": RecordStatus.ENTERED_IN_ERROR if status == "entered-in-error"
        else RecordStatus.ACTIVE,
    }, patient)


# --- Condition / Encounter (fractures) ---------------------------------------------------------
def _fracture_from_codings(codings: list[tuple[str, str, str]]) -> tuple[str, str, str] | None:
    for system, code, display in codings:
        site = codes.fracture_site(system, code)
        if site:
            return system, code, display
    return None


def _record_fracture(resource_type: str, resource: Any, ctx: Context, codings: list,
                     subject: Any, when: Any, when_path: str, body_texts: list[str],
                     entered_in_error: bool) -> MapResult:
    coding = _fracture_from_codings(codings)
    if coding is None:
        return MapResult(resource_type, ignored_reason="not a fragility-fracture code "
                         "(ICD-10-CM / SNOMED CT); ignored")
    patient = resolve_patient(ctx, subject, f"{resource_type}.subject")
    site = codes.fracture_site(coding[0], coding[1]) or "other"
    level = ""
    if site == "vertebral":
        level = codes.resolve_fracture_level(coding[0], coding[1], _levels(*body_texts),
                                             _levels(coding[2]))
    return write_resource(ctx, resource_type, "fracture", {
        "patient": patient, "site": site, "vertebral_level": level,
        "diagnosed_at": fhir_moment(when, when_path), "code_system": coding[0], "code": coding[1],
        "code_display": coding[2], "identifier": business_identifier(resource, ctx),
        "record_status": RecordStatus.ENTERED_IN_ERROR if entered_in_error
        else RecordStatus.ACTIVE,
    }, patient)


def map_condition(resource: Any, ctx: Context) -> MapResult:
    verification = [c for _, c, _ in codings_of(resource.verificationStatus)]
    when = resource.onsetDateTime or resource.recordedDate or (
        resource.onsetPeriod.start if resource.onsetPeriod else None)
    return _record_fracture(
        "Condition", resource, ctx, codings_of(resource.code), resource.subject, when,
        "Condition.onsetDateTime", [concept_text(b) for b in resource.bodySite or []],
        entered_in_error=bool({"entered-in-error", "refuted"} & set(verification)),
    )


def map_encounter(resource: Any, ctx: Context) -> MapResult:
    codings = [c for reason in resource.reasonCode or [] for c in codings_of(reason)]
    when = resource.period.start if resource.period else None
    return _record_fracture(
        "Encounter", resource, ctx, codings, resource.subject, when, "Encounter.period.start",
        [concept_text(r) for r in resource.reasonCode or []],
        entered_in_error=str(resource.status) == "entered-in-error",
    )


# --- Medications --------------------------------------------------------------------------------
STATUS = {
    "active": ExposureStatus.ACTIVE, "completed": ExposureStatus.COMPLETED,
    "stopped": ExposureStatus.STOPPED, "cancelled": ExposureStatus.CANCELLED,
    "on-hold": ExposureStatus.STOPPED, "draft": ExposureStatus.UNKNOWN,
    "unknown": ExposureStatus.UNKNOWN, "not-taken": ExposureStatus.DECLINED,
    "not-done": ExposureStatus.DECLINED, "declined": ExposureStatus.DECLINED,
    "in-progress": ExposureStatus.ACTIVE, "intended": ExposureStatus.ACTIVE,
    "preparation": ExposureStatus.ACTIVE, "entered-in-error": ExposureStatus.CANCELLED,
}
KIND = {"MedicationRequest": "order", "MedicationDispense": "dispense",
        "MedicationAdministration": "administration", "MedicationStatement": "statement"}


def _medication_concept(resource: Any, ctx: Context) -> Any:
    if resource.medicationCodeableConcept is not None:
        return resource.medicationCodeableConcept
    ref = resource.medicationReference
    if ref is not None and ref.reference:
        key = str(ref.reference)
        for contained in resource.contained or []:
            if contained.get_resource_type() == "Medication" and f"#{contained.id}" == key:
                return contained.code
        if key in ctx.contained_medications:
            return ctx.contained_medications[key]
        if ref.display:
            return type("Concept", (), {"coding": [], "text": ref.display})()
    return None


def _agent(concept: Any) -> tuple[str, str, str] | None:
    rxnorm = atc = ""
    agent = None
    for system, code, _ in codings_of(concept):
        found = codes.agent_for_code(system, code)
        if system == codes.RXNORM:
            rxnorm = code
        if system == codes.ATC:
            atc = code
        agent = agent or found
    agent = agent or codes.agent_for_text(concept_text(concept))
    return (agent, rxnorm, atc) if agent else None


def _route(resource: Any, agent: str) -> str:
    dosages = list(getattr(resource, "dosageInstruction", None) or [])
    dosage = getattr(resource, "dosage", None)
    if dosage is not None and not isinstance(dosage, list):
        dosages.append(dosage)
    elif isinstance(dosage, list):
        dosages.extend(dosage)
    text = " ".join(concept_text(getattr(d, "route", None)) for d in dosages).lower()
    if "intravenous" in text or re.search(r"\biv\b", text):
        return "iv"
    if "subcutaneous" in text or re.search(r"\bsc\b", text):
        return "sc"
    if "oral" in text or "mouth" in text:
        return "oral"
    routes = list(codes.AGENTS[agent].dose_interval_days)
    return routes[0] if len(routes) == 1 else ("oral" if "oral" in routes else routes[0])


def _medication_dates(resource: Any, resource_type: str) -> tuple[Any, Any, str]:
    if resource_type == "MedicationRequest":
        period = None
        for d in resource.dosageInstruction or []:
            if d.timing and d.timing.repeat and d.timing.repeat.boundsPeriod:
                period = d.timing.repeat.boundsPeriod
        start = (period.start if period and period.start else resource.authoredOn)
        return start, period.end if period else None, "MedicationRequest.authoredOn"
    if resource_type == "MedicationDispense":
        return (resource.whenHandedOver or resource.whenPrepared, None,
                "MedicationDispense.whenHandedOver")
    period = resource.effectivePeriod
    start = resource.effectiveDateTime or (period.start if period else None)
    return start, period.end if period else None, f"{resource_type}.effective[x]"


def map_medication(resource: Any, ctx: Context) -> MapResult:
    resource_type = resource.get_resource_type()
    concept = _medication_concept(resource, ctx)
    found = _agent(concept)
    if found is None:
        return MapResult(resource_type, ignored_reason="not an anti-osteoporosis agent "
                         "(RxNorm / ATC / ingredient name); ignored")
    agent, rxnorm, atc = found
    patient = resolve_patient(ctx, resource.subject, f"{resource_type}.subject")
    start, end, where = _medication_dates(resource, resource_type)
    start_day = fhir_datetime(start, where)
    if start_day is None:
        raise FhirError.single(400, "required", "a start date is required", where)
    if isinstance(start_day, dt.datetime):
        start_day = start_day.date()
    end_day = fhir_datetime(end, f"{resource_type}.effectivePeriod.end")
    if isinstance(end_day, dt.datetime):
        end_day = end_day.date()
    status = str(resource.status)
    return write_resource(ctx, resource_type, "therapy", {
        "patient": patient, "agent": agent, "kind": KIND[resource_type],
        "start_on": start_day, "end_on": end_day,
        "status": STATUS.get(status, ExposureStatus.UNKNOWN),
        "route": _route(resource, agent), "rxnorm_code": rxnorm, "atc_code": atc,
        "identifier": business_identifier(resource, ctx),
        "record_status": RecordStatus.ENTERED_IN_ERROR if status == "entered-in-error"
        else RecordStatus.ACTIVE,
    }, patient)


# --- ImagingStudy -------------------------------------------------------------------------------
def _uid(value: str) -> str:
    return value[len("urn:oid:"):] if value.startswith("urn:oid:") else value


def map_imaging_study(resource: Any, ctx: Context) -> MapResult:
    uid = next((_uid(str(i.value)) for i in resource.identifier or []
                if str(i.system or "") == "urn:dicom:uid" and i.value), "")
    if not uid:
        raise FhirError.single(400, "required", "an ImagingStudy needs its Study Instance UID "
                               "as identifier (system urn:dicom:uid)", "ImagingStudy.identifier")
    modalities = [c for m in resource.modality or [] for c in [str(m.code or "")]]
    patient = resolve_patient(ctx, resource.subject, "ImagingStudy.subject")
    endpoint = ""
    for ref in resource.endpoint or []:
        key = str(ref.reference or "")
        for contained in resource.contained or []:
            if contained.get_resource_type() == "Endpoint" and f"#{contained.id}" == key:
                endpoint = str(contained.address)
    series = [
        SeriesInput(series_instance_uid=_uid(str(s.uid)), modality=str(s.modality.code or ""),
                    description=str(s.description or ""), number=s.number,
                    body_part=concept_text(s.bodySite), instance_count=s.numberOfInstances)
        for s in resource.series or []
    ]
    started = fhir_moment(resource.started, "ImagingStudy.started") if resource.started else None
    if started is not None:
        day = clinic_date(started)
        if day > clinic_today():
            raise FhirError.single(422, "business-rule", "ImagingStudy.started is in the future",
                                   "ImagingStudy.started")
        if patient.birth_date and day < patient.birth_date:
            raise FhirError.single(422, "business-rule", "ImagingStudy.started is before the "
                                   "patient's birth date", "ImagingStudy.started")
    return write_resource(ctx, "ImagingStudy", "imaging", {
        "study_instance_uid": uid, "patient": patient, "source": "fhir", "started_at": started,
        "modality": ",".join(modalities), "description": str(resource.description or ""),
        "endpoint_url": endpoint, "series": series,
        "record_status": "entered-in-error" if str(resource.status) == "entered-in-error"
        else "active",
    }, patient)


MAPPERS: dict[str, Callable[[Any, Context], MapResult]] = {
    "Patient": map_patient,
    "Procedure": map_procedure,
    "Condition": map_condition,
    "Encounter": map_encounter,
    "MedicationRequest": map_medication,
    "MedicationDispense": map_medication,
    "MedicationAdministration": map_medication,
    "MedicationStatement": map_medication,
    "ImagingStudy": map_imaging_study,
}
