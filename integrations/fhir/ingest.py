"""Apply FHIR resources and bundles to the registry.

- One resource: parse (fhir.resources) → mapper → registry services.
- Transaction bundle: every entry parsed once, then applied in ONE database transaction; any
  bad entry rolls back all and the error names the entry index. Patients are processed first so
  ``urn:uuid`` fullUrl references inside the bundle resolve. Writes are collected and handed to
  the bulk services (``registry.services_bulk``), audit rows written in one INSERT and follow-up
  re-evaluation queued once per patient (``deferred_side_effects``).
- Batch bundle: each entry in its own savepoint; good entries are kept, bad ones answer their
  own status and OperationOutcome.
- Held references: a resource naming an unknown patient is stored as ``HeldResource`` and
  applied when the Patient arrives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from django.db import IntegrityError, OperationalError, connection, transaction
from django.utils import timezone

from integrations.fhir.errors import FhirError, Issue, rule_violation
from integrations.fhir.mappers import (
    MAPPERS,
    Context,
    HeldReference,
    MapResult,
    flush_pending,
    prefetch_patients,
    reference_key,
    run_deferred,
)
from integrations.fhir.parse import parse_resource
from integrations.models import HeldResource
from registry.services import deferred_side_effects
from registry.services_bulk import lookup_patients

logger = logging.getLogger(__name__)
ORDER = {"Patient": 0}


@dataclass
class EntryOutcome:
    status: int
    location: str = ""
    issues: list[Issue] = field(default_factory=list)

    @property
    def status_line(self) -> str:
        return {200: "200 OK", 201: "201 Created", 202: "202 Accepted"}.get(
            self.status, str(self.status))


def parse_entry(data: Any, *, allowed: Any, expression_prefix: str = "") -> Any:
    """Check the type is supported and allowed for the feed; validate with fhir.resources."""
    resource_type = data.get("resourceType") if isinstance(data, dict) else None
    if isinstance(resource_type, str) and resource_type not in MAPPERS and resource_type:
        raise FhirError.single(400, "not-supported",
                               f"resourceType {resource_type!r} is not supported here",
                               f"{expression_prefix}.resourceType" if expression_prefix
                               else "resourceType")
    model = parse_resource(data, expression_prefix=expression_prefix)
    resource_type = model.get_resource_type()
    if not allowed(resource_type):
        raise FhirError.single(403, "forbidden",
                               f"this feed may not submit {resource_type} resources",
                               expression_prefix or resource_type)
    return model


def map_entry(model: Any, data: dict[str, Any], ctx: Context, *, expression_prefix: str = ""
              ) -> MapResult | EntryOutcome:
    """Run the mapper of a parsed resource. A reference to an unknown patient is held (202)."""
    resource_type = model.get_resource_type()
    try:
        return MAPPERS[resource_type](model, ctx)
    except (AttributeError, TypeError, KeyError) as exc:
        # A resource shape the mapper does not handle: refuse it clearly, write nothing.
        logger.exception("mapper %s failed", resource_type)
        raise FhirError.single(422, "processing", f"cannot process this {resource_type}: "
                               f"{type(exc).__name__}", expression_prefix or resource_type
                               ) from exc
    except HeldReference as held:
        HeldResource.objects.create(feed_id=ctx.actor.feed_id, reference_key=held.reference_key,
                                    resource_type=resource_type, resource=data)
        return EntryOutcome(202, issues=[Issue(
            "information", "informational",
            "the referenced patient is not in the registry yet: the resource is held and will "
            "be applied when the Patient arrives")])


def entry_outcome(result: MapResult | EntryOutcome) -> EntryOutcome:
    if isinstance(result, EntryOutcome):
        return result
    if result.ignored_reason:
        return EntryOutcome(200, issues=[Issue("information", "informational",
                                               result.ignored_reason)])
    return EntryOutcome(201 if result.created else 200,
                        f"{result.resource_type}/{result.object_id}")


def apply_resource(data: dict[str, Any], ctx: Context, *, allowed: Any,
                   expression_prefix: str = "", full_url: str = "") -> EntryOutcome:
    """Validate and apply one resource (inside the caller's transaction)."""
    model = parse_entry(data, allowed=allowed, expression_prefix=expression_prefix)
    result = map_entry(model, data, ctx, expression_prefix=expression_prefix)
    if (isinstance(result, MapResult) and result.resource_type == "Patient"
            and result.patient is not None):
        if full_url:
            ctx.bundle_patients[full_url] = result.patient
        release_held([(result.patient, model)], ctx, allowed)
    return entry_outcome(result)


def _held_keys(model: Any, ctx: Context) -> list[str]:
    keys = [reference_key(ctx, f"Patient/{model.id}")] if model.id else []
    return keys + [f"identifier|{i.system}|{i.value}" for i in model.identifier or []
                   if i.system and i.value]


HELD_IDS_SQL = (f"SELECT id FROM {HeldResource._meta.db_table} "  # noqa: S608
                "WHERE reference_key = ANY(%s) AND applied_at IS NULL ORDER BY id FOR UPDATE")


def lock_patients_and_held(ctx: Context, models: list[Any]) -> list[int]:
    """Before the pending Patient writes are flushed: ONE round trip looks up (and locks) the
    patients their identifiers name — handed to ``patient_upsert_many`` through
    ``ctx.patient_owners`` — and locks the resources held for these Patients (their ids are
    returned, for ``release_held``)."""
    keys = {(i.system, i.value) for w in ctx.pending or [] if w.kind == "patient"
            for i in w.kwargs["identifiers"]}
    held_keys = sorted({key for model in models for key in _held_keys(model, ctx)})
    if connection.vendor != "postgresql":  # HELD_IDS_SQL is PostgreSQL's (ANY, FOR UPDATE)
        ctx.patient_owners = lookup_patients(keys, lock=True)[0]
        return list(HeldResource.objects.select_for_update().filter(
            reference_key__in=held_keys, applied_at__isnull=True).order_by("id")
            .values_list("id", flat=True))
    owners, rows = lookup_patients(keys, lock=True, also=(HELD_IDS_SQL, [held_keys]))
    ctx.patient_owners = owners
    return [row[0] for row in rows]


def release_held(patients: list[tuple[Any, Any]], ctx: Context, allowed: Any,
                 held_ids: list[int] | None = None) -> int:
    """Apply resources held for these (patient, Patient model) pairs (by feed-scoped id or
    business identifier): one query to find them, then each in its own savepoint.
    ``held_ids``: the candidates already locked by ``lock_patients_and_held`` (none: no
    query at all)."""
    keys = [key for _, model in patients for key in _held_keys(model, ctx)]
    if not keys or held_ids == []:
        return 0
    applied = 0
    pending, ctx.pending = ctx.pending, None  # held resources are applied one by one
    candidates = HeldResource.objects.select_for_update().filter(
        reference_key__in=keys, applied_at__isnull=True)
    if held_ids is not None:
        candidates = candidates.filter(pk__in=held_ids)
    try:
        for held in candidates.order_by("pk"):
            try:
                with transaction.atomic():
                    apply_resource(held.resource, ctx, allowed=allowed)
                held.applied_at = timezone.now()
                held.error = ""
                applied += 1
            except FhirError as exc:
                held.error = str(exc)[:500]
            except IntegrityError as exc:  # rolled back to its savepoint: the rest goes on
                refused = rule_violation(exc)
                if refused is None:  # a concurrent writer: the whole request retries
                    raise
                held.error = str(refused)[:500]  # a database rule: kept, with the reason
            held.save(update_fields=["applied_at", "error"])
    finally:
        ctx.pending = pending
    return applied


def _entries(bundle: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        raise FhirError.single(400, "structure", "Bundle.entry must be a list", "Bundle.entry")
    indexed = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("resource"), dict):
            raise FhirError.single(400, "required", "the entry has no resource",
                                   f"Bundle.entry[{i}].resource")
        indexed.append((i, entry))
    return sorted(indexed, key=lambda ie: ORDER.get(ie[1]["resource"].get("resourceType"), 1))


def _parse_entries(bundle: dict[str, Any], allowed: Any) -> list[tuple[int, dict[str, Any], Any]]:
    parsed = []
    for i, entry in _entries(bundle):
        prefix = f"Bundle.entry[{i}].resource"
        try:
            model = parse_entry(entry["resource"], allowed=allowed, expression_prefix=prefix)
        except FhirError as exc:
            raise exc.prefixed(f"Bundle.entry[{i}]") from exc
        parsed.append((i, entry, model))
    return parsed


def process_transaction(bundle: dict[str, Any], ctx: Context, allowed: Any,
                        attempts: int = 3) -> list[tuple[int, EntryOutcome]]:
    """All-or-nothing. Every entry is parsed once, by the first attempt, before its first
    statement (``ctx.at_begin`` first: the view stores the raw payload there, so a worker
    killed while parsing leaves it too; the transaction is then open, but has no snapshot and
    holds no lock before that statement); the writes go through the bulk services (a constant
    number of queries per bundle, not per entry). Retries a few times on a concurrent-writer
    conflict, without parsing again."""
    parsed: list[tuple[int, dict[str, Any], Any]] | None = None
    for attempt in range(attempts):
        ctx.reset()
        try:
            with transaction.atomic():
                if ctx.at_begin is not None:
                    ctx.at_begin()
                if parsed is None:
                    parsed = _parse_entries(bundle, allowed)
                with deferred_side_effects():
                    results = _apply_transaction(parsed, ctx, allowed)
                    if ctx.before_commit is not None:  # this commit is the synchronous one
                        ctx.before_commit(results)  # (its statement joins the deferred one)
                return results
        except (IntegrityError, OperationalError) as exc:
            if (refused := rule_violation(exc)) is not None:
                raise refused from exc
            if attempt == attempts - 1:
                raise FhirError.single(409, "conflict", "a concurrent update conflicted with "
                                       "this transaction; retry it", "Bundle") from exc
            logger.info("transaction bundle retry %s after %s", attempt + 1,
                        type(exc).__name__)
    return []


def _apply_transaction(parsed: list[tuple[int, dict[str, Any], Any]], ctx: Context,
                       allowed: Any) -> list[tuple[int, EntryOutcome]]:
    """Patients first (written together, then held resources released in one query), then
    every other entry, with its patients looked up in one query and written together."""
    results: dict[int, MapResult | EntryOutcome] = {}
    patients = [p for p in parsed if p[2].get_resource_type() == "Patient"]
    others = [p for p in parsed if p[2].get_resource_type() != "Patient"]
    for group in (patients, others):
        if group is others:
            prefetch_patients(ctx, [model for _, _, model in others])
        ctx.pending = []
        for i, entry, model in group:
            ctx.entry_where = f"Bundle.entry[{i}]"
            try:
                results[i] = map_entry(model, entry["resource"], ctx,
                                       expression_prefix=f"Bundle.entry[{i}].resource")
            except FhirError as exc:
                raise exc.prefixed(f"Bundle.entry[{i}]") from exc
        held_ids = None
        if group is patients and ctx.pending:
            held_ids = lock_patients_and_held(ctx, [model for _, _, model in patients])
            # Nothing held for them: new patients can be inserted with the other entries'
            # statement (``patient_upsert_many(deferred=...)``), one round trip fewer.
            ctx.defer_new_patients = held_ids == [] and bool(others)
        flush_pending(ctx)
        ctx.pending = None
        if group is patients:
            written = []
            for i, entry, model in patients:
                result = results[i]
                if isinstance(result, MapResult) and result.patient is not None:
                    if entry.get("fullUrl"):
                        ctx.bundle_patients[str(entry["fullUrl"])] = result.patient
                    written.append((result.patient, model))
            release_held(written, ctx, allowed, held_ids)
    run_deferred(ctx)  # (when the other entries wrote nothing)
    return sorted((i, entry_outcome(r)) for i, r in results.items())


def process_batch(bundle: dict[str, Any], ctx: Context, allowed: Any
                  ) -> list[tuple[int, EntryOutcome]]:
    results = []
    for i, entry in _entries(bundle):
        try:
            with transaction.atomic():
                outcome = apply_resource(entry["resource"], ctx, allowed=allowed,
                                         expression_prefix=f"Bundle.entry[{i}].resource",
                                         full_url=str(entry.get("fullUrl") or ""))
        except FhirError as exc:
            err = exc.prefixed(f"Bundle.entry[{i}]")
            outcome = EntryOutcome(err.status, issues=err.issues)
        except IntegrityError as exc:
            refused = rule_violation(exc)
            outcome = (EntryOutcome(409, issues=[Issue("error", "conflict",
                                                       "concurrent update; retry the entry")])
                       if refused is None else EntryOutcome(
                           refused.status, issues=refused.prefixed(f"Bundle.entry[{i}]").issues))
        results.append((i, outcome))
    return sorted(results, key=lambda r: r[0])
