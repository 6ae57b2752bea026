"""The side effects every clinical write shares: who wrote (``Actor``), the audit row, and the
follow-up mark ("this patient's decision may have changed"), each either done at once or, inside
``deferred_side_effects()``, collected and written once at the end of the block (one statement
with the block's other deferred statements, one queued re-evaluation per patient).

The follow-up re-evaluation itself belongs to a higher layer: after commit this module sends
``registry.events.followup_changed_committed`` and follow-up queues the work."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from django.db import connection, transaction

from db.pg import insert_rows, insert_rows_sql, pg_pipeline
from registry import events
from registry.models import (
    AuditEvent,
    Patient,
)
from registry.timeutil import clinic_today


@dataclass(frozen=True)
class Actor:
    """Who performs a write, for the audit trail."""

    user_id: int | None = None
    feed_id: int | None = None
    via: str = "command"


SYSTEM_ACTOR = Actor(via="command")


@dataclass
class _Deferred:
    audits: list[dict[str, Any]] = field(default_factory=list)  # AuditEvent rows (attnames)
    followup_patient_ids: set[Any] = field(default_factory=set)
    # other data-modifying statements (sql, params), PostgreSQL only: CTEs of the final one
    statements: list[tuple[str, list[Any]]] = field(default_factory=list)
    # statements that must see the block's writes (sql, params, prepare), PostgreSQL only:
    # sent after the final one, in the same round trip (one pipeline)
    followers: list[tuple[str, Any, bool]] = field(default_factory=list)


_deferred = threading.local()


@contextmanager
def deferred_side_effects() -> Iterator[None]:
    """Collect the audit rows and follow-up re-evaluations of many writes, and write them once
    at the end: one INSERT of every AuditEvent, one UPDATE of the patients' due dates and one
    queued re-evaluation per patient (after commit). Use inside the caller's transaction (e.g. a
    FHIR transaction bundle); on an exception nothing is flushed (the transaction rolls back)."""
    outer = getattr(_deferred, "current", None)
    if outer is not None:  # nested: the outermost block flushes
        yield
        return
    _deferred.current = pending = _Deferred()
    try:
        yield
    finally:
        _deferred.current = None
    rows = pending.audits
    if connection.vendor == "postgresql" and (
            pending.statements or pending.followers or (rows and pending.followup_patient_ids)):
        # One statement (data-modifying CTEs): the audit rows, the deferred statements (e.g.
        # the FHIR InboundMessage outcome) and the patients' due dates; then the followers
        # (``defer_after``), in the same round trip.
        ctes, params = [], []
        if rows:
            insert_sql, param = insert_rows_sql(AuditEvent, rows)
            ctes.append(f"audit AS ({insert_sql})")
            params.append(param)
        for n, (sql, statement_params) in enumerate(pending.statements):
            ctes.append(f"s{n} AS ({sql})")
            params += statement_params
        main = "SELECT 1"
        if pending.followup_patient_ids:
            ids = [str(p) for p in pending.followup_patient_ids]
            main = (f"UPDATE {Patient._meta.db_table} SET followup_next_check_on = %s "  # noqa: S608
                    "WHERE id = ANY(%s::uuid[])")
            params += [clinic_today(), ids]
        final = []
        if ctes or pending.followup_patient_ids:  # (no CTE: only follow-up and followers)
            final.append((f"WITH {', '.join(ctes)} {main}" if ctes else main, params, False))
        pg_pipeline([*final, *pending.followers])
        if pending.followup_patient_ids:
            _queue_followup(ids)
        return
    if rows:
        insert_rows(AuditEvent, rows)
    if pending.followup_patient_ids:
        _followup_changed_now(pending.followup_patient_ids)


def defer_after(sql: str, params: Any, *, prepare: bool = False) -> bool:
    """Inside ``deferred_side_effects()`` on PostgreSQL: queue one statement that must see the
    block's writes (it cannot be a CTE of the final statement: a statement does not see its
    own CTEs' changes) to run right after that final statement, in the same round trip; its
    rows are not returned. ``False`` (nothing queued): run it yourself, now."""
    pending = getattr(_deferred, "current", None)
    if pending is None or connection.vendor != "postgresql":
        return False
    pending.followers.append((sql, params, prepare))
    return True


def execute_or_defer(sql: str, params: list[Any]) -> None:
    """Run one data-modifying statement now, or, inside ``deferred_side_effects()`` on
    PostgreSQL, as a CTE of that block's final statement (one round trip fewer). Nothing may
    read its effect before the block ends."""
    pending = getattr(_deferred, "current", None)
    if pending is not None and connection.vendor == "postgresql":
        pending.statements.append((sql, params))
        return
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def audit_record(
    *,
    actor: Actor,
    action: str,
    object_type: str,
    object_id: str = "",
    patient_id: Any = None,
    detail: dict[str, Any] | None = None,
) -> AuditEvent | None:
    """Append one AuditEvent. ``detail`` must hold ids and codes only, never PHI.
    Inside ``deferred_side_effects()`` the row is written at the end of that block (and None
    is returned: the row is kept as a plain dict, no model instance is built)."""
    pending: _Deferred | None = getattr(_deferred, "current", None)
    if pending is not None:
        pending.audits.append({
            "at": None, "actor_id": actor.user_id, "feed_id": actor.feed_id, "action": action,
            "patient_id": patient_id, "object_type": object_type, "object_id": str(object_id),
            "via": actor.via, "detail": detail or {},
        })
        return None
    event = AuditEvent(
        actor_id=actor.user_id,
        feed_id=actor.feed_id,
        action=action,
        object_type=object_type,
        object_id=str(object_id),
        patient_id=patient_id,
        via=actor.via,
        detail=detail or {},
    )
    event.save(force_insert=True)
    return event


def followup_changed(patient_id: Any) -> None:
    """Something that can change a follow-up decision was written for this patient.

    Marks the patient due today (the sweep's safety net if the broker is down) and queues an
    immediate re-evaluation after commit, so e.g. a therapy order resolves an alert in seconds.
    Inside ``deferred_side_effects()`` this happens once per patient at the end of that block.
    """
    pending: _Deferred | None = getattr(_deferred, "current", None)
    if pending is not None:
        pending.followup_patient_ids.add(patient_id)
    else:
        _followup_changed_now({patient_id})


def _followup_changed_now(patient_ids: set[Any]) -> None:
    Patient.objects.filter(pk__in=patient_ids).update(followup_next_check_on=clinic_today())
    _queue_followup(patient_ids)


def _queue_followup(patient_ids: Any) -> None:
    """After commit: the patients' re-evaluation is queued (``events.followup_changed_committed``:
    follow-up sends one Celery message for many)."""
    ids = sorted(str(p) for p in patient_ids)
    transaction.on_commit(
        lambda: events.followup_changed_committed.send(sender=Patient, patient_ids=ids))
