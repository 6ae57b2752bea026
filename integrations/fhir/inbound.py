"""What a FHIR feed sent, kept: the raw payload of every authenticated request as an
``InboundMessage`` (sha256, size, the bytes received) and its outcome.

A request that writes stores its payload BEFORE its writes, in its own commit (outcome
``received``), and records the outcome after: single resources and batch bundles by one
autocommit INSERT (``store_first``); a transaction bundle in the pipeline that opens its
transaction (``store_at_begin``), its outcome then set by the bundle's last statement
(``record_outcome``) or, if the bundle rolls back, by ``message_finish``. The endpoints are
``integrations.fhir.views``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.db import connection
from django.http import HttpRequest
from django.utils import timezone

from db.pg import pg_execute
from integrations.fhir import guard
from integrations.fhir.errors import FhirError
from integrations.fhir.ingest import EntryOutcome
from integrations.models import InboundMessage
from registry.models import Feed
from registry.side_effects import execute_or_defer

logger = logging.getLogger(__name__)


def _declared_length(request: HttpRequest) -> int:
    text = request.META.get("CONTENT_LENGTH") or ""
    try:
        length = int(text) if text.strip() else 0
    except ValueError as exc:
        raise FhirError.single(400, "structure", "Content-Length is not a number") from exc
    if length < 0:
        raise FhirError.single(400, "structure", "Content-Length is negative")
    return length


def _chunked(request: HttpRequest) -> bool:
    """A body sent with ``Transfer-Encoding: chunked`` (no Content-Length) that the server
    de-chunks and terminates (``wsgi.input_terminated``, as gunicorn does): Django reads no
    body without a Content-Length, so it is read from the WSGI input here."""
    return (not request.META.get("CONTENT_LENGTH")
            and "chunked" in request.headers.get("Transfer-Encoding", "").lower()
            and bool(request.META.get("wsgi.input_terminated")))


def _raw_body(request: HttpRequest) -> bytes:
    """The bytes received, at most ``FHIR_MAX_PAYLOAD_BYTES`` (413 past it: by the declared
    Content-Length before reading anything, else once read)."""
    limit = settings.FHIR_MAX_PAYLOAD_BYTES
    if _declared_length(request) > limit:
        raise guard.too_large()
    if _chunked(request) and not getattr(request, "_read_started", False):
        stream = request.META["wsgi.input"]
        parts, size = [], 0
        while size <= limit:
            part = stream.read(min(1 << 20, limit + 1 - size))
            if not part:
                break
            parts.append(part)
            size += len(part)
        raw = b"".join(parts)
        request._body = raw  # type: ignore[attr-defined]  # (what request.body returns)
        request._read_started = True  # type: ignore[attr-defined]
    else:
        raw = request.body
    if len(raw) > limit:
        raise guard.too_large()
    return raw


def clean_summary_text(text: str) -> str:
    """Text for a stored summary (jsonb: no NUL, no control character)."""
    return guard.FORBIDDEN_CHARS.sub("\ufffd", text)


def message_received(request: HttpRequest, feed: Feed) -> InboundMessage:
    """The raw payload of an AUTHENTICATED request, as a not yet saved ``InboundMessage``: the
    body is read here; ``_store`` writes it. Over the size limit: 413, and the message is
    stored without its body (``size_bytes`` the declared length)."""
    message = InboundMessage(
        feed=feed, channel="fhir-rest",
        content_type=clean_summary_text(request.META.get("CONTENT_TYPE", ""))[:100],
        sha256="", size_bytes=0, body=b"", received_at=timezone.now())
    try:
        raw = _raw_body(request)
    except FhirError as exc:
        declared = str(request.META.get("CONTENT_LENGTH") or "").strip()
        message.size_bytes = int(declared) if declared.isdigit() else 0
        exc.message = message  # type: ignore[attr-defined]  # stored by ``_guarded``
        raise
    message.sha256 = hashlib.sha256(raw).hexdigest()
    message.size_bytes = len(raw)
    message.body = raw
    return message


def _outcome_fields(status: int, summary: dict[str, Any]) -> dict[str, Any]:
    outcome = (InboundMessage.Outcome.ACCEPTED if status < 300 else
               InboundMessage.Outcome.REJECTED)
    if summary.get("partial"):
        outcome = InboundMessage.Outcome.PARTIAL
    return {"outcome": outcome, "status_code": status, "summary": summary}


def _insert(message: InboundMessage) -> tuple[str, list[Any]]:
    """The PostgreSQL INSERT of a message with its outcome (run with server-side binding by
    ``pg_execute`` or ``deferred_side_effects``: the body is not escaped into the SQL text)."""
    return (
        f"INSERT INTO {InboundMessage._meta.db_table} (feed_id, channel, "  # noqa: S608
        "received_at, content_type, sha256, size_bytes, body, outcome, status_code, summary) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb) RETURNING id",
        [message.feed_id, message.channel, message.received_at, message.content_type,
         message.sha256, message.size_bytes, message.body, str(message.outcome),
         message.status_code, json.dumps(message.summary, default=str)])


def _save(message: InboundMessage) -> None:
    """The ORM INSERT (SQLite): a new row even after a rolled-back attempt had set its pk."""
    message.pk = None
    message.save(force_insert=True)


def _set_outcome(message: InboundMessage, status: int, summary: dict[str, Any]) -> None:
    for name, value in _outcome_fields(status, summary).items():
        setattr(message, name, value)


def _write(message: InboundMessage) -> None:
    """INSERT the message now, in ONE autocommit statement (server-side binding on
    PostgreSQL: the body is not escaped into the SQL text)."""
    if connection.vendor != "postgresql":
        _save(message)
        return
    ((message.pk,),) = pg_execute(*_insert(message))
    message._state.adding = False


def _store(message: InboundMessage, status: int, summary: dict[str, Any]) -> None:
    """Store the raw payload with its outcome: ONE statement (a request refused before it
    wrote anything, or a transaction bundle that rolled back)."""
    _set_outcome(message, status, summary)
    _write(message)


def store_first(message: InboundMessage) -> None:
    """Batch bundles and single resources commit their writes one by one: the raw payload is
    stored BEFORE them (outcome ``received``), so a worker killed in the middle of the request
    leaves no committed clinical row without the payload it came from; ``message_finish`` then
    records the outcome. (A transaction bundle on PostgreSQL stores it first too, without
    this round trip: ``store_at_begin``; on SQLite through here.)"""
    _write(message)
    message.stored_first = True  # type: ignore[attr-defined]


def message_finish(message: InboundMessage | None, status: int, summary: dict[str, Any]) -> None:
    """Store the payload with its outcome, or only the outcome when it was stored first
    (``store_first``, ``store_at_begin``); nothing when the transaction bundle's own
    transaction recorded it (``stored``) or there is no payload (GET; refused before the body
    was read)."""
    if message is None or getattr(message, "stored", False):
        return
    if getattr(message, "stored_first", False):
        InboundMessage.objects.filter(pk=message.pk).update(**_outcome_fields(status, summary))
        return
    _store(message, status, summary)


def _update(message: InboundMessage) -> tuple[str, list[Any]]:
    """The PostgreSQL UPDATE of a stored-first message's outcome."""
    return (
        f"UPDATE {InboundMessage._meta.db_table} SET outcome = %s, "  # noqa: S608
        "status_code = %s, summary = %s::jsonb WHERE id = %s",
        [str(message.outcome), message.status_code,
         json.dumps(message.summary, default=str), message.pk])


# Sent as ONE pipeline (one Sync, one round trip) in place of the bare BEGIN the bundle's
# transaction would have started with: the payload's own short transaction, then the bundle's.
_BEGIN = "BEGIN"
_ASYNC = "SET LOCAL synchronous_commit TO off"
_COMMIT = "COMMIT"


def _begin(pg: Any) -> str:
    """The BEGIN psycopg itself would send on this connection: with its isolation level, read
    only and deferrable settings (Django sets them from ``DATABASES OPTIONS``)."""
    words = ["BEGIN"]
    if pg.isolation_level is not None:
        words.append("ISOLATION LEVEL " + pg.isolation_level.name.replace("_", " "))
    if pg.read_only is not None:
        words.append("READ ONLY" if pg.read_only else "READ WRITE")
    if pg.deferrable is not None:
        words.append("DEFERRABLE" if pg.deferrable else "NOT DEFERRABLE")
    return " ".join(words)


def store_at_begin(message: InboundMessage) -> Callable[[], None]:
    """For a transaction bundle (``Context.at_begin``, PostgreSQL): store the raw payload
    (outcome ``received``) in its OWN commit, at no round trip of its own, so that a worker
    killed in the middle of the bundle (SIGKILL, OOM: PostgreSQL rolls the bundle back) still
    leaves the payload the feed sent.

    Run just inside the bundle's outermost ``atomic`` block, before psycopg has sent its
    BEGIN: ``BEGIN; SET LOCAL synchronous_commit TO off; INSERT ... RETURNING id; COMMIT;
    BEGIN`` go in one pipeline, which replaces psycopg's own BEGIN round trip; the bundle then
    runs in the transaction that pipeline opened (psycopg sends no second BEGIN when the
    connection is already in a transaction; Django commits or rolls it back as usual).
    It costs about what an asynchronous-commit INSERT before the bundle costs locally, a
    fraction of a synchronous one, and one round trip fewer across a network (figures:
    docs/benchmarks.md).

    Why an asynchronous commit is enough: it is committed (visible, kept) as soon as it
    returns, whatever happens to this process; only a crash of PostgreSQL itself within
    ~3 × ``wal_writer_delay`` could lose it, and then the bundle's transaction, which started
    after it, is lost too unless it committed, and its synchronous commit (like the
    synchronous outcome UPDATE of a refused bundle) flushes the WAL up to and past the
    payload's commit record. So no answer is ever sent, and no clinical row committed, before
    the payload is on disk.

    Inside an enclosing transaction (a caller's own ``atomic``, a test's) nothing can be
    committed first: the payload is then INSERTed with its outcome by ``record_outcome``, as
    part of the bundle, as before. Once stored, later attempts (retries) do nothing.

    The bundle's BEGIN carries the connection's transaction characteristics, as psycopg's own
    would (``DATABASES OPTIONS`` ``isolation_level``, read only, deferrable: ``_begin``).

    Limit: a connection lost after the pipeline's COMMIT ran but before its reply came back
    leaves a ``received`` row the retry does not know of: the payload, never the bundle, is
    then stored twice."""

    def at_begin() -> None:
        import psycopg  # (PostgreSQL only: not needed by a SQLite installation)

        if getattr(message, "stored_first", False):
            return
        connection.ensure_connection()
        pg = connection.connection
        if pg.pgconn.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            return  # an enclosing transaction: stored with the bundle
        sql, params = _insert(message)
        # psycopg's autocommit only decides whether it sends BEGIN before a statement while
        # the connection is idle; with it on, the pipeline below runs as written. It cannot
        # be switched back while the bundle's transaction is open, and need not be: Django's
        # commit / rollback work in either mode and the atomic block's exit turns it on.
        pg.autocommit = True
        try:
            with (connection.wrap_database_errors, psycopg.Cursor(pg) as insert,
                  psycopg.Cursor(pg) as command):
                with pg.pipeline():
                    command.execute(_BEGIN)
                    command.execute(_ASYNC)
                    insert.execute(sql, params)
                    command.execute(_COMMIT)
                    command.execute(_begin(pg))
                ((message.pk,),) = insert.fetchall()
        finally:
            if pg.pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                pg.autocommit = False  # (failed before the second BEGIN: Django's state)
        message._state.adding = False
        message.stored_first = True  # type: ignore[attr-defined]

    return at_begin


def record_outcome(message: InboundMessage
                   ) -> Callable[[list[tuple[int, EntryOutcome]]], None]:
    """For a transaction bundle (``Context.before_commit``): the payload's outcome as the
    last statement of the bundle's own transaction (a CTE of its deferred side effects: no
    round trip of its own), whose commit is then the one synchronous commit: an UPDATE of the
    row ``store_at_begin`` stored first, or (stored with the bundle: an enclosing
    transaction, SQLite) the INSERT of the payload with its outcome. Run again by each
    retry; if the bundle finally rolls back, ``message_finish`` records the error instead.
    The caller sets ``message.stored`` once the bundle has committed."""

    def record(results: list[tuple[int, EntryOutcome]]) -> None:
        _set_outcome(message, 200, bundle_summary(results))
        if getattr(message, "stored_first", False):
            if connection.vendor != "postgresql":
                InboundMessage.objects.filter(pk=message.pk).update(
                    **_outcome_fields(200, message.summary))
            else:
                execute_or_defer(*_update(message))
        elif connection.vendor != "postgresql":  # the statement below is PostgreSQL's
            _save(message)
        else:
            execute_or_defer(*_insert(message))

    return record


def bundle_summary(results: list[tuple[int, EntryOutcome]]) -> dict[str, Any]:
    """A bundle's outcome as stored on its InboundMessage."""
    return {
        "entries": len(results),
        "statuses": sorted({o.status for _, o in results}),
        "partial": any(o.status >= 400 for _, o in results)
        and any(o.status < 300 for _, o in results),
    }
