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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.db import connection, transaction

from followup.alerts import alert_escalate, alert_open, alert_resolve
from followup.batch_writes import (
    SWEEP_ACTOR,
    alert_threshold,
    queue_delivery,
    write_batch,
    write_changes,
)
from followup.facts import (
    claim_due,
    config_from_settings,
    facts_from_row,
    load_facts,
    patient_facts_sql,
)
from registry.followup import (
    ESCALATE,
    OPEN,
    RESOLVE,
    SECONDARY_FRACTURE,
    Decision,
    Evaluation,
    evaluate,
)
from registry.models import (
    OPEN_ALERT_STATUSES,
    Alert,
    Patient,
)
from registry.side_effects import Actor
from registry.timeutil import clinic_today

logger = logging.getLogger(__name__)


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
                               vbq_threshold=alert_threshold(decision),
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
                facts = facts_from_row(row)
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
    has any, cost a fixed number of statements more (``write_changes``: lock, two UPDATEs,
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
            opened, escalated = write_batch(
                to_open, teams={pid: f.care_team for pid, f in facts.items()},
                next_dates=next_dates, to_escalate=to_escalate)
            stats.opened += opened
            stats.escalated += escalated
            # After the write above: an alert it just opened can be escalated for a fracture.
            escalated, resolved = write_changes(changes)
            stats.escalated += escalated
            stats.resolved += resolved
            if urgent or any(d.action == ESCALATE for _, d in changes):
                queue_delivery()
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


def reevaluate_in_transaction(sender: Any, *, patient_id: Any, **kwargs: Any) -> None:
    """Receiver of ``scoring.signals.patient_result_stored``: re-evaluate the patient's
    follow-up now, inside the caller's transaction (the result and its alerts commit together).
    If the evaluation fails, the result is still stored and the patient is marked due today,
    so the sweep evaluates them instead: ``followup_evaluate`` does each patient's reads and
    writes in a savepoint of its own (its per-patient ``atomic``), so a database error there
    leaves the caller's transaction usable, and no second savepoint around it is needed (two
    round trips fewer per job)."""
    try:
        followup_evaluate([patient_id])
    except Exception:
        logger.exception("follow-up re-evaluation failed patient=%s; left to the sweep",
                         patient_id)
        Patient.objects.filter(pk=patient_id).update(followup_next_check_on=clinic_today())
