"""The worker's result transaction against concurrent writers (review findings of
2026-11-25): a study moved to another patient while the job is being stored does not deadlock
with it, and a deadlock or serialization failure is retried without re-running the engine.
SYNTHETIC phantoms and patients; PostgreSQL, real concurrent transactions."""

import threading
import time

import pytest
from django.db import connections, transaction

from registry.side_effects import deferred_side_effects
from scoring.models import ImagingSeries, VbqResult
from tests.scoring.test_fractured_levels import _at, _job, _patient

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def _threads(*targets) -> list[BaseException]:
    errors: list[BaseException] = []

    def wrap(target):
        def run():
            try:
                target()
            except BaseException as exc:  # reported to the test
                errors.append(exc)
            finally:
                connections.close_all()
        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return errors


def test_a_study_moved_while_its_result_is_stored_does_not_deadlock(tmp_path, monkeypatch):
    """The mover locks the result row (its ``moved`` CTE), then the patients' rows (the
    deferred due dates); the worker keeps the same order (result, then patient)."""
    import scoring.engine
    import scoring.tasks
    from scoring.engine.phantom import make_phantom
    from scoring.services_bulk import imaging_study_upsert_many
    from scoring.tasks import vbq_compute

    a, b = _patient(), _patient()
    uid = "2.25.7209999000000000000001"
    result = _job(a, uid)
    make_phantom(4242, rows=256, cols=256, slices=11).write(tmp_path / "series")
    ImagingSeries.objects.filter(pk=result.series_id).update(local_path=str(tmp_path / "series"))
    engine_done, moved = threading.Event(), threading.Event()
    real = scoring.engine.compute_vbq

    def engine(source, **kwargs):
        measurement = real(source, **kwargs)
        engine_done.set()
        assert moved.wait(30)
        return measurement

    monkeypatch.setattr(scoring.tasks, "compute_vbq", engine)

    def worker():
        vbq_compute(result.pk)

    def mover():
        assert engine_done.wait(60)
        with transaction.atomic(), deferred_side_effects():
            imaging_study_upsert_many(items=[{
                "study_instance_uid": uid, "patient": b, "source": "dicom",
                "started_at": _at(90), "modality": "MR", "description": "L-SPINE",
                "endpoint_url": "http://127.0.0.1:9/dicom-web", "series": []}])
            moved.set()
            time.sleep(1.0)  # the worker's store runs into this transaction's locks

    assert _threads(worker, mover) == []
    stored = VbqResult.objects.get(pk=result.pk)
    assert stored.status in ("succeeded", "needs_review")
    assert stored.patient_id == b.pk
    assert stored.levels.exists()


def test_a_deadlock_while_storing_is_retried_without_running_the_engine_again(tmp_path,
                                                                              monkeypatch):
    import psycopg

    import scoring.engine
    import scoring.tasks
    from scoring.engine.phantom import make_phantom
    from scoring.tasks import vbq_compute

    patient = _patient()
    result = _job(patient, "2.25.7209999000000000000002")
    make_phantom(4243, rows=256, cols=256, slices=11).write(tmp_path / "series")
    ImagingSeries.objects.filter(pk=result.series_id).update(local_path=str(tmp_path / "series"))
    real_engine, real_store = scoring.engine.compute_vbq, scoring.tasks._store
    calls = {"engine": 0, "store": 0}

    def engine(source, **kwargs):
        calls["engine"] += 1
        return real_engine(source, **kwargs)

    def store_deadlocking_once(result_id, measurement):
        calls["store"] += 1
        if calls["store"] == 1:  # a deadlock error from the server, as PostgreSQL reports one
            with connections["default"].cursor() as cursor:
                cursor.execute("DO $$ BEGIN RAISE EXCEPTION 'deadlock detected' "
                               "USING ERRCODE = '40P01'; END $$")
        return real_store(result_id, measurement)

    monkeypatch.setattr(scoring.tasks, "compute_vbq", engine)
    monkeypatch.setattr(scoring.tasks, "_store", store_deadlocking_once)
    vbq_compute(result.pk)
    stored = VbqResult.objects.get(pk=result.pk)
    assert (calls, stored.status in ("succeeded", "needs_review")) == (
        {"engine": 1, "store": 2}, True)
    assert isinstance(psycopg.errors.DeadlockDetected("x"), psycopg.OperationalError)
