"""The sweep and event-driven re-evaluation on the database, with a real worker and beat."""

import datetime as dt
import os
import threading
import time

import pytest
from django.db import connection

from registry.models import Alert, Patient
from registry.services import therapy_record
from registry.sweep import followup_evaluate, followup_sweep
from registry.timeutil import clinic_today
from tests.conftest import CeleryWorker, test_database_url
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
    with connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")
        cursor.execute(
            "EXPLAIN SELECT id FROM registry_patient WHERE followup_next_check_on <= %s "
            "ORDER BY followup_next_check_on LIMIT 500", [clinic_today()])
        plan = "\n".join(row[0] for row in cursor.fetchall())
        cursor.execute("RESET enable_seqscan")
    assert "patient_followup_due_idx" in plan


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
