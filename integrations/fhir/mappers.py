"""One mapper per resourceType: a validated fhir.resources model → registry services.

Each mapper returns a ``MapResult`` (what was written, or an informational reason it was
ignored). It raises ``FhirError`` for invalid content, or ``HeldReference`` when the resource
names a patient the registry does not know yet (the caller stores it and applies it when that
Patient arrives). Upserts go by business identifier; a resource without one gets a feed-scoped
identifier from its logical id, so a resend updates rather than duplicates.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from integrations.fhir.errors import FhirError
from integrations.fhir.parse import fhir_datetime
from registry import codes
from registry.models import ExposureStatus, Patient, PatientIdentifier, RecordStatus
from registry.services import (
    Actor,
    Identifier,
    RegistryValidationError,
    fracture_record,
    patient_merge,
    patient_upsert,
    procedure_record,
    therapy_record,
)
from registry.timeutil import start_of_clinic_day

LEVEL_RE = re.compile(r"\b([CTL][1-9][0-2]?|S1)\b")


class HeldReference(Exception):
    """The resource references a patient not (yet) in the registry."""

    def __init__(self, reference_key: str) -> None:
        super().__init__(reference_key)
        self.reference_key = reference_key


@dataclass
class Context:
    feed_name: str
    actor: Actor
    bundle_patients: dict[str, Patient] = field(default_factory=dict)  # fullUrl → patient
    contained_medications: dict[str, Any] = field(default_factory=dict)


@dataclass
class MapResult:
    resource_type: str
    object_id: str = ""
    created: bool = False
    ignored_reason: str = ""
    patient: Patient | None = None


def logical_id_system(ctx: Context, resource_type: str) -> str:
    return f"urn:vbq-registry:feed:{ctx.feed_name}:{resource_type}"


def _identifier(resource: Any, ctx: Context) -> Identifier | None:
    for ident in resource.identifier or []:
        if ident.system and ident.value:
            return Identifier(str(ident.system), str(ident.value))
    if resource.id:
        return Identifier(logical_id_system(ctx, resource.get_resource_type()), str(resource.id))
    return None


def _codings(concept: Any) -> list[tuple[str, str, str]]:
    if concept is None:
        return []
    return [(str(c.system or ""), str(c.code or ""), str(c.display or ""))
            for c in (concept.coding or [])]


def _text(concept: Any) -> str:
    """Human text of a CodeableConcept (text + codings' displays) or of a bare Coding."""
    if concept is None:
        return ""
    if not hasattr(concept, "coding"):
        return str(getattr(concept, "display", "") or getattr(concept, "code", "") or "")
    parts = [getattr(concept, "text", "") or ""] + [
        c.display or "" for c in (concept.coding or [])]
    return " ".join(p for p in parts if p)


def reference_key(ctx: Context, reference: str) -> str:
    ref = reference.strip()
    if "/Patient/" in ref:
        ref = "Patient/" + ref.rsplit("/Patient/", 1)[1]
    return f"{ctx.feed_name}|{ref}"


def resolve_patient(ctx: Context, ref: Any, where: str) -> Patient:
    """Resolve ``subject``/``patient``: bundle fullUrl, Patient/<id> of this feed, or a
    business identifier. Raises ``HeldReference`` for an unknown patient."""
    if ref is None:
        raise FhirError.single(400, "required", "a patient reference is required", where)
    if ref.reference:
        text = str(ref.reference)
        if text in ctx.bundle_patients:
            return ctx.bundle_patients[text]
        if text.startswith("urn:uuid:"):
            raise FhirError.single(400, "not-found", f"{text} is not a Patient in this bundle",
                                   f"{where}.reference")
        tail = text.rsplit("Patient/", 1)
        if len(tail) != 2 or not tail[1]:
            raise FhirError.single(400, "invalid", f"{text} is not a Patient reference",
                                   f"{where}.reference")
        ident = PatientIdentifier.objects.select_related("patient").filter(
            system=logical_id_system(ctx, "Patient"), value=tail[1].split("/")[0]
        ).first()
        if ident is None:
            raise HeldReference(reference_key(ctx, text))
        return _live(ident.patient)
    if ref.identifier and ref.identifier.system and ref.identifier.value:
        ident = PatientIdentifier.objects.select_related("patient").filter(
            system=str(ref.identifier.system), value=str(ref.identifier.value)).first()
        if ident is None:
            raise HeldReference(f"identifier|{ref.identifier.system}|{ref.identifier.value}")
        return _live(ident.patient)
    raise FhirError.single(400, "required", "the reference has neither reference nor identifier",
                           where)


def _live(patient: Patient) -> Patient:
    while patient.merged_into_id:
        patient = Patient.objects.get(pk=patient.merged_into_id)
    return patient


def _moment(value: Any, where: str) -> dt.datetime:
    parsed = fhir_datetime(value)
    if parsed is None:
        raise FhirError.single(400, "required", "a date is required", where)
    if isinstance(parsed, dt.datetime):
        if parsed.tzinfo is None:
            raise FhirError.single(400, "value", "a dateTime with a time needs a time zone",
                                   where)
        return parsed
    return start_of_clinic_day(parsed) + dt.timedelta(hours=12)


def _business_error(exc: RegistryValidationError, resource_type: str) -> FhirError:
    code = "business-rule" if exc.code in {"future", "before-birth", "conflict"} else "value"
    status = 409 if exc.code == "conflict" else 422
    return FhirError.single(status, code, exc.messages[0], f"{resource_type}.{exc.field}"
                            if exc.field else resource_type)


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
    deceased = fhir_datetime(resource.deceasedDateTime)
    try:
        patient, created = patient_upsert(
            identifiers=identifiers,
            family_name=str(name.family or "") if name else "",
            given_name=" ".join(name.given or []) if name else "",
            birth_date=fhir_datetime(resource.birthDate),  # type: ignore[arg-type]
            sex=GENDER.get(str(resource.gender or "unknown"), "unknown"),
            deceased_on=deceased.date() if isinstance(deceased, dt.datetime) else deceased,
            actor=ctx.actor,
        )
    except RegistryValidationError as exc:
        raise _business_error(exc, "Patient") from exc
    for link in resource.link or []:
        if str(link.type) == "replaced-by" and link.other is not None:
            try:
                target = resolve_patient(ctx, link.other, "Patient.link.other")
            except HeldReference as exc:
                raise FhirError.single(422, "not-found", "the replacing Patient is not in the "
                                       "registry; send it first", "Patient.link.other") from exc
            try:
                patient_merge(source=patient, target=target, actor=ctx.actor)
            except RegistryValidationError as exc:
                raise _business_error(exc, "Patient") from exc
            return MapResult("Patient", str(target.pk), False, patient=target)
    return MapResult("Patient", str(patient.pk), created, patient=patient)


def _type_code(ident: Any) -> str:
    for _system, code, _ in _codings(ident.type):
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
    coding = next(((s, c, d) for s, c, d in _codings(resource.code)
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
    at = _moment(performed, "Procedure.performedDateTime")
    levels = _levels(*(_text(b) for b in resource.bodySite or []), _text(resource.code))
    try:
        proc, created = procedure_record(
            patient=patient, code_system=coding[0], code=coding[1], code_display=coding[2],
            performed_at=at, levels=levels, identifier=_identifier(resource, ctx),
            record_status=RecordStatus.ENTERED_IN_ERROR if status == "entered-in-error"
            else RecordStatus.ACTIVE,
            actor=ctx.actor,
        )
    except RegistryValidationError as exc:
        raise _business_error(exc, "Procedure") from exc
    return MapResult("Procedure", str(proc.pk), created, patient=patient)


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
        level = codes.fracture_level_from_code(coding[0], coding[1]) or next(
            iter(_levels(*body_texts, coding[2])), "")
    try:
        fracture, created = fracture_record(
            patient=patient, site=site, vertebral_level=level,
            diagnosed_at=_moment(when, when_path), code_system=coding[0], code=coding[1],
            code_display=coding[2], identifier=_identifier(resource, ctx),
            record_status=RecordStatus.ENTERED_IN_ERROR if entered_in_error
            else RecordStatus.ACTIVE,
            actor=ctx.actor,
        )
    except RegistryValidationError as exc:
        raise _business_error(exc, resource_type) from exc
    return MapResult(resource_type, str(fracture.pk), created, patient=patient)


def map_condition(resource: Any, ctx: Context) -> MapResult:
    verification = [c for _, c, _ in _codings(resource.verificationStatus)]
    when = resource.onsetDateTime or resource.recordedDate or (
        resource.onsetPeriod.start if resource.onsetPeriod else None)
    return _record_fracture(
        "Condition", resource, ctx, _codings(resource.code), resource.subject, when,
        "Condition.onsetDateTime", [_text(b) for b in resource.bodySite or []],
        entered_in_error=bool({"entered-in-error", "refuted"} & set(verification)),
    )


def map_encounter(resource: Any, ctx: Context) -> MapResult:
    codings = [c for reason in resource.reasonCode or [] for c in _codings(reason)]
    when = resource.period.start if resource.period else None
    return _record_fracture(
        "Encounter", resource, ctx, codings, resource.subject, when, "Encounter.period.start",
        [_text(r) for r in resource.reasonCode or []],
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
    for system, code, _ in _codings(concept):
        found = codes.agent_for_code(system, code)
        if system == codes.RXNORM:
            rxnorm = code
        if system == codes.ATC:
            atc = code
        agent = agent or found
    agent = agent or codes.agent_for_text(_text(concept))
    return (agent, rxnorm, atc) if agent else None


def _route(resource: Any, agent: str) -> str:
    dosages = list(getattr(resource, "dosageInstruction", None) or [])
    dosage = getattr(resource, "dosage", None)
    if dosage is not None and not isinstance(dosage, list):
        dosages.append(dosage)
    elif isinstance(dosage, list):
        dosages.extend(dosage)
    text = " ".join(_text(getattr(d, "route", None)) for d in dosages).lower()
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
    start_day = fhir_datetime(start)
    if start_day is None:
        raise FhirError.single(400, "required", "a start date is required", where)
    if isinstance(start_day, dt.datetime):
        start_day = start_day.date()
    end_day = fhir_datetime(end)
    if isinstance(end_day, dt.datetime):
        end_day = end_day.date()
    status = str(resource.status)
    try:
        exposure, created = therapy_record(
            patient=patient, agent=agent, kind=KIND[resource_type],
            start_on=start_day, end_on=end_day, status=STATUS.get(status, ExposureStatus.UNKNOWN),
            route=_route(resource, agent), rxnorm_code=rxnorm, atc_code=atc,
            identifier=_identifier(resource, ctx),
            record_status=RecordStatus.ENTERED_IN_ERROR if status == "entered-in-error"
            else RecordStatus.ACTIVE,
            actor=ctx.actor,
        )
    except RegistryValidationError as exc:
        raise _business_error(exc, resource_type) from exc
    return MapResult(resource_type, str(exposure.pk), created, patient=patient)


# --- ImagingStudy -------------------------------------------------------------------------------
def _uid(value: str) -> str:
    return value[len("urn:oid:"):] if value.startswith("urn:oid:") else value


def map_imaging_study(resource: Any, ctx: Context) -> MapResult:
    from scoring.services import SeriesInput, imaging_study_upsert

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
                    body_part=_text(s.bodySite), instance_count=s.numberOfInstances)
        for s in resource.series or []
    ]
    started = _moment(resource.started, "ImagingStudy.started") if resource.started else None
    try:
        study, created = imaging_study_upsert(
            study_instance_uid=uid, patient=patient, source="fhir", started_at=started,
            modality=",".join(modalities), description=str(resource.description or ""),
            endpoint_url=endpoint, series=series,
            record_status="entered-in-error" if str(resource.status) == "entered-in-error"
            else "active",
            actor=ctx.actor,
        )
    except RegistryValidationError as exc:
        raise _business_error(exc, "ImagingStudy") from exc
    return MapResult("ImagingStudy", str(study.pk), created, patient=patient)


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
