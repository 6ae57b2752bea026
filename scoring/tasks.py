"""Celery tasks of the scoring app. Thin: they take ids.

``vbq_compute`` claims its VbqResult row with a conditional update (queued → running), so a
duplicate delivery computes nothing twice; it is ``acks_late`` with ``reject_on_worker_lost``
(a killed worker's job is re-delivered) and retries only transient fetch errors, with backoff.
It re-evaluates the patient's follow-up itself, in the transaction that stores the result (no
second task: an alert the result opens or resolves commits with it; if the evaluation fails the
patient is marked due today for the sweep).
Outbox: the rows themselves. ``imaging_study_upsert`` links a study and creates its jobs in the
ingest's own transaction; a job is a ``queued`` VbqResult until a worker claims it. The studies
of a FHIR bundle carry ``link_reason = LINK_PENDING`` until ``study_received`` links them (one
Celery ``chunks`` message per bundle, so a feed of many studies does not link them inside its
request). Sending after commit never fails the write (a broker outage is logged); the periodic
``vbq_requeue_stale`` links studies still pending (and studies left unlinked behind a nearer
study their patient no longer has linked), re-sends queued jobs whose message may have been
lost, and recovers ``running`` rows of dead workers. The result's transaction keeps the lock
order of study moves and merges (result, then patient) and is retried on a deadlock.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from dataclasses import dataclass
from typing import Any

from celery import shared_task
from django.conf import settings
from django.db import OperationalError, connection, transaction
from django.db.models import F
from django.utils import timezone

from db.pg import json_param, pg_execute, pg_insert_sql
from registry.models import Patient
from scoring import services
from scoring.dicomweb import PermanentFetchError, TransientFetchError, fetch_study_series
from scoring.engine import EngineError, compute_vbq
from scoring.fractured import fractured_levels_of, fractured_levels_sql, results_refresh_fractured
from scoring.identity import describe, patient_mismatches
from scoring.linking import NEARER_ARRIVED, NEARER_LINKED
from scoring.models import ImagingSeries, ImagingStudy, VbqLevel, VbqResult
from scoring.signals import result_ready, result_stored_for
from scoring.trust import hold_category_change, qc_clear

logger = logging.getLogger(__name__)
STUCK_AFTER = dt.timedelta(minutes=30)
REQUEUE_AFTER = dt.timedelta(minutes=2)


def _send(task: Any, *args: Any, about: str) -> None:
    """Send a message after commit. A broker outage must not fail the write that committed:
    its rows are the outbox (a queued job, a study waiting to be linked), which
    ``vbq_requeue_stale`` sends or links later; the outage is logged (ids only)."""
    try:
        task.delay(*args)
    except Exception as exc:
        logger.warning("%s not queued %s: %s", task.name, about, type(exc).__name__)


def enqueue_vbq_compute(result_id: int) -> None:
    _send(vbq_compute, result_id, about=f"result={result_id}")


def enqueue_study_received(study_id: int) -> None:
    _send(study_received, study_id, about=f"study={study_id}")


def enqueue_link_pending_studies(patient_ids: list[str]) -> None:
    _send(link_pending_studies, patient_ids, about=f"for {len(patient_ids)} patient(s)")


@shared_task(name="scoring.link_pending_studies")
def link_pending_studies(patient_ids: list[str]) -> dict:
    """A procedure was recorded for these patients: link their studies waiting as
    ``RELINK_PENDING`` (each as ``study_received`` does, in its own transaction)."""

    pks = list(ImagingStudy.objects.filter(
        patient_id__in=patient_ids, record_status="active", link_reason=services.RELINK_PENDING,
    ).values_list("pk", flat=True))
    linked = sum(bool(study_received(pk).get("linked")) for pk in pks)
    return {"studies": len(pks), "linked": linked}


@shared_task(name="scoring.study_received")
def study_received(study_id: int) -> dict:
    """A study arrived or changed: link it to the index procedure and queue VBQ jobs.

    One transaction: the link and its jobs are written together (a worker dying in between
    cannot leave a study linked without its job) and committed once."""

    with transaction.atomic():
        study = (ImagingStudy.objects.select_for_update(of=("self",))
                 .filter(pk=study_id).select_related("patient").first())
        if study is None or study.record_status != "active":
            return {"study": study_id, "jobs": 0}
        linked, jobs = services.link_and_create_jobs(study)
    return {"study": study_id, "linked": linked, "jobs": len(jobs)}


@dataclass(frozen=True)
class _Claimed:
    """What a claimed job needs, read by the claiming statement itself."""

    patient_id: Any
    local_path: str
    study_instance_uid: str
    series_instance_uid: str
    endpoint_url: str
    fractured_levels: list[str]


def _claim(result_id: int) -> _Claimed | None:
    """Claim the job with one conditional UPDATE (queued → running) that also returns its
    series, its study and the patient's fractured L1–L4 levels (``scoring.fractured``: the
    index procedure's treated levels and the fractures that are not secondary); ``None`` if it
    is not queued (done, running elsewhere or unknown).

    The job is scored for its study's patient AS OF NOW: a job created for the study's former
    patient by a linker that raced a misfile correction (the correction's statement moves
    only the results that existed when it started) moves to the study's patient here."""

    if connection.vendor != "postgresql":
        return _claim_orm(result_id)
    sql = f"""
        WITH claimed AS (
            UPDATE {VbqResult._meta.db_table} AS r SET status = %s, started_at = %s,
                   attempts = attempts + 1,
                   patient_id = coalesce((
                       SELECT st.patient_id FROM {ImagingSeries._meta.db_table} s
                       JOIN {ImagingStudy._meta.db_table} st ON st.id = s.study_id
                       WHERE s.id = r.series_id), r.patient_id)
            WHERE r.id = %s AND r.status = %s
            RETURNING r.patient_id, r.series_id)
        SELECT c.patient_id, coalesce(s.local_path, ''), coalesce(st.study_instance_uid, ''),
               coalesce(s.series_instance_uid, ''), coalesce(st.endpoint_url, ''),
               {fractured_levels_sql("c.patient_id")}
        FROM claimed c
        LEFT JOIN {ImagingSeries._meta.db_table} s ON s.id = c.series_id
        LEFT JOIN {ImagingStudy._meta.db_table} st ON st.id = s.study_id
    """  # noqa: S608 (table names from the models' metadata; values are parameters)
    rows = pg_execute(sql, [VbqResult.Status.RUNNING, timezone.now(), result_id,
                            VbqResult.Status.QUEUED], prepare=True)
    if not rows:
        return None
    [(patient_id, local_path, study_uid, series_uid, endpoint, fractured)] = rows
    return _Claimed(patient_id, local_path, study_uid, series_uid, endpoint,
                    sorted(fractured or []))


def _claim_orm(result_id: int) -> _Claimed | None:
    """``_claim`` in a few ORM statements (databases other than PostgreSQL)."""

    claimed = VbqResult.objects.filter(pk=result_id, status=VbqResult.Status.QUEUED).update(
        status=VbqResult.Status.RUNNING, started_at=timezone.now(), attempts=F("attempts") + 1)
    if not claimed:
        return None
    result = VbqResult.objects.select_related("series__study").get(pk=result_id)
    series = result.series
    if series and series.study.patient_id and series.study.patient_id != result.patient_id:
        result.patient_id = series.study.patient_id  # see ``_claim``
        VbqResult.objects.filter(pk=result_id).update(patient_id=result.patient_id)
    fractured = fractured_levels_of([result.patient_id])[str(result.patient_id)]
    return _Claimed(result.patient_id, series.local_path if series else "",
                    series.study.study_instance_uid if series else "",
                    series.series_instance_uid if series else "",
                    series.study.endpoint_url if series else "", fractured)


def _load_source(job: _Claimed):  # type: ignore[no-untyped-def]
    from pathlib import Path

    if job.local_path and Path(job.local_path).is_dir():
        return job.local_path
    if not job.series_instance_uid:
        raise PermanentFetchError("no PACS endpoint and no local copy for this series")
    # the study's recorded endpoint is provenance: only a configured PACS is contacted
    return fetch_study_series(job.endpoint_url, job.study_instance_uid,
                              job.series_instance_uid)


def _counts_alone(measurement: Any) -> bool:
    """Whether the stored result may move alerts without review (``scoring.trust``), judged
    from the measurement: only then can it change the VBQ category the follow-up sees (the
    category check's queries are skipped for every other result)."""

    return (measurement.status == "succeeded" and qc_clear(measurement.qc_flags)
            and (measurement.confidence or 0.0) >= settings.VBQ_TRUST_MIN_CONFIDENCE)


def _identity_mismatch(datasets: Any, patient_id: Any) -> str:
    """Why the fetched ``datasets`` are not patient ``patient_id``'s ("" when they are)."""

    patient = Patient.objects.filter(pk=patient_id).first()
    if patient is None:
        return ""
    return describe(patient_mismatches(datasets, patient))


STORED_LEVELS = ("L1", "L2", "L3", "L4", "L5", "S1", "csf")
STORE_ATTEMPTS = 3


def _measured_levels(measurement: Any) -> list[Any]:
    """The measurement's level results: the vertebral levels, then the CSF if measured."""
    return [*measurement.levels.values(), *([measurement.csf] if measurement.csf else [])]


def _finite(value: float) -> float:
    """A level's median as stored: JSON (the level rows' one parameter) has no NaN or
    infinity, and a measured level always has a finite median; anything else is an engine
    error, refused here with its value rather than by PostgreSQL's JSON parser."""
    if not math.isfinite(value):

        raise EngineError(f"a level's median signal intensity is not finite ({value})")
    return value


def _store(result_id: int, measurement: Any) -> tuple[Any, list[str]]:
    """Write the result and its level rows (inside the caller's transaction). On PostgreSQL in
    ONE statement: the result's UPDATE, the DELETE of level rows this measurement no longer
    has and an upsert of its levels (a re-run replaces the rows, as the ORM path below),
    prepared once per connection (its text is fixed: the levels travel as one JSON parameter).

    Returns the result's patient and that patient's fractured levels AS OF NOW
    (``scoring.fractured``), read by the same statement: a fracture or procedure written, or
    the study moved to another patient, while the job ran (after its claim read them) is
    caught here, and the caller recomputes the value (the writer's own recompute skipped this
    result: it had no level rows yet). Not closed: a writer whose recompute ran before this
    commit and who commits after this statement began is seen by neither (a window of a few
    milliseconds). Locking the patient first here would close it, but study moves and
    patient merges lock results before patients (a deadlock, found in review), so the worker
    keeps their order (result, then patient in the follow-up) and retries a deadlock."""

    values = {
        "status": measurement.status, "vbq_all_levels": measurement.vbq_all_levels,
        "vbq_excluding_fractured": measurement.vbq_excluding_fractured,
        "confidence": measurement.confidence,
        "qc_flags": [f.__dict__ for f in measurement.qc_flags],
        "qc_clear": qc_clear(measurement.qc_flags),
        "fractured_levels": measurement.fractured_levels,
        "field_strength_t": measurement.acquisition.field_strength_t,
        "measurement": measurement.to_dict(), "error_code": "", "error_message": "",
        "finished_at": timezone.now(),
    }
    kept = _measured_levels(measurement)
    level_rows = [{"result_id": result_id, "level": m.level, "median_si": _finite(m.median_si),
                   "pixel_count": m.pixel_count,
                   "centroid": {"pixel": m.centroid_pixel, "lps_mm": m.centroid_lps_mm},
                   "roi": m.roi.__dict__, "fractured": m.fractured}
                  for m in kept if m.level in STORED_LEVELS]
    if connection.vendor != "postgresql":
        VbqResult.objects.filter(pk=result_id).update(**values)
        VbqLevel.objects.filter(result_id=result_id).delete()
        VbqLevel.objects.bulk_create([VbqLevel(**row) for row in level_rows])
        patient_id = VbqResult.objects.filter(pk=result_id).values_list(
            "patient_id", flat=True).first()
        return patient_id, fractured_levels_of([patient_id])[str(patient_id)]
    quote = connection.ops.quote_name
    result_fields = [VbqResult._meta.get_field(name) for name in values]
    sets = ", ".join(f"{quote(f.column)} = %s" for f in result_fields)
    params: list[Any] = [f.get_db_prep_save(values[f.name], connection) for f in result_fields]
    params += [result_id, result_id, [row["level"] for row in level_rows]]
    # Names from the models' metadata; values are parameters (the level rows as ONE JSON
    # parameter: the statement's text and parameter count stay small and fixed, so psycopg
    # converts it once per process, not on every call as with a VALUES list of ~60).
    sql = (f"WITH result AS (UPDATE {quote(VbqResult._meta.db_table)} SET {sets} "  # noqa: S608
           "WHERE id = %s RETURNING patient_id), "
           f"stale AS (DELETE FROM {quote(VbqLevel._meta.db_table)} "
           f"WHERE result_id = %s AND NOT (level = ANY(%s::varchar[])))")
    if level_rows:
        insert_sql, records = pg_insert_sql(
            VbqLevel, level_rows, ("result", "level"),
            ("median_si", "pixel_count", "centroid", "roi", "fractured"), "")
        sql += f", written AS ({insert_sql})"
        params.append(json_param(records))
    # (a data-modifying WITH runs to completion whether or not the SELECT reads it)
    sql += f" SELECT r.patient_id, {fractured_levels_sql('r.patient_id')} FROM result r"  # noqa: S608
    rows_out = pg_execute(sql, params, prepare=True)
    if not rows_out:
        return None, []
    [(patient_id, fractured)] = rows_out
    return patient_id, sorted(fractured or [])


@shared_task(name="scoring.vbq_compute", bind=True, acks_late=True, reject_on_worker_lost=True,
             max_retries=6)
def vbq_compute(self, result_id: int) -> dict:  # type: ignore[no-untyped-def]
    """Claim, fetch, score, store, and re-evaluate the patient's follow-up, in this task (no
    second message: the alert a result opens or resolves commits with the result)."""

    job = _claim(result_id)
    if job is None:
        return {"result": result_id, "skipped": "not queued (done, running or unknown)"}
    try:
        source = _load_source(job)
        if not isinstance(source, str):
            # Fetched from a PACS: the files' DICOM patient must be this job's patient (an
            # upload and a C-STORE push were checked when they arrived).
            mismatch = _identity_mismatch(source, job.patient_id)
            if mismatch:
                VbqResult.objects.filter(pk=result_id).update(
                    status=VbqResult.Status.FAILED, error_code="patient-mismatch",
                    error_message=f"not scored: {mismatch}"[:2000],
                    finished_at=timezone.now())
                logger.info("vbq_compute held result=%s code=patient-mismatch", result_id)
                return {"result": result_id, "status": "failed",
                        "error_code": "patient-mismatch"}
        measurement = compute_vbq(source, fractured_levels=job.fractured_levels)
        for level in _measured_levels(measurement):
            _finite(level.median_si)  # an EngineError: failed with its reason, as any
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
    held = False
    for attempt in range(1, STORE_ATTEMPTS + 1):
        try:
            with transaction.atomic():
                patient_id, fractured_now = _store(result_id, measurement)
                if patient_id is not None and fractured_now != sorted(set(
                        job.fractured_levels)):
                    # changed while the job ran: the value follows the levels as of now

                    results_refresh_fractured([patient_id])
                if patient_id is not None and _counts_alone(measurement):

                    held = hold_category_change(result_id, patient_id)
                for patient in dict.fromkeys(p for p in (patient_id, job.patient_id) if p):
                    # follow-up re-evaluates them in this transaction (scoring.signals)
                    result_stored_for(patient)  # the result's patient now (and before)
                result_ready(result_id)  # scoring.signals (the PACS export's outbox row)
            break
        except OperationalError as exc:
            # a deadlock or serialization failure with a concurrent writer (a study move, a
            # merge): the transaction was rolled back; storing again is safe, the engine is
            # not re-run
            sqlstate = getattr(exc.__cause__, "sqlstate", "")
            if attempt == STORE_ATTEMPTS or sqlstate not in ("40P01", "40001"):
                raise
            logger.info("vbq_compute store retried result=%s (%s)", result_id, sqlstate)
    return {"result": result_id, "status": "needs_review" if held else measurement.status}


@shared_task(name="scoring.vbq_requeue_stale")
def vbq_requeue_stale(stuck_after_seconds: float | None = None,
                      requeue_after_seconds: float | None = None) -> dict:
    """Outbox sweep: link studies still ``LINK_PENDING`` or never linked (their message was
    lost), and studies that lost their link to a nearer study their patient no longer has
    linked; re-send queued jobs older than a few minutes; recover jobs stuck in ``running``
    (their worker died: a re-delivered message skips a row it cannot claim)."""
    from django.db.models import Exists, OuterRef

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
        record_status="active",
        link_reason__in=[services.LINK_PENDING, services.RELINK_PENDING, ""],
        updated_at__lt=now - requeue_after).values_list("pk", flat=True)[:200])
    # Healing: a study left unlinked because a nearer one was linked (or arrived), while its
    # patient now has NO linked study (that nearer study was moved to another patient,
    # voided, or lost a race with a misfile correction): linked again, nearest wins.
    linked = ImagingStudy.objects.filter(patient_id=OuterRef("patient_id"),
                                         record_status="active",
                                         linked_procedure__isnull=False)
    pending += list(ImagingStudy.objects.filter(
        record_status="active", linked_procedure__isnull=True,
        link_reason__in=[NEARER_LINKED, NEARER_ARRIVED], updated_at__lt=now - requeue_after,
    ).filter(~Exists(linked)).order_by("patient_id", "-started_on").values_list(
        "pk", flat=True)[:200])
    for pk in pending:
        study_received(pk)  # in this worker: the original message may never come
    stale = list(VbqResult.objects.filter(status=VbqResult.Status.QUEUED,
                                          queued_at__lt=now - requeue_after)
                 .values_list("pk", flat=True)[:500])
    for pk in stale:
        enqueue_vbq_compute(pk)
    return {"recovered": recovered, "linked": len(pending), "requeued": len(stale)}
