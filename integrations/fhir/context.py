"""The context of one FHIR ingest (a resource, a batch or a transaction bundle) and the write
path every mapper (``integrations.fhir.mappers``) shares.

``Context`` carries the feed, the actor, the patients already resolved and, for a transaction
bundle, the writes collected so far. Writes go through ``write_resource``: one registry service
call per resource, or, when the context collects writes (``Context.pending``), a
``PendingWrite`` that ``flush_pending`` hands to the bulk variant of the same service
(``registry.services_bulk``). ``resolve_patient`` finds a resource's subject or raises
``HeldReference`` when the registry does not know it yet.
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
from registry import services
from registry.lookup import patients_by_identifier
from registry.models import Patient, PatientIdentifier
from registry.services import Identifier, RegistryValidationError
from registry.services_bulk import (
    SOURCED_KINDS,
    fracture_record_many,
    patient_upsert_many,
    procedure_record_many,
    sourced_record_many,
    therapy_record_many,
)
from registry.side_effects import Actor
from registry.timeutil import start_of_clinic_day
from scoring.services import imaging_study_upsert
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


SINGLE: dict[str, Callable[..., tuple[Any, bool]]] = {
    "patient": services.patient_upsert, "procedure": services.procedure_record,
    "fracture": services.fracture_record, "therapy": services.therapy_record,
    "imaging": imaging_study_upsert,
}
BULK: dict[str, Callable[..., list[tuple[Any, bool]]]] = {
    "patient": patient_upsert_many, "procedure": procedure_record_many,
    "fracture": fracture_record_many, "therapy": therapy_record_many,
    "imaging": imaging_study_upsert_many,
}


def write_resource(ctx: Context, resource_type: str, kind: str, kwargs: dict[str, Any],
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
        raise business_error(exc, resource_type) from exc
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
            error = business_error(exc, write.result.resource_type)
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
            error = business_error(exc, write.result.resource_type)
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


def business_identifier(resource: Any, ctx: Context) -> Identifier | None:
    for ident in resource.identifier or []:
        if ident.system and ident.value:
            return Identifier(str(ident.system), str(ident.value))
    if resource.id:
        return Identifier(logical_id_system(ctx, resource.get_resource_type()), str(resource.id))
    return None


def codings_of(concept: Any) -> list[tuple[str, str, str]]:
    if concept is None:
        return []
    return [(str(c.system or ""), str(c.code or ""), str(c.display or ""))
            for c in (concept.coding or [])]


def concept_text(concept: Any) -> str:
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


def fhir_moment(value: Any, where: str) -> dt.datetime:
    parsed = fhir_datetime(value, where)
    if parsed is None:
        raise FhirError.single(400, "required", "a date is required", where)
    if isinstance(parsed, dt.datetime):
        if parsed.tzinfo is None:
            raise FhirError.single(400, "value", "a dateTime with a time needs a time zone",
                                   where)
        return parsed
    return start_of_clinic_day(parsed) + dt.timedelta(hours=12)


def business_error(exc: RegistryValidationError, resource_type: str) -> FhirError:
    code = "business-rule" if exc.code in {"future", "before-birth", "conflict"} else "value"
    status = 409 if exc.code == "conflict" else 422
    return FhirError.single(status, code, exc.messages[0], f"{resource_type}.{exc.field}"
                            if exc.field else resource_type)
