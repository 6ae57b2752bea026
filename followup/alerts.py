"""Alert lifecycle services: open → acknowledged → resolved(reason) | snoozed, assignment,
notes, escalation. Every change writes an AlertEvent (history) and an AuditEvent, and opening or
escalating writes the outbox rows (AlertDelivery) in the same transaction.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.utils import timezone

from followup.delivery import enqueue_deliveries
from registry.followup import RESOLUTION_REASONS, RULE_VERSIONS
from registry.models import (
    OPEN_ALERT_STATUSES,
    Alert,
    AlertEvent,
    AlertStatus,
    AuditAction,
    Patient,
)
from registry.services import RegistryValidationError
from registry.side_effects import SYSTEM_ACTOR, Actor, audit_record
from registry.timeutil import clinic_today

logger = logging.getLogger(__name__)


def _record(alert: Alert, *, actor: Actor, action: str, from_status: str, note: str = "",
            detail: dict[str, Any] | None = None) -> None:
    AlertEvent.objects.create(
        alert=alert, actor_id=actor.user_id, action=action, from_status=from_status,
        to_status=alert.status, note=note, detail=detail or {},
    )
    audit_record(actor=actor, action=AuditAction.UPDATE if action != "open" else
                 AuditAction.CREATE, object_type="Alert", object_id=str(alert.pk),
                 patient_id=alert.patient_id, detail={"alert_action": action})


@transaction.atomic
def alert_open(
    *,
    patient: Patient,
    rule_id: str,
    reason: str,
    vbq_value: float | None = None,
    due_on: dt.date | None = None,
    actor: Actor = SYSTEM_ACTOR,
    vbq_threshold: float | None = None,
    vbq_threshold_field: str = "",
) -> Alert | None:
    """Open an alert unless one is already unresolved for (patient, rule). Returns the new alert,
    or ``None`` when one already exists (the partial unique constraint decides races)."""
    try:
        with transaction.atomic():
            alert = Alert.objects.create(
                patient=patient, rule_id=rule_id, rule_version=RULE_VERSIONS.get(rule_id, 1),
                status=AlertStatus.OPEN, reason=reason[:300], vbq_value=vbq_value,
                vbq_threshold=settings.VBQ_HIGH_THRESHOLD if vbq_threshold is None
                else vbq_threshold, vbq_threshold_field=vbq_threshold_field,
                care_team=patient.care_team
                or settings.DEFAULT_CARE_TEAM, opened_at=timezone.now(),
                due_on=due_on or clinic_today(),
            )
    except IntegrityError:
        return None
    _record(alert, actor=actor, action="open", from_status="", note=reason)
    enqueue_deliveries(alert, "opened")
    logger.info("alert opened alert=%s patient=%s rule=%s", alert.pk, patient.pk, rule_id)
    return alert


def _locked(alert: Alert) -> Alert:
    return Alert.objects.select_for_update().get(pk=alert.pk)


@transaction.atomic
def alert_acknowledge(*, alert: Alert, actor: Actor, note: str = "") -> Alert:
    alert = _locked(alert)
    if alert.status not in (AlertStatus.OPEN, AlertStatus.SNOOZED):
        raise RegistryValidationError(f"an alert that is {alert.status} cannot be acknowledged",
                                      field="status", code="invalid-transition")
    before = alert.status
    alert.status = AlertStatus.ACKNOWLEDGED
    alert.acknowledged_at = alert.acknowledged_at or timezone.now()
    alert.snoozed_until = None
    alert.save(update_fields=["status", "acknowledged_at", "snoozed_until"])
    _record(alert, actor=actor, action="acknowledge", from_status=before, note=note)
    return alert


@transaction.atomic
def alert_snooze(*, alert: Alert, until: dt.date, actor: Actor, note: str = "") -> Alert:
    # The patient's row first, then the alert: the order the sweep takes them (it claims due
    # patients, then locks their alerts), so a snooze during a sweep waits or is skipped
    # instead of deadlocking with it (a snooze also moves the patient's next check).
    list(Patient.objects.select_for_update().filter(pk=alert.patient_id).values_list("pk"))
    alert = _locked(alert)
    if alert.status == AlertStatus.RESOLVED:
        raise RegistryValidationError("a resolved alert cannot be snoozed", field="status",
                                      code="invalid-transition")
    if until <= clinic_today():
        raise RegistryValidationError("snooze until a future date", field="until")
    if until > clinic_today() + dt.timedelta(days=365):
        raise RegistryValidationError("snooze at most one year", field="until")
    before = alert.status
    alert.status = AlertStatus.SNOOZED
    alert.snoozed_until = until
    alert.save(update_fields=["status", "snoozed_until"])
    Patient.objects.filter(pk=alert.patient_id).update(followup_next_check_on=until)
    _record(alert, actor=actor, action="snooze", from_status=before, note=note,
            detail={"until": until.isoformat()})
    return alert


@transaction.atomic
def alert_resolve(*, alert: Alert, reason: str, actor: Actor, note: str = "") -> Alert:
    if reason not in RESOLUTION_REASONS:
        raise RegistryValidationError(f"unknown resolution reason {reason!r}", field="reason")
    alert = _locked(alert)
    if alert.status == AlertStatus.RESOLVED:
        raise RegistryValidationError("the alert is already resolved", field="status",
                                      code="invalid-transition")
    before = alert.status
    alert.status = AlertStatus.RESOLVED
    alert.resolved_at = timezone.now()
    alert.resolution_reason = reason
    alert.save(update_fields=["status", "resolved_at", "resolution_reason"])
    _record(alert, actor=actor, action="resolve", from_status=before, note=note,
            detail={"reason": reason})
    return alert


def reopen_deadline(alert: Alert) -> dt.datetime | None:
    """Until when a person's resolve of ``alert`` may be undone (``alert_reopen``), or ``None``
    when it may not: the alert is not resolved, was resolved by a rule (the rule would resolve
    it again), or was resolved longer ago than ``ALERT_REOPEN_WINDOW_SECONDS``."""
    if alert.status != AlertStatus.RESOLVED or alert.resolved_at is None:
        return None
    last = alert.events.filter(action="resolve").order_by("-at", "-pk").first()
    if last is None or last.actor_id is None:
        return None
    deadline = alert.resolved_at + dt.timedelta(seconds=settings.ALERT_REOPEN_WINDOW_SECONDS)
    return deadline if timezone.now() <= deadline else None


@transaction.atomic
def alert_reopen(*, alert: Alert, actor: Actor, note: str = "") -> Alert:
    """Undo a person's resolve within ``ALERT_REOPEN_WINDOW_SECONDS``: the alert returns to the
    status it had before (open, acknowledged or snoozed), the resolution reason is cleared, and
    a ``reopen`` history event and an AuditEvent record who undid it. Refused (typed error)
    outside the window, for a rule's automatic resolution, or when the rule has since opened
    another alert for the patient (one unresolved alert per patient and rule)."""
    alert = _locked(alert)
    if alert.status != AlertStatus.RESOLVED:
        raise RegistryValidationError("only a resolved alert can be reopened", field="status",
                                      code="invalid-transition")
    if reopen_deadline(alert) is None:
        raise RegistryValidationError(
            "this resolution can no longer be undone (too late, or resolved by a rule)",
            field="status", code="invalid-transition")
    last = alert.events.filter(action="resolve").order_by("-at", "-pk").first()
    previous = (last.from_status if last and last.from_status in OPEN_ALERT_STATUSES
                else AlertStatus.OPEN)
    reason = alert.resolution_reason
    alert.status = previous
    alert.resolved_at = None
    alert.resolution_reason = ""
    try:
        with transaction.atomic():
            alert.save(update_fields=["status", "resolved_at", "resolution_reason"])
    except IntegrityError:
        raise RegistryValidationError(
            "another alert for this rule is already open for the patient", field="status",
            code="invalid-transition") from None
    _record(alert, actor=actor, action="reopen", from_status=AlertStatus.RESOLVED, note=note,
            detail={"undone_reason": reason})
    return alert


@transaction.atomic
def alert_assign(*, alert: Alert, actor: Actor, assignee_id: int | None = None,
                 care_team: str | None = None) -> Alert:
    alert = _locked(alert)
    if alert.status == AlertStatus.RESOLVED:
        raise RegistryValidationError("a resolved alert cannot be reassigned", field="status",
                                      code="invalid-transition")
    if assignee_id is not None and not get_user_model().objects.filter(
        pk=assignee_id, is_active=True
    ).exists():
        raise RegistryValidationError("unknown or inactive user", field="assignee")
    alert.assignee_id = assignee_id
    if care_team is not None:
        alert.care_team = care_team
    alert.save(update_fields=["assignee", "care_team"])
    _record(alert, actor=actor, action="assign", from_status=alert.status,
            detail={"assignee_id": assignee_id, "care_team": alert.care_team})
    return alert


@transaction.atomic
def alert_escalate(*, alert: Alert, reason: str, for_fracture: bool = False,
                   actor: Actor = SYSTEM_ACTOR) -> Alert:
    alert = _locked(alert)
    if alert.status == AlertStatus.RESOLVED:
        return alert
    before = alert.status
    alert.escalation_level += 1
    alert.escalated_for_fracture = alert.escalated_for_fracture or for_fracture
    if alert.status == AlertStatus.SNOOZED and for_fracture:
        alert.status = AlertStatus.OPEN  # a new fracture ends a snooze
        alert.snoozed_until = None
    alert.save(update_fields=["escalation_level", "escalated_for_fracture", "status",
                              "snoozed_until"])
    _record(alert, actor=actor, action="escalate", from_status=before, note=reason)
    enqueue_deliveries(alert, "escalated")
    return alert


@transaction.atomic
def alert_add_note(*, alert: Alert, note: str, actor: Actor) -> AlertEvent:
    if not note.strip():
        raise RegistryValidationError("the note is empty", field="note")
    event = AlertEvent.objects.create(alert=alert, actor_id=actor.user_id, action="note",
                                      from_status=alert.status, to_status=alert.status,
                                      note=note.strip()[:4000])
    audit_record(actor=actor, action=AuditAction.UPDATE, object_type="Alert",
                 object_id=str(alert.pk), patient_id=alert.patient_id,
                 detail={"alert_action": "note"})
    return event


def unresolved_alerts(patient_id: Any) -> list[Alert]:
    return list(Alert.objects.filter(patient_id=patient_id, status__in=OPEN_ALERT_STATUSES))
