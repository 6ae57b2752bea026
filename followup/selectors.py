"""The patient page's reads that span the layers below follow-up: the timeline (registry
records, imaging, VBQ results, alerts) and the VBQ result the rules use, with its context."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from django.contrib.auth import get_user_model
from django.db.models import Prefetch

from registry import labels
from registry.models import (
    Alert,
    AlertEvent,
    Fracture,
    Patient,
    Procedure,
    TherapyExposure,
)
from registry.selectors import alert_event_entry
from registry.timeutil import clinic_date
from scoring.models import ImagingStudy, VbqResult
from scoring.trust import (
    result_is_trusted,
    rule_result,
    rule_value,
    threshold_of,
    untrusted_reason,
)


@dataclass
class TimelineEntry:
    day: dt.date
    kind: str
    title: str
    object_id: str
    detail: dict = field(default_factory=dict)


def patient_timeline(*, patient: Patient) -> list[TimelineEntry]:
    """Everything known about a patient, in date order (procedures, fractures, therapy)."""
    entries: list[TimelineEntry] = []
    for p in Procedure.objects.filter(patient=patient):
        entries.append(
            TimelineEntry(
                p.performed_on,
                "procedure",
                f"{p.get_kind_display()} {', '.join(p.levels)}".strip(),
                str(p.pk),
                {"status": p.record_status},
            )
        )
    for f in Fracture.objects.filter(patient=patient):
        entries.append(
            TimelineEntry(
                f.diagnosed_on,
                "fracture",
                f"{f.get_site_display()} fracture {f.vertebral_level}".strip(),
                str(f.pk),
                {"status": f.record_status},
            )
        )
    for t in TherapyExposure.objects.filter(patient=patient):
        entries.append(
            TimelineEntry(
                t.start_on,
                "therapy",
                f"{t.agent.replace('_', ' ').title()} ({t.get_kind_display()})",
                str(t.pk),
                {"status": t.status, "end_on": t.end_on},
            )
        )
    for study in ImagingStudy.objects.filter(patient=patient):
        if study.started_on:
            entries.append(TimelineEntry(
                study.started_on, "mri", study.description or f"{study.modality} study",
                str(study.pk), {"linked": study.linked_procedure_id is not None,
                                "link_reason": _readable_link_reason(study.link_reason)}))
    for result in VbqResult.objects.filter(patient=patient):
        moment = result.finished_at or result.queued_at
        value = (f"VBQ {result.vbq_excluding_fractured or result.vbq_all_levels:.2f}"
                 if (result.vbq_excluding_fractured or result.vbq_all_levels) else "VBQ —")
        entries.append(TimelineEntry(
            clinic_date(moment), "vbq", f"{value} ({result.get_status_display().lower()}, "
            f"{result.get_source_display().lower()})", str(result.pk),
            {"review": result.review_status}))
    alerts = list(Alert.objects.filter(patient=patient).prefetch_related(
        Prefetch("events", queryset=AlertEvent.objects.select_related("actor"))))
    assignee_ids = {e.detail.get("assignee_id") for a in alerts for e in a.events.all()
                    if e.action == "assign" and isinstance(e.detail, dict)} - {None}
    users = dict(get_user_model().objects.filter(pk__in=assignee_ids).values_list(
        "pk", "username")) if assignee_ids else {}
    for alert in alerts:
        entries.append(TimelineEntry(
            clinic_date(alert.opened_at), "alert", f"Alert: {labels.rule_label(alert.rule_id)} "
            f"({labels.alert_status_label(alert.status).lower()})", str(alert.pk),
            {"history": [alert_event_entry(e, users) for e in alert.events.all()],
             "resolution": labels.reason_label(alert.resolution_reason)
             if alert.resolution_reason else ""}))
    entries.sort(key=lambda e: (e.day, e.kind))
    return entries


# Link notes written before the text named no setting (stored rows keep their old wording).
_LEGACY_LINK_NOTES = {
    "no PACS endpoint (PACS_DICOMWEB_URL) and no local copy":
        "no PACS is configured and the images are not stored here",
}


def _readable_link_reason(text: str) -> str:
    for old, new in _LEGACY_LINK_NOTES.items():
        text = text.replace(old, new)
    return text


def current_vbq(*, patient: Patient):  # type: ignore[no-untyped-def]
    """The result the follow-up rules use (``scoring.trust``: accepted, or automatic with no QC
    warning and enough confidence; the latest such), or None."""
    return rule_result(patient.pk)


def vbq_rule_context(vbq: Any, results: Iterable[Any]) -> dict[str, Any]:
    """For the patient page: the value the rules read from ``vbq`` (the result they use), the
    high-VBQ threshold that applied (by its field strength, or the default and why), and the
    shown results that do not count, each with its reason (``scoring.trust``)."""
    out: dict[str, Any] = {"vbq_value": None, "vbq_high": False, "vbq_threshold": None,
                           "vbq_waiting": []}
    if vbq is not None:
        value = rule_value(vbq.vbq_all_levels, vbq.vbq_excluding_fractured)
        cut = threshold_of(vbq.field_strength_t)
        out.update(vbq_value=value, vbq_threshold=cut,
                   vbq_high=value is not None and value >= cut.value)
    for result in results:
        result.why_not_used = "" if result_is_trusted(result) else untrusted_reason(result)
        if result.why_not_used and result.review_status == "pending" and (
                vbq is None or result.queued_at >= vbq.queued_at):
            out["vbq_waiting"].append(result)
    return out
