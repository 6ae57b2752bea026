"""VBQ results stored back in the PACS: the SR Measurement Report and the overlay Secondary
Capture (``integrations.dicom.vbq_sr``), sent with STOW-RS through an outbox with retries.

Which results: ``result_may_be_exported`` (an accepted result, or an automatic one the trust
rule lets through). Which PACS: the configured endpoint the study is read from
(``dicomweb.configured_endpoint``: ``PACS_DICOMWEB_URL``, or one of
``PACS_DICOMWEB_ALLOWED_URLS`` named by the study; an address a feed sent is never contacted),
when that endpoint is listed in ``PACS_EXPORT_ENDPOINTS`` (empty by default: nothing is
exported, as in the embedded demo). The PACS credentials go to ``PACS_DICOMWEB_URL`` only.

Flow: ``scoring.signals.vbq_result_ready`` (sent in the transaction that stores or reviews a
result) → ``on_vbq_result_ready`` writes a ``DicomExport`` row in that same transaction, with
the report snapshot and the UIDs, unique on (result, endpoint, content digest): a result that
says the same thing again writes nothing; a result whose content changed (re-scored,
corrected, fractured levels changed) gets a new row whose SR names the previous SR of the
series as its predecessor. After commit ``integrations.dicom_exports_send`` sends due rows;
it also runs periodically. Each row is claimed with a conditional update (pending → sending),
its source series read (local copy or WADO-RS), the SR and SC built from the snapshot and
stored with one STOW-RS request; a transient failure (PACS down, HTTP 5xx/429) puts it back
with exponential backoff (1, 2, 4 … minutes, capped at an hour) until ``MAX_ATTEMPTS``, a
permanent one marks it ``failed`` with the reason. The UIDs are derived from the content, so
a re-send (a retry after a lost answer, ``dicom_export_resend``) stores nothing new.
Logs carry row, result and series ids, never patient identity.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from integrations import tasks
from integrations.dicom.vbq_sr import (
    Predecessor,
    ReportError,
    ReportLevel,
    VbqReport,
    build_instances,
    export_uids,
)
from integrations.models import DicomExport
from registry.timeutil import clinic_zone
from scoring.dicomweb import (
    PermanentFetchError,
    TransientFetchError,
    configured_endpoint,
    fetch_study_series,
    store_instances,
)
from scoring.engine import EngineError
from scoring.engine.dicom_io import read_series
from scoring.models import VbqResult
from scoring.trust import result_is_trusted

logger = logging.getLogger(__name__)
MAX_ATTEMPTS = 8
STALE_CLAIM = dt.timedelta(minutes=10)
REPORTED_LEVELS = ("L1", "L2", "L3", "L4", "csf")
Status = DicomExport.Status


def result_may_be_exported(result: VbqResult) -> bool:
    """Whether a result may leave the registry as a DICOM report: it has a VBQ value and a
    source series, and the trust rule that decides which results may move an alert
    (``scoring.trust.result_is_trusted``: accepted, or automatic, succeeded, no QC warning,
    confidence at least ``VBQ_TRUST_MIN_CONFIDENCE``) lets it through; an unreviewed automatic
    result also needs a confidence of at least ``PACS_EXPORT_MIN_CONFIDENCE`` (a site may ask
    more of what reaches the radiologists unreviewed)."""
    if result.series_id is None or result.vbq_all_levels is None:
        return False
    if not result_is_trusted(result):
        return False
    if result.review_status == VbqResult.Review.ACCEPTED:
        return True
    return (result.confidence is not None
            and result.confidence >= settings.PACS_EXPORT_MIN_CONFIDENCE)


def _normalised(url: str) -> str:
    return url.strip().rstrip("/")


def endpoint_exports_enabled(base_url: str) -> bool:
    """Whether results of studies read from this DICOMweb endpoint are stored back there:
    ``PACS_EXPORT_ENDPOINTS`` lists base URLs, ``default`` (= ``PACS_DICOMWEB_URL``) or
    ``*`` (every endpoint)."""
    base = _normalised(base_url)
    if not base:
        return False
    for item in settings.PACS_EXPORT_ENDPOINTS:
        item = _normalised(item)
        if item == "*" or item == base or (
                item == "default" and base == _normalised(settings.PACS_DICOMWEB_URL)):
            return True
    return False


def _source_endpoint(result: VbqResult) -> str:
    """The configured endpoint the result's study is read from ("" when none is configured)."""

    study = result.series.study  # type: ignore[union-attr]
    base, _username, _password = configured_endpoint(study.endpoint_url or "")
    return _normalised(base) if base else ""


def _credentials_for(base_url: str) -> tuple[str, str]:
    """The PACS username and password, for ``PACS_DICOMWEB_URL`` only (any other configured
    endpoint is contacted without them, as for fetching)."""
    if base_url and _normalised(base_url) == _normalised(settings.PACS_DICOMWEB_URL):
        return settings.PACS_DICOMWEB_USERNAME, settings.PACS_DICOMWEB_PASSWORD
    return "", ""


def _reviewer_name(result: VbqResult) -> str:
    """The reviewer as a DICOM person name (Family^Given), else the login name."""
    user = result.reviewer
    if user is None or result.review_status != VbqResult.Review.ACCEPTED:
        return ""
    family, given = (getattr(user, "last_name", "") or "", getattr(user, "first_name", "") or "")
    if family or given:
        return f"{family}^{given}"[:64]
    return user.get_username()[:64]


def report_of(result: VbqResult) -> VbqReport | None:
    """The result as a ``VbqReport`` (without predecessors), or ``None`` when it has no
    measured ROI to report (an imported value)."""
    levels = []
    for row in sorted(result.levels.all(), key=lambda r: REPORTED_LEVELS.index(r.level)
                      if r.level in REPORTED_LEVELS else 99):
        if row.level not in REPORTED_LEVELS or not row.roi:
            continue
        roi = row.roi
        levels.append(ReportLevel(
            level=row.level, median_si=float(row.median_si), pixel_count=int(row.pixel_count),
            slice_index=int(roi["slice_index"]), row=float(roi["row"]), col=float(roi["col"]),
            half_height=float(roi["half_height"]), half_width=float(roi["half_width"]),
            shape=str(roi.get("shape", "ellipse")), angle_deg=float(roi.get("angle_deg", 0.0)),
            fractured=bool(row.fractured)))
    if not levels:
        return None
    accepted = result.review_status == VbqResult.Review.ACCEPTED
    when = (result.reviewed_at if accepted else None) or result.finished_at or timezone.now()
    return VbqReport(
        result_id=result.pk, algorithm_version=result.algorithm_version, source=result.source,
        review_status=result.review_status, reviewer_name=_reviewer_name(result),
        vbq_all_levels=result.vbq_all_levels,
        vbq_excluding_fractured=result.vbq_excluding_fractured,
        confidence=result.confidence, status=result.status,
        content_datetime=when.astimezone(clinic_zone()).isoformat(), levels=tuple(levels),
        qc_flags=tuple((str(f.get("code", "")), str(f.get("message", "")))
                       for f in result.qc_flags or []),
        fractured_levels=tuple(sorted(result.fractured_levels or [])))


def dicom_export_create(*, result_id: Any) -> DicomExport | None:
    """Write the export outbox row of a result if it may be exported to an enabled endpoint
    and says something not exported yet (in the caller's transaction; the send is queued
    after commit). Returns the row created, else ``None``."""
    result = (VbqResult.objects.select_related("series__study", "reviewer")
              .prefetch_related("levels").filter(pk=result_id).first())
    if result is None or not result_may_be_exported(result):
        return None
    endpoint = _source_endpoint(result)
    if not endpoint_exports_enabled(endpoint):
        return None
    report = report_of(result)
    if report is None:
        logger.info("dicom export skipped result=%s: no measured ROI", result.pk)
        return None
    digest = report.digest()
    series = result.series
    if series is None:  # (result_may_be_exported checked it; for the type checker)
        return None
    earlier = DicomExport.objects.filter(series_instance_uid=series.series_instance_uid,
                                         endpoint_url=endpoint)
    if earlier.filter(result_id=result.pk, content_sha=digest).exists():
        return None
    previous = earlier.order_by("-pk").first()
    report = dataclasses.replace(
        report, instance_number=earlier.count() + 1,
        predecessors=(Predecessor(previous.study_instance_uid, previous.sr_series_instance_uid,
                                  previous.sr_sop_instance_uid),) if previous else ())
    uids = export_uids(report, series.series_instance_uid)
    row, created = DicomExport.objects.get_or_create(
        result_id=result.pk, endpoint_url=endpoint, content_sha=digest, defaults={
            "report": report.to_json(),
            "study_instance_uid": series.study.study_instance_uid,
            "series_instance_uid": series.series_instance_uid,
            "sr_series_instance_uid": uids.sr_series, "sr_sop_instance_uid": uids.sr_instance,
            "sc_series_instance_uid": uids.sc_series, "sc_sop_instance_uid": uids.sc_instance,
            "next_attempt_at": timezone.now()})
    if not created:
        return None

    transaction.on_commit(tasks.enqueue_dicom_exports_send)
    logger.info("dicom export queued export=%s result=%s", row.pk, result.pk)
    return row


def on_vbq_result_ready(sender: Any, result_id: Any, **kwargs: Any) -> None:
    """``scoring.signals.vbq_result_ready`` receiver. Nothing (not even a query) when no
    endpoint is enabled; otherwise ``dicom_export_create`` in a savepoint, so that a failure
    here is logged and never fails the result's own transaction."""
    if not settings.PACS_EXPORT_ENDPOINTS:
        return
    try:
        with transaction.atomic():
            dicom_export_create(result_id=result_id)
    except Exception:
        logger.exception("dicom export not queued result=%s", result_id)


@transaction.atomic
def dicom_export_resend(*, export_id: int) -> None:
    """Send an export row again (its instances keep their UIDs: the PACS keeps one copy)."""
    DicomExport.objects.filter(pk=export_id).exclude(status=Status.SENDING).update(
        status=Status.PENDING, next_attempt_at=timezone.now(), attempts=0, last_error="")

    transaction.on_commit(tasks.enqueue_dicom_exports_send)


# --- sending --------------------------------------------------------------------------------


def _backoff(attempts: int) -> dt.timedelta:
    return dt.timedelta(seconds=min(3600, 60 * 2 ** max(attempts - 1, 0)))


def _claim(pk: int, now: dt.datetime) -> DicomExport | None:
    if not DicomExport.objects.filter(pk=pk, status=Status.PENDING).update(
            status=Status.SENDING, claimed_at=now, attempts=F("attempts") + 1):
        return None
    return DicomExport.objects.select_related("result__series__study").get(pk=pk)


def _finish(row: DicomExport, *, error: str = "", permanent: bool = False) -> None:
    now = timezone.now()
    rows = DicomExport.objects.filter(pk=row.pk, status=Status.SENDING)
    if not error:
        rows.update(status=Status.SENT, sent_at=now, last_error="")
        logger.info("dicom export sent export=%s result=%s", row.pk, row.result_id)
        return
    give_up = permanent or row.attempts >= MAX_ATTEMPTS
    rows.update(status=Status.FAILED if give_up else Status.PENDING,
                next_attempt_at=now + _backoff(row.attempts), last_error=error[:500])
    logger.warning("dicom export %s export=%s result=%s attempt=%s: %s",
                   "failed" if give_up else "will retry", row.pk, row.result_id, row.attempts,
                   error[:200])


def _source_series(row: DicomExport) -> Any:
    """The engine ``Series`` of the row's source series: the local copy, else WADO-RS."""

    series = row.result.series
    if series is not None and series.local_path and Path(series.local_path).is_dir():
        return read_series(series.local_path)
    study = series.study if series is not None else None
    datasets = fetch_study_series(study.endpoint_url if study else "", row.study_instance_uid,
                                  row.series_instance_uid)
    return read_series(datasets)


def send_export(row: DicomExport) -> None:
    """Build and store one claimed row's SR and SC; marks it sent, pending or failed."""

    try:
        report = VbqReport.from_json(row.report)
        series = _source_series(row)
        instances, uids = build_instances(report, series)
        if (uids.sr_instance, uids.sc_instance) != (row.sr_sop_instance_uid,
                                                    row.sc_sop_instance_uid):
            raise ReportError("the source series is not the one the export was made for")
        username, password = _credentials_for(row.endpoint_url)
        store_instances(row.endpoint_url, list(instances), username=username, password=password)
    except TransientFetchError as exc:
        _finish(row, error=str(exc))
    except (PermanentFetchError, ReportError, EngineError) as exc:
        _finish(row, error=f"{type(exc).__name__}: {exc}", permanent=True)
    except Exception as exc:  # a bug or an unexpected answer: retried, then given up
        logger.exception("dicom export error export=%s", row.pk)
        _finish(row, error=f"{type(exc).__name__}: {str(exc)[:300]}")
    else:
        _finish(row)


def send_due_exports(now: dt.datetime | None = None) -> dict[str, int]:
    """Send every due export row. Safe to run concurrently (rows are claimed one by one)."""
    now = now or timezone.now()
    # A worker killed between claim and mark leaves 'sending' rows: give them back.
    DicomExport.objects.filter(status=Status.SENDING, claimed_at__lt=now - STALE_CLAIM).update(
        status=Status.PENDING)
    due = list(DicomExport.objects.filter(status=Status.PENDING, next_attempt_at__lte=now)
               .order_by("next_attempt_at", "pk").values_list("pk", flat=True)[:200])
    counts = {"sent": 0, "retry": 0, "failed": 0}
    for pk in due:
        row = _claim(pk, now)
        if row is None:
            continue
        send_export(row)
        status = DicomExport.objects.filter(pk=pk).values_list("status", flat=True).first()
        counts["sent" if status == Status.SENT else
               "failed" if status == Status.FAILED else "retry"] += 1
    return counts
