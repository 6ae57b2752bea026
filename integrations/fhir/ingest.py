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
  applied when the Patient arrives; one that then cannot be applied is parked with the reason
  (``HeldResource.parked_at``, shown in the admin) and never tried again by later deliveries.
- Entry semantics (``check_entries``): ``fullUrl`` a string, unique in the bundle;
  ``request.method`` POST or PUT (DELETE, PATCH, GET, HEAD are refused, never applied as a
  create); ``request.url`` names the resource's type, a PUT names an id or a condition;
  ``ifNoneExist`` and conditional URLs take ``identifier`` tokens only (else 400), a condition
  matching 2+ resources is 412, ``ifMatch`` is 412 (the registry keeps no versions).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from django.db import DatabaseError, IntegrityError, OperationalError, connection, transaction
from django.utils import timezone

from integrations.fhir import read
from integrations.fhir.context import (
    Context,
    HeldReference,
    MapResult,
    flush_pending,
    prefetch_patients,
    reference_key,
    run_deferred,
)
from integrations.fhir.errors import FhirError, Issue, rule_violation
from integrations.fhir.guard import ID_RE, check_document
from integrations.fhir.limits import check_value
from integrations.fhir.mappers import MAPPERS
from integrations.fhir.parse import parse_resource
from integrations.models import HeldResource
from registry.lookup import lookup_patients
from registry.models import Feed
from registry.side_effects import Actor, deferred_side_effects

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
    except (AttributeError, TypeError, KeyError, ValueError, OverflowError) as exc:
        # A resource shape the mapper does not handle: refuse it clearly, write nothing.
        logger.exception("mapper %s failed", resource_type)
        raise FhirError.single(422, "processing", f"cannot process this {resource_type}: "
                               f"{type(exc).__name__}", expression_prefix or resource_type
                               ) from exc
    except HeldReference as held:
        check_value(HeldResource, "reference_key", held.reference_key,
                    f"{resource_type}.subject.reference")
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
                "WHERE reference_key = ANY(%s) AND applied_at IS NULL AND parked_at IS NULL "
                "ORDER BY id FOR UPDATE")


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
            reference_key__in=held_keys, applied_at__isnull=True, parked_at__isnull=True
        ).order_by("id")
            .values_list("id", flat=True))
    owners, rows = lookup_patients(keys, lock=True, also=(HELD_IDS_SQL, [held_keys]))
    ctx.patient_owners = owners
    return [row[0] for row in rows]


def _held_context(held: HeldResource, ctx: Context, allowed: Any) -> tuple[Context, Any]:
    """The context a held resource is applied in: its OWN feed's (namespace of its logical
    ids, allowed types, audit actor), not that of the feed whose Patient released it."""
    if held.feed_id is None or held.feed_id == ctx.actor.feed_id:
        return ctx, allowed
    feed = Feed.objects.filter(pk=held.feed_id).first()
    if feed is None:
        return ctx, allowed
    return Context(feed_name=feed.name, actor=Actor(feed_id=feed.pk, via="fhir")), feed.allows


def release_held(patients: list[tuple[Any, Any]], ctx: Context, allowed: Any,
                 held_ids: list[int] | None = None) -> int:
    """Apply resources held for these (patient, Patient model) pairs (by feed-scoped id or
    business identifier): one query to find them, then each in its own savepoint, checked
    again by the validation layer and applied in its own feed's context. One that cannot be
    applied, for whatever reason (refused, a database rule, a mapper's failure), is PARKED
    with the reason (``parked_at``, ``error``: the admin lists them) and not tried again, so
    it never blocks this or a later delivery of the patient; only a concurrent-writer
    conflict propagates (the whole request retries).
    ``held_ids``: the candidates already locked by ``lock_patients_and_held`` (none: no
    query at all)."""
    keys = [key for _, model in patients for key in _held_keys(model, ctx)]
    if not keys or held_ids == []:
        return 0
    applied = 0
    pending, ctx.pending = ctx.pending, None  # held resources are applied one by one
    candidates = HeldResource.objects.select_for_update().filter(
        reference_key__in=keys, applied_at__isnull=True, parked_at__isnull=True)
    if held_ids is not None:
        candidates = candidates.filter(pk__in=held_ids)
    try:
        for held in candidates.order_by("pk"):
            held_ctx, held_allowed = _held_context(held, ctx, allowed)
            reason = note = ""
            try:
                with transaction.atomic():
                    check_document(held.resource, feed_name=held_ctx.feed_name)
                    outcome = apply_resource(held.resource, held_ctx, allowed=held_allowed)
                if outcome.status == 202:  # held again under another key: that row holds it
                    note = "held again under another reference"
            except FhirError as exc:
                reason = str(exc)
            except IntegrityError as exc:  # rolled back to its savepoint: the rest goes on
                refused = rule_violation(exc)
                if refused is None:  # a concurrent writer: the whole request retries
                    raise
                reason = str(refused)  # a database rule: parked, with the reason
            except OperationalError:
                raise
            except (DatabaseError, Exception) as exc:  # parked, never a 500
                logger.exception("held resource %s could not be applied", held.pk)
                reason = f"could not be applied: {type(exc).__name__}"
            if reason:
                held.parked_at = timezone.now()
                held.error = reason[:500]
            else:
                held.applied_at = timezone.now()
                held.error = note
                applied += 1
            held.save(update_fields=["applied_at", "parked_at", "error"])
    finally:
        ctx.pending = pending
    return applied


SUPPORTED_METHODS = {"POST", "PUT"}
REFUSED_METHODS = {"DELETE", "PATCH", "GET", "HEAD"}


def check_bundle(bundle: dict[str, Any]) -> list[Any]:
    """The bundle-level rules (400 for the whole bundle): ``Bundle.entry`` a list,
    ``fullUrl`` a non-empty string when present and unique in the bundle (a reference to a
    repeated one would be ambiguous). Returns the entries."""
    entries = bundle.get("entry")
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise FhirError.single(400, "structure", "Bundle.entry must be a list", "Bundle.entry")
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "fullUrl" not in entry:
            continue
        full_url = entry["fullUrl"]
        if not isinstance(full_url, str) or not full_url.strip():
            raise FhirError.single(400, "value", "fullUrl must be a non-empty string (a URI)",
                                   f"Bundle.entry[{i}].fullUrl")
        if full_url in seen:
            raise FhirError.single(400, "invalid", "this fullUrl is already used by another "
                                   "entry of the bundle", f"Bundle.entry[{i}].fullUrl")
        seen.add(full_url)
    return entries


def _condition(text: Any, where: str) -> list[tuple[str | None, str | None]]:
    if not isinstance(text, str):
        raise FhirError.single(400, "value", "the condition must be a string", where)
    return read.parse_condition(text.removeprefix("?"), where)


def check_entry(i: int, entry: Any, at: str = "") -> dict[str, Any]:
    """One entry's own rules (``FhirError`` named by its index, or by ``at``: a single
    resource's request is checked as an entry ``at="request"``): an object with a resource
    object; its ``request`` (optional: an upsert by identifier) a supported method with a
    url naming the resource's type, a PUT with an id or a condition. A ``PUT Type/id`` gives
    its id to a resource sent without one. Returns the entry (a copy when changed)."""
    at = at or f"Bundle.entry[{i}]"
    try:
        return _check_entry(entry, at)
    except FhirError as exc:
        raise FhirError(exc.status, [Issue(x.severity, x.code, f"{at}: {x.diagnostics}",
                                           x.expression) for x in exc.issues]) from None


def _check_entry(entry: Any, at: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise FhirError.single(400, "structure", "an entry must be an object", at)
    resource = entry.get("resource")
    if not isinstance(resource, dict):
        raise FhirError.single(400, "required", "the entry has no resource", f"{at}.resource")
    request = entry.get("request")
    if request is None:
        return entry
    if not isinstance(request, dict):
        raise FhirError.single(400, "structure", "request must be an object", f"{at}.request")
    method = request.get("method")
    if not isinstance(method, str) or method.upper() not in SUPPORTED_METHODS:
        shown = method.upper() if isinstance(method, str) else method
        if isinstance(shown, str) and shown in REFUSED_METHODS:
            raise FhirError.single(400, "not-supported", f"{shown} is not supported in a bundle "
                                   "(to withdraw a record, send it with status "
                                   "entered-in-error)", f"{at}.request.method")
        raise FhirError.single(400, "value", "request.method must be POST or PUT",
                               f"{at}.request.method")
    url = request.get("url")
    if not isinstance(url, str) or not url.strip():
        raise FhirError.single(400, "required", "request.url must name the resource type",
                               f"{at}.request.url")
    path, _, query = url.strip().partition("?")
    parts = path.strip("/").split("/")
    resource_type = resource.get("resourceType")
    if "://" in path and resource_type in parts:  # an absolute URL: from the type on
        parts = parts[parts.index(resource_type):]
    if parts[0] != resource_type or len(parts) > 2:
        raise FhirError.single(400, "invalid", "request.url does not name this resource's "
                               "type", f"{at}.request.url")
    if query:
        _condition(query, f"{at}.request.url")
    if method.upper() == "PUT":
        if len(parts) == 2:
            if not ID_RE.fullmatch(parts[1]):
                raise FhirError.single(400, "value", "the id in request.url must match "
                                       "[A-Za-z0-9\\-.]{1,64}", f"{at}.request.url")
            if resource.get("id") not in (None, parts[1]):
                raise FhirError.single(400, "invalid", "the resource id does not match "
                                       "request.url", f"{at}.resource.id")
            if "id" not in resource:
                entry = {**entry, "resource": {**resource, "id": parts[1]}}
        elif not query:
            raise FhirError.single(400, "required", "a PUT needs Type/id or a condition "
                                   "(Type?identifier=system|value)", f"{at}.request.url")
    elif len(parts) == 2:
        raise FhirError.single(400, "invalid", "a POST url names the type only",
                               f"{at}.request.url")
    if "ifNoneExist" in request:
        _condition(request["ifNoneExist"], f"{at}.request.ifNoneExist")
    if request.get("ifMatch") is not None:
        raise FhirError.single(412, "conflict", "the registry keeps no resource versions: "
                               "an If-Match precondition cannot be met", f"{at}.request.ifMatch")
    return entry


def _full_tokens(tokens: list[tuple[str | None, str | None]]) -> bool:
    """One ``system|value`` token: a unique identifier can match one resource at most."""
    return len(tokens) == 1 and bool(tokens[0][0]) and bool(tokens[0][1])


def _carries(resource: dict[str, Any], token: tuple[str | None, str | None]) -> bool:
    """Whether the resource carries the identifier ``token`` names (its upsert key)."""
    idents = resource.get("identifier")
    if not isinstance(idents, list):
        return False
    values = {(i.get("system"), i.get("value")) for i in idents if isinstance(i, dict)}
    if resource.get("resourceType") == "ImagingStudy" and token[0] == "urn:dicom:uid":
        values |= {(s, v.removeprefix("urn:oid:")) for s, v in values if isinstance(v, str)}
        token = (token[0], (token[1] or "").removeprefix("urn:oid:"))
    return token in values


def conditional_outcome(entry: dict[str, Any], where: str) -> EntryOutcome | None:
    """The outcome of an entry's condition that decides it without a write: ``ifNoneExist``
    matching one resource → 200 with its location (nothing written); a condition (create or
    update) matching two or more → 412 (``FhirError``). ``None``: apply the entry."""
    request = entry.get("request")
    if not isinstance(request, dict):
        return None
    resource_type = entry["resource"].get("resourceType")
    url = request.get("url") or ""
    query = url.partition("?")[2] if isinstance(url, str) else ""
    if query and str(request.get("method", "")).upper() == "PUT":
        tokens = _condition(query, f"{where}.request.url")
        if not _full_tokens(tokens) and len(read.find_matches(resource_type, tokens)) > 1:
            raise FhirError.single(412, "multiple-matches", "the condition matches more than "
                                   "one resource", f"{where}.request.url")
    if "ifNoneExist" in request:
        tokens = _condition(request["ifNoneExist"], f"{where}.request.ifNoneExist")
        if _full_tokens(tokens) and _carries(entry["resource"], tokens[0]):
            return None  # the upsert by that identifier is the same answer, without a query
        found = read.find_matches(resource_type, tokens)
        if len(found) > 1:
            raise FhirError.single(412, "multiple-matches", "ifNoneExist matches more than one "
                                   "resource", f"{where}.request.ifNoneExist")
        if found:
            return EntryOutcome(200, found[0])
    return None


def _order(entry: Any) -> int:
    resource = entry.get("resource") if isinstance(entry, dict) else None
    kind = resource.get("resourceType") if isinstance(resource, dict) else None
    return ORDER.get(kind, 1) if isinstance(kind, str) else 1


def _entries(bundle: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """A transaction's entries, every one checked (the first bad one refuses the bundle),
    Patients first."""
    indexed = [(i, check_entry(i, entry)) for i, entry in enumerate(check_bundle(bundle))]
    return sorted(indexed, key=lambda ie: _order(ie[1]))


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
                decided = conditional_outcome(entry, ctx.entry_where)
                results[i] = decided if decided is not None else map_entry(
                    model, entry["resource"], ctx,
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


def _batch_entry(i: int, entry: Any, ctx: Context, allowed: Any) -> EntryOutcome:
    """One batch entry in its own savepoint: whatever goes wrong in it (refused, a database
    rule, a crash of a mapper) rolls back only its savepoint and becomes its own outcome."""
    where = f"Bundle.entry[{i}]"
    try:
        entry = check_entry(i, entry)
        with transaction.atomic():
            decided = conditional_outcome(entry, where)
            if decided is not None:
                return decided
            return apply_resource(entry["resource"], ctx, allowed=allowed,
                                  expression_prefix=f"{where}.resource",
                                  full_url=str(entry.get("fullUrl") or ""))
    except FhirError as exc:
        err = exc.prefixed(where)
        return EntryOutcome(err.status, issues=err.issues)
    except IntegrityError as exc:
        refused = rule_violation(exc)
        if refused is None:
            return EntryOutcome(409, issues=[Issue("error", "conflict",
                                                   "concurrent update; retry the entry",
                                                   [where])])
        return EntryOutcome(refused.status, issues=refused.prefixed(where).issues)
    except OperationalError:
        raise  # the database is gone: nothing more can be written or recorded
    except Exception as exc:  # a bug or a database error: this entry only, never a 500
        logger.exception("batch entry %s failed", i)
        return EntryOutcome(422, issues=[Issue(
            "error", "processing", f"{where}: this entry could not be processed "
            f"({type(exc).__name__}); nothing of it was written", [where])])


def process_batch(bundle: dict[str, Any], ctx: Context, allowed: Any
                  ) -> list[tuple[int, EntryOutcome]]:
    """Each entry in its own savepoint, Patients first; the answer lists every entry's own
    status (the HTTP status of a batch is 200 whatever its entries' outcomes)."""
    entries = sorted(enumerate(check_bundle(bundle)), key=lambda ie: _order(ie[1]))
    results = [(i, _batch_entry(i, entry, ctx, allowed)) for i, entry in entries]
    return sorted(results, key=lambda r: r[0])
