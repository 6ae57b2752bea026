"""Human review of VBQ results: reads (queue, ROIs, slice images) and writes (accept, reject,
mark fractured levels, save a reviewer-corrected result). Writes are keyword-only, one
transaction each, audited (``registry.side_effects.audit_record``).

The corrected result is computed by the engine's manual-ROI path
(``scoring.engine.compute_vbq(source, manual_rois=..., fractured_levels=...)``) and saved as a
NEW ``VbqResult`` (source ``manual``, next revision, reviewer recorded); the reviewed result is
kept, marked as superseded.
"""

from __future__ import annotations

import io
import math
import re
import statistics
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from django.db import transaction
from django.db.models import Max, Q, QuerySet
from django.utils import timezone

from registry.services import RegistryValidationError
from registry.side_effects import Actor, audit_record, followup_changed
from scoring.dicomweb import FetchError, configured_endpoint, fetch_study_series
from scoring.engine import EngineError, Roi, VbqMeasurement, compute_vbq
from scoring.engine.dicom_io import Series, read_series
from scoring.fractured import PENDING, apply_fractured_levels
from scoring.models import VbqLevel, VbqResult
from scoring.signals import result_ready
from scoring.tasks import STORED_LEVELS
from scoring.trust import (
    CATEGORY_CHANGE,
    category_change,
    qc_clear,
    rule_result,
    rule_value,
    threshold_of,
    trusted_q,
)

ROI_LEVELS = ("L1", "L2", "L3", "L4", "csf")  # the ROIs a VBQ needs (the reviewer's choices)
VBQ_LEVELS = ("L1", "L2", "L3", "L4")
# Any vertebral level the engine may store (T1–T12, L1–L6, S1–S5) and the CSF: a result's
# ROIs come back from the page as stored; only L1–L4 and the CSF enter the VBQ.
ANY_LEVEL = re.compile(r"^(T([1-9]|1[0-2])|L[1-6]|S[1-5]|csf)$")


def level_order(level: str) -> tuple[int, int]:
    """Head-to-feet order of level names (T before L before S, the CSF last)."""
    if level == "csf":
        return (9, 0)
    return ("TLS".index(level[0]), int(level[1:])) if ANY_LEVEL.match(level) else (8, 0)
REJECT_REASONS = {
    "wrong-series": "Wrong series (not a sagittal T1 of the lumbar spine)",
    "wrong-patient": "Images of another patient",
    "poor-quality": "Image quality too poor (motion, artefact, coverage)",
    "wrong-levels": "Levels mislabelled and cannot be corrected here",
    "hardware": "Metal or cement artefact over the measured levels",
    "other": "Other (see note)",
}
# Failed results a human must look at (not a technical failure that a retry fixes).
HELD_ERROR_CODES = ("patient-mismatch",)
SLICE_SCROLL = 2  # the reviewer may scroll this many slices either side of the chosen one


class ReviewError(RegistryValidationError):
    """A review request that cannot be carried out (message is safe to show)."""


# --- reads ---------------------------------------------------------------------------------


def review_queue() -> QuerySet[VbqResult]:
    """Results waiting for a human, oldest first: every finished result not yet reviewed that
    does not move alerts by itself (``scoring.trust``: QC warnings, low confidence, pending
    manual or assisted results, category changes), and failed results held for a human
    (patient identity mismatch), and counting results holding a fractured-levels recompute
    that would cross the high-VBQ threshold (``scoring.fractured.PENDING``). Each row's
    reason: ``scoring.trust.untrusted_reason``, or the held recompute's."""

    pending = Q(review_status=VbqResult.Review.PENDING)
    finished = Q(status__in=[VbqResult.Status.SUCCEEDED, VbqResult.Status.NEEDS_REVIEW])
    held = Q(status=VbqResult.Status.FAILED, error_code__in=HELD_ERROR_CODES)
    # a counting result whose fractured-levels recompute would cross the threshold (held by
    # ``scoring.fractured``; accepted or not): text match, so SQLite answers it too
    recompute = Q(qc_flags__icontains=f'"{PENDING}"')
    return (VbqResult.objects.filter((pending & (finished | held) & ~trusted_q()) | recompute)
            .select_related("patient", "series__study")
            .order_by("queued_at", "pk"))


def stored_rois(result: VbqResult) -> dict[str, dict[str, Any]]:
    """The per-level ROI geometry stored with a result (level → Roi fields)."""
    out: dict[str, dict[str, Any]] = {}
    for level in result.levels.all():
        if level.roi:
            out[level.level] = dict(level.roi)
    return out


_CACHE: OrderedDict[tuple[int, str], Series] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 4


def series_source(result: VbqResult) -> Any:
    """Where the series of ``result`` can be read: its local folder, else the PACS (DICOMweb)."""
    series = result.series
    if series is None:
        raise ReviewError("this result has no image series", code="no-series")
    if series.local_path and Path(series.local_path).is_dir():
        return series.local_path

    # the study's recorded endpoint is provenance: only a configured PACS is contacted
    if not configured_endpoint(series.study.endpoint_url)[0]:
        raise ReviewError("the images of this series are not stored here and no PACS is "
                          "configured", code="no-images")
    try:
        return fetch_study_series(series.study.endpoint_url, series.study.study_instance_uid,
                                  series.series_instance_uid)
    except FetchError as exc:
        raise ReviewError(f"the PACS did not return the series: {exc}", code="pacs") from exc


def load_series(result: VbqResult) -> Series:
    """The series of ``result`` as an engine ``Series`` (a few kept in memory per process)."""
    key = (result.series_id or 0, result.series.local_path if result.series else "")
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    try:
        series = read_series(series_source(result))
    except EngineError as exc:
        raise ReviewError(str(exc), code=getattr(exc, "code", "engine-error")) from exc
    with _CACHE_LOCK:
        _CACHE[key] = series
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return series


def chosen_slice(result: VbqResult, series: Series) -> int:
    """The mid-sagittal slice: where the stored ROIs are, else the middle of the series."""
    slices = [int(r["slice_index"]) for r in stored_rois(result).values() if "slice_index" in r]
    if slices:
        return int(statistics.median_low(slices))
    return (series.pixels.shape[0] - 1) // 2


def default_window(image: np.ndarray) -> tuple[float, float]:
    """(centre, width) from the 1st–99th percentiles of the slice."""
    lo, hi = (float(v) for v in np.percentile(image, [1, 99]))
    return (lo + hi) / 2, max(hi - lo, 1.0)


def render_png(series: Series, *, slice_index: int, centre: float | None = None,
               width: float | None = None, rois: Mapping[str, Mapping[str, Any]] | None = None
               ) -> bytes:
    """One slice as an 8-bit greyscale PNG with the given window; ROIs burnt in if given."""
    from PIL import Image, ImageDraw

    if not 0 <= slice_index < series.pixels.shape[0]:
        raise ReviewError(f"slice {slice_index} is outside the series", code="slice")
    image = series.pixels[slice_index]
    d_centre, d_width = default_window(image)
    centre = d_centre if centre is None or not math.isfinite(centre) else centre
    width = d_width if width is None or not math.isfinite(width) or width <= 0 else width
    low = centre - width / 2
    scaled = np.clip((image - low) / width * 255.0, 0, 255).astype(np.uint8)
    picture = Image.fromarray(scaled, mode="L")
    if rois:
        picture = picture.convert("RGB")
        draw = ImageDraw.Draw(picture)
        for level, roi in rois.items():
            r, c = float(roi["row"]), float(roi["col"])
            hh, hw = float(roi["half_height"]), float(roi["half_width"])
            colour = (80, 200, 255) if level == "csf" else (255, 200, 40)
            draw.ellipse([c - hw, r - hh, c + hw, r + hh], outline=colour, width=2)
            draw.text((c + hw + 3, r - 6), level, fill=colour)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=False, compress_level=3)
    return buffer.getvalue()


def parse_rois(data: Any, *, n_slices: int, shape: tuple[int, int]) -> dict[str, Roi]:
    """Validate reviewer ROIs from a request (level → {slice_index,row,col,half_height,
    half_width}). Raises ``ReviewError`` naming the first bad field."""
    if not isinstance(data, Mapping) or not data:
        raise ReviewError("send the ROIs as an object: level → ellipse", code="rois")
    rois: dict[str, Roi] = {}
    for level, raw in data.items():
        if not isinstance(level, str) or not ANY_LEVEL.match(level):
            raise ReviewError(f"unknown ROI level {str(level)[:8]!r}", code="rois")
        if not isinstance(raw, Mapping):
            raise ReviewError(f"the {level} ROI must be an object", code="rois")
        try:
            values = {k: float(raw[k]) for k in ("slice_index", "row", "col", "half_height",
                                                  "half_width")}
        except (KeyError, TypeError, ValueError) as exc:
            raise ReviewError(f"the {level} ROI needs numeric slice_index, row, col, "
                              "half_height and half_width", code="rois") from exc
        if not all(math.isfinite(v) for v in values.values()):
            raise ReviewError(f"the {level} ROI has a non-finite number", code="rois")
        s = int(values["slice_index"])
        if not 0 <= s < n_slices:
            raise ReviewError(f"the {level} ROI is on slice {s}, outside the series", code="rois")
        if not (0 <= values["row"] < shape[0] and 0 <= values["col"] < shape[1]):
            raise ReviewError(f"the {level} ROI centre is outside the image", code="rois")
        if not (1 <= values["half_height"] <= shape[0] / 2 and
                1 <= values["half_width"] <= shape[1] / 2):
            raise ReviewError(f"the {level} ROI size is out of range", code="rois")
        rois[level] = Roi(slice_index=s, row=values["row"], col=values["col"],
                          half_height=values["half_height"], half_width=values["half_width"])
    return rois


def parse_levels(values: Iterable[Any]) -> list[str]:
    levels = sorted({str(v).strip().upper() for v in values if str(v).strip()})
    bad = [lv for lv in levels if lv not in VBQ_LEVELS]
    if bad:
        raise ReviewError(f"fractured levels must be among L1–L4, not {bad[0][:8]!r}",
                          code="levels")
    return levels


def review_preview(*, result: VbqResult, rois: Mapping[str, Roi],
                   fractured_levels: Iterable[str]) -> VbqMeasurement:
    """The engine's answer for reviewer ROIs, without saving anything."""
    series = load_series(result)
    try:
        return compute_vbq(series.datasets, manual_rois=rois, fractured_levels=fractured_levels)
    except EngineError as exc:
        raise ReviewError(str(exc), code=getattr(exc, "code", "engine-error")) from exc


def save_outcome(*, result: VbqResult, measurement: VbqMeasurement) -> dict[str, Any]:
    """What saving ``measurement`` as a corrected result of ``result`` would do: ``counts``
    (True: accepted and used by the follow-up at once) and the reasons it would wait in the
    needs-review queue instead (QC warnings; a change of the VBQ category against the value
    the rules use now or the value being corrected)."""

    reasons = []
    if not qc_clear(measurement.qc_flags):
        reasons.append("QC warnings on the placed ROIs: "
                       + ", ".join(f.code for f in measurement.qc_flags
                                   if f.severity != "info"))
    value = rule_value(measurement.vbq_all_levels, measurement.vbq_excluding_fractured)
    field = measurement.acquisition.field_strength_t
    current = rule_result(result.patient_id)
    references = []
    if current is not None:
        references.append(("the VBQ the follow-up uses now, result "
                           f"{current.pk}", rule_value(current.vbq_all_levels,
                                                       current.vbq_excluding_fractured)))
    references.append((f"result {result.pk}", rule_value(result.vbq_all_levels,
                                                         result.vbq_excluding_fractured)))
    crossing = category_change(value=value, field_strength_t=field, references=references)
    if crossing:
        reasons.append(crossing)
    cut = threshold_of(field)
    return {"counts": not reasons, "reasons": reasons, "crossing": crossing,
            "threshold": cut.value, "threshold_label": cut.label,
            "high": value is not None and value >= cut.value}


def measurement_summary(m: VbqMeasurement) -> dict[str, Any]:
    return {
        "status": m.status,
        "vbq_all_levels": m.vbq_all_levels,
        "vbq_excluding_fractured": m.vbq_excluding_fractured,
        "confidence": m.confidence,
        "qc_flags": [{"code": f.code, "message": f.message, "severity": f.severity}
                     for f in m.qc_flags],
        "levels": {k: {"median_si": v.median_si, "pixel_count": v.pixel_count}
                   for k, v in {**m.levels, **({"csf": m.csf} if m.csf else {})}.items()},
        "fractured_levels": m.fractured_levels,
    }


# --- writes --------------------------------------------------------------------------------


def next_revision(series_id: int, algorithm_version: str, source: str) -> int:
    """The revision number a new ``source`` result of ``series_id`` takes (the unique
    constraint's scope: series, version, source), for the manual and assisted writers."""
    latest = VbqResult.objects.filter(series_id=series_id, algorithm_version=algorithm_version,
                                      source=source).aggregate(m=Max("revision"))["m"]
    return (latest or 0) + 1


def _locked(result: VbqResult) -> VbqResult:
    return VbqResult.objects.select_for_update().get(pk=result.pk)


def review_save_corrected(*, result: VbqResult, rois: Mapping[str, Roi],
                          fractured_levels: Iterable[str], actor: Actor, note: str = ""
                          ) -> VbqResult:
    """Recompute with the reviewer's ROIs and save a NEW manual result (next revision).

    The images are read and measured before the transaction opens (a PACS fetch never holds
    row locks); the writes are one transaction."""
    fractured = parse_levels(fractured_levels)
    measurement = review_preview(result=result, rois=rois, fractured_levels=fractured)
    if measurement.vbq_all_levels is None:
        reasons = "; ".join(f.message for f in measurement.qc_flags) or "no VBQ"
        raise ReviewError(f"the corrected ROIs give no VBQ: {reasons}", code="no-vbq")
    with transaction.atomic():
        return _save_corrected(result=result, measurement=measurement, rois=rois, actor=actor,
                               note=note)


def _save_corrected(*, result: VbqResult, measurement: VbqMeasurement, rois: Mapping[str, Roi],
                    actor: Actor, note: str) -> VbqResult:
    """Write the corrected result. It is accepted (and moves alerts) only when its placed ROIs
    pass QC and it keeps the VBQ category; otherwise it waits in the needs-review queue with
    the reasons as QC flags (``scoring.trust``), and the follow-up keeps the value it had."""

    original = _locked(result)
    outcome = save_outcome(result=original, measurement=measurement)
    flags = [f.__dict__ for f in measurement.qc_flags]
    if outcome["crossing"]:
        flags.append({"code": CATEGORY_CHANGE, "message": outcome["crossing"],
                      "severity": "warning"})
    revision = next_revision(original.series_id, measurement.algorithm_version,
                             VbqResult.Source.MANUAL)
    now = timezone.now()
    new = VbqResult.objects.create(
        series_id=original.series_id, patient_id=original.patient_id,
        algorithm_version=measurement.algorithm_version, source=VbqResult.Source.MANUAL,
        revision=revision,
        status=measurement.status if outcome["counts"] else VbqResult.Status.NEEDS_REVIEW,
        review_status=(VbqResult.Review.ACCEPTED if outcome["counts"]
                       else VbqResult.Review.PENDING),
        vbq_all_levels=measurement.vbq_all_levels,
        vbq_excluding_fractured=measurement.vbq_excluding_fractured,
        csf_median_si=measurement.csf.median_si if measurement.csf else None,
        confidence=measurement.confidence,
        qc_flags=flags, qc_clear=qc_clear(flags),
        fractured_levels=measurement.fractured_levels, fractured_levels_by_reviewer=True,
        field_strength_t=measurement.acquisition.field_strength_t,
        measurement=measurement.to_dict(), started_at=now, finished_at=now,
        reviewer_id=actor.user_id, reviewed_at=now,
        review_note=(note or f"corrected from result {original.pk}")[:500],
    )
    rows = [m for m in (*measurement.levels.values(), *([measurement.csf] if measurement.csf
                                                        else [])) if m.level in STORED_LEVELS]
    VbqLevel.objects.bulk_create([
        VbqLevel(result=new, level=m.level, median_si=m.median_si, pixel_count=m.pixel_count,
                 centroid={"pixel": m.centroid_pixel, "lps_mm": m.centroid_lps_mm},
                 roi=m.roi.__dict__, fractured=m.fractured)
        for m in rows
    ])
    if original.review_status == VbqResult.Review.PENDING and outcome["counts"]:
        # superseded only by a result that counts: a queued correction leaves the value the
        # follow-up uses (and the alerts resting on it) as they are until it is accepted
        original.review_status = VbqResult.Review.REJECTED
        original.reviewer_id = actor.user_id
        original.reviewed_at = now
        original.review_note = f"superseded by corrected result {new.pk}"
        original.save(update_fields=["review_status", "reviewer", "reviewed_at", "review_note"])
    audit_record(actor=actor, action="create", object_type="VbqResult", object_id=str(new.pk),
                 patient_id=new.patient_id,
                 detail={"review": "corrected", "from_result": original.pk,
                         "revision": revision, "levels": sorted(rois),
                         "accepted": outcome["counts"],
                         **({"queued": outcome["reasons"]} if not outcome["counts"] else {})})
    followup_changed(new.patient_id)
    result_ready(new.pk)
    return new


@transaction.atomic
def review_decide(*, result: VbqResult, decision: str, actor: Actor, reason: str = "",
                  note: str = "") -> VbqResult:
    """Accept or reject a result. A rejection needs a coded reason."""
    locked = _locked(result)
    if decision == "accept":
        if locked.vbq_all_levels is None:
            raise ReviewError("a result without a VBQ value cannot be accepted: place the ROIs "
                              "and save a corrected result", code="no-vbq")
        status = VbqResult.Review.ACCEPTED
        text = note
    elif decision == "reject":
        if reason not in REJECT_REASONS:
            raise ReviewError("choose a reason for the rejection", code="reason")
        status = VbqResult.Review.REJECTED
        text = f"{reason}: {note}" if note else reason
    else:
        raise ReviewError(f"unknown decision {decision[:20]!r}", code="decision")
    locked.review_status = status
    locked.reviewer_id = actor.user_id
    locked.reviewed_at = timezone.now()
    locked.review_note = text[:500]
    locked.save(update_fields=["review_status", "reviewer", "reviewed_at", "review_note"])
    if status == VbqResult.Review.ACCEPTED and locked.series_id:
        # the other unreviewed results of this series (the one this corrected) are superseded
        VbqResult.objects.filter(series_id=locked.series_id,
                                 review_status=VbqResult.Review.PENDING).exclude(
            pk=locked.pk).update(review_status=VbqResult.Review.REJECTED,
                                 reviewer_id=actor.user_id, reviewed_at=locked.reviewed_at,
                                 review_note=f"superseded by accepted result {locked.pk}")
    audit_record(actor=actor, action="update", object_type="VbqResult", object_id=str(locked.pk),
                 patient_id=locked.patient_id,
                 detail={"review": decision, **({"reason": reason} if reason else {})})
    followup_changed(locked.patient_id)
    result_ready(locked.pk)
    return locked


@transaction.atomic
def review_mark_fractured(*, result: VbqResult, levels: Iterable[Any], actor: Actor
                          ) -> VbqResult:
    """Set the fractured levels of a result; the VBQ excluding fractured levels follows from
    the stored per-level medians (the same definition as the engine:
    ``scoring.fractured.apply_fractured_levels``, shared with the automatic recompute). The
    reviewer's choice is kept: the automatic recompute never overwrites it."""
    fractured = parse_levels(levels)
    locked = _locked(result)
    apply_fractured_levels(locked, fractured, by_reviewer=True)
    audit_record(actor=actor, action="update", object_type="VbqResult", object_id=str(locked.pk),
                 patient_id=locked.patient_id,
                 detail={"review": "fractured-levels", "levels": fractured})
    followup_changed(locked.patient_id)
    result_ready(locked.pk)
    return locked
