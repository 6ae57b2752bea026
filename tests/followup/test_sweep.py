"""The sweep and event-driven re-evaluation on the database, with a real worker and beat."""

import datetime as dt
import os
import threading
import time
from zoneinfo import ZoneInfo

import pytest
from django.conf import settings
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from followup.batch_writes import write_batch
from followup.facts import (
    claim_due,
    due_facts_sql,
    facts_from_row,
    load_facts,
    patient_facts_sql,
)
from followup.sweep import followup_evaluate, followup_sweep
from registry.models import Alert, AlertDelivery, AlertEvent, AuditEvent, Patient
from registry.services import therapy_record
from registry.timeutil import clinic_today, start_of_clinic_day
from scoring.models import VbqResult
from tests.conftest import CeleryWorker, test_database_url
from tests.factories import FractureFactory, ProcedureFactory, TherapyExposureFactory
from tests.registry.followup_helpers import high_vbq_patient

pytestmark = pytest.mark.django_db


def test_sweep_opens_one_alert_per_due_patient_and_is_idempotent():
    due = [high_vbq_patient(70) for _ in range(3)]
    not_yet = high_vbq_patient(20)
    first = followup_sweep()
    second = followup_sweep()
    assert first.opened == 3
    assert second.opened == 0
    assert set(Alert.objects.values_list("patient_id", flat=True)) == {p.pk for p in due}
    not_yet.refresh_from_db()
    assert not_yet.followup_next_check_on == clinic_today() + dt.timedelta(days=40)


def test_sweep_only_reads_due_patients():
    high_vbq_patient(70)
    Patient.objects.update(followup_next_check_on=clinic_today() + dt.timedelta(days=5))
    assert followup_sweep().evaluated == 0


def test_sweep_plan_uses_the_due_date_index():
    if connection.vendor != "postgresql":
        pytest.skip("plan check is PostgreSQL-specific")
    sql, params = due_facts_sql(clinic_today(), 500)  # exactly what the sweep runs
    with connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")  # a test database is too small to matter
        cursor.execute("EXPLAIN " + sql, params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
        cursor.execute("RESET enable_seqscan")
    assert "patient_followup_due_idx" in plan
    assert "Seq Scan on registry_patient" not in plan


def _statements(ctx):
    return [q["sql"] for q in ctx.captured_queries
            if q["sql"].split()[0].upper() not in {"BEGIN", "COMMIT", "SAVEPOINT", "RELEASE"}]


@pytest.mark.postgres
def test_a_batch_costs_two_statements_whatever_the_number_of_due_patients():
    for n in (2, 9):
        for _ in range(n):
            high_vbq_patient(70)
        with CaptureQueriesContext(connection) as ctx:
            stats = followup_sweep()
        assert stats.opened == n
        assert len(_statements(ctx)) == 2, _statements(ctx)  # claim+facts, then writes


@pytest.mark.postgres
def test_the_sweeps_sql_facts_match_the_orm_facts():
    """The one-statement claim returns what ``load_facts`` (ORM, event path) reads."""
    patient = high_vbq_patient(70, vbq=3.2)
    today = clinic_today()
    ProcedureFactory(patient=patient, levels=["L2", "L3"],
                     performed_at=start_of_clinic_day(today - dt.timedelta(days=40)))
    ProcedureFactory(patient=patient, record_status="entered-in-error",
                     performed_at=start_of_clinic_day(today - dt.timedelta(days=300)))
    VbqResult.objects.create(patient=patient, algorithm_version="test-2", source="auto",
                             status="succeeded", review_status="pending", vbq_all_levels=2.7,
                             vbq_excluding_fractured=None, qc_clear=True, confidence=0.95)
    VbqResult.objects.create(patient=patient, algorithm_version="test-4", source="manual",
                             status="succeeded", review_status="pending", vbq_all_levels=1.1,
                             qc_clear=True, confidence=1.0)  # not accepted: never counts
    VbqResult.objects.create(patient=patient, algorithm_version="test-3", source="manual",
                             status="succeeded", review_status="rejected", vbq_all_levels=9.0)
    TherapyExposureFactory(patient=patient, agent="zoledronic_acid", route="iv",
                           start_on=today - dt.timedelta(days=400))
    TherapyExposureFactory(patient=patient, agent="denosumab", route="sc", status="declined",
                           start_on=today - dt.timedelta(days=3),
                           end_on=today - dt.timedelta(days=1))
    FractureFactory(patient=patient, site="vertebral", vertebral_level="L4", code="S32.040A",
                    diagnosed_at=start_of_clinic_day(today - dt.timedelta(days=20)))
    Alert.objects.create(patient=patient, rule_id="vbq-missing", reason="r", status="snoozed",
                         opened_at=start_of_clinic_day(today), due_on=today,
                         snoozed_until=today + dt.timedelta(days=3), escalation_level=1)
    Alert.objects.create(patient=patient, rule_id="secondary-fracture", reason="r",
                         status="resolved", opened_at=start_of_clinic_day(today),
                         resolved_at=start_of_clinic_day(today))
    other = high_vbq_patient(5)
    Patient.objects.filter(pk=patient.pk).update(deceased_on=today, care_team="spine")
    with transaction.atomic():
        claimed = claim_due(today, 10)
    expected = load_facts([patient.pk, other.pk])
    assert set(claimed) == {patient.pk, other.pk}
    for pid in claimed:
        got, want = claimed[pid], expected[pid]
        assert (got.index_date, got.index_levels, got.vbq_all_levels,
                got.vbq_excluding_fractured, got.deceased_on, got.care_team) == (
            want.index_date, want.index_levels, want.vbq_all_levels,
            want.vbq_excluding_fractured, want.deceased_on, want.care_team)
        assert sorted(got.exposures, key=repr) == sorted(want.exposures, key=repr)
        assert sorted(got.fractures, key=repr) == sorted(want.fractures, key=repr)
        assert sorted(got.open_alerts, key=repr) == sorted(want.open_alerts, key=repr)
    if connection.vendor == "postgresql":  # the event path's one-patient read, same facts
        for pid in claimed:
            sql, params = patient_facts_sql(pid)
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute(sql, params)
                one = facts_from_row(cursor.fetchone())
            assert (one.index_date, one.index_levels, one.vbq_all_levels, one.deceased_on,
                    one.care_team) == (claimed[pid].index_date, claimed[pid].index_levels,
                                       claimed[pid].vbq_all_levels, claimed[pid].deceased_on,
                                       claimed[pid].care_team)
            assert sorted(one.exposures, key=repr) == sorted(claimed[pid].exposures, key=repr)
            assert sorted(one.fractures, key=repr) == sorted(claimed[pid].fractures, key=repr)
            assert sorted(one.open_alerts, key=repr) == sorted(claimed[pid].open_alerts,
                                                               key=repr)
    facts = claimed[patient.pk]
    # the latest result that counts (scoring.trust): not the rejected one, not the pending
    # manual one
    assert facts.vbq_all_levels == 2.7
    assert len(facts.exposures) == 2
    assert len(facts.fractures) == 1
    assert [a.rule_id for a in facts.open_alerts] == ["vbq-missing"]


def test_an_alert_opened_by_the_sweep_has_its_history_audit_and_outbox_rows():
    patient = high_vbq_patient(70)
    followup_sweep()
    alert = Alert.objects.get(patient=patient)
    assert (alert.status, alert.rule_id, alert.escalation_level) == ("open",
                                                                     "high-vbq-untreated-60d", 0)
    assert (alert.vbq_value, alert.vbq_threshold) == (pytest.approx(3.6), 3.0)
    assert alert.due_on == clinic_today()
    assert alert.care_team == (patient.care_team or settings.DEFAULT_CARE_TEAM)
    event = AlertEvent.objects.get(alert=alert)
    assert (event.action, event.to_status, event.note) == ("open", "open", alert.reason)
    audit = AuditEvent.objects.get(object_type="Alert", object_id=str(alert.pk))
    assert (audit.action, audit.via, audit.patient_id, audit.detail) == (
        "create", "task", patient.pk, {"alert_action": "open"})
    keys = set(AlertDelivery.objects.filter(alert=alert).values_list("idempotency_key",
                                                                      flat=True))
    assert keys == {f"alert-{alert.pk}-opened-0-in-app", f"alert-{alert.pk}-opened-0-email"}
    assert set(AlertDelivery.objects.filter(alert=alert).values_list("status", flat=True)) == {
        "pending"}


def test_an_unacknowledged_alert_escalates_once_at_the_sweep_a_week_later():
    ignored, acknowledged = high_vbq_patient(70), high_vbq_patient(70)
    today = clinic_today()
    assert followup_sweep(today=today).opened == 2
    ack_alert = Alert.objects.get(patient=acknowledged)
    from followup.alerts import alert_acknowledge
    from registry.side_effects import Actor

    alert_acknowledge(alert=ack_alert, actor=Actor(via="api"))
    assert followup_sweep(today=today + dt.timedelta(days=6)).evaluated == 0  # not due yet
    with CaptureQueriesContext(connection) as ctx:
        week = followup_sweep(today=today + dt.timedelta(days=7))
    assert (week.evaluated, week.escalated) == (2, 1)
    if connection.vendor == "postgresql":  # the 2-statement batch is PostgreSQL's; SQLite: ORM
        assert len(_statements(ctx)) == 2
    alert = Alert.objects.get(patient=ignored)
    assert (alert.status, alert.escalation_level) == ("open", 1)
    assert Alert.objects.get(patient=acknowledged).escalation_level == 0
    event = AlertEvent.objects.get(alert=alert, action="escalate")
    assert (event.from_status, event.to_status, event.note) == ("open", "open",
                                                                "not acknowledged within 7 days")
    assert AuditEvent.objects.filter(object_id=str(alert.pk),
                                     detail={"alert_action": "escalate"}).count() == 1
    assert set(AlertDelivery.objects.filter(alert=alert, event="escalated").values_list(
        "idempotency_key", flat=True)) == {f"alert-{alert.pk}-escalated-1-in-app",
                                           f"alert-{alert.pk}-escalated-1-email"}
    later = followup_sweep(today=today + dt.timedelta(days=30))
    assert later.escalated == 0
    assert Alert.objects.get(patient=ignored).escalation_level == 1


def test_a_batch_write_racing_an_existing_alert_adds_nothing_for_it():
    """An event opened the alert between the claim and the write: the unique index skips the
    duplicate, and no history, audit or outbox row is written for it."""
    patient = high_vbq_patient(70)
    followup_evaluate([patient.pk])  # the event path opens the alert
    counts = (AlertEvent.objects.count(), AuditEvent.objects.count(),
              AlertDelivery.objects.count())
    from registry.followup import HIGH_VBQ, Decision

    decision = Decision(HIGH_VBQ, "open", "race", vbq_value=3.6, due_on=clinic_today())
    nxt = clinic_today() + dt.timedelta(days=9)
    assert write_batch([(patient.pk, decision)], {}, {patient.pk: nxt}) == (0, 0)
    assert Alert.objects.filter(patient=patient).count() == 1
    assert (AlertEvent.objects.count(), AuditEvent.objects.count(),
            AlertDelivery.objects.count()) == counts
    patient.refresh_from_db()
    assert patient.followup_next_check_on == nxt


NEW_YORK = ZoneInfo("America/New_York")


@pytest.mark.parametrize(
    ("sweep_at_utc", "clinic_day", "opens"),
    [
        # Procedure at 23:30 New York time on 8 Jan 2025 (04:30 UTC on 9 Jan): day 60 in clinic
        # time is 9 March 2025, the spring-forward day (23 hours long).
        (dt.datetime(2025, 3, 9, 4, 59, tzinfo=dt.UTC), 59, False),  # 23:59 EST, 8 March
        (dt.datetime(2025, 3, 9, 5, 0, tzinfo=dt.UTC), 60, True),  # 00:00 EST, 9 March
        (dt.datetime(2025, 3, 10, 3, 59, tzinfo=dt.UTC), 60, True),  # 23:59 EDT, 9 March
        (dt.datetime(2025, 3, 10, 4, 0, tzinfo=dt.UTC), 61, True),  # 00:00 EDT, 10 March
    ],
)
def test_the_sweep_counts_days_in_the_clinic_zone_across_the_dst_change(
    settings, monkeypatch, sweep_at_utc, clinic_day, opens
):
    from django.utils import timezone

    settings.CLINIC_TIME_ZONE = "America/New_York"
    patient = high_vbq_patient(70)
    patient.procedures.all().delete()
    ProcedureFactory(patient=patient,
                     performed_at=dt.datetime(2025, 1, 8, 23, 30, tzinfo=NEW_YORK))
    monkeypatch.setattr(timezone, "now", lambda: sweep_at_utc)
    today = clinic_today()
    assert (today - dt.date(2025, 1, 8)).days == clinic_day
    Patient.objects.filter(pk=patient.pk).update(followup_next_check_on=today)
    stats = followup_sweep()  # the beat task's call: no explicit date
    assert stats.opened == (1 if opens else 0)
    patient.refresh_from_db()
    if not opens:
        assert patient.followup_next_check_on == dt.date(2025, 3, 9)


def test_therapy_recorded_resolves_the_open_alert_on_re_evaluation():
    patient = high_vbq_patient(70)
    followup_sweep()
    therapy_record(patient=patient, agent="alendronate", kind="order", route="oral",
                   start_on=clinic_today())
    followup_evaluate([patient.pk])
    alert = Alert.objects.get(patient=patient)
    assert alert.status == "resolved"
    assert alert.resolution_reason == "therapy-started"


@pytest.mark.postgres
def test_two_concurrent_sweeps_open_exactly_one_alert_per_due_patient(transactional_db):
    patients = [high_vbq_patient(65 + i % 30) for i in range(40)]
    errors = []

    def run():
        try:
            followup_sweep(batch_size=7)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert Alert.objects.count() == len(patients)
    assert Alert.objects.values("patient_id").distinct().count() == len(patients)


def _wait(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.3)
    return False


@pytest.mark.slow
def test_worker_resolves_the_alert_within_seconds_of_a_therapy_order(celery_worker_process):
    patient = high_vbq_patient(70)
    followup_sweep()
    assert Alert.objects.get(patient=patient).status == "open"
    therapy_record(patient=patient, agent="denosumab", kind="order", route="sc",
                   start_on=clinic_today())  # queues registry.followup_reevaluate on commit
    assert _wait(lambda: Alert.objects.get(patient=patient).status == "resolved", 30), \
        celery_worker_process.log_path.read_text()[-2000:]


@pytest.mark.slow
def test_a_medication_request_posted_to_fhir_resolves_the_alert_through_the_worker(
    client, celery_worker_process
):
    """End to end: the EHR posts the order to /fhir; the commit queues the re-evaluation and the
    real worker resolves the alert (nothing here calls the rules directly)."""
    import copy
    import json
    from pathlib import Path

    from registry.feeds import feed_create

    patient = high_vbq_patient(70, mrn="SYN-ALERT-W1")
    followup_sweep()
    assert Alert.objects.get(patient=patient).status == "open"
    token = feed_create(name="test-ehr-worker")[1]
    fixtures = Path(__file__).resolve().parents[1] / "integrations" / "fhir" / "fixtures"
    bundle = json.loads((fixtures / "transaction-vertebroplasty.json").read_text())
    order = copy.deepcopy(next(e["resource"] for e in bundle["entry"]
                               if e["resource"]["resourceType"] == "MedicationRequest"))
    order["subject"] = {"identifier": {
        "system": "https://vbq-registry.example.org/fhir/sid/synthetic-mrn",
        "value": "SYN-ALERT-W1"}}
    order["authoredOn"] = clinic_today().isoformat()
    response = client.post("/fhir/MedicationRequest", data=json.dumps(order),
                           content_type="application/fhir+json",
                           HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 201, response.content[:500]
    assert _wait(lambda: Alert.objects.get(patient=patient).status == "resolved", 30), \
        celery_worker_process.log_path.read_text()[-2000:]
    assert Alert.objects.get(patient=patient).resolution_reason == "therapy-started"


@pytest.mark.slow
def test_beat_runs_the_sweep_and_two_workers_open_one_alert_per_patient(
    transactional_db, tmp_path
):
    patients = [high_vbq_patient(61 + i) for i in range(12)]
    env = {**os.environ, "DATABASE_URL": test_database_url(), "PYTHONUNBUFFERED": "1",
           "FOLLOWUP_SWEEP_EVERY_SECONDS": "1", "DELIVERY_EVERY_SECONDS": "3600"}
    beat = CeleryWorker(env, tmp_path / "beat.log",
                        ["--beat", "--schedule", str(tmp_path / "beat-schedule"),
                         "--concurrency", "2", "--pool", "prefork"])
    other = CeleryWorker(env, tmp_path / "worker2.log", ["--concurrency", "1", "--pool", "solo",
                                                         "--hostname", "second@%h"])
    beat.start()
    other.start()
    try:
        assert _wait(lambda: Alert.objects.count() >= len(patients), 45), \
            (tmp_path / "beat.log").read_text()[-3000:]
        time.sleep(3)  # several more sweeps run meanwhile
    finally:
        beat.stop()
        other.stop()
    assert Alert.objects.count() == len(patients)


def test_re_evaluation_accepts_patient_ids_as_strings_like_celery_sends_them():
    patient = high_vbq_patient(70)
    stats = followup_evaluate([str(patient.pk)])
    assert stats.opened == 1


def test_re_evaluation_writes_the_next_check_date_only_when_it_changes():
    patient = high_vbq_patient(20)  # no decision today; next check on day 60
    Patient.objects.filter(pk=patient.pk).update(followup_next_check_on=None)
    with CaptureQueriesContext(connection) as first:
        followup_evaluate([patient.pk])
    patient.refresh_from_db()
    assert patient.followup_next_check_on == clinic_today() + dt.timedelta(days=40)
    with CaptureQueriesContext(connection) as again:
        followup_evaluate([patient.pk])
    patient.refresh_from_db()
    assert patient.followup_next_check_on == clinic_today() + dt.timedelta(days=40)

    def patient_updates(ctx):
        return [q["sql"] for q in ctx.captured_queries
                if q["sql"].startswith("UPDATE") and "registry_patient" in q["sql"]]

    assert len(patient_updates(first)) == 1
    assert patient_updates(again) == []
