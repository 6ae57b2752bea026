"""Apply the pure follow-up rules to the registry: event-driven re-evaluation and the daily sweep.

The sweep reads only due patients: ``Patient.followup_next_check_on <= today`` on a partial
index, in batches claimed with ``SELECT ... FOR UPDATE SKIP LOCKED`` so concurrent sweeps split
the work instead of doubling it (the partial unique constraint on unresolved alerts is the
backstop). After evaluation each patient gets the next date its decision could change without
a new event, or NULL — so a steady-state daily sweep costs O(patients due), not O(registry).
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q

from registry import codes
from registry.alerts import alert_escalate, alert_open, alert_resolve
from registry.followup import (
    ESCALATE,
    OPEN,
    RESOLVE,
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
    Fracture,
    Patient,
    Procedure,
    RecordStatus,
    TherapyExposure,
)
from registry.services import SYSTEM_ACTOR, Actor
from registry.timeutil import clinic_today

logger = logging.getLogger(__name__)
SWEEP_ACTOR = Actor(via="task")


def config_from_settings() -> FollowupConfig:
    return FollowupConfig(
        threshold=settings.VBQ_HIGH_THRESHOLD,
        followup_days=settings.FOLLOWUP_DAYS,
        vbq_value=settings.VBQ_ALERT_VALUE,
        vbq_missing_after_days=settings.VBQ_MISSING_AFTER_DAYS,
        escalate_after_days=settings.ALERT_ESCALATE_AFTER_DAYS,
        lookback_days=settings.FOLLOWUP_LOOKBACK_DAYS,
    )


def load_facts(patient_ids: Iterable[Any]) -> dict[Any, PatientFacts]:
    """Facts for many patients in a fixed number of queries (no per-patient queries)."""
    from scoring.models import VbqResult

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
    vbq: dict[Any, tuple[float | None, float | None]] = {}
    for pid, all_levels, excluding in (
        VbqResult.objects.filter(patient_id__in=ids)
        .filter(Q(review_status=VbqResult.Review.ACCEPTED)
                | Q(status=VbqResult.Status.SUCCEEDED, review_status=VbqResult.Review.PENDING))
        .order_by("patient_id", "queued_at", "pk")
        .values_list("patient_id", "vbq_all_levels", "vbq_excluding_fractured")
    ):
        vbq[pid] = (all_levels, excluding)
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
        all_levels, excluding = vbq.get(pid, (None, None))
        out[pid] = PatientFacts(
            index_date=idx[0] if idx else None,
            index_levels=idx[1] if idx else frozenset(),
            vbq_all_levels=all_levels,
            vbq_excluding_fractured=excluding,
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
                               actor=actor)
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
    """Evaluate the given patients now (event-driven path), one transaction per patient."""
    today = today or clinic_today()
    config = config_from_settings()
    stats = SweepStats()
    for raw_id in patient_ids:
        pid = raw_id if isinstance(raw_id, uuid.UUID) else uuid.UUID(str(raw_id))
        with transaction.atomic():
            patient = Patient.objects.select_for_update().filter(pk=pid).first()
            if patient is None:
                continue
            facts = load_facts([pid])[pid]
            evaluation = evaluate(facts, today, config)
            apply_evaluation(patient, evaluation, stats, actor)
            Patient.objects.filter(pk=pid).update(
                followup_next_check_on=evaluation.next_check_on
            )
            stats.evaluated += 1
    return stats


def followup_sweep(*, today: dt.date | None = None, batch_size: int = 1000,
                   max_batches: int | None = None) -> SweepStats:
    """Evaluate every due patient. Safe to run concurrently with itself.

    Per batch: one indexed claim query, a fixed number of fact queries, and bulk writes for the
    alerts it opens; patients with no decision cost no query of their own.
    """
    today = today or clinic_today()
    config = config_from_settings()
    stats = SweepStats()
    batches = 0
    while max_batches is None or batches < max_batches:
        with transaction.atomic():
            ids = list(
                Patient.objects.select_for_update(skip_locked=True)
                .filter(followup_next_check_on__lte=today)
                .order_by("followup_next_check_on")
                .values_list("id", flat=True)[:batch_size]
            )
            if not ids:
                break
            facts = load_facts(ids)
            next_dates: dict[Any, dt.date | None] = {}
            to_open: list[tuple[Any, Any]] = []  # (patient id, decision)
            other: dict[Any, Evaluation] = {}
            for pid in ids:
                try:
                    evaluation = evaluate(facts[pid], today, config)
                except Exception:  # one bad record must not stop the sweep
                    logger.exception("followup evaluation failed patient=%s", pid)
                    stats.errors += 1
                    next_dates[pid] = today + dt.timedelta(days=1)
                    continue
                stats.evaluated += 1
                next_dates[pid] = evaluation.next_check_on
                simple_opens = [d for d in evaluation.decisions
                                if d.action == OPEN and not d.for_fracture]
                to_open.extend((pid, d) for d in simple_opens)
                rest = [d for d in evaluation.decisions if d not in simple_opens]
                if rest:
                    other[pid] = Evaluation(rest, evaluation.next_check_on)
            stats.opened += _bulk_open(to_open, teams={
                pid: f.care_team for pid, f in facts.items()})
            if other:
                patients = Patient.objects.in_bulk(list(other))
                for pid, evaluation in other.items():
                    with transaction.atomic():
                        apply_evaluation(patients[pid], evaluation, stats)
            _set_next_dates(next_dates)
        batches += 1
    logger.info("followup sweep today=%s %s", today, stats)
    return stats


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
              vbq_threshold=settings.VBQ_HIGH_THRESHOLD,
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
