"""FHIR REST endpoints for EHR feeds (JSON, ``application/fhir+json``).

Authentication: ``Authorization: Bearer <feed token>`` (hashed at rest; see ``registry.Feed``),
checked FIRST: a missing or wrong token is answered 401 (429 when throttled) without reading
the request body, and nothing is stored.
Every accepted or rejected payload is stored raw (``InboundMessage``, sha256) with its outcome.
A request that writes stores its payload BEFORE its writes, in its own commit (outcome
``received``), and records the outcome after, so that a worker killed in the middle of the
request (SIGKILL, OOM) leaves the payload the feed sent: single resources and batch bundles,
whose writes commit one by one, by one autocommit INSERT (``store_first``); a transaction
bundle in the pipeline that opens its transaction (``store_at_begin``: no round trip of its
own), its outcome then set by the bundle's last statement (``record_outcome``: committed with
the bundle) or, if the bundle rolls back, by ``message_finish``. A request refused before it wrote
anything stores the payload with its error in one INSERT, except a transaction bundle refused
while parsing its entries (inside its first attempt, after ``store_at_begin``): a ROLLBACK
and an UPDATE of the stored row.
Errors always answer an OperationOutcome with the right 4xx — never a 5xx for bad input.

Every write goes through the validation layer (``integrations.fhir.guard``) before anything
is parsed as FHIR: the body is read (a chunked body too, where the server marks
``wsgi.input_terminated``), its size capped, decoded per ``Content-Encoding`` and charset,
its nesting depth capped, JSON parsed strictly and every string checked; the payload is
stored as the bytes received whatever the outcome. Reads and searches need the feed's
scope for the resource type, as writes do.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from django.contrib.auth.decorators import login_not_required
from django.db import DataError, IntegrityError, connection, transaction
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from config.ratelimit import RateLimited, feed_from_request
from integrations.fhir import guard, read
from integrations.fhir.context import Context
from integrations.fhir.errors import FhirError, Issue, operation_outcome, rule_violation
from integrations.fhir.inbound import (
    bundle_summary,
    clean_summary_text,
    message_finish,
    message_received,
    record_outcome,
    store_at_begin,
    store_first,
)
from integrations.fhir.ingest import (
    EntryOutcome,
    apply_resource,
    check_entry,
    conditional_outcome,
    process_batch,
    process_transaction,
)
from integrations.fhir.mappers import MAPPERS
from integrations.models import InboundMessage
from registry.models import AuditAction, Feed
from registry.side_effects import Actor, audit_record

logger = logging.getLogger(__name__)
FHIR_JSON = "application/fhir+json"


def _response(body: dict[str, Any], status: int = 200, **headers: str) -> HttpResponse:
    response = HttpResponse(json.dumps(body, default=str), status=status,
                            content_type=f"{FHIR_JSON}; charset=utf-8")
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    return response


def _outcome(error: FhirError) -> HttpResponse:
    response = _response(operation_outcome(error.issues), error.status)
    if getattr(error, "retry_after", None):
        response["Retry-After"] = str(error.retry_after)  # type: ignore[attr-defined]
    return response


def _feed(request: HttpRequest) -> Feed:
    """The request's Feed; repeated wrong tokens from one address are throttled (429)."""
    try:
        feed = feed_from_request(request)
    except RateLimited as exc:
        error = FhirError.single(429, "throttled", "too many failed token attempts; retry later")
        error.retry_after = exc.retry_after_seconds  # type: ignore[attr-defined]
        raise error from exc
    if feed is None:
        raise FhirError.single(401, "security", "a valid bearer token is required")
    return feed


JSON_TYPES = {FHIR_JSON, "application/json", "application/json+fhir"}



def _body(request: HttpRequest) -> Any:
    """The validated JSON of a write (``guard``): 415 for another media type, an unknown
    Content-Encoding or charset; 400 for bad bytes, bad JSON, too deep a nesting, a
    forbidden character, a repeated key, another feed's namespace (403)."""
    content_type = request.content_type or ""
    if content_type not in JSON_TYPES:
        raise FhirError.single(415, "not-supported", f"Content-Type must be {FHIR_JSON} "
                               f"(got {content_type[:60] or 'none'})")
    text = guard.decode_body(request.body,  # (read and size-checked by ``message_received``)
                             content_encoding=request.headers.get("Content-Encoding", ""),
                             charset=request.content_params.get("charset"))
    document = guard.loads(text)
    feed: Feed = request.feed  # type: ignore[attr-defined]
    guard.check_document(document, feed_name=feed.name)
    return document.data


# Errors that only bad input can raise past the validation layer (a database DataError: a
# value out of a column's range or encoding; Python's on a shape nothing checked).
UNPROCESSABLE = (DataError, ValueError, TypeError, KeyError, AttributeError, IndexError,
                 RecursionError, OverflowError)


def _guarded(handler: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Authenticate (before the body is read), size-check, run the handler, store the raw
    payload with its outcome; turn every FhirError into an OperationOutcome."""

    def view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        message = None
        try:
            feed = _feed(request)  # 401/429 here: the body is never read, nothing stored
            if request.method in {"POST", "PUT"}:
                try:
                    message = message_received(request, feed)
                except FhirError as exc:
                    message = getattr(exc, "message", None)
                    raise
            request.feed = feed  # type: ignore[attr-defined]
            request.inbound_message = message  # type: ignore[attr-defined]
            response = handler(request, *args, **kwargs)
            message_finish(message, response.status_code,
                    getattr(response, "vbq_summary", {"status": response.status_code}))
            return response
        except FhirError as exc:
            message_finish(message, exc.status, {"error": clean_summary_text(str(exc))[:500]})
            return _outcome(exc)
        except UNPROCESSABLE as exc:
            # Input the checks above did not foresee (the request's writes, each inside its
            # transaction or savepoint, were rolled back): 422, logged as the defect it is.
            logger.exception("FHIR request of feed %s could not be processed",
                             message.feed_id if message else None)
            error = FhirError.single(422, "processing", "the request could not be processed "
                                     f"({type(exc).__name__}); nothing of it was written")
            message_finish(message, 422, {"error": type(exc).__name__})
            return _outcome(error)
        except Exception as exc:  # a bug or the database gone: record it if we still can
            try:
                message_finish(message, 500, {"error": type(exc).__name__})
            except Exception:  # the original exception is the one to raise
                logger.warning("inbound message of feed %s not stored",
                               message.feed_id if message else None)
            raise

    return csrf_exempt(login_not_required(view))


def _ctx(request: HttpRequest) -> tuple[Context, Callable[[str], bool]]:
    feed: Feed = request.feed  # type: ignore[attr-defined]
    return Context(feed_name=feed.name, actor=Actor(feed_id=feed.pk, via="fhir")), feed.allows


def _bundle_response(kind: str, results: list[tuple[int, EntryOutcome]]) -> HttpResponse:
    entries = []
    for _, outcome in results:
        response: dict[str, Any] = {"status": outcome.status_line}
        if outcome.location:
            response["location"] = outcome.location
        if outcome.issues:
            response["outcome"] = operation_outcome(outcome.issues)
        entries.append({"response": response})
    http = _response({"resourceType": "Bundle", "type": f"{kind}-response", "entry": entries})
    http.vbq_summary = bundle_summary(results)  # type: ignore[attr-defined]
    return http


@_guarded
def root(request: HttpRequest) -> HttpResponse:
    """``POST /fhir``: a Bundle of type transaction or batch."""
    if request.method != "POST":
        raise FhirError.single(405, "not-supported", "POST a transaction or batch Bundle here")
    data = _body(request)
    if not isinstance(data, dict) or data.get("resourceType") != "Bundle":
        raise FhirError.single(400, "invalid", "POST /fhir takes a Bundle", "resourceType")
    kind = data.get("type")
    ctx, allowed = _ctx(request)
    if kind == "transaction":
        message: InboundMessage = request.inbound_message  # type: ignore[attr-defined]
        if connection.vendor == "postgresql":
            ctx.at_begin = store_at_begin(message)
        elif not connection.in_atomic_block:  # (SQLite: a local commit, cheap)
            store_first(message)
        ctx.before_commit = record_outcome(message)
        results = process_transaction(data, ctx, allowed)  # returns once committed
        message.stored = True  # type: ignore[attr-defined]  # by the bundle's transaction
        return _bundle_response("transaction", results)
    if kind == "batch":
        store_first(request.inbound_message)  # type: ignore[attr-defined]
        return _bundle_response("batch", process_batch(data, ctx, allowed))
    raise FhirError.single(400, "not-supported", "Bundle.type must be transaction or batch",
                           "Bundle.type")


def _check_type(resource_type: str, data: Any) -> None:
    if resource_type not in MAPPERS:
        raise FhirError.single(404, "not-supported", f"{resource_type} is not supported")
    if not isinstance(data, dict):
        raise FhirError.single(400, "structure", "the body must be a JSON object (a resource)")
    if data.get("resourceType") != resource_type:
        raise FhirError.single(400, "invalid", f"the body is not a {resource_type}",
                               "resourceType")


def _single(request: HttpRequest, resource_type: str, data: Any,
            entry: dict[str, Any] | None = None) -> HttpResponse:
    """Apply one resource in its own transaction (after the payload was stored); ``entry``:
    the request as a bundle entry, whose condition (``conditional_outcome``) is evaluated
    inside that transaction."""
    ctx, allowed = _ctx(request)
    store_first(request.inbound_message)  # type: ignore[attr-defined]
    try:
        with transaction.atomic():
            decided = conditional_outcome(entry, "HTTP") if entry else None
            if decided is not None:
                return _response(read.read(decided.location) or {}, 200,
                                 Location=decided.location)
            outcome = apply_resource(data, ctx, allowed=allowed)
    except IntegrityError as exc:  # a database rule (422) or a concurrent writer (409)
        raise rule_violation(exc) or FhirError.single(
            409, "conflict", "a concurrent update conflicted with this request; retry it"
        ) from exc
    if outcome.status >= 400:
        return _response(operation_outcome(outcome.issues), outcome.status)
    body = read.read(outcome.location) if outcome.location else operation_outcome(
        outcome.issues)
    headers = {"Location": outcome.location} if outcome.location else {}
    return _response(body or operation_outcome(outcome.issues), outcome.status, **headers)


def _check_read_scope(request: HttpRequest, resource_type: str) -> None:
    """Reads and searches need the feed's scope for the type, as writes do (403)."""
    if resource_type not in read.READERS:
        raise FhirError.single(404, "not-supported", f"{resource_type} cannot be read here")
    feed: Feed = request.feed  # type: ignore[attr-defined]
    if not feed.allows(resource_type):
        raise FhirError.single(403, "forbidden", f"this feed may not read {resource_type} "
                               "resources")


# Result parameters a client may add to any request (FHIR's ``_format``, ``_pretty``):
# ignored, never taken for a condition.
RESULT_PARAMETERS = {"_format", "_pretty"}


def _query(request: HttpRequest) -> str:
    """The query string without the result parameters (``RESULT_PARAMETERS``)."""
    text = request.META.get("QUERY_STRING", "")
    if "_format" not in text and "_pretty" not in text:
        return text
    parts = [p for p in text.split("&") if p and p.split("=", 1)[0] not in RESULT_PARAMETERS]
    return "&".join(parts)


def _no_if_match(request: HttpRequest) -> None:
    if request.headers.get("If-Match") is not None:
        raise FhirError.single(412, "conflict", "the registry keeps no resource versions: an "
                               "If-Match precondition cannot be met")


@_guarded
def type_level(request: HttpRequest, resource_type: str) -> HttpResponse:
    """``POST /fhir/<Type>`` (create; ``If-None-Exist: identifier=...``: one match answers it
    unchanged, two or more 412; creates are upserts by identifier anyway),
    ``PUT /fhir/<Type>?identifier=...`` (conditional update: none or one match applies it,
    two or more 412), ``GET /fhir/<Type>?identifier=`` (search by identifier). Conditions
    take ``identifier`` tokens only (another parameter is 400)."""
    query = _query(request)
    if request.method == "GET":
        _check_read_scope(request, resource_type)
        return _response(read.search(resource_type, query))
    if request.method not in {"POST", "PUT"}:
        raise FhirError.single(405, "not-supported", "use POST or PUT")
    data = _body(request)
    _check_type(resource_type, data)
    _no_if_match(request)
    if request.method == "PUT":
        if not query:
            raise FhirError.single(400, "required", "a PUT needs an id in the URL or a "
                                   "condition (?identifier=system|value)")
        entry = {"resource": data, "request": {"method": "PUT",
                                               "url": f"{resource_type}?{query}"}}
    elif "If-None-Exist" in request.headers:
        entry = {"resource": data, "request": {
            "method": "POST", "url": resource_type,
            "ifNoneExist": request.headers["If-None-Exist"]}}
    else:
        if query:
            raise FhirError.single(400, "not-supported", "a create takes no query parameters")
        entry = None
    if entry is not None:  # its condition is checked before the payload's first write
        check_entry(0, entry, at="HTTP")
    return _single(request, resource_type, data, entry)


def _audit_read(request: HttpRequest, resource_type: str, logical_id: str,
                body: dict[str, Any]) -> None:
    """Every FHIR read of patient data is an AuditEvent (ids only)."""
    reference = body.get("subject", {}).get("reference", "") if isinstance(
        body.get("subject"), dict) else ""
    patient_id = body.get("id") if resource_type == "Patient" else (
        reference.removeprefix("Patient/") if reference.startswith("Patient/") else None)
    feed: Feed = request.feed  # type: ignore[attr-defined]
    audit_record(actor=Actor(feed_id=feed.pk, via="fhir"), action=AuditAction.READ,
                 object_type=resource_type, object_id=logical_id, patient_id=patient_id)


@_guarded
def instance_level(request: HttpRequest, resource_type: str, logical_id: str) -> HttpResponse:
    """``GET /fhir/<Type>/<id>`` reads what the registry holds (an id that names nothing,
    or cannot, is 404); ``PUT`` updates by id."""
    if request.method == "GET":
        _check_read_scope(request, resource_type)
        body = read.read(f"{resource_type}/{logical_id}")
        if body is None:
            raise FhirError.single(404, "not-found", f"{resource_type}/{logical_id} not found")
        _audit_read(request, resource_type, logical_id, body)
        return _response(body)
    if request.method != "PUT":
        raise FhirError.single(405, "not-supported", "use GET or PUT")
    data = _body(request)
    _check_type(resource_type, data)
    _no_if_match(request)
    if _query(request):
        raise FhirError.single(400, "not-supported", "an update by id takes no query "
                               "parameters")
    if data.get("id") not in (None, logical_id):
        raise FhirError.single(400, "invalid", "the resource id does not match the URL", "id")
    return _single(request, resource_type, {**data, "id": logical_id})


@csrf_exempt
@login_not_required
def metadata(request: HttpRequest) -> HttpResponse:
    """CapabilityStatement: exactly what this server supports (GET and HEAD only: 405)."""
    if request.method not in {"GET", "HEAD"}:
        response = _outcome(FhirError.single(405, "not-supported", "metadata is read-only: "
                                             "use GET"))
        response["Allow"] = "GET, HEAD"
        return response
    resources = []
    for resource_type in MAPPERS:
        interactions = [{"code": "create"}, {"code": "update"}]
        if resource_type in read.READERS:
            interactions.append({"code": "read"})
        resources.append({
            "type": resource_type,
            "interaction": interactions,
            "conditionalCreate": True,
            "conditionalUpdate": True,
            "searchParam": [{"name": "identifier", "type": "token"}],
        })
    for resource_type in read.READERS:
        if resource_type not in MAPPERS:
            resources.append({"type": resource_type, "interaction": [{"code": "read"}],
                              "searchParam": [{"name": "identifier", "type": "token"}]})
    return _response({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-24",
        "kind": "instance",
        "software": {"name": "VBQ Registry", "version": "0.1.0"},
        "fhirVersion": "4.3.0",
        "format": ["json"],
        "rest": [{
            "mode": "server",
            "security": {"description": "Bearer token per EHR feed (OAuth2-style bearer, issued "
                         "by the registry admin)."},
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}],
        }],
    })


@csrf_exempt
@login_not_required
def not_found(request: HttpRequest, rest: str = "") -> HttpResponse:
    """Any other path under /fhir: a 404 OperationOutcome (not Django's HTML page)."""
    return _response(operation_outcome([Issue("error", "not-found", "unknown FHIR path: "
                                              "see /fhir/metadata")]), 404)
