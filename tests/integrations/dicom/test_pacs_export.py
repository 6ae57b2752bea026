"""VBQ results stored back in a real Orthanc (DICOMweb STOW-RS) as an SR and an overlay SC,
through the export outbox (integrations/dicom/export.py). SYNTHETIC phantoms only."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shutil
import subprocess

import highdicom as hd
import pytest
import requests
from django.utils import timezone

from integrations.dicom.export import (
    dicom_export_resend,
    result_may_be_exported,
    send_due_exports,
)
from integrations.models import DicomExport
from registry.services import Identifier, procedure_record
from registry.side_effects import Actor
from registry.timeutil import clinic_today, start_of_clinic_day
from scoring.dicomweb import fetch_series
from scoring.engine.phantom import make_phantom
from scoring.models import VbqResult
from scoring.review import review_decide, review_mark_fractured
from scoring.services import SeriesInput, imaging_study_upsert
from scoring.tasks import vbq_compute
from scoring.trust import qc_clear
from tests import orthanc as orthanc_mod
from tests.factories import PatientFactory

pytestmark = [pytest.mark.orthanc, pytest.mark.django_db]


def _seeds_scored(wanted, count, first=222, tries=120):
    """The first ``count`` SYNTHETIC phantom seeds from ``first`` whose outcome under the
    installed engine satisfies ``wanted`` (the tests must not depend on how one engine
    version scores one seed)."""
    from scoring.engine import compute_vbq

    found = []
    for seed in range(first, first + tries):
        if wanted(compute_vbq(make_phantom(seed, slices=9).datasets)):
            found.append(seed)
            if len(found) == count:
                return tuple(found)
    raise AssertionError(f"only {len(found)} suitable phantoms among seeds {first}..")


# scored succeeded with no QC flag at all and a confidence the export rule accepts
CLEAN_SEEDS = _seeds_scored(lambda m: m.status == "succeeded" and not m.qc_flags
                            and m.confidence >= 0.95, 6)
# scored succeeded with a QC warning: not trusted until a reviewer accepts it
FLAGGED_SEED = _seeds_scored(lambda m: m.status == "succeeded" and not qc_clear(m.qc_flags)
                             and m.vbq_all_levels is not None, 1)[0]


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


@pytest.fixture
def exports_on(settings, orthanc):
    settings.PACS_EXPORT_ENDPOINTS = [orthanc.dicomweb]
    settings.PACS_EXPORT_MIN_CONFIDENCE = 0.9
    return settings


def _linked(orthanc, seed):
    """A SYNTHETIC phantom stored in Orthanc and its study linked for a patient (the DICOM
    patient, an index procedure 5 days ago): the phantom and its pending automatic result."""
    phantom = make_phantom(seed, slices=9)
    orthanc.upload(phantom.datasets)
    patient = PatientFactory(mrn=str(phantom.datasets[0].PatientID))  # the DICOM patient
    index_day = clinic_today() - dt.timedelta(days=5)
    procedure_record(patient=patient, code_system="http://www.ama-assn.org/go/cpt",
                     code="22511", performed_at=start_of_clinic_day(index_day)
                     + dt.timedelta(hours=10), identifier=Identifier("urn:t", str(patient.pk)))
    ds = phantom.datasets[0]
    study, _ = imaging_study_upsert(
        study_instance_uid=str(ds.StudyInstanceUID), patient=patient, source="fhir",
        started_at=start_of_clinic_day(index_day - dt.timedelta(days=20)), modality="MR",
        endpoint_url=orthanc.dicomweb,
        series=[SeriesInput(str(ds.SeriesInstanceUID), "MR", str(ds.SeriesDescription))])
    return phantom, VbqResult.objects.get(series__study=study)


def _scored(orthanc, seed):
    """A SYNTHETIC phantom stored in Orthanc, its study linked for a patient, and the
    automatic job run by the pipeline's task (fetch from Orthanc, score, store)."""
    phantom, result = _linked(orthanc, seed)
    vbq_compute(result.pk)
    result.refresh_from_db()
    return phantom, result


def _series_in_study(orthanc, study_uid) -> dict[str, list[dict]]:
    """Orthanc's series of the study (QIDO-RS): modality → list of series (DICOM JSON)."""
    answer = requests.get(f"{orthanc.dicomweb}/studies/{study_uid}/series", timeout=10)
    answer.raise_for_status()
    out: dict[str, list[dict]] = {}
    for item in answer.json():
        out.setdefault(item["00080060"]["Value"][0], []).append(item)
    return out


def _instance_count(orthanc, study_uid, series_uid) -> int:
    answer = requests.get(
        f"{orthanc.dicomweb}/studies/{study_uid}/series/{series_uid}/instances", timeout=10)
    return 0 if answer.status_code == 404 else len(answer.json())


def _reviewer(django_user_model):
    user = django_user_model.objects.create_user(
        username="reviewer-synthetic", password="a-long-test-password-1",
        first_name="Rita", last_name="SYNTHETIC")
    return Actor(user_id=user.pk, via="web")


def test_after_a_job_orthanc_holds_the_sr_and_the_sc_in_the_source_study(
        orthanc, exports_on, tmp_path):
    phantom, result = _scored(orthanc, CLEAN_SEEDS[0])
    assert result.status == "succeeded"
    assert result_may_be_exported(result)
    [row] = DicomExport.objects.filter(result=result)  # written with the result
    assert send_due_exports() == {"sent": 1, "retry": 0, "failed": 0}
    source = phantom.datasets[0]
    study_uid = str(source.StudyInstanceUID)
    by_modality = _series_in_study(orthanc, study_uid)
    assert set(by_modality) == {"MR", "SR", "OT"}
    [sr] = fetch_series(orthanc.dicomweb, study_uid, row.sr_series_instance_uid)
    [sc] = fetch_series(orthanc.dicomweb, study_uid, row.sc_series_instance_uid)
    assert (sc.PatientID, sc.StudyInstanceUID) == (source.PatientID, source.StudyInstanceUID)
    assert (sr.PatientID, sr.StudyInstanceUID) == (source.PatientID, source.StudyInstanceUID)
    assert sc.PatientName == source.PatientName == "SYNTHETIC^Phantom"
    assert sr.SOPInstanceUID == row.sr_sop_instance_uid
    # read back from the PACS, the SR is a valid TID 1500 report with the stored values
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    parsed = hd.sr.MeasurementReport.from_sequence([hd.sr.srread(path)])
    [score] = parsed.get_image_measurement_groups()
    values = {m.name.meaning: m.value for m in score.get_measurements()}
    assert values["VBQ score, L1-L4"] == pytest.approx(round(result.vbq_all_levels, 4))
    medians = {g.tracking_identifier: g.get_measurements()[0].value
               for g in parsed.get_planar_roi_measurement_groups()}
    for level in result.levels.filter(level__in=["L1", "L2", "L3", "L4", "csf"]):
        name = "CSF ROI at L3" if level.level == "csf" else f"{level.level} vertebral body ROI"
        assert medians[name] == pytest.approx(level.median_si)
    if shutil.which("dsrdump"):
        dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True,
                              check=True, timeout=30).stdout
        assert f'"VBQ score, L1-L4")="{round(result.vbq_all_levels, 4)}"' in dump
        assert '"L3 vertebral body ROI"' in dump
        assert 'SCT,"L1 vertebra")' in dump


def test_a_re_send_leaves_one_copy_of_each_and_a_repeated_hook_writes_no_row(
        orthanc, exports_on):
    from scoring.signals import result_ready

    phantom, result = _scored(orthanc, CLEAN_SEEDS[1])
    study_uid = str(phantom.datasets[0].StudyInstanceUID)
    assert send_due_exports()["sent"] == 1
    result_ready(result.pk)  # the same result announced again: nothing new to say
    [row] = DicomExport.objects.filter(result=result)
    dicom_export_resend(export_id=row.pk)
    assert send_due_exports() == {"sent": 1, "retry": 0, "failed": 0}
    assert _instance_count(orthanc, study_uid, row.sr_series_instance_uid) == 1
    assert _instance_count(orthanc, study_uid, row.sc_series_instance_uid) == 1
    assert len(_series_in_study(orthanc, study_uid)["SR"]) == 1


def test_orthanc_down_is_retried_then_stored_once(orthanc, exports_on):
    phantom, result = _scored(orthanc, CLEAN_SEEDS[2])
    study_uid = str(phantom.datasets[0].StudyInstanceUID)
    [row] = DicomExport.objects.filter(result=result)
    orthanc.stop()
    try:
        assert send_due_exports() == {"sent": 0, "retry": 1, "failed": 0}
        row.refresh_from_db()
        assert (row.status, row.attempts) == ("pending", 1)
        assert "unreachable" in row.last_error
        assert row.next_attempt_at > timezone.now()  # backoff: not due again at once
        assert send_due_exports() == {"sent": 0, "retry": 0, "failed": 0}
    finally:
        orthanc.start()  # same storage: the source series is still there
    later = timezone.now() + dt.timedelta(minutes=2)
    assert send_due_exports(now=later) == {"sent": 1, "retry": 0, "failed": 0}
    row.refresh_from_db()
    assert (row.status, row.attempts, row.last_error) == ("sent", 2, "")
    assert _instance_count(orthanc, study_uid, row.sr_series_instance_uid) == 1
    assert _instance_count(orthanc, study_uid, row.sc_series_instance_uid) == 1


def test_exports_are_off_unless_the_endpoint_is_enabled(orthanc, settings):
    settings.PACS_EXPORT_ENDPOINTS = []
    _, result = _scored(orthanc, CLEAN_SEEDS[3])
    assert result_may_be_exported(result)
    assert not DicomExport.objects.filter(result=result).exists()
    settings.PACS_EXPORT_ENDPOINTS = ["http://another-pacs.invalid/dicom-web"]
    from scoring.signals import result_ready

    result_ready(result.pk)
    assert not DicomExport.objects.filter(result=result).exists()


def test_an_export_goes_to_the_configured_pacs_never_to_an_address_a_feed_sent(
        orthanc, settings):
    """A study whose recorded endpoint is another address (a feed's ImagingStudy
    Endpoint.address) is exported to the configured PACS only, even with every endpoint
    enabled: the recorded address receives no request and no credential."""
    import http.server
    import threading

    seen: list[str] = []

    class Trap(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization", "") or self.path)
            self.send_response(500)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args):
            pass

    trap = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trap)
    threading.Thread(target=trap.serve_forever, daemon=True).start()
    try:
        settings.PACS_EXPORT_ENDPOINTS = ["*"]
        settings.PACS_DICOMWEB_USERNAME, settings.PACS_DICOMWEB_PASSWORD = "pacs-user", "secret"
        _, result = _scored(orthanc, CLEAN_SEEDS[4])
        study = result.series.study
        study.endpoint_url = f"http://127.0.0.1:{trap.server_address[1]}/dicom-web"
        study.save(update_fields=["endpoint_url"])
        DicomExport.objects.filter(result=result).delete()
        from scoring.signals import result_ready

        result_ready(result.pk)
        rows = list(DicomExport.objects.filter(result=result))
        assert [r.endpoint_url for r in rows] == [orthanc.dicomweb.rstrip("/")]
        send_due_exports()
    finally:
        trap.shutdown()
    assert seen == []


def test_a_flagged_automatic_result_is_exported_only_once_accepted_with_its_reviewer(
        orthanc, exports_on, django_user_model):
    phantom, result = _scored(orthanc, FLAGGED_SEED)
    assert result.qc_flags
    assert not result_may_be_exported(result)
    assert not DicomExport.objects.filter(result=result).exists()
    review_decide(result=result, decision="accept", actor=_reviewer(django_user_model))
    [row] = DicomExport.objects.filter(result=result)
    assert send_due_exports()["sent"] == 1
    [sr] = fetch_series(orthanc.dicomweb, str(phantom.datasets[0].StudyInstanceUID),
                        row.sr_series_instance_uid)
    assert sr.VerificationFlag == "VERIFIED"
    assert sr.VerifyingObserverSequence[0].VerifyingObserverName == "SYNTHETIC^Rita"


def test_a_changed_result_makes_a_new_sr_that_names_the_earlier_one(
        orthanc, exports_on, django_user_model):
    phantom, result = _scored(orthanc, CLEAN_SEEDS[4])
    assert send_due_exports()["sent"] == 1
    first = DicomExport.objects.get(result=result)
    review_mark_fractured(result=result, levels=["L2"], actor=_reviewer(django_user_model))
    review_decide(result=result, decision="accept", actor=Actor(
        user_id=django_user_model.objects.get(username="reviewer-synthetic").pk, via="web"))
    rows = list(DicomExport.objects.filter(result=result).order_by("pk"))
    assert len(rows) == 3  # automatic; its fractured levels changed; then accepted
    assert send_due_exports()["sent"] == 2
    study_uid = str(phantom.datasets[0].StudyInstanceUID)
    assert _instance_count(orthanc, study_uid, first.sr_series_instance_uid) == 3
    last = rows[-1]
    [sr] = [ds for ds in fetch_series(orthanc.dicomweb, study_uid, last.sr_series_instance_uid)
            if ds.SOPInstanceUID == last.sr_sop_instance_uid]
    [ref] = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == rows[1].sr_sop_instance_uid
    assert sr.InstanceNumber == 3


def test_a_rejected_result_is_never_exported(orthanc, exports_on, django_user_model):
    _, result = _scored(orthanc, FLAGGED_SEED)  # a QC warning: waits for a reviewer
    assert not DicomExport.objects.filter(result=result).exists()
    review_decide(result=result, decision="reject", reason="poor-quality",
                  actor=_reviewer(django_user_model))
    result.refresh_from_db()
    assert not result_may_be_exported(result)
    assert not DicomExport.objects.filter(result=result).exists()


def test_a_failing_export_hook_never_fails_the_result_write(orthanc, exports_on):
    """A stored ROI the report cannot read: the hook logs it, the caller's transaction
    goes on (the result is the clinical write)."""
    from django.db import transaction

    from scoring.signals import result_ready

    _, result = _scored(orthanc, CLEAN_SEEDS[5])
    DicomExport.objects.filter(result=result).delete()
    result.levels.filter(level="L1").update(roi={"row": 1})
    with transaction.atomic():
        result_ready(result.pk)
        VbqResult.objects.filter(pk=result.pk).update(review_note="still writable")
    assert not DicomExport.objects.filter(result=result).exists()
    assert VbqResult.objects.get(pk=result.pk).review_note == "still writable"


@pytest.mark.parametrize(("changes", "expected"), [
    ({}, True),
    ({"qc_flags": [{"code": "small-csf-roi"}]}, False),
    ({"confidence": 0.89}, False),
    ({"status": "needs_review", "confidence": 0.5}, False),
    ({"source": "manual"}, False),  # not automatic: only once accepted
    ({"source": "manual", "review_status": "accepted"}, True),
    ({"qc_flags": [{"code": "x"}], "review_status": "accepted"}, True),
    ({"review_status": "rejected"}, False),
    ({"vbq_all_levels": None, "review_status": "accepted"}, False),
])
def test_the_export_rule_is_accepted_or_automatic_unflagged_and_confident(
        settings, changes, expected):
    settings.PACS_EXPORT_MIN_CONFIDENCE = 0.9
    values = {"series_id": 1, "vbq_all_levels": 3.1, "review_status": "pending",
              "source": "auto", "status": "succeeded", "qc_flags": [], "confidence": 0.9,
              **changes}
    values["qc_clear"] = qc_clear(values["qc_flags"])
    assert result_may_be_exported(VbqResult(**values)) is expected


@pytest.mark.slow
@pytest.mark.redis
def test_a_job_in_a_real_worker_ends_with_the_sr_and_sc_in_orthanc(
        orthanc, transactional_db, tmp_path):
    """The whole chain in a real Celery worker: the job scores the series fetched from Orthanc,
    stores the result with its export row, queues the send after commit, and the same worker
    stores the SR and the SC in the source study."""
    import time

    import redis

    from config.celery import app
    from tests.conftest import CeleryWorker, test_database_url

    broker = os.environ["REDIS_URL"]  # this run's own Redis database: no other worker reads it
    redis.Redis.from_url(broker).flushdb()
    env = {**os.environ, "DATABASE_URL": test_database_url(), "CELERY_BROKER_URL": broker,
           "PACS_EXPORT_ENDPOINTS": orthanc.dicomweb, "PYTHONUNBUFFERED": "1"}
    phantom, result = _linked(orthanc, CLEAN_SEEDS[0])
    ds = phantom.datasets[0]
    with app.connection_for_write(broker) as conn:
        vbq_compute.apply_async((result.pk,), connection=conn)
    worker = CeleryWorker(env, tmp_path / "worker.log", ["--pool", "solo"])
    worker.start()
    try:
        deadline = time.monotonic() + 90
        row = None
        while time.monotonic() < deadline:
            row = DicomExport.objects.filter(result=result, status="sent").first()
            if row:
                break
            time.sleep(0.5)
        assert row is not None, worker.log_path.read_text()[-3000:]
    finally:
        worker.stop()
    by_modality = _series_in_study(orthanc, str(ds.StudyInstanceUID))
    assert {s["0020000E"]["Value"][0] for s in by_modality["SR"]} == {row.sr_series_instance_uid}
    assert {s["0020000E"]["Value"][0] for s in by_modality["OT"]} == {row.sc_series_instance_uid}


def test_the_admin_action_sends_a_row_again(orthanc, exports_on, admin_client):
    _, result = _scored(orthanc, 232)
    [row] = DicomExport.objects.filter(result=result)
    assert send_due_exports()["sent"] == 1
    response = admin_client.post("/admin/integrations/dicomexport/", {
        "action": "send_again", "_selected_action": [row.pk]})
    assert response.status_code == 302
    row.refresh_from_db()
    assert (row.status, row.attempts) == ("pending", 0)
    page = admin_client.get(f"/admin/integrations/dicomexport/{row.pk}/change/")
    assert page.status_code == 200


def test_a_corrected_result_is_a_new_sr_naming_the_automatic_one_as_predecessor(
        orthanc, exports_on, django_user_model):
    from scoring.engine import Roi
    from scoring.review import review_save_corrected

    phantom, result = _scored(orthanc, 223)
    assert send_due_exports()["sent"] == 1
    automatic = DicomExport.objects.get(result=result)
    rois = {lv.level: Roi(**lv.roi) for lv in result.levels.filter(
        level__in=["L1", "L2", "L3", "L4", "csf"])}
    rois["L1"] = dataclasses.replace(rois["L1"], col=rois["L1"].col + 2)
    corrected = review_save_corrected(result=result, rois=rois, fractured_levels=[],
                                      actor=_reviewer(django_user_model))
    assert corrected.pk != result.pk
    [row] = DicomExport.objects.filter(result=corrected)
    assert send_due_exports()["sent"] == 1
    study_uid = str(phantom.datasets[0].StudyInstanceUID)
    srs = {str(ds.SOPInstanceUID): ds for ds in fetch_series(
        orthanc.dicomweb, study_uid, row.sr_series_instance_uid)}
    assert set(srs) == {automatic.sr_sop_instance_uid, row.sr_sop_instance_uid}
    sr = srs[row.sr_sop_instance_uid]
    [ref] = sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == automatic.sr_sop_instance_uid
    parsed = hd.sr.MeasurementReport.from_sequence([sr])
    [score] = parsed.get_image_measurement_groups()
    evaluations = {(q.name.meaning, q.value.meaning) for q in score.get_qualitative_evaluations()}
    assert ("VBQ result source", "Manual ROIs by a reviewer") in evaluations
    values = {m.name.meaning: m.value for m in score.get_measurements()}
    assert values["VBQ score, L1-L4"] == pytest.approx(round(corrected.vbq_all_levels, 4))
