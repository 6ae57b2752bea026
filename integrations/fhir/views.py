"""FHIR REST endpoints for EHR feeds (JSON, ``application/fhir+json``).

Authentication: ``Authorization: Bearer <feed token>`` (hashed at rest; see ``registry.Feed``).
Every payload is stored raw (``InboundMessage``, sha256) in its own committed transaction
BEFORE parsing, so nothing received is ever lost; its outcome is recorded afterwards.
Errors always answer an OperationOutcome with the right 4xx — never a 5xx for bad input.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.db import connection, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from config.ratelimit import RateLimited, feed_from_request
from integrations.fhir import read
from integrations.fhir.errors import FhirError, Issue, operation_outcome
from integrations.fhir.ingest import (
    EntryOutcome,
    apply_resource,
    commit_without_waiting,
    process_batch,
    process_transaction,
)
from integrations.fhir.mappers import MAPPERS, Context
from integrations.models import InboundMessage
from registry.models import AuditAction, Feed
from registry.services import Actor, audit_record, execute_or_defer, on_feed_authenticated
from registry.services_bulk import pg_execute

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


def _body(request: HttpRequest) -> Any:
    content_type = request.content_type or ""
    if content_type not in {FHIR_JSON, "application/json"}:
        raise FhirError.single(415, "not-supported",
                               f"Content-Type must be {FHIR_JSON} (got {content_type or 'none'})")
    length = int(request.headers.get("Content-Length") or 0)
    if length > settings.FHIR_MAX_PAYLOAD_BYTES or len(request.body) > (
        settings.FHIR_MAX_PAYLOAD_BYTES
    ):
        raise FhirError.single(413, "too-costly", "the payload is larger than "
                               f"{settings.FHIR_MAX_PAYLOAD_BYTES} bytes")
    try:
        return json.loads(request.body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise FhirError.single(400, "structure", f"the body is not valid JSON: {exc}") from exc


def _raw_message(request: HttpRequest, feed: Feed | None) -> InboundMessage:
    raw = request.body
    return InboundMessage(
        feed=feed, channel="fhir-rest", content_type=(request.content_type or "")[:100],
        sha256=hashlib.sha256(raw).hexdigest(), size_bytes=len(raw),
        body=raw.decode("utf-8", "replace"), received_at=timezone.now(),
    )


def _raw_insert(message: InboundMessage, feed_id: str) -> tuple[str, list[Any]]:
    """The autocommit INSERT of the raw payload (PostgreSQL), which sets ``synchronous_commit``
    off for its own implicit transaction. ``feed_id``: ``%s`` (the feed's id is the first
    parameter) or ``feed.id`` (read from the CTE ``feed`` of ``on_feed_authenticated``)."""
    source = ", feed" if feed_id == "feed.id" else ""
    params = [] if source else [message.feed_id]
    return (
        f"INSERT INTO {InboundMessage._meta.db_table} (feed_id, channel, "  # noqa: S608
        "received_at, content_type, sha256, size_bytes, body, outcome, summary) "
        f"SELECT {feed_id}::bigint, %s, %s, %s, %s, %s, %s, %s, '{{}}'::jsonb "
        f"FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit{source} "
        "RETURNING id",
        [*params, message.channel, message.received_at, message.content_type,
         message.sha256, message.size_bytes, message.body, message.outcome])


def _store_raw(request: HttpRequest, feed: Feed | None) -> InboundMessage:
    """Committed before parsing. Its WAL flush is left to the synchronous commit that always
    follows before the answer (the transaction bundle's, or ``_finish``'s; see
    ``commit_without_waiting``). On PostgreSQL outside a transaction this is ONE round trip: an
    autocommit INSERT that sets ``synchronous_commit`` off for its own implicit transaction
    (and none of its own when it went with the feed's authentication: ``_authenticate``)."""
    message = _raw_message(request, feed)
    if connection.vendor != "postgresql" or connection.in_atomic_block:
        with transaction.atomic():
            commit_without_waiting()
            message.save(force_insert=True)
        return message
    ((message.pk,),) = pg_execute(*_raw_insert(message, "%s"))  # server-side binding: the
    message._state.adding = False  # body is not escaped into the SQL text
    return message


# Up to this size the raw payload is read before the token is checked, to be stored by the
# same statement as the feed's authentication (a wrong token stores nothing).
STORE_WITH_AUTHENTICATION_BYTES = 4 * 1024 * 1024


def _authenticate(request: HttpRequest) -> tuple[Feed, InboundMessage | None]:
    """The request's Feed, and for a POST/PUT on PostgreSQL (outside a transaction) of at most
    ``STORE_WITH_AUTHENTICATION_BYTES`` its raw payload stored by the SAME statement that
    authenticates the token (``registry.services.on_feed_authenticated``): one round trip
    fewer. Otherwise the message is None and ``_store_raw`` stores it after the size check."""
    length = int(request.headers.get("Content-Length") or 0)
    if (request.method not in {"POST", "PUT"} or connection.vendor != "postgresql"
            or connection.in_atomic_block
            or not 0 < length <= min(STORE_WITH_AUTHENTICATION_BYTES,
                                     settings.FHIR_MAX_PAYLOAD_BYTES)
            or len(request.body) > settings.FHIR_MAX_PAYLOAD_BYTES):
        return _feed(request), None
    message = _raw_message(request, None)
    with on_feed_authenticated(*_raw_insert(message, "feed.id")) as stored:
        feed = _feed(request)
    if not stored:
        return feed, None
    message.pk, message.feed = stored[0], feed
    message._state.adding = False
    return feed, message


def _outcome_fields(status: int, summary: dict[str, Any]) -> dict[str, Any]:
    outcome = (InboundMessage.Outcome.ACCEPTED if status < 300 else
               InboundMessage.Outcome.REJECTED)
    if summary.get("partial"):
        outcome = InboundMessage.Outcome.PARTIAL
    return {"outcome": outcome, "status_code": status, "summary": summary}


def _finish(message: InboundMessage | None, status: int, summary: dict[str, Any]) -> None:
    """Record the outcome: a synchronous commit, which also makes the raw payload and the
    bundle's writes durable before the answer is sent. Skipped when the transaction bundle
    already recorded it inside its own (synchronous) commit."""
    if message is None or getattr(message, "outcome_recorded", False):
        return
    InboundMessage.objects.filter(pk=message.pk).update(**_outcome_fields(status, summary))


def _record_in_transaction(message: InboundMessage | None
                           ) -> Callable[[list[tuple[int, EntryOutcome]]], None] | None:
    """For a transaction bundle: the outcome UPDATE as the last statement of the bundle's own
    transaction, whose commit is then the one synchronous commit (one round trip and one
    transaction fewer). ``outcome_recorded`` is set only once that commit has happened."""
    if message is None:
        return None

    def record(results: list[tuple[int, EntryOutcome]]) -> None:
        fields = _outcome_fields(200, _summary(results))
        if connection.vendor != "postgresql":  # the statement below is PostgreSQL's (::jsonb)
            InboundMessage.objects.filter(pk=message.pk).update(**fields)
            transaction.on_commit(lambda: setattr(message, "outcome_recorded", True))
            return
        # inside the bundle's deferred side effects: a CTE of its last statement
        execute_or_defer(
            f"UPDATE {InboundMessage._meta.db_table} SET outcome = %s, "  # noqa: S608
            "status_code = %s, summary = %s::jsonb WHERE id = %s",
            [str(fields["outcome"]), fields["status_code"], json.dumps(fields["summary"]),
             message.pk])
        transaction.on_commit(lambda: setattr(message, "outcome_recorded", True))

    return record


def _guarded(handler: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Authenticate, size-check and store raw; turn every FhirError into an OperationOutcome."""

    def view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        message = None
        try:
            feed, message = _authenticate(request)
            if request.method in {"POST", "PUT"} and message is None:
                if len(request.body) > settings.FHIR_MAX_PAYLOAD_BYTES:
                    raise FhirError.single(413, "too-costly", "the payload is too large")
                message = _store_raw(request, feed)
            request.feed = feed  # type: ignore[attr-defined]
            request.inbound_message = message  # type: ignore[attr-defined]
            response = handler(request, *args, **kwargs)
            _finish(message, response.status_code,
                    getattr(response, "vbq_summary", {"status": response.status_code}))
            return response
        except FhirError as exc:
            _finish(message, exc.status, {"error": str(exc)[:500]})
            return _outcome(exc)
        except Exception as exc:  # a bug or the database gone: record it if we still can
            try:
                _finish(message, 500, {"error": type(exc).__name__})
            except Exception:  # the original exception is the one to raise
                logger.warning("inbound message %s outcome not recorded",
                               message.pk if message else None)
            raise

    return csrf_exempt(login_not_required(view))


def _ctx(request: HttpRequest) -> tuple[Context, Callable[[str], bool]]:
    feed: Feed = request.feed  # type: ignore[attr-defined]
    return Context(feed_name=feed.name, actor=Actor(feed_id=feed.pk, via="fhir"),
                   durable_later=True), feed.allows


def _summary(results: list[tuple[int, EntryOutcome]]) -> dict[str, Any]:
    return {
        "entries": len(results),
        "statuses": sorted({o.status for _, o in results}),
        "partial": any(o.status >= 400 for _, o in results)
        and any(o.status < 300 for _, o in results),
    }


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
    http.vbq_summary = _summary(results)  # type: ignore[attr-defined]
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
        ctx.before_commit = _record_in_transaction(
            getattr(request, "inbound_message", None))
        return _bundle_response("transaction", process_transaction(data, ctx, allowed))
    if kind == "batch":
        return _bundle_response("batch", process_batch(data, ctx, allowed))
    raise FhirError.single(400, "not-supported", "Bundle.type must be transaction or batch",
                           "Bundle.type")


def _check_type(resource_type: str, data: Any) -> None:
    if resource_type not in MAPPERS:
        raise FhirError.single(404, "not-supported", f"{resource_type} is not supported")
    if isinstance(data, dict) and data.get("resourceType") != resource_type:
        raise FhirError.single(400, "invalid", f"the body is not a {resource_type}",
                               "resourceType")


def _single(request: HttpRequest, resource_type: str, data: Any) -> HttpResponse:
    ctx, allowed = _ctx(request)
    with transaction.atomic():
        outcome = apply_resource(data, ctx, allowed=allowed)
    if outcome.status >= 400:
        return _response(operation_outcome(outcome.issues), outcome.status)
    body = read.read(outcome.location) if outcome.location else operation_outcome(
        outcome.issues)
    headers = {"Location": outcome.location} if outcome.location else {}
    return _response(body or operation_outcome(outcome.issues), outcome.status, **headers)


@_guarded
def type_level(request: HttpRequest, resource_type: str) -> HttpResponse:
    """``POST /fhir/<Type>`` (create; ``If-None-Exist: identifier=system|value`` honoured, and
    creates are upserts by identifier anyway), ``PUT /fhir/<Type>?identifier=system|value``
    (conditional update), ``GET /fhir/<Type>?identifier=`` (search by identifier)."""
    if request.method == "GET":
        return _response(read.search(resource_type, request.GET.get("identifier", "")))
    if request.method not in {"POST", "PUT"}:
        raise FhirError.single(405, "not-supported", "use POST or PUT")
    data = _body(request)
    _check_type(resource_type, data)
    condition = request.headers.get("If-None-Exist", "") if request.method == "POST" else (
        "identifier=" + request.GET.get("identifier", "") if request.GET.get("identifier")
        else "")
    if request.method == "PUT" and not condition:
        raise FhirError.single(400, "required", "conditional update needs ?identifier=s|v")
    if condition:
        existing = read.find_by_identifier(resource_type, condition.removeprefix("identifier="))
        if existing is None and "|" not in condition:
            raise FhirError.single(400, "invalid", "the condition must be identifier=system|value")
        if existing and request.method == "POST":
            return _response(read.read(existing) or {}, 200, Location=existing)
    return _single(request, resource_type, data)


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
    """``GET /fhir/<Type>/<id>`` reads what the registry holds; ``PUT`` updates by id."""
    if request.method == "GET":
        body = read.read(f"{resource_type}/{logical_id}")
        if body is None:
            raise FhirError.single(404, "not-found", f"{resource_type}/{logical_id} not found")
        _audit_read(request, resource_type, logical_id, body)
        return _response(body)
    if request.method != "PUT":
        raise FhirError.single(405, "not-supported", "use GET or PUT")
    data = _body(request)
    _check_type(resource_type, data)
    if isinstance(data, dict) and data.get("id") not in (None, logical_id):
        raise FhirError.single(400, "invalid", "the resource id does not match the URL", "id")
    if isinstance(data, dict):
        data = {**data, "id": logical_id}
    return _single(request, resource_type, data)


@csrf_exempt
@login_not_required
def metadata(request: HttpRequest) -> HttpResponse:
    """CapabilityStatement: exactly what this server supports."""
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


def not_found(request: HttpRequest, rest: str = "") -> JsonResponse:
    return JsonResponse(operation_outcome([Issue("error", "not-found", "unknown FHIR path")]),
                        status=404)
