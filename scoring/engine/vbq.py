"""VBQ from a series: protocol QC, ROI statistics, and the measurement. Pure (numpy).

Paths:
- ``manual_rois`` (level → ``Roi``, including ``"csf"``): a reviewer's ROIs; the engine only
  measures. This path is exact and is the reference for the others.
- automatic localisation: NOT YET IMPLEMENTED in this version. Without ROIs the engine runs
  protocol QC and returns ``needs_review`` with the reason, never a guessed value.

VBQ = median(median SI of L1, L2, L3, L4 ROIs) / median SI of the CSF ROI at L3 (Kadri et al.
2025). ``vbq_excluding_fractured`` drops the fractured levels given by the caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from scoring.engine.dicom_io import Series, describe_orientation, read_series
from scoring.engine.model import (
    VBQ_LEVELS,
    EngineError,
    LevelMeasurement,
    QcFlag,
    Roi,
    VbqMeasurement,
)

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


def roi_mask(shape: tuple[int, int], roi: Roi) -> np.ndarray:
    rr, cc = np.ogrid[: shape[0], : shape[1]]
    if roi.shape == "box":
        return (np.abs(rr - roi.row) <= roi.half_height) & (np.abs(cc - roi.col) <= roi.half_width)
    return ((rr - roi.row) / max(roi.half_height, 0.5)) ** 2 + (
        (cc - roi.col) / max(roi.half_width, 0.5)) ** 2 <= 1.0


def measure_roi(series: Series, level: str, roi: Roi, fractured: bool = False
                ) -> LevelMeasurement:
    if not 0 <= roi.slice_index < series.pixels.shape[0]:
        raise EngineError(f"the {level} ROI is on slice {roi.slice_index}, outside the series")
    image = series.pixels[roi.slice_index]
    mask = roi_mask(image.shape, roi)
    values = image[mask]
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
) -> VbqMeasurement:
    """Measure VBQ on ``source`` (folder, file paths, or pydicom Datasets).

    Raises a typed ``EngineError`` for unreadable/empty/non-image/wrong-modality input or
    invalid ROIs. Protocol problems do not raise: they come back as ``status="failed"`` with
    ``qc_flags`` of severity ``refusal``.
    """
    series = read_series(source)
    fractured = sorted({lv.strip().upper() for lv in fractured_levels})
    flags = protocol_qc(series)

    def result(**kw: Any) -> VbqMeasurement:
        return VbqMeasurement(series_instance_uid=series.series_instance_uid,
                              acquisition=series.acquisition, fractured_levels=fractured, **kw)

    if any(f.severity == "refusal" for f in flags):
        return result(status="failed", source="manual" if manual_rois else "auto",
                      vbq_all_levels=None, vbq_excluding_fractured=None, confidence=0.0,
                      qc_flags=flags)
    if not manual_rois:
        flags.append(QcFlag("auto-localisation-unavailable", "automatic localisation of the "
                            "vertebral bodies and CSF is not available in this engine version: "
                            "place the ROIs by hand", "info"))
        return result(status="needs_review", source="auto", vbq_all_levels=None,
                      vbq_excluding_fractured=None, confidence=0.0, qc_flags=flags)
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
    vbq_all = _vbq(levels, csf)
    vbq_excl = _vbq(levels, csf, fractured)
    if vbq_excl is None and vbq_all is not None:
        flags.append(QcFlag("all-levels-fractured", "every measured level is fractured"))
    status = "succeeded" if confidence >= REVIEW_BELOW_CONFIDENCE and vbq_all else "needs_review"
    return result(status=status, source="manual", vbq_all_levels=vbq_all,
                  vbq_excluding_fractured=vbq_excl, confidence=confidence, qc_flags=flags,
                  levels=levels, csf=csf)
