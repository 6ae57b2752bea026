"""Celery tasks of the scoring app. Thin: they take ids.

``vbq_compute`` claims its VbqResult row with a conditional update (queued → running), so a
duplicate delivery computes nothing twice; it is ``acks_late`` with ``reject_on_worker_lost``
(a killed worker's job is re-delivered) and retries only transient fetch errors, with backoff.
Outbox: the rows themselves. A study written by ``imaging_study_upsert`` carries
``link_reason = LINK_PENDING`` until ``study_received`` links it, and a job is a ``queued``
VbqResult until a worker claims it. Sending after commit never fails the write (a broker outage
is logged); the periodic ``vbq_requeue_stale`` links studies still pending, re-sends queued jobs
whose message may have been lost, and recovers ``running`` rows of dead workers.
"""

from __future__ import annotations

import datetime as dt
import logging

from celery import shared_task
from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

logger = logging.getLogger(__name__)
STUCK_AFTER = dt.timedelta(minutes=30)
REQUEUE_AFTER = dt.timedelta(minutes=2)


def enqueue_vbq_compute(result_id: int) -> None:
    """Send the job; a broker outage must not fail the write (the row stays queued and
    ``vbq_requeue_stale`` sends it later)."""
    try:
        vbq_compute.delay(result_id)
    except Exception as exc:
        logger.warning("vbq_compute not queued result=%s: %s", result_id, type(exc).__name__)


def enqueue_study_received(study_id: int) -> None:
    """Send ``study_received``; a broker outage must not fail the ingest (the study stays
    ``LINK_PENDING`` and ``vbq_requeue_stale`` links it later)."""
    try:
        study_received.delay(study_id)
    except Exception as exc:
        logger.warning("study_received not queued study=%s: %s", study_id, type(exc).__name__)


@shared_task(name="scoring.study_received")
def study_received(study_id: int) -> dict:
    """A study arrived or changed: link it to the index procedure and queue VBQ jobs."""
    from scoring.linking import link_study
    from scoring.models import ImagingStudy
    from scoring.services import vbq_jobs_create

    study = ImagingStudy.objects.filter(pk=study_id).select_related("patient").first()
    if study is None or study.record_status != "active":
        return {"study": study_id, "jobs": 0}
    linked = link_study(study)
    jobs = vbq_jobs_create(study=study) if linked else []
    return {"study": study_id, "linked": linked, "jobs": len(jobs)}


def _load_source(result):  # type: ignore[no-untyped-def]
    from pathlib import Path

    from integrations.dicom.dicomweb import fetch_series

    series = result.series
    if series.local_path and Path(series.local_path).is_dir():
        return series.local_path
    base = series.study.endpoint_url or settings.PACS_DICOMWEB_URL
    if not base:
        from integrations.dicom.dicomweb import PermanentFetchError

        raise PermanentFetchError("no PACS endpoint and no local copy for this series")
    return fetch_series(base, series.study.study_instance_uid, series.series_instance_uid,
                        username=settings.PACS_DICOMWEB_USERNAME,
                        password=settings.PACS_DICOMWEB_PASSWORD)


@shared_task(name="scoring.vbq_compute", bind=True, acks_late=True, reject_on_worker_lost=True,
             max_retries=6)
def vbq_compute(self, result_id: int) -> dict:  # type: ignore[no-untyped-def]
    from integrations.dicom.dicomweb import PermanentFetchError, TransientFetchError
    from registry.models import Fracture
    from registry.services import followup_changed
    from scoring.engine import EngineError, compute_vbq
    from scoring.models import VbqLevel, VbqResult

    claimed = VbqResult.objects.filter(pk=result_id, status=VbqResult.Status.QUEUED).update(
        status=VbqResult.Status.RUNNING, started_at=timezone.now(), attempts=F("attempts") + 1)
    if not claimed:
        return {"result": result_id, "skipped": "not queued (done, running or unknown)"}
    result = VbqResult.objects.select_related("series__study").get(pk=result_id)
    try:
        source = _load_source(result)
        fractured = sorted(set(Fracture.objects.filter(
            patient_id=result.patient_id, site="vertebral", record_status="active",
            vertebral_level__in=["L1", "L2", "L3", "L4"],
        ).values_list("vertebral_level", flat=True)))
        measurement = compute_vbq(source, fractured_levels=fractured)
    except TransientFetchError as exc:
        VbqResult.objects.filter(pk=result_id, status=VbqResult.Status.RUNNING).update(
            status=VbqResult.Status.QUEUED, error_code="pacs-unavailable",
            error_message=str(exc)[:500])
        if self.request.retries >= self.max_retries:
            VbqResult.objects.filter(pk=result_id).update(
                status=VbqResult.Status.FAILED, finished_at=timezone.now())
            return {"result": result_id, "status": "failed", "error": str(exc)}
        raise self.retry(exc=exc, countdown=min(600, 5 * 2 ** self.request.retries)) from exc
    except (EngineError, PermanentFetchError) as exc:
        code = getattr(exc, "code", "fetch-failed")
        VbqResult.objects.filter(pk=result_id).update(
            status=VbqResult.Status.FAILED, error_code=code, error_message=str(exc)[:2000],
            finished_at=timezone.now())
        logger.info("vbq_compute failed result=%s code=%s", result_id, code)
        return {"result": result_id, "status": "failed", "error_code": code}
    with transaction.atomic():
        VbqResult.objects.filter(pk=result_id).update(
            status=measurement.status, vbq_all_levels=measurement.vbq_all_levels,
            vbq_excluding_fractured=measurement.vbq_excluding_fractured,
            confidence=measurement.confidence,
            qc_flags=[f.__dict__ for f in measurement.qc_flags],
            fractured_levels=measurement.fractured_levels,
            field_strength_t=measurement.acquisition.field_strength_t,
            measurement=measurement.to_dict(), error_code="", error_message="",
            finished_at=timezone.now())
        VbqLevel.objects.filter(result_id=result_id).delete()
        rows = [*measurement.levels.values(), *([measurement.csf] if measurement.csf else [])]
        VbqLevel.objects.bulk_create([
            VbqLevel(result_id=result_id, level=m.level, median_si=m.median_si,
                     pixel_count=m.pixel_count, centroid={"pixel": m.centroid_pixel,
                                                          "lps_mm": m.centroid_lps_mm},
                     roi=m.roi.__dict__, fractured=m.fractured)
            for m in rows if m.level in {"L1", "L2", "L3", "L4", "L5", "S1", "csf"}
        ])
        followup_changed(result.patient_id)
    return {"result": result_id, "status": measurement.status}


@shared_task(name="scoring.vbq_requeue_stale")
def vbq_requeue_stale(stuck_after_seconds: float | None = None,
                      requeue_after_seconds: float | None = None) -> dict:
    """Outbox sweep: link studies still ``LINK_PENDING`` or never linked (their message was
    lost); re-send queued jobs older than a few minutes; recover jobs stuck in ``running``
    (their worker died: a re-delivered message skips a row it cannot claim)."""
    from scoring.models import ImagingStudy, VbqResult
    from scoring.services import LINK_PENDING

    now = timezone.now()
    stuck_after = STUCK_AFTER if stuck_after_seconds is None else dt.timedelta(
        seconds=stuck_after_seconds)
    requeue_after = REQUEUE_AFTER if requeue_after_seconds is None else dt.timedelta(
        seconds=requeue_after_seconds)
    stuck = VbqResult.objects.filter(status=VbqResult.Status.RUNNING,
                                     started_at__lt=now - stuck_after)
    recovered = stuck.update(status=VbqResult.Status.QUEUED)
    # "" = never linked (a study row written without the marker, e.g. by a bulk upsert).
    pending = list(ImagingStudy.objects.filter(
        record_status="active", link_reason__in=[LINK_PENDING, ""],
        updated_at__lt=now - requeue_after).values_list("pk", flat=True)[:200])
    for pk in pending:
        study_received(pk)  # in this worker: the original message may never come
    stale = list(VbqResult.objects.filter(status=VbqResult.Status.QUEUED,
                                          queued_at__lt=now - requeue_after)
                 .values_list("pk", flat=True)[:500])
    for pk in stale:
        enqueue_vbq_compute(pk)
    return {"recovered": recovered, "linked": len(pending), "requeued": len(stale)}
