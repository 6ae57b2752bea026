"""One mapper per resourceType: a validated fhir.resources model → registry services.

Each mapper returns a ``MapResult`` (what was written, or an informational reason it was
ignored). It raises ``FhirError`` for invalid content, or ``HeldReference`` when the resource
names a patient the registry does not know yet (the caller stores it and applies it when that
Patient arrives). Upserts go by business identifier; a resource without one gets a feed-scoped
identifier from its logical id, so a resend updates rather than duplicates.

Writes go through ``_write``: one registry service call per resource, or, when the context
collects writes (``Context.pending``, a transaction bundle), a ``PendingWrite`` that
``flush_pending`` hands to the bulk variant of the same service (``registry.services_bulk``).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.db import connection

from integrations.fhir.errors import FhirError
from integrations.fhir.limits import check_columns
from integrations.fhir.parse import fhir_datetime
from registry import codes
from registry.lookup import patients_by_identifier
from registry.models import ExposureStatus, Patient, PatientIdentifier, RecordStatus
from registry.services import (
    Identifier,
    RegistryValidationError,
    fracture_record,
    patient_merge,
    patient_upsert,
    procedure_record,
    therapy_record,
)
from registry.services_bulk import (
    SOURCED_KINDS,
    fracture_record_many,
    patient_upsert_many,
    procedure_record_many,
    sourced_record_many,
    therapy_record_many,
)
from registry.side_effects import Actor
from registry.timeutil import clinic_date, clinic_today, start_of_clinic_day
from scoring.services import SeriesInput, imaging_study_upsert
from scoring.services_bulk import imaging_study_statement, imaging_study_upsert_many

LEVEL_RE = re.compile(r"\b([CTL][1-9][0-2]?|S1)\b")


class HeldReference(Exception):
    """The resource references a patient not (yet) in the registry."""

    def __init__(self, reference_key: str) -> None:
        super().__init__(reference_key)
        self.reference_key = reference_key


@dataclass
class MapResult:
    resource_type: str
    object_id: str = ""
    created: bool = False
    ignored_reason: str = ""
    patient: Patient | None = None


@dataclass
class PendingWrite:
    """A write collected for a bulk service call; ``result`` is filled by ``flush_pending``."""

    kind: str  # patient | procedure | fracture | therapy | imaging
    kwargs: dict[str, Any]
    result: MapResult
    where: str  # the entry's expression prefix, to name it in an error


@dataclass
class Context:
    feed_name: str
    actor: Actor
    bundle_patients: dict[str, Patient] = field(default_factory=dict)  # fullUrl → patient
    contained_medications: dict[str, Any] = field(default_factory=dict)
    # Collect writes for bulk services instead of writing each resource (None: write each).
    pending: list[PendingWrite] | None = None
    entry_where: str = ""  # expression prefix of the entry being mapped
    # (system, value) → patient (None: not in the registry), filled by ``prefetch_patients``.
    patient_cache: dict[tuple[str, str], Patient | None] = field(default_factory=dict)
    # The patients the pending Patient writes name, looked up and locked by the caller
    # (``registry.services_bulk.lookup_patients``); used by the next flush only.
    patient_owners: dict[tuple[str, str], Patient] | None = None
    # Set by the caller: the next flush hands the INSERT of NEW patients to ``deferred``
    # (``patient_upsert_many(deferred=...)``) and a later flush (or ``run_deferred``) runs it
    # within its own bulk statement.
    defer_new_patients: bool = False
    deferred: list[Any] = field(default_factory=list)
    # Called with the entry outcomes as the last statement inside a transaction bundle's
    # database transaction (the view records the InboundMessage outcome there).
    before_commit: Callable[[list[tuple[int, Any]]], None] | None = None
    # Called first inside each attempt's database transaction, before its first statement
    # (the view stores the raw payload there in its own commit: ``views._store_at_begin``).
    at_begin: Callable[[], None] | None = None

    def reset(self) -> None:
        self.bundle_patients.clear()
        self.patient_cache.clear()
        self.pending = None
        self.entry_where = ""
        self.patient_owners = None
        self.defer_new_patients = False
        self.deferred.clear()


def _imaging_single(**kwargs: Any) -> tuple[Any, bool]:

    return imaging_study_upsert(**kwargs)


def _imaging_many(**kwargs: Any) -> list[tuple[Any, bool]]:

    return imaging_study_upsert_many(**kwargs)


SINGLE: dict[str, Callable[..., tuple[Any, bool]]] = {
    "patient": patient_upsert, "procedure": procedure_record, "fracture": fracture_record,
    "therapy": therapy_record, "imaging": _imaging_single,
}
BULK: dict[str, Callable[..., list[tuple[Any, bool]]]] = {
    "patient": patient_upsert_many, "procedure": procedure_record_many,
    "fracture": fracture_record_many, "therapy": therapy_record_many, "imaging": _imaging_many,
}


def _write(ctx: Context, resource_type: str, kind: str, kwargs: dict[str, Any],
           patient: Patient | None = None) -> MapResult:
    """Write one mapped resource now, or collect it when the context collects writes. Every
    value is checked against its column first (``limits.check_columns``: 422, nothing
    written)."""
    check_columns(kind, kwargs, resource_type)
    if ctx.pending is not None:
        result = MapResult(resource_type, patient=patient)
        ctx.pending.append(PendingWrite(kind, kwargs, result, ctx.entry_where))
        return result
    try:
        obj, created = SINGLE[kind](**kwargs, actor=ctx.actor)
    except RegistryValidationError as exc:
        raise _business_error(exc, resource_type) from exc
    return MapResult(resource_type, str(obj.pk), created, patient=patient or (
        obj if kind == "patient" else None))


def flush_pending(ctx: Context) -> None:
    """Write the collected resources: one bulk service call per kind. A validation error names
    its entry (``FhirError`` with the entry's expression prefix); nothing is half-written
    because the caller's transaction rolls back."""
    pending, ctx.pending = ctx.pending or [], []
    by_kind: dict[str, list[PendingWrite]] = {}
    for write in pending:
        by_kind.setdefault(write.kind, []).append(write)
    done: dict[str, list[tuple[Any, bool]]] = {}
    sourced = {k: [w.kwargs for w in by_kind[k]] for k in SOURCED_KINDS if by_kind.get(k)}
    extra = {}
    if ctx.deferred and not by_kind.get("patient") and (sourced or by_kind.get("imaging")):
        # the new patients of an earlier flush go with these writes
        extra.update({f"deferred{n}": part for n, part in enumerate(ctx.deferred)})
        ctx.deferred.clear()
    if (sourced or extra) and by_kind.get("imaging") and connection.vendor == "postgresql":

        extra["imaging"] = imaging_study_statement(
            items=[w.kwargs for w in by_kind["imaging"]], actor=ctx.actor)
    if len(sourced) + len(extra) > 1:  # procedures, fractures, therapy, imaging: one statement
        try:
            done = sourced_record_many(groups=sourced, actor=ctx.actor, extra=extra)
        except RegistryValidationError as exc:
            write = by_kind[getattr(exc, "kind", next(iter(sourced)))][getattr(exc, "index", 0)]
            error = _business_error(exc, write.result.resource_type)
            raise (error.prefixed(write.where) if write.where else error) from exc
    known, ctx.patient_owners = ctx.patient_owners, None
    patient_options: dict[str, Any] = {}
    if known is not None:
        patient_options["known"] = known
    if ctx.defer_new_patients:
        patient_options["deferred"] = ctx.deferred
        ctx.defer_new_patients = False
    for kind in ("patient", "procedure", "fracture", "therapy", "imaging"):
        writes = by_kind.get(kind)
        if not writes:
            continue
        try:
            results = done[kind] if kind in done else BULK[kind](
                items=[w.kwargs for w in writes], actor=ctx.actor,
                **(patient_options if kind == "patient" else {}))
        except RegistryValidationError as exc:
            write = writes[getattr(exc, "index", 0)]
            error = _business_error(exc, write.result.resource_type)
            raise (error.prefixed(write.where) if write.where else error) from exc
        for write, (obj, created) in zip(writes, results, strict=True):
            write.result.object_id = str(getattr(obj, "pk", obj))
            write.result.created = created
            if kind == "patient":
                write.result.patient = obj


def run_deferred(ctx: Context) -> None:
    """Run the writes still deferred (``Context.deferred``), each on its own."""
    parts, ctx.deferred[:] = list(ctx.deferred), []
    for part in parts:
        part.run()


def _subject_keys(ctx: Context, ref: Any) -> tuple[str, str] | None:
    """The (system, value) of the PatientIdentifier a reference points to, if it needs one."""
    if ref is None:
        return None
    if ref.reference:
        text = str(ref.reference)
        if text in ctx.bundle_patients or text.startswith("urn:uuid:"):
            return None
        tail = text.rsplit("Patient/", 1)
        if len(tail) != 2 or not tail[1]:
            return None
        return logical_id_system(ctx, "Patient"), tail[1].split("/")[0]
    if ref.identifier and ref.identifier.system and ref.identifier.value:
        return str(ref.identifier.system), str(ref.identifier.value)
    return None


def prefetch_patients(ctx: Context, resources: list[Any]) -> None:
    """Look up every patient the resources' ``subject`` names in ONE query, so that
    ``resolve_patient`` needs none."""
    keys = {k for r in resources
            if (k := _subject_keys(ctx, getattr(r, "subject", None))) is not None}
    keys -= set(ctx.patient_cache)
    if not keys:
        return
    run_deferred(ctx)  # a deferred new patient must be found by the lookup
    found = patients_by_identifier(keys)
    for key in keys:
        ctx.patient_cache[key] = found.get(key)


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
        patient = _lookup(ctx, logical_id_system(ctx, "Patient"), tail[1].split("/")[0])
        if patient is None:
            raise HeldReference(reference_key(ctx, text))
        return _live(patient)
    if ref.identifier and ref.identifier.system and ref.identifier.value:
        patient = _lookup(ctx, str(ref.identifier.system), str(ref.identifier.value))
        if patient is None:
            raise HeldReference(f"identifier|{ref.identifier.system}|{ref.identifier.value}")
        return _live(patient)
    raise FhirError.single(400, "required", "the reference has neither reference nor identifier",
                           where)


def _lookup(ctx: Context, system: str, value: str) -> Patient | None:
    if (system, value) in ctx.patient_cache:
        return ctx.patient_cache[(system, value)]
    ident = PatientIdentifier.objects.select_related("patient").filter(
        system=system, value=value).first()
    return ident.patient if ident is not None else None


def _live(patient: Patient) -> Patient:
    while patient.merged_into_id:
        patient = Patient.objects.get(pk=patient.merged_into_id)
    return patient


def _moment(value: Any, where: str) -> dt.datetime:
    parsed = fhir_datetime(value, where)
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
        return _write(ctx, "Patient", "patient", kwargs)
    if ctx.pending is not None:  # a merge needs the earlier patients written first
        flush_pending(ctx)
        pending, ctx.pending = ctx.pending, None
        try:
            return map_patient(resource, ctx)
        finally:
            ctx.pending = pending
    patient = _write(ctx, "Patient", "patient", kwargs).patient
    try:
        target = resolve_patient(ctx, links[0].other, "Patient.link.other")
    except HeldReference as exc:
        raise FhirError.single(422, "not-found", "the replacing Patient is not in the "
                               "registry; send it first", "Patient.link.other") from exc
    try:
        patient_merge(source=patient, target=target, actor=ctx.actor)
    except RegistryValidationError as exc:
        raise _business_error(exc, "Patient") from exc
    return MapResult("Patient", str(target.pk), False, patient=target)


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
    return _write(ctx, "Procedure", "procedure", {
        "patient": patient, "code_system": coding[0], "code": coding[1],
        "code_display": coding[2], "performed_at": at, "levels": levels,
        "identifier": _identifier(resource, ctx),
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
    return _write(ctx, resource_type, "fracture", {
        "patient": patient, "site": site, "vertebral_level": level,
        "diagnosed_at": _moment(when, when_path), "code_system": coding[0], "code": coding[1],
        "code_display": coding[2], "identifier": _identifier(resource, ctx),
        "record_status": RecordStatus.ENTERED_IN_ERROR if entered_in_error
        else RecordStatus.ACTIVE,
    }, patient)


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
    start_day = fhir_datetime(start, where)
    if start_day is None:
        raise FhirError.single(400, "required", "a start date is required", where)
    if isinstance(start_day, dt.datetime):
        start_day = start_day.date()
    end_day = fhir_datetime(end, f"{resource_type}.effectivePeriod.end")
    if isinstance(end_day, dt.datetime):
        end_day = end_day.date()
    status = str(resource.status)
    return _write(ctx, resource_type, "therapy", {
        "patient": patient, "agent": agent, "kind": KIND[resource_type],
        "start_on": start_day, "end_on": end_day,
        "status": STATUS.get(status, ExposureStatus.UNKNOWN),
        "route": _route(resource, agent), "rxnorm_code": rxnorm, "atc_code": atc,
        "identifier": _identifier(resource, ctx),
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
                    body_part=_text(s.bodySite), instance_count=s.numberOfInstances)
        for s in resource.series or []
    ]
    started = _moment(resource.started, "ImagingStudy.started") if resource.started else None
    if started is not None:
        day = clinic_date(started)
        if day > clinic_today():
            raise FhirError.single(422, "business-rule", "ImagingStudy.started is in the future",
                                   "ImagingStudy.started")
        if patient.birth_date and day < patient.birth_date:
            raise FhirError.single(422, "business-rule", "ImagingStudy.started is before the "
                                   "patient's birth date", "ImagingStudy.started")
    return _write(ctx, "ImagingStudy", "imaging", {
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
