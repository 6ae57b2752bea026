"""VBQ from a series: protocol QC, ROI statistics, and the measurement. Pure (numpy).

Paths:
- ``manual_rois`` (level → ``Roi``, including ``"csf"``): a reviewer's ROIs; the engine only
  measures. This path is exact and is the reference for the others.
- ``segmentation``: an external label map / DICOM SEG gives the slice, bodies and CSF
  (``segimport.segmentation_rois``), no automatic localiser.
- ``seed``: one click inside a named body; ``assisted.assisted_rois`` counts the other
  bodies along the spine and finds the CSF behind L3 (source ``assisted``, always reviewed).
- automatic (no ROIs): ``scoring.engine.localize`` finds the mid-sagittal slice, labels the
  levels and places the ROIs; a result below ``REVIEW_BELOW_CONFIDENCE`` or whose localisation
  failed is ``needs_review`` with the reasons, never a silent guess.

VBQ = median(median SI of L1, L2, L3, L4 ROIs) / median SI of the CSF ROI at L3 (Kadri et al.
2025). ``vbq_excluding_fractured`` drops the fractured levels given by the caller.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from scoring.engine import learned
from scoring.engine.assisted import Seed, assisted_rois
from scoring.engine.dicom_io import Series, describe_orientation, read_series
from scoring.engine.localize import LocalisationError, localize
from scoring.engine.model import (
    VBQ_LEVELS,
    EngineError,
    LevelMeasurement,
    QcFlag,
    Roi,
    TooFewSlicesError,
    VbqMeasurement,
)
from scoring.engine.roi_qc import placed_roi_qc
from scoring.engine.segimport import segmentation_rois

TR_RANGE_MS = (350.0, 900.0)
TE_RANGE_MS = (6.0, 25.0)
MIN_SLICES = 3
MIN_ROI_PIXELS = 20
REVIEW_BELOW_CONFIDENCE = 0.7
LEARNED_ENV_VAR = "VBQ_LEARNED_SEGMENTER"


def protocol_qc(series: Series) -> list[QcFlag]:
    """Reasons this series is not a non-contrast, non-fat-suppressed sagittal T1."""
    flags: list[QcFlag] = []
    plane = describe_orientation(series.normal)
    if plane != "sagittal":
        flags.append(QcFlag("not-sagittal", f"the series is {plane}, VBQ needs sagittal images",
                            "refusal"))
    acq = series.acquisition
    text = " ".join([acq.series_description, acq.sequence_name]).upper()
    options = " ".join(str(ds.get("ScanOptions", "")) for ds in series.datasets[:1]).upper()
    if (acq.echo_time_ms is not None and acq.echo_time_ms > 40) or " T2" in f" {text}" or (
        "STIR" in text
    ):
        flags.append(QcFlag("t2-like", "T2-weighted or STIR contrast (long TE or T2 in the "
                            "description): VBQ needs T1", "refusal"))
    if "FS" in options.split() or "FATSAT" in text.replace(" ", "") or " FS" in f" {text}" or (
        "FAT SAT" in text or ("DIXON" in text and "W" in text)
    ):
        flags.append(QcFlag("fat-suppressed", "fat-suppressed images: marrow signal is not "
                            "comparable", "refusal"))
    if any(ds.get("ContrastBolusAgent") for ds in series.datasets[:1]) or "GAD" in text or (
        "POST" in text
    ):
        flags.append(QcFlag("contrast", "contrast-enhanced images: VBQ needs non-contrast T1",
                            "refusal"))
    if acq.repetition_time_ms is not None and not (
        TR_RANGE_MS[0] <= acq.repetition_time_ms <= TR_RANGE_MS[1]
    ):
        flags.append(QcFlag("tr-out-of-range", f"TR {acq.repetition_time_ms:g} ms outside "
                            f"{TR_RANGE_MS[0]:g}–{TR_RANGE_MS[1]:g} ms"))
    if acq.echo_time_ms is not None and not (TE_RANGE_MS[0] <= acq.echo_time_ms <= TE_RANGE_MS[1]):
        flags.append(QcFlag("te-out-of-range", f"TE {acq.echo_time_ms:g} ms outside "
                            f"{TE_RANGE_MS[0]:g}–{TE_RANGE_MS[1]:g} ms"))
    if series.pixels.shape[0] < MIN_SLICES:
        flags.append(QcFlag("too-few-slices", f"{series.pixels.shape[0]} slice(s): the "
                            "mid-sagittal slice cannot be chosen", "refusal"))
    return flags


def _roi_box(shape: tuple[int, int], roi: Roi
             ) -> tuple[tuple[slice, slice], np.ndarray] | None:
    """The ROI's bounding box in the image and its inside mask there (``None``: empty)."""
    reach = float(np.hypot(roi.half_height, roi.half_width)) + 1.0
    if not (np.isfinite(reach) and np.isfinite(roi.row) and np.isfinite(roi.col)):
        return None
    r0, r1 = max(0, int(roi.row - reach)), min(shape[0], int(roi.row + reach) + 2)
    c0, c1 = max(0, int(roi.col - reach)), min(shape[1], int(roi.col + reach) + 2)
    if r0 >= r1 or c0 >= c1:
        return None
    rr, cc = np.ogrid[r0:r1, c0:c1]
    dr, dc = rr - roi.row, cc - roi.col
    if roi.angle_deg:
        a = np.radians(roi.angle_deg)
        u = dr * np.cos(a) + dc * np.sin(a)
        v = -dr * np.sin(a) + dc * np.cos(a)
    else:
        u, v = dr, dc
    if roi.shape == "box":
        inside = (np.abs(u) <= roi.half_height) & (np.abs(v) <= roi.half_width)
    else:
        inside = (u / max(roi.half_height, 0.5)) ** 2 + (v / max(roi.half_width, 0.5)) ** 2 <= 1.0
    return (slice(r0, r1), slice(c0, c1)), inside


def roi_mask(shape: tuple[int, int], roi: Roi) -> np.ndarray:
    """Boolean mask of the ROI (computed inside its bounding box only)."""
    mask = np.zeros(shape, bool)
    box = _roi_box(shape, roi)
    if box is not None:
        mask[box[0]] = box[1]
    return mask


def roi_values(image: np.ndarray, roi: Roi) -> np.ndarray:
    """The pixel values inside the ROI (row-major order, as ``image[roi_mask(...)]``)."""
    box = _roi_box(image.shape, roi)
    if box is None:
        return image[:0, 0]
    return image[box[0]][box[1]]


def measure_roi(series: Series, level: str, roi: Roi, fractured: bool = False
                ) -> LevelMeasurement:
    if not 0 <= roi.slice_index < series.pixels.shape[0]:
        raise EngineError(f"the {level} ROI is on slice {roi.slice_index}, outside the series")
    values = roi_values(series.pixels[roi.slice_index], roi)
    if values.size < MIN_ROI_PIXELS:
        raise EngineError(f"the {level} ROI covers {values.size} pixels (minimum "
                          f"{MIN_ROI_PIXELS}): draw it larger")
    return LevelMeasurement(
        level=level, median_si=float(np.median(values)), pixel_count=int(values.size), roi=roi,
        centroid_pixel=(roi.slice_index, float(roi.row), float(roi.col)),
        centroid_lps_mm=series.patient_lps(roi.slice_index, roi.row, roi.col),
        fractured=fractured,
    )


def _vbq(levels: Mapping[str, LevelMeasurement], csf: LevelMeasurement,
         exclude: Iterable[str] = ()) -> float | None:
    excluded = set(exclude)
    values = [levels[lv].median_si for lv in VBQ_LEVELS if lv in levels and lv not in excluded]
    if not values or csf.median_si <= 0:
        return None
    return float(np.median(values)) / csf.median_si


def compute_vbq(
    source: Any,
    *,
    fractured_levels: Iterable[str] = (),
    manual_rois: Mapping[str, Roi] | None = None,
    segmentation: str | Path | None = None,
    segmentation_labels: str | Mapping[Any, str] | None = None,
    seed: Seed | Mapping[str, Any] | None = None,
) -> VbqMeasurement:
    """Measure VBQ on ``source`` (folder, file paths, or pydicom Datasets).

    Four paths, one result type: ``manual_rois`` (level → ``Roi`` incl. ``"csf"``), an
    external ``segmentation`` (NIfTI label map with ``segmentation_labels``, or DICOM SEG;
    slice, bodies and CSF from it alone), a ``seed`` (one click inside a named body:
    ``assisted.Seed`` or a mapping with level, slice_index, row, col; source ``assisted``,
    always ``needs_review``), or none of them (automatic).

    Raises a typed ``EngineError`` for unreadable/empty/non-image/wrong-modality input or
    invalid ROIs / segmentation. Protocol problems do not raise: they come back as
    ``status="failed"`` with ``qc_flags`` of severity ``refusal``.
    """
    series = read_series(source)
    if series.pixels.shape[0] < MIN_SLICES:
        raise TooFewSlicesError(f"the series has {series.pixels.shape[0]} image(s); VBQ needs a "
                                f"sagittal series of at least {MIN_SLICES} slices to find the "
                                "mid-sagittal slice")
    fractured = sorted({lv.strip().upper() for lv in fractured_levels})
    flags = protocol_qc(series)

    def result(**kw: Any) -> VbqMeasurement:
        return VbqMeasurement(series_instance_uid=series.series_instance_uid,
                              acquisition=series.acquisition, fractured_levels=fractured, **kw)

    source = ("manual" if manual_rois else "external-seg" if segmentation
              else "assisted" if seed is not None else "auto")
    if any(f.severity == "refusal" for f in flags):
        return result(status="failed", source=source,
                      vbq_all_levels=None, vbq_excluding_fractured=None, confidence=0.0,
                      qc_flags=flags)
    if segmentation and not manual_rois:
        return _external(series, fractured, flags, result, segmentation, segmentation_labels)
    if seed is not None and not manual_rois:
        return _assisted(series, fractured, flags, result, seed)
    if not manual_rois:
        return _auto(series, fractured, flags, result)
    rois = {k.strip(): v for k, v in manual_rois.items()}
    missing = [lv for lv in (*VBQ_LEVELS, "csf") if lv not in rois]
    if "csf" in missing:
        raise EngineError("a CSF ROI (at L3) is required")
    levels = {lv: measure_roi(series, lv, roi, lv in fractured)
              for lv, roi in rois.items() if lv != "csf"}
    csf = measure_roi(series, "csf", rois["csf"])
    if missing:
        flags.append(QcFlag("missing-levels", f"no ROI for {', '.join(missing)}"))
    confidence = 1.0 if not missing else 0.6
    # placed ROIs get the automatic path's checks (size, contrast, position, voids)
    placed_flags, penalty = placed_roi_qc(series, levels, csf)
    flags.extend(placed_flags)
    confidence -= penalty + _signal_voids(series, levels, csf, flags)
    return _finish(result, "manual", levels, csf, fractured, flags, max(0.0, confidence))


def _finish(result: Any, source: str, levels: dict[str, LevelMeasurement],
            csf: LevelMeasurement, fractured: list[str], flags: list[QcFlag],
            confidence: float) -> VbqMeasurement:
    vbq_all = _vbq(levels, csf)
    vbq_excl = _vbq(levels, csf, fractured)
    if vbq_excl is None and vbq_all is not None:
        flags.append(QcFlag("all-levels-fractured", "every measured level is fractured"))
    status = "succeeded" if confidence >= REVIEW_BELOW_CONFIDENCE and vbq_all else "needs_review"
    out: VbqMeasurement = result(status=status, source=source, vbq_all_levels=vbq_all,
                                 vbq_excluding_fractured=vbq_excl,
                                 confidence=round(confidence, 3), qc_flags=flags,
                                 levels=levels, csf=csf)
    return out


def _not_localised(result: Any, source: str, flags: list[QcFlag], message: str
                   ) -> VbqMeasurement:
    """No value when the column could not be localised: ``needs_review`` with the reason."""
    flags.append(QcFlag("localisation-failed", message, "warning"))
    out: VbqMeasurement = result(status="needs_review", source=source, vbq_all_levels=None,
                                 vbq_excluding_fractured=None, confidence=0.0, qc_flags=flags)
    return out


def _external(series: Series, fractured: list[str], flags: list[QcFlag], result: Any,
              segmentation: str | Path, labels: str | Mapping[Any, str] | None
              ) -> VbqMeasurement:
    """Bodies, mid-sagittal slice and CSF from an external segmentation alone
    (``segimport.segmentation_rois``; no automatic localisation)."""
    seg = segmentation_rois(segmentation, series, labels)
    return _measure_placed(series, fractured, flags, result, "external-seg", seg.rois,
                           seg.csf_roi, seg.flags, "the segmentation has no")


def _assisted(series: Series, fractured: list[str], flags: list[QcFlag], result: Any,
              seed: Seed | Mapping[str, Any]) -> VbqMeasurement:
    """Bodies and CSF placed from one click (``assisted.assisted_rois``); the result always
    goes to review, and without a value when a level or the CSF was not found."""
    placed = assisted_rois(series, seed)
    missing = [lv for lv in VBQ_LEVELS if lv not in placed.rois]
    if missing or placed.csf_roi is None:
        flags.extend(placed.flags)
        what = f"{', '.join(missing)} not found" if missing else "the CSF not found"
        reasons = "; ".join(f.message for f in placed.flags if f.code != "assisted-placement")
        return _not_localised(result, "assisted", flags, f"assisted placement: {what}"
                              f"{': ' + reasons if reasons else ''}. Place the ROIs by hand")
    out = _measure_placed(series, fractured, flags, result, "assisted", placed.rois,
                          placed.csf_roi, placed.flags, "no body found for")
    if out.status == "succeeded":
        out.status = "needs_review"
    return out


def _measure_placed(series: Series, fractured: list[str], flags: list[QcFlag], result: Any,
                    source: str, rois: Mapping[str, Roi], csf_roi: Roi | None,
                    found_flags: list[QcFlag], missing_text: str) -> VbqMeasurement:
    """Measure body ROIs and a CSF ROI placed without the automatic localiser (external
    segmentation, assisted path) with the same checks and confidence rules."""
    confidence = 1.0
    for flag in found_flags:
        flags.append(flag)
        confidence -= {"csf-unclear": 0.3, "csf-not-at-l3": 0.1, "implausible-body": 0.4,
                       "levels-disagree": 0.6, "csf-outside-canal": 0.4,
                       "no-cross-check": 0.4}.get(flag.code, 0.0)
    if csf_roi is None:
        reasons = "; ".join(f.message for f in found_flags) or "the CSF was not found"
        return _not_localised(result, source, flags, f"{reasons}. Place the CSF ROI by hand")
    missing = [lv for lv in VBQ_LEVELS if lv not in rois]
    if missing:
        flags.append(QcFlag("missing-levels", f"{missing_text} {', '.join(missing)}"))
        confidence -= 0.4
    levels: dict[str, LevelMeasurement] = {}
    for lv, roi in rois.items():
        try:
            levels[lv] = measure_roi(series, lv, roi, lv in fractured)
        except EngineError:
            if lv in VBQ_LEVELS:
                confidence -= 0.3
                flags.append(QcFlag("small-roi", f"the {lv} ROI is too small to measure"))
    try:
        csf = measure_roi(series, "csf", csf_roi)
    except EngineError as exc:
        return _not_localised(result, source, flags, f"{exc}. Place the CSF ROI by hand")
    marrow = [levels[lv].median_si for lv in VBQ_LEVELS if lv in levels]
    if marrow and csf.median_si > 0 and float(np.median(marrow)) < 1.1 * csf.median_si:
        confidence -= 0.5
        flags.append(QcFlag("weak-marrow-contrast", "marrow is not brighter than CSF as on a "
                            "T1 image: check the series and the ROIs"))
    confidence -= _signal_voids(series, levels, csf, flags)
    return _finish(result, source, levels, csf, fractured, flags, max(0.0, confidence))


def learned_mode() -> str:
    """``VBQ_LEARNED_SEGMENTER``: ``fallback`` (default: the learned placement replaces the
    classical result only when the classical localiser found no column), ``replace`` (it
    replaces every classical result that is not confident: best on the real set, but it takes
    the SYNTHETIC phantoms' sacrum for L5, see docs/engine.md) or ``off``."""
    value = os.environ.get(LEARNED_ENV_VAR, "fallback").strip().lower()
    if value in ("off", "0", "false", "no"):
        return "off"
    return "replace" if value == "replace" else "fallback"


def learned_enabled() -> bool:
    """Whether the automatic path may use the learned segmenter (``learned_mode`` not off)."""
    return learned_mode() != "off"


def _try_learned(series: Series, flags: list[QcFlag]) -> learned.LearnedPlacement | None:
    if not learned_enabled():
        return None
    if not learned.available():
        flags.append(QcFlag("learned-unavailable", "the learned segmenter is unavailable ("
                            f"{learned.unavailable_reason}): classical localiser only", "info"))
        return None
    try:
        return learned.learned_rois(series)
    except learned.LearnedError as exc:
        flags.append(QcFlag("learned-failed", f"{exc}: classical localiser only", "info"))
        return None


def _cross_check(placed: learned.LearnedPlacement, loc: Any) -> list[QcFlag]:
    """Flags from comparing the learned placement with the classical localiser's: every
    classical L1–L4 ROI centre on the learned slice (±2 slices) must lie in the learned body of
    its level, and the CSF ROI centre in the learned canal."""
    out: list[QcFlag] = []
    csf = placed.rois.csf_roi
    if csf is not None:
        r, c = round(csf.row), round(csf.col)
        near = placed.canal[max(r - 1, 0): r + 2, max(c - 1, 0): c + 2]
        if not near.any():
            out.append(QcFlag("csf-outside-canal", "the CSF ROI is not inside the canal the "
                              "learned segmenter found"))
    if loc is None:
        out.append(QcFlag("no-cross-check", "the classical localiser found no column to check "
                          "the learned levels against"))
        return out
    wrong = []
    for lv in VBQ_LEVELS:
        body = loc.bodies.get(lv)
        mask = placed.bodies.get(lv)
        if body is None or mask is None:
            continue
        roi = body.roi
        r, c = round(roi.row), round(roi.col)
        inside = (0 <= r < mask.shape[0] and 0 <= c < mask.shape[1]
                  and bool(mask[max(r - 1, 0): r + 2, max(c - 1, 0): c + 2].any()))
        if abs(roi.slice_index - placed.mid_slice) > 2 or not inside:
            wrong.append(lv)
    if wrong:
        out.append(QcFlag("levels-disagree", "the learned segmenter and the classical "
                          f"localiser disagree at {', '.join(wrong)}: check the level labels"))
    return out


def _auto(series: Series, fractured: list[str], flags: list[QcFlag], result: Any
          ) -> VbqMeasurement:
    """Automatic path: the classical localiser; when it found no column (``learned_mode``
    ``fallback``, the default) or its result is not confident (``replace``), the learned
    segmenter (``learned.learned_rois``, measured like an
    external segmentation and cross-checked against the classical levels: a disagreement,
    no classical column to compare with, or a CSF ROI outside the learned canal sends it to
    review). The learned placement replaces the classical result when it has one; otherwise
    the classical result stands, with the learned path's reason as an info flag."""
    base_flags = list(flags)
    loc: Any = None
    try:
        loc = localize(series)
    except LocalisationError as exc:
        classical = _not_localised(result, "auto", flags, f"automatic localisation failed: "
                                   f"{exc}. Place the ROIs by hand or import a segmentation")
    else:
        classical = _classical(series, fractured, flags, result, loc)
    if classical.status == "succeeded":
        return classical
    if loc is not None and learned_mode() != "replace":
        return classical
    learned_flags = list(base_flags)
    placed = _try_learned(series, learned_flags)
    if placed is None:
        classical.qc_flags.extend(f for f in learned_flags if f not in base_flags)
        return classical
    found = [*placed.rois.flags, *_cross_check(placed, loc)]
    return _measure_placed(series, fractured, learned_flags, result, "auto", placed.rois.rois,
                           placed.rois.csf_roi, found, "the learned segmentation has no")


def _classical(series: Series, fractured: list[str], flags: list[QcFlag], result: Any,
               loc: Any) -> VbqMeasurement:
    """Measure the classical localiser's bodies and CSF ROI and check the result."""
    flags.extend(loc.flags)
    confidence = loc.confidence
    levels: dict[str, LevelMeasurement] = {}
    for lv, body in loc.bodies.items():
        try:
            m = measure_roi(series, lv, body.roi, lv in fractured)
        except EngineError:
            confidence -= 0.3 if lv in VBQ_LEVELS else 0.0
            flags.append(QcFlag("small-roi", f"the {lv} ROI is too small to measure"))
            continue
        m.suggested_fractured = body.suggested_fractured
        m.height_ratio = None if body.height_ratio is None else round(body.height_ratio, 3)
        levels[lv] = m
    csf = measure_roi(series, "csf", loc.csf_roi)
    suggested = [lv for lv, m in levels.items() if m.suggested_fractured]
    if suggested:
        flags.append(QcFlag("suggested-fracture", f"height loss of 20 % or more at "
                            f"{', '.join(suggested)}: confirm and pass them as fractured "
                            "levels", "info"))
    if csf.pixel_count < 40:
        confidence -= 0.2
        flags.append(QcFlag("small-csf-roi", f"the CSF ROI holds {csf.pixel_count} pixels"))
    marrow = [levels[lv].median_si for lv in VBQ_LEVELS if lv in levels]
    if marrow and csf.median_si > 0 and float(np.median(marrow)) < 1.1 * csf.median_si:
        confidence -= 0.5
        flags.append(QcFlag("weak-marrow-contrast", "marrow is not brighter than CSF as on a "
                            "T1 image: check the series and the ROIs"))
    confidence -= _signal_voids(series, levels, csf, flags)
    return _finish(result, "auto", levels, csf, fractured, flags, max(0.0, confidence))


def _signal_voids(series: Series, levels: Mapping[str, LevelMeasurement],
                  csf: LevelMeasurement, flags: list[QcFlag]) -> float:
    """Flag L1–L4 ROIs that are largely darker than half the CSF: on T1 that is a signal void
    (cement, hardware, sclerosis), not marrow. The level is kept in the value but the result
    goes to review; returns the confidence penalty."""
    void_levels = []
    for lv in VBQ_LEVELS:
        if lv not in levels:
            continue
        m = levels[lv]
        values = roi_values(series.pixels[m.roi.slice_index], m.roi)
        if values.size and float(np.mean(values < 0.5 * csf.median_si)) > 0.3:
            void_levels.append(lv)
    if not void_levels:
        return 0.0
    flags.append(QcFlag("signal-void", f"{', '.join(void_levels)}: large signal void in the "
                        "ROI (cement or hardware?): exclude the level or place ROIs by hand"))
    return 0.4
