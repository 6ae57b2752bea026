"""Imaging pipeline fault tests with real processes: a PRIVATE redis-server as the broker (never
the shared one), real Celery workers, a real Orthanc (verbose, so its request log counts the
fetches) and the test PostgreSQL database. All data is SYNTHETIC (phantoms, synthetic patients).

- Orthanc serving a corrupt instance: the job ends ``failed`` with the reason after ONE fetch;
  neither Celery retries nor the outbox sweep fetch it again.
- Redis down when the ImagingStudy arrives through /fhir: the ingest answers 2xx and commits
  its outbox row; once Redis is back the sweep the beat sends finishes the work and the job
  runs, exactly once. In a transaction bundle the study waits as ``linking pending`` (bundles
  are linked by ``study_received``); POSTed alone it is linked at once and its job waits as a
  ``queued`` VbqResult whose message could not be sent.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import requests

from registry.feeds import feed_create
from registry.services import Identifier, procedure_record
from registry.timeutil import clinic_today, start_of_clinic_day
from scoring.engine import EngineError, compute_vbq
from scoring.engine.phantom import make_phantom
from scoring.models import ImagingStudy, VbqResult
from scoring.services import LINK_PENDING, SeriesInput, imaging_study_upsert
from scoring.tasks import study_received, vbq_compute, vbq_requeue_stale
from tests import orthanc as orthanc_mod
from tests.conftest import ROOT, CeleryWorker, test_database_url
from tests.factories import PatientFactory
from tests.redis_server import PrivateRedis, free_port, listening

pytestmark = [pytest.mark.orthanc, pytest.mark.slow,
              pytest.mark.skipif(not shutil.which("redis-server"),
                                 reason="redis-server not installed")]
TERMINAL = ("succeeded", "needs_review", "failed")


def _wait(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.25)
    return bool(predicate())


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    if not orthanc_mod.available():
        if os.environ.get("REQUIRE_SERVICES") in {"1", "true"}:
            pytest.fail("REQUIRE_SERVICES=1 but Orthanc is not installed")
        pytest.skip("Orthanc (Debian orthanc + orthanc-dicomweb) is not installed")
    server = orthanc_mod.Orthanc(tmp_path_factory.mktemp("orthanc-faults"), verbose=True)
    server.start()
    # the configured PACS (a study's recorded endpoint is provenance, never fetched from):
    # here, and for the worker processes the tests start (their environment)
    from django.conf import settings

    saved = os.environ.get("PACS_DICOMWEB_URL"), settings.PACS_DICOMWEB_URL
    os.environ["PACS_DICOMWEB_URL"] = settings.PACS_DICOMWEB_URL = server.dicomweb
    yield server
    settings.PACS_DICOMWEB_URL = saved[1]
    if saved[0] is None:
        os.environ.pop("PACS_DICOMWEB_URL", None)
    else:
        os.environ["PACS_DICOMWEB_URL"] = saved[0]
    server.stop()


@pytest.fixture
def broker(tmp_path):
    redis = PrivateRedis(tmp_path)
    yield redis
    redis.kill()


def _worker_env(broker_url: str) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": test_database_url(), "CELERY_BROKER_URL": broker_url,
            "PYTHONUNBUFFERED": "1"}


def _send(broker_url: str, task, **options) -> None:
    from config.celery import app

    with app.connection_for_write(broker_url) as conn:
        task.apply_async(connection=conn, **options)


def _series_path(ds) -> str:
    return f"/dicom-web/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"


def test_orthanc_serving_a_corrupt_instance_fails_the_job_with_the_reason_and_fetches_once(
    orthanc, broker, transactional_db, tmp_path
):
    phantom = make_phantom(131, slices=7)
    corrupt = phantom.datasets[3]
    corrupt.PixelData = corrupt.PixelData[: len(corrupt.PixelData) // 3]  # truncated pixels
    orthanc.upload(phantom.datasets)  # Orthanc stores it and serves it back as it is
    patient = PatientFactory(mrn=str(phantom.datasets[0].PatientID))
    index_day = clinic_today() - dt.timedelta(days=5)
    procedure_record(patient=patient, code_system="http://www.ama-assn.org/go/cpt",
                     code="22511", performed_at=start_of_clinic_day(index_day)
                     + dt.timedelta(hours=10), identifier=Identifier("urn:t", "corrupt-1"))
    ds = phantom.datasets[0]
    study, _ = imaging_study_upsert(
        study_instance_uid=str(ds.StudyInstanceUID), patient=patient, source="fhir",
        started_at=start_of_clinic_day(index_day - dt.timedelta(days=15)), modality="MR",
        endpoint_url=orthanc.dicomweb,
        series=[SeriesInput(str(ds.SeriesInstanceUID), "MR", str(ds.SeriesDescription))])
    study_received(study.pk)
    result = VbqResult.objects.get(series__study=study)

    broker.start()
    worker = CeleryWorker(_worker_env(broker.url), tmp_path / "worker.log", ["--pool", "solo"])
    worker.start()
    try:
        _send(broker.url, vbq_compute, args=(result.pk,))
        assert _wait(lambda: VbqResult.objects.get(pk=result.pk).status in TERMINAL, 45), (
            worker.log_path.read_text()[-3000:])
        # A retry storm would show up now: Celery retries (5 s countdown) and the outbox
        # sweep (which re-sends queued and recovers running rows) get their chance.
        _send(broker.url, vbq_requeue_stale,
              kwargs={"stuck_after_seconds": 0, "requeue_after_seconds": 0})
        time.sleep(7)
    finally:
        worker.stop()
    result.refresh_from_db()
    with pytest.raises(EngineError) as expected:  # the engine's own verdict on these bytes
        compute_vbq(phantom.datasets)
    assert (result.status, result.error_code) == ("failed", expected.value.code)
    assert result.error_message == str(expected.value)
    assert "pixel data" in result.error_message  # says what is wrong, for the clinic
    assert result.finished_at is not None
    assert result.attempts == 1
    assert orthanc.requests_logged("GET", _series_path(ds)) == 1
    log = worker.log_path.read_text()
    assert len(re.findall(r"Task scoring\.vbq_compute\[[^\]]+\] received", log)) == 1, log
    assert not re.search(r"vbq_compute\[[^\]]+\] retry", log), log[-3000:]


def _bundle(ds, orthanc, index_day: dt.date) -> dict:
    patient_ref = "urn:uuid:22222222-2222-4222-8222-222222222222"
    return {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": patient_ref, "resource": {
            "resourceType": "Patient", "identifier": [{"system": "urn:syn",
                                                       "value": "SYN-REDIS-DOWN"}],
            "birthDate": "1951-02-03", "gender": "female"}},
        {"resource": {"resourceType": "Procedure", "status": "completed",
                      "identifier": [{"system": "urn:syn-proc", "value": "REDIS-DOWN-1"}],
                      "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt",
                                           "code": "22511"}]},
                      "subject": {"reference": patient_ref},
                      "performedDateTime": f"{index_day.isoformat()}T10:00:00-05:00"}},
        {"resource": {"resourceType": "ImagingStudy", "status": "available",
                      "identifier": [{"system": "urn:dicom:uid",
                                      "value": f"urn:oid:{ds.StudyInstanceUID}"}],
                      "contained": [{"resourceType": "Endpoint", "id": "pacs",
                                     "status": "active", "connectionType": {
                                         "system": "http://terminology.hl7.org/CodeSystem/"
                                         "endpoint-connection-type", "code": "dicom-wado-rs"},
                                     "payloadType": [{"text": "DICOM"}],
                                     "address": orthanc.dicomweb}],
                      "endpoint": [{"reference": "#pacs"}],
                      "subject": {"reference": patient_ref},
                      "started": f"{(index_day - dt.timedelta(days=9)).isoformat()}"
                                 "T09:00:00-05:00",
                      "series": [{"uid": str(ds.SeriesInstanceUID), "description": "SAG T1",
                                  "modality": {"system": "http://dicom.nema.org/resources/"
                                               "ontology/DCM", "code": "MR"}}]}},
    ]}


@pytest.mark.parametrize("path", ["bundle", "single"])
def test_an_imaging_study_ingested_while_redis_is_down_is_scored_once_redis_is_back(
    orthanc, broker, transactional_db, tmp_path, path
):
    phantom = make_phantom(132, slices=7)
    for one in phantom.datasets:
        one.PatientID = "SYN-REDIS-DOWN"  # the DICOM patient is the FHIR Patient of the bundle
    orthanc.upload(phantom.datasets)
    ds = phantom.datasets[0]
    _, token = feed_create(name="redis-down-ehr")
    env = {**_worker_env(broker.url), "DEBUG": "false", "ALLOWED_HOSTS": "127.0.0.1",
           "VAR_DIR": str(tmp_path)}
    port = free_port()
    web = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--config", "docker/gunicorn.conf.py", "--bind",
         f"127.0.0.1:{port}", "--workers", "1", "config.wsgi:application"],
        cwd=ROOT, env=env, stdout=(tmp_path / "web.log").open("wb"), stderr=subprocess.STDOUT)
    worker = None
    try:
        assert _wait(lambda: listening(port), 60), (tmp_path / "web.log").read_text()[-2000:]
        assert not listening(broker.port)  # the broker is down
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
        bundle = _bundle(ds, orthanc, clinic_today() - dt.timedelta(days=4))
        imaging = bundle["entry"].pop() if path == "single" else None
        started = time.monotonic()
        response = requests.post(f"http://127.0.0.1:{port}/fhir", data=json.dumps(bundle),
                                 headers=headers, timeout=60)
        assert response.status_code == 200, response.text[:1000]
        if imaging is not None:  # the ImagingStudy alone, naming the patient by identifier
            imaging["resource"]["subject"] = {"identifier": {"system": "urn:syn",
                                                             "value": "SYN-REDIS-DOWN"}}
            response = requests.post(f"http://127.0.0.1:{port}/fhir/ImagingStudy",
                                     data=json.dumps(imaging["resource"]), headers=headers,
                                     timeout=60)
            assert response.status_code == 201, response.text[:1000]
        ingest_seconds = time.monotonic() - started
        assert ingest_seconds < 20, ingest_seconds  # the broker outage costs seconds, not more
        study = ImagingStudy.objects.get(study_instance_uid=str(ds.StudyInstanceUID))
        if path == "bundle":
            # The outbox row, committed with the ingest: not linked yet ("" when a bulk upsert
            # wrote it without the marker; the sweep takes both).
            assert study.link_reason in (LINK_PENDING, "")
            assert study.linked_procedure is None
            assert not VbqResult.objects.filter(series__study=study).exists()
        else:
            # Linked by the ingest's own transaction; the outbox row is the queued job.
            assert study.linked_procedure is not None
            assert VbqResult.objects.get(series__study=study).status == "queued"

        broker.start()  # Redis is back
        worker = CeleryWorker(env, tmp_path / "worker.log", ["--pool", "solo"])
        worker.start()
        # What the beat sends every 120 s (CELERY_BEAT_SCHEDULE "vbq-requeue-stale"), sent
        # now with a zero age threshold instead of waiting minutes.
        _send(broker.url, vbq_requeue_stale, kwargs={"requeue_after_seconds": 0})
        assert _wait(lambda: VbqResult.objects.filter(series__study=study,
                                                      status__in=TERMINAL).exists(), 60), (
            worker.log_path.read_text()[-3000:])
    finally:
        if worker:
            worker.stop()
        web.terminate()
        web.wait(timeout=30)
    study.refresh_from_db()
    assert study.linked_procedure is not None
    assert study.link_reason.startswith("nearest lumbar MRI")
    result = VbqResult.objects.get(series__study=study)  # exactly one job
    expected = compute_vbq(phantom.datasets)  # the engine's own answer for this series
    assert result.status == expected.status
    assert result.attempts == 1
    assert orthanc.requests_logged("GET", _series_path(ds)) == 1


def test_the_beat_sends_the_outbox_sweep_every_few_minutes():
    from django.conf import settings

    entry = settings.CELERY_BEAT_SCHEDULE["vbq-requeue-stale"]
    assert entry["task"] == vbq_requeue_stale.name
    assert float(entry["schedule"]) <= 300
