"""Imaging pipeline: link, queue, fetch from a real Orthanc over DICOMweb, score, store."""

import datetime as dt
import functools
import json
import os
import time

import pytest
from django.db import DatabaseError, connection

from registry.feeds import feed_create
from registry.services import Identifier, procedure_record
from registry.side_effects import Actor
from registry.timeutil import clinic_today, start_of_clinic_day
from scoring.dicomweb import PermanentFetchError, TransientFetchError, fetch_series
from scoring.engine.phantom import make_phantom
from scoring.models import ImagingStudy, VbqResult
from scoring.services import SeriesInput, imaging_study_upsert, link_or_defer
from scoring.tasks import study_received, vbq_compute, vbq_requeue_stale
from tests import orthanc as orthanc_mod
from tests.factories import PatientFactory

pytestmark = [pytest.mark.orthanc]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    if not orthanc_mod.available():
        if os.environ.get("REQUIRE_SERVICES") in {"1", "true"}:
            pytest.fail("REQUIRE_SERVICES=1 but Orthanc is not installed")
        pytest.skip("Orthanc (Debian orthanc + orthanc-dicomweb) is not installed")
    server = orthanc_mod.Orthanc(tmp_path_factory.mktemp("orthanc"))
    server.start()
    with orthanc_mod.as_configured_pacs(server):
        yield server
    server.stop()


def _study(orthanc, phantom, *, days_before=20, endpoint=None):
    # the phantom's DICOM patient is this registry patient (scoring.identity)
    patient = PatientFactory(mrn=str(phantom.datasets[0].PatientID))
    index_day = clinic_today() - dt.timedelta(days=5)
    procedure_record(patient=patient, code_system="http://www.ama-assn.org/go/cpt",
                     code="22511", performed_at=start_of_clinic_day(index_day)
                     + dt.timedelta(hours=10), identifier=Identifier("urn:t", str(patient.pk)))
    ds = phantom.datasets[0]
    study, _ = imaging_study_upsert(
        study_instance_uid=str(ds.StudyInstanceUID), patient=patient, source="fhir",
        started_at=start_of_clinic_day(index_day - dt.timedelta(days=days_before)),
        modality="MR", endpoint_url=endpoint or orthanc.dicomweb,
        series=[SeriesInput(str(ds.SeriesInstanceUID), "MR", str(ds.SeriesDescription))],
    )
    return study


def _first_clean_high_phantom(first_seed, *, tries=40):
    """The first SYNTHETIC phantom from ``first_seed`` that the installed engine scores
    ``succeeded``, high (VBQ >= 3.0) and with no QC flag, with that outcome: the tests that
    need such a result do not depend on one seed's outcome under one engine version."""
    from scoring.engine import compute_vbq

    for seed in range(first_seed, first_seed + tries):
        phantom = make_phantom(seed, slices=9)
        outcome = compute_vbq(phantom.datasets)
        if (outcome.status == "succeeded" and not outcome.qc_flags
                and (outcome.vbq_excluding_fractured or 0) >= 3.0):
            return phantom, outcome
    raise AssertionError(f"no clean high phantom among seeds {first_seed}..{first_seed + tries}")


def _engine_outcome(phantom):
    """What the installed engine answers for this series in-process (``needs_review`` before
    automatic localisation, ``succeeded`` once it exists): the pipeline must store exactly
    that, whatever the engine version."""
    from scoring.engine import compute_vbq

    return compute_vbq(phantom.datasets)


@pytest.mark.django_db
def test_dicomweb_fetch_returns_every_instance_of_the_series(orthanc):
    phantom = make_phantom(101, slices=9)
    orthanc.upload(phantom.datasets)
    ds = phantom.datasets[0]
    fetched = fetch_series(orthanc.dicomweb, ds.StudyInstanceUID, ds.SeriesInstanceUID)
    assert len(fetched) == 9


def test_an_unknown_series_is_a_permanent_error(orthanc):
    with pytest.raises(PermanentFetchError):
        fetch_series(orthanc.dicomweb, "1.2.3.4", "1.2.3.4.5")


def test_an_unreachable_pacs_is_a_transient_error():
    with pytest.raises(TransientFetchError):
        fetch_series("http://127.0.0.1:9/dicom-web", "1.2.3", "1.2.3.4")


@pytest.mark.django_db
def test_a_fetched_series_of_another_patient_is_not_scored_and_waits_in_the_queue(orthanc):
    from registry.models import PatientIdentifier
    from scoring.review import review_queue

    phantom = make_phantom(109, slices=9)
    orthanc.upload(phantom.datasets)
    study = _study(orthanc, phantom)
    PatientIdentifier.objects.filter(patient=study.patient).update(value="SYN-SOMEONE-ELSE")
    result = VbqResult.objects.get(series__study=study)
    assert vbq_compute(result.pk) == {"result": result.pk, "status": "failed",
                                      "error_code": "patient-mismatch"}
    result.refresh_from_db()
    assert (result.status, result.vbq_all_levels) == ("failed", None)
    assert "not one of this patient's identifiers" in result.error_message
    assert list(review_queue()) == [result]


@pytest.mark.django_db
def test_study_is_linked_queued_fetched_and_scored(orthanc):
    phantom = make_phantom(102, slices=9)
    orthanc.upload(phantom.datasets)
    study = _study(orthanc, phantom)
    # Linked, with its queued job, by the ingest's own transaction (no study_received hop).
    study.refresh_from_db()
    assert study.linked_procedure_id is not None
    assert study.link_reason.startswith("nearest lumbar MRI, 20 days")
    result = VbqResult.objects.get(series__study=study)
    assert result.status == "queued"
    assert study_received(study.pk) == {"study": study.pk, "linked": True, "jobs": 0}
    expected = _engine_outcome(phantom)
    assert vbq_compute(result.pk)["status"] == expected.status
    result.refresh_from_db()
    assert result.measurement["acquisition"]["field_strength_t"] in (1.5, 3.0)
    assert {f["code"] for f in result.qc_flags} == {f.code for f in expected.qc_flags}
    assert result.vbq_all_levels == expected.vbq_all_levels
    assert vbq_compute(result.pk)["skipped"]  # a duplicate delivery computes nothing


@pytest.mark.django_db
def test_a_study_outside_the_window_is_not_linked_and_says_why(orthanc):
    phantom = make_phantom(103, slices=5)
    study = _study(orthanc, phantom, days_before=400)
    assert study.linked_procedure_id is None
    study.refresh_from_db()
    assert "outside the 0–180 day window" in study.link_reason
    assert not VbqResult.objects.filter(series__study=study).exists()
    assert study_received(study.pk)["linked"] is False


@pytest.mark.django_db
def test_a_wrong_modality_series_fails_with_the_reason_and_no_retry(orthanc):
    phantom = make_phantom(104, slices=5)
    for ds in phantom.datasets:
        ds.Modality = "CT"
    orthanc.upload(phantom.datasets)
    study = _study(orthanc, phantom)
    result = VbqResult.objects.get(series__study=study)
    outcome = vbq_compute(result.pk)
    result.refresh_from_db()
    assert outcome["status"] == "failed"
    assert (result.status, result.error_code) == ("failed", "wrong-modality")
    assert result.attempts == 1


@pytest.mark.django_db
def test_pacs_down_puts_the_job_back_in_the_queue_for_a_retry(orthanc, settings):
    from celery.exceptions import Retry

    settings.PACS_DICOMWEB_URL = "http://127.0.0.1:9/dicom-web"  # the configured PACS, down
    phantom = make_phantom(105, slices=5)
    study = _study(orthanc, phantom, endpoint="http://127.0.0.1:9/dicom-web")
    result = VbqResult.objects.get(series__study=study)
    # Called directly (no worker) Celery's retry re-raises the cause; in a worker it is Retry.
    with pytest.raises((Retry, TransientFetchError)):
        vbq_compute(result.pk)
    result.refresh_from_db()
    assert (result.status, result.error_code) == ("queued", "pacs-unavailable")


@pytest.mark.django_db
def test_stuck_running_jobs_are_recovered(orthanc):
    phantom = make_phantom(106, slices=5)
    study = _study(orthanc, phantom)
    result = VbqResult.objects.get(series__study=study)
    VbqResult.objects.filter(pk=result.pk).update(
        status="running", started_at=dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
    assert vbq_requeue_stale()["recovered"] == 1
    result.refresh_from_db()
    assert result.status == "queued"


@pytest.mark.slow
def test_fhir_imaging_study_to_stored_result_through_a_real_worker(
    orthanc, client, celery_worker_process
):
    phantom = make_phantom(107, slices=9)
    for one in phantom.datasets:
        one.PatientID = "SYN-E2E"  # the DICOM patient is the FHIR Patient below
    orthanc.upload(phantom.datasets)
    ds = phantom.datasets[0]
    _, token = feed_create(name="e2e-ehr")
    index_day = clinic_today() - dt.timedelta(days=5)
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:11111111-1111-4111-8111-111111111111", "resource": {
            "resourceType": "Patient", "identifier": [{"system": "urn:syn", "value": "SYN-E2E"}],
            "birthDate": "1950-01-01", "gender": "female"}},
        {"resource": {"resourceType": "Procedure", "status": "completed",
                      "identifier": [{"system": "urn:syn-proc", "value": "E2E-1"}],
                      "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt",
                                           "code": "22511"}]},
                      "subject": {"reference": "urn:uuid:11111111-1111-4111-8111-111111111111"},
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
                      "subject": {"reference": "urn:uuid:11111111-1111-4111-8111-111111111111"},
                      "started": f"{(index_day - dt.timedelta(days=10)).isoformat()}"
                                 "T09:00:00-05:00",
                      "series": [{"uid": str(ds.SeriesInstanceUID), "description": "SAG T1",
                                  "modality": {"system": "http://dicom.nema.org/resources/"
                                               "ontology/DCM", "code": "MR"}}]}},
    ]}
    response = client.post("/fhir", data=json.dumps(bundle), content_type="application/fhir+json",
                           HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 200, response.json()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        result = VbqResult.objects.filter(series__series_instance_uid=ds.SeriesInstanceUID).first()
        if result and result.status not in ("queued", "running"):
            break
        time.sleep(0.5)
    assert result is not None, celery_worker_process.log_path.read_text()[-3000:]
    assert result.status == _engine_outcome(phantom).status
    assert ImagingStudy.objects.get().linked_procedure is not None


@pytest.mark.slow
@pytest.mark.dcmtk
def test_storescu_push_to_the_receiver_ends_in_a_scored_result(
    tmp_path, celery_worker_process
):
    import os
    import shutil
    import socket
    import subprocess
    import sys

    from tests.conftest import ROOT, test_database_url

    if shutil.which("storescu") is None:
        if os.environ.get("REQUIRE_SERVICES") in {"1", "true"}:
            pytest.fail("REQUIRE_SERVICES=1 but dcmtk (storescu) is not installed")
        pytest.skip("dcmtk storescu is not installed")
    patient = PatientFactory(mrn="SYN-SCP-1")
    index_day = clinic_today() - dt.timedelta(days=5)
    procedure_record(patient=patient, code_system="http://www.ama-assn.org/go/cpt",
                     code="22511", performed_at=start_of_clinic_day(index_day)
                     + dt.timedelta(hours=10), identifier=Identifier("urn:t", "scp-1"))
    phantom = make_phantom(108, slices=7)
    for ds in phantom.datasets:
        ds.PatientID = "SYN-SCP-1"
        ds.StudyDate = (index_day - dt.timedelta(days=12)).strftime("%Y%m%d")
    files = phantom.write(tmp_path / "push")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DATABASE_URL": test_database_url(),
           "DICOM_STORAGE_ROOT": str(tmp_path / "store")}
    receiver = subprocess.Popen(
        [sys.executable, "manage.py", "dicom_receiver", "--port", str(port),
         "--complete-after", "2"], cwd=ROOT, env=env,
        stdout=(tmp_path / "receiver.log").open("wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60  # Django start-up is slow on a loaded machine
        while receiver.poll() is None and time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        push = subprocess.run(["storescu", "-aec", "VBQREGISTRY", "127.0.0.1", str(port),
                               *map(str, files)], timeout=60, capture_output=True)
        assert push.returncode == 0, (push.stderr.decode()[-1000:],
                                      (tmp_path / "receiver.log").read_text()[-2000:])
        deadline = time.monotonic() + 60
        result = None
        while time.monotonic() < deadline:
            result = VbqResult.objects.filter(patient=patient).first()
            if result and result.status not in ("queued", "running"):
                break
            time.sleep(0.5)
    finally:
        receiver.terminate()
        receiver.wait(10)
    assert result is not None
    assert result.status == _engine_outcome(phantom).status
    study = ImagingStudy.objects.get(patient=patient)
    assert study.source == "dicom"
    assert study.linked_procedure is not None


@pytest.mark.slow
@pytest.mark.redis
def test_a_worker_killed_mid_batch_still_ends_with_exactly_one_result_per_job(
    orthanc, transactional_db, tmp_path
):
    """SIGKILL the worker while it works through 12 jobs; a new worker plus the recovery task
    finish every job, each exactly once (Redis broker, acks_late, short visibility timeout)."""
    import os
    import signal

    from tests.conftest import CeleryWorker, test_database_url

    redis_url = os.environ["REDIS_URL"].rsplit("/", 1)[0] + "/13"
    import redis

    redis.Redis.from_url(redis_url).flushdb()
    env = {**os.environ, "DATABASE_URL": test_database_url(), "CELERY_BROKER_URL": redis_url,
           "CELERY_VISIBILITY_TIMEOUT": "4", "PYTHONUNBUFFERED": "1"}
    results, expected = [], {}
    for i in range(12):
        phantom = make_phantom(300 + i, slices=9)
        orthanc.upload(phantom.datasets)
        study = _study(orthanc, phantom)  # linked, with its queued job (sent below to redis_url)
        results.append(VbqResult.objects.get(series__study=study, status="queued").pk)
        expected[results[-1]] = _engine_outcome(phantom).status
    from config.celery import app

    with app.connection_for_write(redis_url) as conn:
        for pk in results:
            vbq_compute.apply_async((pk,), connection=conn)
    worker = CeleryWorker(env, tmp_path / "w1.log", ["--pool", "prefork", "--concurrency", "1"])
    worker.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not VbqResult.objects.filter(
        pk__in=results, status__in=["needs_review", "succeeded", "failed"]).exists():
        time.sleep(0.1)
    worker.stop(signal.SIGKILL)
    done_before = VbqResult.objects.filter(pk__in=results).exclude(
        status__in=["queued", "running"]).count()
    assert done_before < len(results), "the kill came too late to interrupt the batch"
    second = CeleryWorker(env, tmp_path / "w2.log", ["--pool", "solo"])
    second.start()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with app.connection_for_write(redis_url) as conn:  # the recovery beat would send
                vbq_requeue_stale.apply_async(
                    kwargs={"stuck_after_seconds": 5, "requeue_after_seconds": 5},
                    connection=conn)
            if not VbqResult.objects.filter(pk__in=results,
                                            status__in=["queued", "running"]).exists():
                break
            time.sleep(3)
    finally:
        second.stop()
    rows = VbqResult.objects.filter(series__vbq_results__pk__in=results).distinct()
    assert dict(VbqResult.objects.filter(pk__in=results).values_list("pk", "status")) == expected
    assert set(VbqResult.objects.filter(pk__in=results).values_list("attempts", flat=True)) <= {
        1, 2}  # 2 only for the job the kill interrupted
    assert rows.count() == len(results)  # one result per series, no duplicate


@pytest.mark.django_db
def test_orthanc_stopped_during_a_job_is_retried_and_succeeds_when_back(orthanc):
    from celery.exceptions import Retry

    phantom = make_phantom(120, slices=5)
    orthanc.upload(phantom.datasets)
    study = _study(orthanc, phantom)
    result = VbqResult.objects.get(series__study=study)
    orthanc.stop()
    try:
        with pytest.raises((Retry, TransientFetchError)):
            vbq_compute(result.pk)
        result.refresh_from_db()
        assert result.status == "queued"
    finally:
        orthanc.start()  # same storage: the series is still there
    expected = _engine_outcome(phantom).status
    assert vbq_compute(result.pk)["status"] == expected
    result.refresh_from_db()
    assert (result.status, result.attempts) == (expected, 2)


def _local_study(tmp_path, phantom, *, index_days_ago, mri_days_before):
    """A linked study whose series has a local copy (no PACS fetch), and its queued job."""
    from scoring.models import ImagingSeries

    patient = PatientFactory()
    index_day = clinic_today() - dt.timedelta(days=index_days_ago)
    procedure_record(patient=patient, code_system="http://www.ama-assn.org/go/cpt",
                     code="22511", performed_at=start_of_clinic_day(index_day)
                     + dt.timedelta(hours=10), identifier=Identifier("urn:t", str(patient.pk)))
    ds = phantom.datasets[0]
    study, _ = imaging_study_upsert(
        study_instance_uid=str(ds.StudyInstanceUID), patient=patient, source="upload",
        started_at=start_of_clinic_day(index_day - dt.timedelta(days=mri_days_before)),
        modality="MR",
        series=[SeriesInput(str(ds.SeriesInstanceUID), "MR", str(ds.SeriesDescription))],
        link=False)  # linked below, once the local copy is recorded (as the DICOM receiver)
    phantom.write(tmp_path / "series")
    ImagingSeries.objects.filter(study=study).update(local_path=str(tmp_path / "series"))
    assert link_or_defer(study) is True
    return patient, VbqResult.objects.get(series__study=study)


@pytest.mark.django_db
def test_an_automatic_result_that_changes_the_category_waits_for_review_and_opens_nothing(
        tmp_path):
    from registry.models import Alert
    from scoring.review import review_decide, review_queue

    phantom = make_phantom(144, slices=9)  # high VBQ, no QC warning
    assert _engine_outcome(phantom).vbq_excluding_fractured >= 3.0  # high
    patient, result = _local_study(tmp_path, phantom, index_days_ago=70, mri_days_before=10)
    earlier = VbqResult.objects.create(
        patient=patient, algorithm_version="imported", source="imported", status="succeeded",
        review_status="accepted", vbq_all_levels=2.1, vbq_excluding_fractured=2.1)  # low
    VbqResult.objects.filter(pk=earlier.pk).update(
        queued_at=result.queued_at - dt.timedelta(days=1))

    assert vbq_compute(result.pk)["status"] == "needs_review"
    result.refresh_from_db()
    assert (result.status, result.qc_clear) == ("needs_review", False)
    assert "category-change" in {f["code"] for f in result.qc_flags}
    assert list(review_queue()) == [result]
    assert not Alert.objects.filter(patient=patient, rule_id="high-vbq-untreated-60d").exists()
    review_decide(result=result, decision="accept", actor=Actor(via="test"))  # a human confirms
    followup_reevaluate_now(patient)
    assert Alert.objects.get(patient=patient, rule_id="high-vbq-untreated-60d").status == "open"


def followup_reevaluate_now(patient):
    from followup.tasks import followup_reevaluate

    followup_reevaluate(str(patient.pk))


@pytest.mark.django_db
def test_a_stored_result_re_evaluates_the_follow_up_in_the_same_task(tmp_path):
    """No second task: under ``django_db`` nothing queued after commit ever runs, so the
    alerts below can only come from ``vbq_compute`` itself."""
    from followup.tasks import followup_reevaluate
    from registry.models import Alert

    phantom, expected = _first_clean_high_phantom(130)
    patient, result = _local_study(tmp_path, phantom, index_days_ago=70, mri_days_before=10)
    followup_reevaluate(str(patient.pk))  # day 70, no VBQ yet: a vbq-missing work item
    assert Alert.objects.get(patient=patient).rule_id == "vbq-missing"

    assert vbq_compute(result.pk)["status"] == "succeeded"
    alerts = {a.rule_id: a for a in Alert.objects.filter(patient=patient)}
    assert (alerts["vbq-missing"].status, alerts["vbq-missing"].resolution_reason) == (
        "resolved", "vbq-obtained")
    assert alerts["high-vbq-untreated-60d"].status == "open"
    assert alerts["high-vbq-untreated-60d"].vbq_value == pytest.approx(
        expected.vbq_excluding_fractured)
    patient.refresh_from_db()
    assert patient.followup_next_check_on != clinic_today()  # evaluated, not left to the sweep


@pytest.mark.django_db
@pytest.mark.parametrize(("failure", "seed"), [("python", 131), ("database", 132)])
def test_a_failing_follow_up_evaluation_keeps_the_result_and_leaves_the_patient_to_the_sweep(
    tmp_path, monkeypatch, failure, seed
):
    """``python``: the rules raise. ``database``: the evaluation's SQL fails; the evaluation's
    own savepoint (``followup_evaluate``'s per-patient ``atomic``) is what keeps the job's
    transaction usable. Either way the result and its levels are stored and the patient is
    left due today for the sweep."""
    import followup.sweep
    from registry.models import Alert

    phantom = make_phantom(seed, slices=9)
    expected = _engine_outcome(phantom)
    patient, result = _local_study(tmp_path, phantom, index_days_ago=70, mri_days_before=10)
    patient.followup_next_check_on = None
    patient.save(update_fields=["followup_next_check_on"])

    def broken(*args, **kwargs):
        raise RuntimeError("SYNTHETIC evaluation failure")

    def broken_facts(*args, **kwargs):
        raise DatabaseError("SYNTHETIC failure of the facts query")

    def broken_sql(*args, **kwargs):
        return "SELECT no_such_column FROM no_such_table WHERE %(x)s", {"x": 1}

    if failure == "python":
        monkeypatch.setattr(followup.sweep, "evaluate", broken)
    elif connection.vendor == "postgresql":
        monkeypatch.setattr(followup.sweep, "patient_facts_sql", broken_sql)
    else:
        monkeypatch.setattr(followup.sweep, "load_facts", broken_facts)
    assert vbq_compute(result.pk)["status"] == expected.status
    result.refresh_from_db()
    assert (result.status, result.vbq_all_levels) == (expected.status, expected.vbq_all_levels)
    assert result.levels.count() >= 5
    patient.refresh_from_db()
    assert patient.followup_next_check_on == clinic_today()  # the sweep's safety net
    assert not Alert.objects.filter(patient=patient).exists()


@pytest.mark.django_db
def test_a_study_is_linked_together_with_its_job_or_not_at_all(
    monkeypatch, django_capture_on_commit_callbacks
):
    """Linking and job creation share one savepoint of the ingest: if creating the job fails,
    the study is written but not left linked without a job; it stays ``linking pending`` and
    ``study_received`` is sent after commit (the sweep links it if that message is lost).
    ``study_received`` itself is one transaction with the same all-or-nothing rule."""
    import scoring.services
    from scoring.services import LINK_PENDING

    def broken(**kwargs):
        raise RuntimeError("SYNTHETIC job creation failure")

    monkeypatch.setattr(scoring.services, "vbq_jobs_create", broken)
    with django_capture_on_commit_callbacks() as callbacks:
        study = _study(None, make_phantom(132, slices=5), endpoint="http://127.0.0.1:9/dicom-web")
    assert (study.link_reason, study.linked_procedure_id) == (LINK_PENDING, None)
    study.refresh_from_db()
    assert (study.link_reason, study.linked_procedure_id) == (LINK_PENDING, None)
    assert not VbqResult.objects.filter(series__study=study).exists()
    queued = [(c.func.__name__, c.args) for c in callbacks if isinstance(c, functools.partial)]
    assert ("enqueue_study_received", (study.pk,)) in queued
    with pytest.raises(RuntimeError):
        study_received(study.pk)
    study.refresh_from_db()
    assert (study.link_reason, study.linked_procedure_id) == (LINK_PENDING, None)
    monkeypatch.undo()
    assert study_received(study.pk)["jobs"] == 1
    study.refresh_from_db()
    assert study.linked_procedure_id is not None
