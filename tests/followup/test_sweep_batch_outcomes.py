"""The sweep over a mixed SYNTHETIC cohort: the exact alerts, history, audit and outbox rows it
writes (fracture escalations, resolutions, opens, unacknowledged escalations), idempotency on
re-run, and a statement count that does not grow with the number of patients."""

import datetime as dt

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from followup.alerts import alert_acknowledge, alert_escalate, alert_open, alert_snooze
from followup.sweep import followup_evaluate, followup_sweep
from registry.followup import HIGH_VBQ, SECONDARY_FRACTURE, VBQ_MISSING
from registry.models import Alert, AlertDelivery, AlertEvent, AuditEvent, Patient
from registry.side_effects import Actor
from registry.timeutil import clinic_today, start_of_clinic_day
from tests.factories import FractureFactory, TherapyExposureFactory
from tests.registry.followup_helpers import high_vbq_patient

pytestmark = pytest.mark.django_db
STAFF = Actor(via="api")


def _fracture(patient: Patient, days_ago: int = 10) -> None:
    day = clinic_today() - dt.timedelta(days=days_ago)
    FractureFactory(patient=patient, diagnosed_at=start_of_clinic_day(day)
                    + dt.timedelta(hours=12))


def _alert(patient: Patient, rule: str, days_ago: int = 2) -> Alert:
    alert = alert_open(patient=patient, rule_id=rule, reason=f"setup {rule}",
                       due_on=clinic_today() - dt.timedelta(days=days_ago), actor=STAFF)
    assert alert is not None
    return alert


def _due(patient: Patient) -> Patient:
    Patient.objects.filter(pk=patient.pk).update(followup_next_check_on=clinic_today())
    return patient


def build(label: str) -> Patient:
    """One SYNTHETIC patient in the state ``label`` names, due today."""
    today = clinic_today()
    if label == "opens":
        return high_vbq_patient(70)
    if label == "nothing-yet":
        return high_vbq_patient(20)
    if label.startswith("fx-escalates-"):
        patient = high_vbq_patient(70)
        alert = _alert(patient, HIGH_VBQ)
        if label == "fx-escalates-snoozed":
            alert_snooze(alert=alert, until=today + dt.timedelta(days=10), actor=STAFF)
        elif label == "fx-escalates-acknowledged":
            alert_acknowledge(alert=alert, actor=STAFF)
        _fracture(patient)
        return _due(patient)
    if label == "fx-already-escalated":
        patient = high_vbq_patient(70)
        alert_escalate(alert=_alert(patient, HIGH_VBQ), reason="setup", for_fracture=True,
                       actor=STAFF)
        _fracture(patient)
        return _due(patient)
    if label == "fx-opens-and-escalates":
        patient = high_vbq_patient(70)
        _fracture(patient)
        return patient
    if label == "fx-opens-own":
        patient = high_vbq_patient(70, vbq=2.0)
        _fracture(patient)
        return patient
    if label == "resolves-therapy":
        patient = high_vbq_patient(70)
        _alert(patient, HIGH_VBQ)
        TherapyExposureFactory(patient=patient, start_on=today - dt.timedelta(days=5))
        return _due(patient)
    if label == "resolves-fx-alert-therapy":
        patient = high_vbq_patient(70, vbq=2.0)
        _fracture(patient)
        _alert(patient, SECONDARY_FRACTURE)
        TherapyExposureFactory(patient=patient, start_on=today - dt.timedelta(days=5))
        return _due(patient)
    if label == "resolves-deceased":
        patient = high_vbq_patient(70, deceased_on=today - dt.timedelta(days=1))
        alert_acknowledge(alert=_alert(patient, HIGH_VBQ), actor=STAFF)
        _alert(patient, VBQ_MISSING)
        return _due(patient)
    if label == "resolves-not-appropriate":
        patient = high_vbq_patient(70, vbq=2.5)
        _alert(patient, HIGH_VBQ)
        return _due(patient)
    if label == "resolves-vbq-obtained":
        patient = high_vbq_patient(70, vbq=2.0)
        _alert(patient, VBQ_MISSING)
        return _due(patient)
    if label == "escalates-unacknowledged":
        patient = high_vbq_patient(70)
        _alert(patient, HIGH_VBQ, days_ago=8)
        return _due(patient)
    raise AssertionError(label)


LABELS = [
    "opens", "nothing-yet", "fx-escalates-open", "fx-escalates-snoozed",
    "fx-escalates-acknowledged", "fx-already-escalated", "fx-opens-and-escalates",
    "fx-opens-own", "resolves-therapy", "resolves-fx-alert-therapy", "resolves-deceased",
    "resolves-not-appropriate", "resolves-vbq-obtained", "escalates-unacknowledged",
]


def snapshot(labels: dict, after: dict[str, int]) -> dict:
    """Every alert's state, and the history/audit/outbox rows written after ``after`` (max
    ids), keyed by patient label and rule instead of ids."""
    today = clinic_today()
    alerts = {a.pk: a for a in Alert.objects.filter(patient_id__in=labels)}

    def key(alert_id: int) -> tuple[str, str]:
        alert = alerts[alert_id]
        return labels[alert.patient_id], alert.rule_id

    return {
        "alerts": {
            key(a.pk): (a.status, a.escalation_level, a.escalated_for_fracture,
                        a.snoozed_until and (a.snoozed_until - today).days,
                        a.resolution_reason, a.resolved_at is not None,
                        (a.due_on - today).days, a.reason, a.vbq_value, a.care_team)
            for a in alerts.values()
        },
        "events": sorted(
            (*key(e.alert_id), e.action, e.from_status, e.to_status, e.note, e.detail,
             e.actor_id)
            for e in AlertEvent.objects.filter(pk__gt=after["event"])
        ),
        "audit": sorted(
            (*key(int(a.object_id)), labels[a.patient_id], a.action, a.via, a.detail,
             a.actor_id, a.feed_id)
            for a in AuditEvent.objects.filter(pk__gt=after["audit"], object_type="Alert")
        ),
        "other_audit": AuditEvent.objects.filter(pk__gt=after["audit"]).exclude(
            object_type="Alert").count(),
        "deliveries": sorted(
            (*key(d.alert_id), d.channel, d.event, d.status,
             d.idempotency_key.replace(f"alert-{d.alert_id}-", "alert-<id>-", 1))
            for d in AlertDelivery.objects.filter(pk__gt=after["delivery"])
        ),
        "next": {labels[pid]: day and (day - today).days for pid, day in
                 Patient.objects.filter(pk__in=labels).values_list(
                     "id", "followup_next_check_on")},
    }


def _max_ids() -> dict[str, int]:
    def top(model) -> int:
        return model.objects.order_by("-pk").values_list("pk", flat=True).first() or 0

    return {"event": top(AlertEvent), "audit": top(AuditEvent), "delivery": top(AlertDelivery)}


def _expected_rows(today: dt.date) -> tuple[dict, list, list, list]:
    fx_day = (today - dt.timedelta(days=10)).isoformat()
    fx_note = f"secondary fracture on {fx_day} while untreated"
    open_note = ("VBQ 3.60 ≥ 3 (default threshold, field strength unknown), no "
                 "anti-osteoporosis therapy on day 70 after the procedure")
    own_note = f"secondary fracture on {fx_day} without anti-osteoporosis therapy"
    team = "fracture-liaison"
    alerts = {
        ("opens", HIGH_VBQ): ("open", 0, False, None, "", False, 0, open_note, 3.6, team),
        ("fx-escalates-open", HIGH_VBQ): ("open", 1, True, None, "", False, -2,
                                          f"setup {HIGH_VBQ}", None, team),
        ("fx-escalates-snoozed", HIGH_VBQ): ("open", 1, True, None, "", False, -2,
                                             f"setup {HIGH_VBQ}", None, team),
        ("fx-escalates-acknowledged", HIGH_VBQ): ("acknowledged", 1, True, None, "", False, -2,
                                                  f"setup {HIGH_VBQ}", None, team),
        ("fx-already-escalated", HIGH_VBQ): ("open", 1, True, None, "", False, -2,
                                             f"setup {HIGH_VBQ}", None, team),
        ("fx-opens-and-escalates", HIGH_VBQ): ("open", 1, True, None, "", False, 0, open_note,
                                               3.6, team),
        ("fx-opens-own", SECONDARY_FRACTURE): ("open", 0, False, None, "", False, 0, own_note,
                                               2.0, team),
        ("resolves-therapy", HIGH_VBQ): ("resolved", 0, False, None, "therapy-started", True,
                                         -2, f"setup {HIGH_VBQ}", None, team),
        ("resolves-fx-alert-therapy", SECONDARY_FRACTURE): (
            "resolved", 0, False, None, "therapy-started", True, -2,
            f"setup {SECONDARY_FRACTURE}", None, team),
        ("resolves-deceased", HIGH_VBQ): ("resolved", 0, False, None, "deceased", True, -2,
                                          f"setup {HIGH_VBQ}", None, team),
        ("resolves-deceased", VBQ_MISSING): ("resolved", 0, False, None, "deceased", True, -2,
                                             f"setup {VBQ_MISSING}", None, team),
        ("resolves-not-appropriate", HIGH_VBQ): ("resolved", 0, False, None, "not-appropriate",
                                                 True, -2, f"setup {HIGH_VBQ}", None, team),
        ("resolves-vbq-obtained", VBQ_MISSING): ("resolved", 0, False, None, "vbq-obtained",
                                                 True, -2, f"setup {VBQ_MISSING}", None, team),
        ("escalates-unacknowledged", HIGH_VBQ): ("open", 1, False, None, "", False, -8,
                                                 f"setup {HIGH_VBQ}", None, team),
    }

    def esc(label, before, after, note=fx_note):
        return (label, HIGH_VBQ, "escalate", before, after, note, {}, None)

    def res(label, rule, before, why, note):
        return (label, rule, "resolve", before, "resolved", note, {"reason": why}, None)

    events = sorted([
        ("opens", HIGH_VBQ, "open", "", "open", open_note, {}, None),
        esc("fx-escalates-open", "open", "open"),
        esc("fx-escalates-snoozed", "snoozed", "open"),
        esc("fx-escalates-acknowledged", "acknowledged", "acknowledged"),
        ("fx-opens-and-escalates", HIGH_VBQ, "open", "", "open", open_note, {}, None),
        esc("fx-opens-and-escalates", "open", "open"),
        ("fx-opens-own", SECONDARY_FRACTURE, "open", "", "open", own_note, {}, None),
        res("resolves-therapy", HIGH_VBQ, "open", "therapy-started",
            "anti-osteoporosis therapy recorded"),
        res("resolves-fx-alert-therapy", SECONDARY_FRACTURE, "open", "therapy-started",
            "anti-osteoporosis therapy recorded"),
        res("resolves-deceased", HIGH_VBQ, "acknowledged", "deceased", "patient deceased"),
        res("resolves-deceased", VBQ_MISSING, "open", "deceased", "patient deceased"),
        res("resolves-not-appropriate", HIGH_VBQ, "open", "not-appropriate",
            "VBQ revised to 2.50 (below 3: default threshold, field strength unknown)"),
        res("resolves-vbq-obtained", VBQ_MISSING, "open", "vbq-obtained", "VBQ now available"),
        esc("escalates-unacknowledged", "open", "open", "not acknowledged within 7 days"),
    ])
    audit = sorted(
        (label, rule, label, "create" if action == "open" else "update", "task",
         {"alert_action": action}, None, None)
        for label, rule, action, *_ in events
    )
    deliveries = sorted(
        (label, rule, channel, event, "pending", f"alert-<id>-{event}-{level}-{channel}")
        for label, rule, event, level in [
            ("opens", HIGH_VBQ, "opened", 0),
            ("fx-escalates-open", HIGH_VBQ, "escalated", 1),
            ("fx-escalates-snoozed", HIGH_VBQ, "escalated", 1),
            ("fx-escalates-acknowledged", HIGH_VBQ, "escalated", 1),
            ("fx-opens-and-escalates", HIGH_VBQ, "opened", 0),
            ("fx-opens-and-escalates", HIGH_VBQ, "escalated", 1),
            ("fx-opens-own", SECONDARY_FRACTURE, "opened", 0),
            ("escalates-unacknowledged", HIGH_VBQ, "escalated", 1),
        ]
        for channel in ("email", "in-app")
    )
    return alerts, events, audit, deliveries


def test_a_mixed_cohort_sweep_writes_exactly_these_alerts_history_audit_and_outbox_rows():
    today = clinic_today()
    labels = {build(label).pk: label for label in LABELS}
    before = _max_ids()
    stats = followup_sweep(today=today)
    assert (stats.evaluated, stats.opened, stats.escalated, stats.resolved, stats.errors) == (
        14, 3, 5, 6, 0)
    alerts, events, audit, deliveries = _expected_rows(today)
    got = snapshot(labels, before)
    assert got["alerts"] == alerts
    assert got["events"] == events
    assert got["audit"] == audit
    assert got["other_audit"] == 0
    assert got["deliveries"] == deliveries
    assert got["next"] == {
        "opens": 7, "nothing-yet": 40, "fx-escalates-open": None, "fx-escalates-snoozed": None,
        "fx-escalates-acknowledged": None, "fx-already-escalated": None,
        "fx-opens-and-escalates": 7, "fx-opens-own": 7, "resolves-therapy": None,
        "resolves-fx-alert-therapy": None, "resolves-deceased": None,
        "resolves-not-appropriate": None, "resolves-vbq-obtained": None,
        "escalates-unacknowledged": None,
    }

    # Idempotent: everyone due again the same day changes nothing and writes no row.
    Patient.objects.update(followup_next_check_on=today)
    again = followup_sweep(today=today)
    assert (again.evaluated, again.opened, again.escalated, again.resolved) == (14, 0, 0, 0)
    rerun = snapshot(labels, before)
    assert {k: v for k, v in rerun.items() if k != "next"} == {
        k: v for k, v in got.items() if k != "next"}
    # (the alert opened and escalated at once leaves nothing to come back for)
    assert rerun["next"] == {**got["next"], "fx-opens-and-escalates": None}


class _Undo(Exception):
    pass


def test_the_batched_sweep_writes_what_the_per_patient_alert_services_write():
    """The event path (``followup_evaluate``: alert_open/alert_escalate/alert_resolve one patient
    at a time) on the same cohort, rolled back, then the sweep: the same rows, ids aside."""
    today = clinic_today()
    labels = {build(label).pk: label for label in LABELS}
    before = _max_ids()
    seen: list[dict] = []

    def evaluate_then_undo() -> None:
        with transaction.atomic():
            followup_evaluate(list(labels), today=today)
            seen.append(snapshot(labels, before))
            raise _Undo

    with pytest.raises(_Undo):
        evaluate_then_undo()
    per_patient = seen[0]
    assert per_patient["events"]  # the event path did carry out the decisions
    assert Alert.objects.filter(status="resolved").count() == 0  # rolled back
    followup_sweep(today=today)
    assert snapshot(labels, before) == per_patient


def _escalating_and_resolving_cohort(n: int) -> None:
    for _ in range(n):
        for label in ("fx-escalates-open", "fx-escalates-snoozed", "resolves-therapy",
                      "resolves-deceased", "fx-opens-own", "fx-opens-and-escalates"):
            build(label)


def _statements(ctx) -> list[str]:
    return [q["sql"] for q in ctx.captured_queries
            if q["sql"].split()[0].upper() not in {"BEGIN", "COMMIT", "SAVEPOINT", "RELEASE"}]


@pytest.mark.parametrize("n", [3])
def test_fracture_escalations_and_resolutions_cost_the_same_statements_for_n_and_3n(n):
    counts = []
    for size in (n, 3 * n):
        Patient.objects.update(followup_next_check_on=None)
        _escalating_and_resolving_cohort(size)
        with CaptureQueriesContext(connection) as ctx:
            stats = followup_sweep()
        assert (stats.evaluated, stats.escalated, stats.resolved, stats.opened) == (
            6 * size, 3 * size, 3 * size, 2 * size)
        counts.append(len(_statements(ctx)))
    assert counts[0] == counts[1], counts
    if connection.vendor == "postgresql":
        # claim+facts, the batch write, then lock, two UPDATEs and three INSERTs for the
        # fracture escalations and resolutions
        assert counts[0] == 8, counts
