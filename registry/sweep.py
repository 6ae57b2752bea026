"""Apply the pure follow-up rules to the registry: event-driven re-evaluation and the daily sweep.

The sweep reads only due patients: ``Patient.followup_next_check_on <= today`` on a partial
index, in batches claimed with ``SELECT ... FOR UPDATE SKIP LOCKED`` so concurrent sweeps split
the work instead of doubling it (the partial unique constraint on unresolved alerts is the
backstop). After evaluation each patient gets the next date its decision could change without
a new event, or NULL — so a steady-state daily sweep costs O(patients due), not O(registry).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import BooleanField, Case, CharField, DateField, F, Q, Value, When

from registry import codes
from registry.alerts import alert_escalate, alert_open, alert_resolve
from registry.followup import (
    ESCALATE,
    OPEN,
    RESOLUTION_REASONS,
    RESOLVE,
    SECONDARY_FRACTURE,
    Decision,
    Evaluation,
    Exposure,
    FollowupConfig,
    FractureFact,
    OpenAlert,
    PatientFacts,
    evaluate,
)
from registry.models import (
    OPEN_ALERT_STATUSES,
    Alert,
    AlertStatus,
    AuditAction,
    Fracture,
    Patient,
    Procedure,
    RecordStatus,
    TherapyExposure,
)
from registry.services import SYSTEM_ACTOR, Actor, RegistryValidationError
from registry.timeutil import clinic_today

logger = logging.getLogger(__name__)
SWEEP_ACTOR = Actor(via="task")


def config_from_settings() -> FollowupConfig:
    return FollowupConfig(
        threshold=settings.VBQ_HIGH_THRESHOLD,
        threshold_1_5t=settings.VBQ_HIGH_THRESHOLD_1_5T,
        threshold_3t=settings.VBQ_HIGH_THRESHOLD_3T,
        followup_days=settings.FOLLOWUP_DAYS,
        vbq_value=settings.VBQ_ALERT_VALUE,
        vbq_missing_after_days=settings.VBQ_MISSING_AFTER_DAYS,
        escalate_after_days=settings.ALERT_ESCALATE_AFTER_DAYS,
        lookback_days=settings.FOLLOWUP_LOOKBACK_DAYS,
    )


# A VBQ result counts only if its study is active and is its own patient's (``_facts_sql``
# says the same in SQL): a study entered in error, or moved to another patient whose results
# did not follow it (``scoring.services_bulk`` moves them; this is the second line), must not
# raise or suppress an alert on images that are not this patient's. A result with no series
# (an imported value, e.g. the demo cohort's) has no study to check and counts.
COUNTED_STUDY = Q(series__isnull=True) | Q(series__study__record_status=RecordStatus.ACTIVE,
                                            series__study__patient_id=F("patient_id"))


def load_facts(patient_ids: Iterable[Any]) -> dict[Any, PatientFacts]:
    """Facts for many patients in a fixed number of queries (no per-patient queries)."""
    from scoring.models import VbqResult
    from scoring.trust import trusted_q

    ids = list(patient_ids)
    people = {pid: (deceased_on, team) for pid, deceased_on, team in Patient.objects.filter(
        pk__in=ids).values_list("id", "deceased_on", "care_team")}
    index: dict[Any, tuple[dt.date, frozenset[str]]] = {}
    for pid, day, levels in (
        Procedure.objects.filter(patient_id__in=ids, record_status=RecordStatus.ACTIVE)
        .order_by("patient_id", "performed_at", "pk")
        .values_list("patient_id", "performed_on", "levels")
    ):
        index.setdefault(pid, (day, frozenset(levels or [])))
    vbq: dict[Any, tuple[float | None, float | None, float | None]] = {}
    for pid, all_levels, excluding, field in (
        VbqResult.objects.filter(patient_id__in=ids)
        .filter(trusted_q())  # scoring.trust: only a result that may move an alert
        .filter(COUNTED_STUDY)
        .order_by("patient_id", "queued_at", "pk")
        .values_list("patient_id", "vbq_all_levels", "vbq_excluding_fractured",
                     "field_strength_t")
    ):
        vbq[pid] = (all_levels, excluding, field)
    exposures: dict[Any, list[Exposure]] = defaultdict(list)
    for pid, agent, route, start, end, status in TherapyExposure.objects.filter(
        patient_id__in=ids, record_status=RecordStatus.ACTIVE
    ).values_list("patient_id", "agent", "route", "start_on", "end_on", "status"):
        interval = codes.dose_interval_days(agent, route) if agent in codes.AGENTS else 0
        exposures[pid].append(Exposure(agent, route, start, end, status, interval))
    fractures: dict[Any, list[FractureFact]] = defaultdict(list)
    for pid, day, site, level in Fracture.objects.filter(
        patient_id__in=ids, record_status=RecordStatus.ACTIVE
    ).values_list("patient_id", "diagnosed_on", "site", "vertebral_level"):
        fractures[pid].append(FractureFact(day, site, level))
    alerts: dict[Any, list[OpenAlert]] = defaultdict(list)
    for pid, rule, status, opened, level, for_fx, snoozed in Alert.objects.filter(
        patient_id__in=ids, status__in=OPEN_ALERT_STATUSES
    ).values_list("patient_id", "rule_id", "status", "due_on", "escalation_level",
                  "escalated_for_fracture", "snoozed_until"):
        alerts[pid].append(OpenAlert(rule, status, opened, level, for_fx, snoozed))
    out = {}
    for pid in ids:
        idx = index.get(pid)
        all_levels, excluding, field = vbq.get(pid, (None, None, None))
        out[pid] = PatientFacts(
            index_date=idx[0] if idx else None,
            index_levels=idx[1] if idx else frozenset(),
            vbq_all_levels=all_levels,
            vbq_excluding_fractured=excluding,
            vbq_field_strength_t=field,
            exposures=tuple(exposures.get(pid, ())),
            fractures=tuple(fractures.get(pid, ())),
            deceased_on=people.get(pid, (None, ""))[0],
            care_team=people.get(pid, (None, ""))[1],
            open_alerts=tuple(alerts.get(pid, ())),
        )
    return out


@dataclass
class SweepStats:
    evaluated: int = 0
    opened: int = 0
    escalated: int = 0
    resolved: int = 0
    errors: int = 0


def apply_evaluation(patient: Patient, evaluation: Evaluation, stats: SweepStats,
                     actor: Actor = SWEEP_ACTOR) -> None:
    """Carry out the decisions for one patient (inside the caller's transaction)."""
    for decision in evaluation.decisions:
        if decision.action == OPEN:
            alert = alert_open(patient=patient, rule_id=decision.rule_id, reason=decision.reason,
                               vbq_value=decision.vbq_value, due_on=decision.due_on,
                               vbq_threshold=_threshold(decision),
                               vbq_threshold_field=decision.threshold_field, actor=actor)
            if alert is not None:
                stats.opened += 1
                if decision.for_fracture and decision.rule_id != "secondary-fracture":
                    alert_escalate(alert=alert, reason=decision.reason, for_fracture=True,
                                   actor=actor)
            continue
        target = Alert.objects.filter(patient=patient, rule_id=decision.rule_id,
                                      status__in=OPEN_ALERT_STATUSES).first()
        if target is None:
            continue
        if decision.action == ESCALATE:
            alert_escalate(alert=target, reason=decision.reason,
                           for_fracture=decision.for_fracture, actor=actor)
            stats.escalated += 1
        elif decision.action == RESOLVE:
            alert_resolve(alert=target, reason=decision.resolution_reason, actor=actor,
                          note=decision.reason)
            stats.resolved += 1


def followup_evaluate(patient_ids: Iterable[Any], *, today: dt.date | None = None,
                      actor: Actor = SWEEP_ACTOR) -> SweepStats:
    """Evaluate the given patients now (event-driven path), one transaction per patient.

    PostgreSQL: one statement locks the patient and reads the facts (the sweep's query, by id);
    the Patient row is loaded only when there is a decision to carry out."""
    today = today or clinic_today()
    config = config_from_settings()
    stats = SweepStats()
    for raw_id in patient_ids:
        pid = raw_id if isinstance(raw_id, uuid.UUID) else uuid.UUID(str(raw_id))
        with transaction.atomic():
            if connection.vendor == "postgresql":
                sql, params = patient_facts_sql(pid)
                with connection.cursor() as cursor:
                    cursor.execute(sql, params)
                    row = cursor.fetchone()
                if row is None:
                    continue
                facts = _facts_from_row(row)
                evaluation = evaluate(facts, today, config)
                if evaluation.decisions:
                    apply_evaluation(Patient.objects.get(pk=pid), evaluation, stats, actor)
                current_next_check = row[-1]
            else:
                patient = Patient.objects.select_for_update().filter(pk=pid).first()
                if patient is None:
                    continue
                evaluation = evaluate(load_facts([pid])[pid], today, config)
                apply_evaluation(patient, evaluation, stats, actor)
                current_next_check = patient.followup_next_check_on
            # The patient row is locked by the read above, and with no decision carried out
            # nothing here wrote it since: an unchanged date needs no write (one statement
            # fewer for most events, e.g. every VBQ result a worker stores).
            if evaluation.decisions or evaluation.next_check_on != current_next_check:
                Patient.objects.filter(pk=pid).update(
                    followup_next_check_on=evaluation.next_check_on
                )
            stats.evaluated += 1
    return stats


def followup_sweep(*, today: dt.date | None = None, batch_size: int = 1000,
                   max_batches: int | None = None) -> SweepStats:
    """Evaluate every due patient. Safe to run concurrently with itself.

    Per batch on PostgreSQL: ONE statement claims the due patients on the partial index
    ``patient_followup_due_idx`` (``FOR UPDATE SKIP LOCKED``) and returns their facts, and ONE
    statement writes the batch (alerts + history + audit + outbox + next dates); patients with
    no decision cost no query of their own. Fracture escalations and resolutions, when the batch
    has any, cost a fixed number of statements more (``_write_changes``: lock, two UPDATEs,
    three INSERTs), whatever the number of patients. Every database: the statement count of a
    batch does not grow with its size.
    """
    today = today or clinic_today()
    config = config_from_settings()
    stats = SweepStats()
    batches = 0
    while max_batches is None or batches < max_batches:
        with transaction.atomic():
            facts = claim_due(today, batch_size)
            if not facts:
                break
            next_dates: dict[Any, dt.date | None] = {}
            to_open: list[tuple[Any, Any]] = []  # (patient id, decision)
            to_escalate: list[tuple[Any, Any]] = []
            changes: list[tuple[Any, Decision]] = []  # fracture escalations and resolutions
            urgent = False  # fracture outbox rows: queue the delivery task after commit
            other: dict[Any, Evaluation] = {}
            for pid, patient_facts in facts.items():
                try:
                    evaluation = evaluate(patient_facts, today, config)
                except Exception:  # one bad record must not stop the sweep
                    logger.exception("followup evaluation failed patient=%s", pid)
                    stats.errors += 1
                    next_dates[pid] = today + dt.timedelta(days=1)
                    continue
                stats.evaluated += 1
                next_dates[pid] = evaluation.next_check_on
                rest = []
                for d in evaluation.decisions:
                    if d.action == OPEN and (not d.for_fracture
                                             or d.rule_id == SECONDARY_FRACTURE):
                        # A secondary-fracture alert opens like any other (alert_open does
                        # not escalate it); only its delivery is queued at once.
                        to_open.append((pid, d))
                        urgent = urgent or d.for_fracture
                    elif d.action == ESCALATE and not d.for_fracture:
                        to_escalate.append((pid, d))
                    elif d.action in (ESCALATE, RESOLVE):
                        changes.append((pid, d))
                    else:  # not produced by the current rules: the per-patient services
                        rest.append(d)
                if rest:
                    other[pid] = Evaluation(rest, evaluation.next_check_on)
            opened, escalated = _write_batch(
                to_open, teams={pid: f.care_team for pid, f in facts.items()},
                next_dates=next_dates, to_escalate=to_escalate)
            stats.opened += opened
            stats.escalated += escalated
            # After the write above: an alert it just opened can be escalated for a fracture.
            escalated, resolved = _write_changes(changes)
            stats.escalated += escalated
            stats.resolved += resolved
            if urgent or any(d.action == ESCALATE for _, d in changes):
                _queue_delivery()
            if other:
                patients = Patient.objects.in_bulk(list(other))
                for pid, evaluation in other.items():
                    with transaction.atomic():
                        apply_evaluation(patients[pid], evaluation, stats)
        batches += 1
        if len(facts) < batch_size:
            # Every unlocked due patient was in this batch; locked ones belong to a concurrent
            # sweep's batch. No need for another (empty) claim.
            break
    logger.info("followup sweep today=%s %s", today, stats)
    return stats


def claim_due(today: dt.date, limit: int) -> dict[Any, PatientFacts]:
    """Lock up to ``limit`` due patients (skipping ones a concurrent sweep holds) and return
    their facts. Must run inside a transaction; the locks last until it ends."""
    if connection.vendor == "postgresql":
        sql, params = due_facts_sql(today, limit)
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return {row[0]: _facts_from_row(row) for row in cursor.fetchall()}
    ids = list(
        Patient.objects.select_for_update(skip_locked=True)
        .filter(followup_next_check_on__lte=today)
        .order_by("followup_next_check_on")
        .values_list("id", flat=True)[:limit]
    )
    return load_facts(ids) if ids else {}


def due_facts_sql(today: dt.date, limit: int) -> tuple[str, dict[str, Any]]:
    """The sweep's single read per batch (PostgreSQL): claim due patients through
    ``patient_followup_due_idx`` and gather each one's facts with per-patient index lookups
    (procedure, VBQ, therapy, fractures, unresolved alerts). Exposed so the bench can EXPLAIN
    exactly what the sweep runs."""
    sql, params = _facts_sql("""WHERE p.followup_next_check_on <= %(today)s
    ORDER BY p.followup_next_check_on
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED""")
    return sql, {**params, "today": today, "limit": limit}


def patient_facts_sql(patient_id: uuid.UUID) -> tuple[str, dict[str, Any]]:
    """The event path's read (PostgreSQL): lock ONE patient (waiting for a concurrent writer)
    and gather the same facts as the sweep, in one statement."""
    sql, params = _facts_sql("WHERE p.id = %(patient)s FOR UPDATE")
    return sql, {**params, "patient": patient_id}


def _facts_sql(selection: str) -> tuple[str, dict[str, Any]]:
    """The facts statement. The VBQ lookup reads the patient's results by ``patient_id`` (its
    index) and each candidate's series and study by primary key (``COUNTED_STUDY``)."""
    from scoring.models import ImagingSeries, ImagingStudy, VbqResult
    from scoring.trust import trusted_sql

    trusted, trusted_params = trusted_sql("r")  # scoring.trust: the results that count
    sql = f"""
WITH due AS MATERIALIZED (
    SELECT p.id, p.deceased_on, p.care_team, p.followup_next_check_on
    FROM {Patient._meta.db_table} p
    {selection}
)
SELECT d.id, d.deceased_on, d.care_team, ix.performed_on, ix.levels::text,
    v.vbq_all_levels, v.vbq_excluding_fractured, v.field_strength_t,
    (SELECT json_agg(json_build_array(t.agent, t.route, t.start_on, t.end_on, t.status))::text
     FROM {TherapyExposure._meta.db_table} t
     WHERE t.patient_id = d.id AND t.record_status = %(active)s),
    (SELECT json_agg(json_build_array(f.diagnosed_on, f.site, f.vertebral_level))::text
     FROM {Fracture._meta.db_table} f
     WHERE f.patient_id = d.id AND f.record_status = %(active)s),
    (SELECT json_agg(json_build_array(a.rule_id, a.status, a.due_on, a.escalation_level,
                                      a.escalated_for_fracture, a.snoozed_until))::text
     FROM {Alert._meta.db_table} a
     WHERE a.patient_id = d.id AND a.status = ANY(%(unresolved)s)),
    d.followup_next_check_on
FROM due d
LEFT JOIN LATERAL (
    SELECT pr.performed_on, pr.levels FROM {Procedure._meta.db_table} pr
    WHERE pr.patient_id = d.id AND pr.record_status = %(active)s
    ORDER BY pr.performed_at, pr.id LIMIT 1
) ix ON true
LEFT JOIN LATERAL (
    SELECT r.vbq_all_levels, r.vbq_excluding_fractured, r.field_strength_t
    FROM {VbqResult._meta.db_table} r
    LEFT JOIN {ImagingSeries._meta.db_table} se ON se.id = r.series_id
    LEFT JOIN {ImagingStudy._meta.db_table} st ON st.id = se.study_id
    WHERE r.patient_id = d.id AND {trusted}
      AND (r.series_id IS NULL
           OR (st.record_status = %(active)s AND st.patient_id = r.patient_id))
    ORDER BY r.queued_at DESC, r.id DESC LIMIT 1
) v ON true
"""  # noqa: S608 - table names come from model metadata; every value is a bound parameter
    return sql, {
        "active": RecordStatus.ACTIVE.value,
        "unresolved": [str(s) for s in OPEN_ALERT_STATUSES],
        **trusted_params,
    }


def _day(value: str | None) -> dt.date | None:
    return dt.date.fromisoformat(value) if value else None


def _facts_from_row(row: tuple[Any, ...]) -> PatientFacts:
    (_pid, deceased_on, care_team, index_date, levels, all_levels, excluding, field, therapy,
     fractures, alerts, _next_check_on) = row
    exposures = []
    for agent, route, start, end, status in json.loads(therapy) if therapy else ():
        interval = codes.dose_interval_days(agent, route) if agent in codes.AGENTS else 0
        exposures.append(Exposure(agent, route, _day(start), _day(end), status, interval))
    return PatientFacts(
        index_date=index_date,
        index_levels=frozenset(json.loads(levels) or []) if levels else frozenset(),
        vbq_all_levels=all_levels,
        vbq_excluding_fractured=excluding,
        vbq_field_strength_t=field,
        exposures=tuple(exposures),
        fractures=tuple(FractureFact(_day(day), site, level)
                        for day, site, level in (json.loads(fractures) if fractures else ())),
        deceased_on=deceased_on,
        care_team=care_team,
        open_alerts=tuple(
            OpenAlert(rule, status, _day(opened), level, for_fx, _day(snoozed))
            for rule, status, opened, level, for_fx, snoozed
            in (json.loads(alerts) if alerts else ())),
    )


def _threshold(decision: Any) -> float:
    """The high-VBQ cut-off stored on an alert: the one the decision applied (by the result's
    field strength), else the default."""
    return (decision.threshold if decision.threshold is not None
            else settings.VBQ_HIGH_THRESHOLD)


def _write_batch(to_open: list[tuple[Any, Any]], teams: dict[Any, str],
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
        opened = _bulk_open(to_open, teams)
        _set_next_dates(next_dates)
        escalated, _ = _write_changes(to_escalate)
        if escalated:
            _queue_delivery()
        return opened, escalated
    from django.utils import timezone

    from registry.alerts import _channels
    from registry.models import AlertDelivery, AlertEvent, AuditEvent

    q = connection.ops.quote_name
    now = timezone.now()
    channels = [str(c) for c in _channels()]
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
            [_threshold(d) for _, d in to_open],
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


def _write_changes(changes: list[tuple[Any, Decision]],
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
    transaction; the caller queues the delivery task (``_queue_delivery``)."""
    from django.utils import timezone

    from registry.alerts import _channels
    from registry.models import AlertDelivery, AlertEvent, AuditEvent

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
    channels = _channels()
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


def _queue_delivery() -> None:
    """Queue the delivery task after commit, as the alert services do for escalations (a broker
    outage only leaves the outbox rows to the periodic run)."""
    from registry.alerts import _safe_delay
    from registry.tasks import deliveries_send

    transaction.on_commit(_safe_delay(deliveries_send))


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


def _bulk_open(to_open: list[tuple[Any, Any]], teams: dict[Any, str],
               queue_delivery: bool = False) -> int:
    """Open many alerts with a handful of statements. Conflicts with an existing unresolved
    alert (a concurrent sweep or an event) are skipped by the partial unique index. The outbox
    rows are sent by the periodic delivery task (beat, ``DELIVERY_EVERY_SECONDS``) unless
    ``queue_delivery`` asks for an immediate run."""
    from django.utils import timezone

    from registry.alerts import _channels, _safe_delay
    from registry.models import AlertDelivery, AlertEvent, AuditEvent
    from registry.tasks import deliveries_send

    if not to_open:
        return 0
    now = timezone.now()
    created = _insert_alerts([
        Alert(patient_id=pid, rule_id=d.rule_id, rule_version=d.rule_version,
              status="open", reason=d.reason[:300], vbq_value=d.vbq_value,
              vbq_threshold=_threshold(d), vbq_threshold_field=d.threshold_field,
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
         for a in created for channel in _channels()],
        ignore_conflicts=True,
    )
    if queue_delivery:
        transaction.on_commit(_safe_delay(deliveries_send))
    return len(created)


def _set_next_dates(next_dates: dict[Any, dt.date | None]) -> None:
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


__all__ = ["SYSTEM_ACTOR", "followup_evaluate", "followup_sweep", "load_facts"]
