"""Apply FHIR resources and bundles to the registry.

- One resource: parse (fhir.resources) → mapper → registry services.
- Transaction bundle: every entry in ONE database transaction; any bad entry rolls back all
  and the error names the entry index. Patients are processed first so ``urn:uuid`` fullUrl
  references inside the bundle resolve.
- Batch bundle: each entry in its own savepoint; good entries are kept, bad ones answer their
  own status and OperationOutcome.
- Held references: a resource naming an unknown patient is stored as ``HeldResource`` and
  applied when the Patient arrives.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from django.db import IntegrityError, OperationalError, transaction
from django.utils import timezone

from integrations.fhir.errors import FhirError, Issue
from integrations.fhir.mappers import MAPPERS, Context, HeldReference, MapResult, reference_key
from integrations.fhir.parse import parse_resource
from integrations.models import HeldResource

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


def apply_resource(data: dict[str, Any], ctx: Context, *, allowed: Any,
                   expression_prefix: str = "", full_url: str = "") -> EntryOutcome:
    """Validate and apply one resource (inside the caller's transaction)."""
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
    try:
        result: MapResult = MAPPERS[resource_type](model, ctx)
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
    if result.ignored_reason:
        return EntryOutcome(200, issues=[Issue("information", "informational",
                                               result.ignored_reason)])
    if resource_type == "Patient" and result.patient is not None:
        if full_url:
            ctx.bundle_patients[full_url] = result.patient
        release_held(result.patient, model, ctx, allowed)
    return EntryOutcome(201 if result.created else 200, f"{resource_type}/{result.object_id}")


def release_held(patient: Any, model: Any, ctx: Context, allowed: Any) -> int:
    """Apply resources held for this Patient (by feed-scoped id or business identifier)."""
    keys = []
    if model.id:
        keys.append(reference_key(ctx, f"Patient/{model.id}"))
    keys += [f"identifier|{i.system}|{i.value}" for i in model.identifier or []
             if i.system and i.value]
    applied = 0
    for held in HeldResource.objects.select_for_update().filter(
        reference_key__in=keys, applied_at__isnull=True
    ):
        try:
            with transaction.atomic():
                apply_resource(held.resource, ctx, allowed=allowed)
            held.applied_at = timezone.now()
            held.error = ""
            applied += 1
        except FhirError as exc:
            held.error = str(exc)[:500]
        held.save(update_fields=["applied_at", "error"])
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


def process_transaction(bundle: dict[str, Any], ctx: Context, allowed: Any,
                        attempts: int = 3) -> list[tuple[int, EntryOutcome]]:
    """All-or-nothing. Retries a few times on a concurrent-writer conflict."""
    entries = _entries(bundle)
    for attempt in range(attempts):
        ctx.bundle_patients.clear()
        try:
            with transaction.atomic():
                results = []
                for i, entry in entries:
                    prefix = f"Bundle.entry[{i}].resource"
                    try:
                        outcome = apply_resource(entry["resource"], ctx, allowed=allowed,
                                                 expression_prefix=prefix,
                                                 full_url=str(entry.get("fullUrl") or ""))
                    except FhirError as exc:
                        raise exc.prefixed(f"Bundle.entry[{i}]") from exc
                    results.append((i, outcome))
                return sorted(results, key=lambda r: r[0])
        except (IntegrityError, OperationalError) as exc:
            if attempt == attempts - 1:
                raise FhirError.single(409, "conflict", "a concurrent update conflicted with "
                                       "this transaction; retry it", "Bundle") from exc
            logger.info("transaction bundle retry %s after %s", attempt + 1,
                        type(exc).__name__)
    return []


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
        except IntegrityError:
            outcome = EntryOutcome(409, issues=[Issue("error", "conflict",
                                                      "concurrent update; retry the entry")])
        results.append((i, outcome))
    return sorted(results, key=lambda r: r[0])
