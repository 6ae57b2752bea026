"""VBQ from a series: protocol QC, ROI statistics, and the measurement. Pure (numpy).

Paths:
- ``manual_rois`` (level → ``Roi``, including ``"csf"``): a reviewer's ROIs; the engine only
  measures. This path is exact and is the reference for the others.
- automatic (no ROIs): ``scoring.engine.localize`` finds the mid-sagittal slice, labels the
  levels and places the ROIs; a result below ``REVIEW_BELOW_CONFIDENCE`` or whose localisation
  failed is ``needs_review`` with the reasons, never a silent guess.

VBQ = median(median SI of L1, L2, L3, L4 ROIs) / median SI of the CSF ROI at L3 (Kadri et al.
2025). ``vbq_excluding_fractured`` drops the fractured levels given by the caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

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
from scoring.engine.segimport import rois_from_segmentation

TR_RANGE_MS = (350.0, 900.0)
TE_RANGE_MS = (6.0, 25.0)
MIN_SLICES = 3
MIN_ROI_PIXELS = 20
REVIEW_BELOW_CONFIDENCE = 0.7


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
) -> VbqMeasurement:
    """Measure VBQ on ``source`` (folder, file paths, or pydicom Datasets).

    Three paths, one result type: ``manual_rois`` (level → ``Roi`` incl. ``"csf"``), an
    external ``segmentation`` (NIfTI label map with ``segmentation_labels``, or DICOM SEG; the
    CSF ROI then comes from our localisation), or neither (automatic).

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

    source = "manual" if manual_rois else "external-seg" if segmentation else "auto"
    if any(f.severity == "refusal" for f in flags):
        return result(status="failed", source=source,
                      vbq_all_levels=None, vbq_excluding_fractured=None, confidence=0.0,
                      qc_flags=flags)
    if segmentation and not manual_rois:
        return _external(series, fractured, flags, result, segmentation, segmentation_labels)
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
    """Bodies from an external segmentation, CSF from our localisation."""
    try:
        loc = localize(series)
    except LocalisationError as exc:
        return _not_localised(result, "external-seg", flags, f"the CSF could not be localised: "
                              f"{exc}. Place the CSF ROI by hand")
    rois = rois_from_segmentation(segmentation, series, loc.mid_slice, loc.si_direction_px,
                                  labels)
    confidence = 1.0
    for flag in loc.flags:
        if flag.code in ("csf-unclear", "csf-not-at-l3"):
            flags.append(flag)
            confidence -= 0.3 if flag.code == "csf-unclear" else 0.1
    missing = [lv for lv in VBQ_LEVELS if lv not in rois]
    if missing:
        flags.append(QcFlag("missing-levels", f"the segmentation has no {', '.join(missing)}"))
        confidence -= 0.4
    levels = {lv: measure_roi(series, lv, roi, lv in fractured) for lv, roi in rois.items()}
    csf = measure_roi(series, "csf", loc.csf_roi)
    confidence -= _signal_voids(series, levels, csf, flags)
    return _finish(result, "external-seg", levels, csf, fractured, flags, max(0.0, confidence))


def _auto(series: Series, fractured: list[str], flags: list[QcFlag], result: Any
          ) -> VbqMeasurement:
    """Automatic path: localise, measure, and check the result is plausible."""
    try:
        loc = localize(series)
    except LocalisationError as exc:
        return _not_localised(result, "auto", flags, f"automatic localisation failed: {exc}. "
                              "Place the ROIs by hand or import a segmentation")
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
