"""Read paths of the registry."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from django.db.models import Q, QuerySet

from registry import labels
from registry.models import (
    AlertEvent,
    Fracture,
    Patient,
    PatientIdentifier,
    Procedure,
    RecordStatus,
)
from registry.timeutil import clinic_zone


def patient_get_by_identifier(*, system: str, value: str) -> Patient | None:
    ident = (
        PatientIdentifier.objects.select_related("patient")
        .filter(system=system, value=value)
        .first()
    )
    return ident.patient if ident else None


def patient_list(*, search: str = "", care_team: str = "") -> QuerySet[Patient]:
    """Patients (not merged away), newest first. ``search`` matches an identifier value exactly
    or a name prefix."""
    qs = Patient.objects.filter(merged_into__isnull=True).prefetch_related("identifiers")
    if search:
        qs = qs.filter(
            Q(identifiers__value=search.strip())
            | Q(family_name__istartswith=search.strip())
        ).distinct()
    if care_team:
        qs = qs.filter(care_team=care_team)
    return qs.order_by("-created_at")


def index_procedure(*, patient: Patient) -> Procedure | None:
    """The patient's first active vertebroplasty/kyphoplasty."""
    return index_procedure_query(patient_id=patient.pk).first()


def index_procedure_query(*, patient_id: Any) -> QuerySet[Procedure]:
    """The rule of ``index_procedure`` as a query, first row first: for a caller that folds the
    lookup into a statement of its own (``scoring.linking`` takes its per-patient lock in the
    same statement), so the rule stays written once."""
    return Procedure.objects.filter(
        patient_id=patient_id, record_status=RecordStatus.ACTIVE
    ).order_by("performed_at", "pk")


def secondary_fractures(*, patient: Patient, index: Procedure | None = None) -> list[Fracture]:
    """Active fractures diagnosed after the index procedure's date, excluding the index fracture
    (a vertebral fracture at a treated level)."""
    index = index or index_procedure(patient=patient)
    if index is None:
        return []
    treated = set(index.levels)
    return [
        f
        for f in Fracture.objects.filter(
            patient=patient, record_status=RecordStatus.ACTIVE, diagnosed_on__gt=index.performed_on
        ).order_by("diagnosed_on", "pk")
        if not (f.site == "vertebral" and f.vertebral_level and f.vertebral_level in treated)
    ]


@dataclass(frozen=True)
class AlertHistoryEntry:
    """One line of an alert's history as a person reads it: when, who, what, the note."""

    at: dt.datetime
    when: str  # clinic-local "YYYY-MM-DD HH:MM"
    who: str
    what: str
    note: str


def alert_event_entry(event: AlertEvent, users: dict[int, str] | None = None
                      ) -> AlertHistoryEntry:
    """``event`` (with ``actor`` loaded) in words: "Resolved: Therapy declined by the patient"
    by ``demo-coordinator``, or by "system" for the follow-up rules."""
    what = labels.alert_action_label(event.action)
    detail = event.detail or {}
    if event.action == "resolve" and detail.get("reason"):
        what += f": {labels.reason_label(detail['reason'])}"
    elif event.action == "reopen" and detail.get("undone_reason"):
        what += f" (was: {labels.reason_label(detail['undone_reason'])})"
    elif event.action == "snooze" and detail.get("until"):
        what += f" until {detail['until']}"
    elif event.action == "assign":
        assignee = detail.get("assignee_id")
        what += (f" to {(users or {}).get(assignee, f'user {assignee}')}" if assignee
                 else " (unassigned)")
    who = event.actor.get_username() if event.actor_id and event.actor else "system"
    when = event.at.astimezone(clinic_zone()).strftime("%Y-%m-%d %H:%M")
    return AlertHistoryEntry(at=event.at, when=when, who=who, what=what, note=event.note)
