"""The sweep's writes of a whole batch: next check dates, opened, escalated and resolved
alerts with their history, audit and outbox rows (PostgreSQL: one statement per batch)."""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import BooleanField, Case, CharField, DateField, F, Q, Value, When
from django.utils import timezone

from followup.delivery import deliveries_send, delivery_channels, safe_delay
from registry.followup import (
    RESOLUTION_REASONS,
    RESOLVE,
    Decision,
)
from registry.models import (
    OPEN_ALERT_STATUSES,
    Alert,
    AlertDelivery,
    AlertEvent,
    AlertStatus,
    AuditAction,
    AuditEvent,
    Patient,
)
from registry.services import RegistryValidationError
from registry.side_effects import Actor

logger = logging.getLogger(__name__)
SWEEP_ACTOR = Actor(via="task")


def alert_threshold(decision: Any) -> float:
    """The high-VBQ cut-off stored on an alert: the one the decision applied (by the result's
    field strength), else the default."""
    return (decision.threshold if decision.threshold is not None
            else settings.VBQ_HIGH_THRESHOLD)


def write_batch(to_open: list[tuple[Any, Any]], teams: dict[Any, str],
                 next_dates: dict[Any, dt.date | None],
                 to_escalate: list[tuple[Any, Any]] | None = None) -> tuple[int, int]:
    """Write a batch's outcome; returns (alerts opened, alerts escalated).

    PostgreSQL: ONE statement (data-modifying CTEs) sets every patient's next check date, opens
    the alerts and escalates the unacknowledged ones, each with its history, audit and outbox
    rows. An alert that conflicts with an existing unresolved one (a concurrent sweep or an
    event got there first) is skipped by the partial unique index, and an escalation whose
    alert was meanwhile acknowledged, escalated or resolved matches no row; either way no
    history/audit/outbox row is written for it. Other databases: the ORM path."""
    to_escalate = to_escalate or []
    if connection.vendor != "postgresql":
        opened = bulk_open(to_open, teams)
        set_next_dates(next_dates)
        escalated, _ = write_changes(to_escalate)
        if escalated:
            queue_delivery()
        return opened, escalated

    q = connection.ops.quote_name
    now = timezone.now()
    channels = [str(c) for c in delivery_channels()]
    params: list[Any] = [list(next_dates), list(next_dates.values())]
    # Table and column names come from model metadata; every value is a bound parameter.
    sql = (
        "WITH nxt(id, day) AS (SELECT * FROM unnest(%s::uuid[], %s::date[])), "  # noqa: S608
        f"upd AS (UPDATE {q(Patient._meta.db_table)} AS p "
        f"SET {q('followup_next_check_on')} = nxt.day FROM nxt WHERE p.id = nxt.id)"
    )

    def insert_from(name: str, model: Any, source: str, exprs: dict[str, str], template: Any,
                    tail: str = "", source_params: list[Any] | None = None) -> str:
        columns, values = [], []
        for field in model._meta.concrete_fields:
            if field.primary_key:
                continue
            columns.append(q(field.column))
            if field.attname in exprs:
                values.append(exprs[field.attname])
            else:
                values.append("%s")
                params.append(field.get_db_prep_save(getattr(template, field.attname),
                                                     connection))
        params.extend(source_params or [])
        return (f", {name} AS (INSERT INTO {q(model._meta.db_table)} ({', '.join(columns)}) "  # noqa: S608
                f"SELECT {', '.join(values)} FROM {source}{tail})")

    counts = ["0", "0"]
    if to_open:
        params += [
            [pid for pid, _ in to_open], [d.rule_id for _, d in to_open],
            [d.rule_version for _, d in to_open], [d.reason[:300] for _, d in to_open],
            [d.vbq_value for _, d in to_open],
            [teams.get(pid) or settings.DEFAULT_CARE_TEAM for pid, _ in to_open],
            [d.due_on for _, d in to_open],
            [alert_threshold(d) for _, d in to_open],
            [d.threshold_field for _, d in to_open],
        ]
        sql += (
            ", v(patient_id, rule_id, rule_version, reason, vbq_value, care_team, due_on, "
            "vbq_threshold, vbq_threshold_field) AS (SELECT * FROM unnest(%s::uuid[], "
            "%s::text[], %s::int[], %s::text[], %s::float8[], %s::text[], %s::date[], "
            "%s::float8[], %s::text[]))"
        )
        sql += insert_from(
            "ins", Alert, "v", {name: f"v.{name}" for name in (
                "patient_id", "rule_id", "rule_version", "reason", "vbq_value", "care_team",
                "due_on", "vbq_threshold", "vbq_threshold_field")},
            Alert(status="open", opened_at=now),
            " ON CONFLICT DO NOTHING RETURNING id, patient_id, reason")
        sql += insert_from("ev", AlertEvent, "ins", {"alert_id": "ins.id", "note": "ins.reason"},
                           AlertEvent(at=now, action="open", to_status="open"))
        sql += insert_from("au", AuditEvent, "ins",
                           {"patient_id": "ins.patient_id", "object_id": "ins.id::text"},
                           AuditEvent(at=now, action="create", object_type="Alert", via="task",
                                      detail={"alert_action": "open"}))
        sql += insert_from("de", AlertDelivery, "ins CROSS JOIN unnest(%s::text[]) AS ch(channel)",
                           {"alert_id": "ins.id", "channel": "ch.channel",
                            "idempotency_key": "'alert-' || ins.id || '-opened-0-' || ch.channel"},
                           AlertDelivery(event="opened", next_attempt_at=now),
                           " ON CONFLICT DO NOTHING", [channels])
        counts[0] = "(SELECT count(*) FROM ins)"
    if to_escalate:
        # Same effect as alerts.alert_escalate for an unacknowledged alert (no fracture).
        params += [[pid for pid, _ in to_escalate], [d.rule_id for _, d in to_escalate],
                   [d.reason for _, d in to_escalate], AlertStatus.OPEN.value]
        sql += (
            ", e(patient_id, rule_id, reason) AS ("  # noqa: S608
            "SELECT * FROM unnest(%s::uuid[], %s::text[], %s::text[])), "
            f"esc AS (UPDATE {q(Alert._meta.db_table)} AS a "
            "SET escalation_level = a.escalation_level + 1 FROM e "
            "WHERE a.patient_id = e.patient_id AND a.rule_id = e.rule_id AND a.status = %s "
            "AND a.escalation_level = 0 "
            "RETURNING a.id, a.patient_id, a.status, a.escalation_level, e.reason)"
        )
        sql += insert_from("eve", AlertEvent, "esc",
                           {"alert_id": "esc.id", "note": "esc.reason",
                            "from_status": "esc.status", "to_status": "esc.status"},
                           AlertEvent(at=now, action="escalate"))
        sql += insert_from("aue", AuditEvent, "esc",
                           {"patient_id": "esc.patient_id", "object_id": "esc.id::text"},
                           AuditEvent(at=now, action="update", object_type="Alert", via="task",
                                      detail={"alert_action": "escalate"}))
        sql += insert_from("dee", AlertDelivery,
                           "esc CROSS JOIN unnest(%s::text[]) AS ch(channel)",
                           {"alert_id": "esc.id", "channel": "ch.channel",
                            "idempotency_key": "'alert-' || esc.id || '-escalated-' || "
                                               "esc.escalation_level || '-' || ch.channel"},
                           AlertDelivery(event="escalated", next_attempt_at=now),
                           " ON CONFLICT DO NOTHING", [channels])
        counts[1] = "(SELECT count(*) FROM esc)"
    with connection.cursor() as cursor:
        cursor.execute(f"{sql} SELECT {counts[0]}, {counts[1]}", params)
        opened, escalated = cursor.fetchone()
    return int(opened), int(escalated)


def write_changes(changes: list[tuple[Any, Decision]],
                   actor: Actor = SWEEP_ACTOR) -> tuple[int, int]:
    """Carry out many patients' ESCALATE and RESOLVE decisions in at most six statements, whatever
    their number: lock the target alerts (one SELECT ... FOR UPDATE), one UPDATE for the
    resolutions, one for the escalations, and one INSERT each for their history (AlertEvent),
    audit (AuditEvent) and ``escalated`` outbox rows (AlertDelivery). Returns (escalated,
    resolved).

    Per alert, the same effect as ``alerts.alert_resolve`` / ``alerts.alert_escalate`` (which
    the event path, ``apply_evaluation``, still uses): the target is the unresolved alert of
    (patient, rule), read under its row lock; none (resolved meanwhile), no change and no row.
    A fracture escalation marks the alert ``escalated_for_fracture`` and ends a snooze. The rules
    give at most one escalation or resolution per (patient, rule). Runs inside the caller's
    transaction; the caller queues the delivery task (``queue_delivery``)."""

    if not changes:
        return 0, 0
    for _, d in changes:
        if d.action == RESOLVE and d.resolution_reason not in RESOLUTION_REASONS:
            raise RegistryValidationError(f"unknown resolution reason {d.resolution_reason!r}",
                                          field="reason")
    wanted = {(pid, d.rule_id): d for pid, d in changes}
    if len(wanted) < len(changes):  # the rules give at most one per (patient, rule)
        logger.error("sweep: %s decision(s) for an already decided (patient, rule) dropped",
                     len(changes) - len(wanted))
    # Locks the targets, like alerts._locked does one at a time (and any other unresolved
    # alert these patients have under one of these rules: one statement, never fewer rows).
    targets = {
        (pid, rule): (pk, status, level)
        for pk, pid, rule, status, level in Alert.objects.select_for_update()
        .filter(patient_id__in={pid for pid, _ in wanted}, rule_id__in={r for _, r in wanted},
                status__in=OPEN_ALERT_STATUSES)
        .order_by("pk").values_list("pk", "patient_id", "rule_id", "status", "escalation_level")
    }
    now = timezone.now()
    channels = delivery_channels()
    events: list[AlertEvent] = []
    audits: list[AuditEvent] = []
    deliveries: list[AlertDelivery] = []
    resolve_reasons: dict[str, list[int]] = defaultdict(list)
    escalate_ids: list[int] = []
    fracture_ids: list[int] = []
    for key, d in wanted.items():
        if key not in targets:
            continue
        pk, before, level = targets[key]
        if d.action == RESOLVE:
            resolve_reasons[d.resolution_reason].append(pk)
            after, detail = str(AlertStatus.RESOLVED), {"reason": d.resolution_reason}
        else:
            escalate_ids.append(pk)
            if d.for_fracture:
                fracture_ids.append(pk)
            after = (str(AlertStatus.OPEN) if d.for_fracture and before == AlertStatus.SNOOZED
                     else before)
            detail = {}
            deliveries.extend(
                AlertDelivery(alert_id=pk, channel=channel, event="escalated", next_attempt_at=now,
                              idempotency_key=f"alert-{pk}-escalated-{level + 1}-{channel}")
                for channel in channels)
        events.append(AlertEvent(alert_id=pk, actor_id=actor.user_id, action=d.action,
                                 from_status=before, to_status=after, note=d.reason,
                                 detail=detail))
        audits.append(AuditEvent(actor_id=actor.user_id, feed_id=actor.feed_id,
                                 action=AuditAction.UPDATE, object_type="Alert",
                                 object_id=str(pk), patient_id=key[0], via=actor.via,
                                 detail={"alert_action": d.action}))
    if resolve_reasons:
        Alert.objects.filter(pk__in=[pk for ids in resolve_reasons.values() for pk in ids]).update(
            status=AlertStatus.RESOLVED, resolved_at=now,
            resolution_reason=Case(*(When(pk__in=ids, then=Value(reason))
                                     for reason, ids in resolve_reasons.items()),
                                   output_field=CharField()))
    if escalate_ids:
        fields: dict[str, Any] = {"escalation_level": F("escalation_level") + 1}
        if fracture_ids:
            fracture = Q(pk__in=fracture_ids)
            snoozed = fracture & Q(status=AlertStatus.SNOOZED)
            fields |= {
                "escalated_for_fracture": Case(When(fracture, then=Value(True)),
                                               default=F("escalated_for_fracture"),
                                               output_field=BooleanField()),
                "status": Case(When(snoozed, then=Value(str(AlertStatus.OPEN))),
                               default=F("status"), output_field=CharField()),
                "snoozed_until": Case(When(snoozed, then=Value(None)),
                                      default=F("snoozed_until"), output_field=DateField()),
            }
        Alert.objects.filter(pk__in=escalate_ids).update(**fields)
    if events:
        AlertEvent.objects.bulk_create(events)
        AuditEvent.objects.bulk_create(audits)
    if deliveries:
        AlertDelivery.objects.bulk_create(deliveries, ignore_conflicts=True)
    return len(escalate_ids), sum(len(ids) for ids in resolve_reasons.values())


def queue_delivery() -> None:
    """Queue the delivery task after commit, as the alert services do for escalations (a broker
    outage only leaves the outbox rows to the periodic run)."""

    transaction.on_commit(safe_delay(deliveries_send))


def _insert_alerts(rows: list[Alert]) -> list[Alert]:
    """Insert alerts, skipping any that conflict with an existing unresolved alert (partial
    unique index); return the ones inserted, with their ids."""
    if connection.vendor == "postgresql":
        fields = [f for f in Alert._meta.concrete_fields if f.name != "id"]
        columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
        placeholders = ", ".join(["(" + ", ".join(["%s"] * len(fields)) + ")"] * len(rows))
        params: list[Any] = []
        for row in rows:
            params.extend(f.get_db_prep_save(getattr(row, f.attname), connection)
                          for f in fields)
        # Column names come from model metadata and every value is a bound parameter.
        sql = (f"INSERT INTO registry_alert ({columns}) VALUES {placeholders} "  # noqa: S608
               "ON CONFLICT DO NOTHING RETURNING id, patient_id, rule_id")
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            inserted = {(pid, rule): pk for pk, pid, rule in cursor.fetchall()}
        out = []
        for row in rows:
            pk = inserted.get((row.patient_id, row.rule_id))
            if pk is not None:
                row.pk = pk
                out.append(row)
        return out
    stamp = rows[0].opened_at
    Alert.objects.bulk_create(rows, ignore_conflicts=True)
    return list(Alert.objects.filter(opened_at=stamp,
                                     patient_id__in=[r.patient_id for r in rows]))


def bulk_open(to_open: list[tuple[Any, Any]], teams: dict[Any, str],
               queue_delivery: bool = False) -> int:
    """Open many alerts with a handful of statements. Conflicts with an existing unresolved
    alert (a concurrent sweep or an event) are skipped by the partial unique index. The outbox
    rows are sent by the periodic delivery task (beat, ``DELIVERY_EVERY_SECONDS``) unless
    ``queue_delivery`` asks for an immediate run."""

    if not to_open:
        return 0
    now = timezone.now()
    created = _insert_alerts([
        Alert(patient_id=pid, rule_id=d.rule_id, rule_version=d.rule_version,
              status="open", reason=d.reason[:300], vbq_value=d.vbq_value,
              vbq_threshold=alert_threshold(d), vbq_threshold_field=d.threshold_field,
              care_team=teams.get(pid) or settings.DEFAULT_CARE_TEAM, opened_at=now,
              due_on=d.due_on)
        for pid, d in to_open
    ])
    if not created:
        return 0
    AlertEvent.objects.bulk_create(
        [AlertEvent(alert=a, action="open", to_status="open", note=a.reason) for a in created]
    )
    AuditEvent.objects.bulk_create(
        [AuditEvent(action="create", object_type="Alert", object_id=str(a.pk),
                    patient_id=a.patient_id, via="task", detail={"alert_action": "open"})
         for a in created]
    )
    AlertDelivery.objects.bulk_create(
        [AlertDelivery(alert=a, channel=channel, event="opened", next_attempt_at=now,
                       idempotency_key=f"alert-{a.pk}-opened-0-{channel}")
         for a in created for channel in delivery_channels()],
        ignore_conflicts=True,
    )
    if queue_delivery:
        transaction.on_commit(safe_delay(deliveries_send))
    return len(created)


def set_next_dates(next_dates: dict[Any, dt.date | None]) -> None:
    """One UPDATE for the whole batch (PostgreSQL: ``UPDATE … FROM (VALUES …)``)."""
    if not next_dates:
        return
    if connection.vendor == "postgresql":
        values = ", ".join(["(%s::uuid, %s::date)"] * len(next_dates))
        params: list[Any] = []
        for pid, day in next_dates.items():
            params.extend([str(pid), day])
        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE registry_patient AS p SET followup_next_check_on = v.day "  # noqa: S608
                f"FROM (VALUES {values}) AS v(id, day) WHERE p.id = v.id", params)
        return
    by_date: dict[dt.date | None, list[Any]] = defaultdict(list)
    for pid, day in next_dates.items():
        by_date[day].append(pid)
    for day, pids in by_date.items():
        Patient.objects.filter(pk__in=pids).update(followup_next_check_on=day)
