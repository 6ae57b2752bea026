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

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from scoring.engine import combine, learned
from scoring.engine.assisted import Seed, assisted_rois
from scoring.engine.bodies import series_directions
from scoring.engine.dicom_io import Series, describe_orientation, read_series
from scoring.engine.findings import (
    LABEL_DOUBT_PENALTY,
    MAX_MARROW_TO_CSF,
    Localisation,
    LocalisationError,
)
from scoring.engine.localize import localize
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
from scoring.engine.rois import roi_values
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
                    found_flags: list[QcFlag], missing_text: str,
                    max_marrow_to_csf: float | None = None) -> VbqMeasurement:
    """Measure body ROIs and a CSF ROI placed without the automatic localiser (external
    segmentation, assisted path, learned segmenter) with the same checks and confidence
    rules; ``max_marrow_to_csf``: a marrow/CSF ratio above it is flagged ``csf-too-dark``
    (the automatic path's check)."""
    confidence = 1.0
    for flag in found_flags:
        flags.append(flag)
        confidence -= {"csf-unclear": 0.3, "csf-not-at-l3": 0.1, "implausible-body": 0.4,
                       "levels-disagree": 0.6, "csf-outside-canal": 0.4,
                       "no-cross-check": 0.4, "learned-chain-irregular": 0.6,
                       "csf-off-classical-canal": 0.4,
                       "csf-disagree": LABEL_DOUBT_PENALTY,
                       "learned-chain-repaired": 0.6}.get(flag.code, 0.0)
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
    if marrow and max_marrow_to_csf is not None and (
            csf.median_si <= 0 or float(np.median(marrow)) > max_marrow_to_csf * csf.median_si):
        confidence -= LABEL_DOUBT_PENALTY
        flags.append(QcFlag("csf-too-dark", f"the CSF ROI is more than {max_marrow_to_csf:g} "
                            "times darker than the marrow (VBQ is rarely above 5): it may lie "
                            "on bone, ligament or air, not in the thecal sac"))
    confidence -= _signal_voids(series, levels, csf, flags)
    return _finish(result, source, levels, csf, fractured, flags, max(0.0, confidence))


def learned_mode() -> str:
    """``VBQ_LEARNED_SEGMENTER``: ``combine`` (default; ``replace`` is the same): every
    classical result that is not confident is cross-checked with the learned segmenter and the
    level names come from ``combine.decide`` (a confident classical result is not: see
    docs/engine.md); ``check-all``: as ``combine``, and a confident classical result is
    cross-checked too (``combine.confident_check``; ~0.2 s more per series, so not the
    default); ``fallback``: the learned placement is used only when the classical localiser
    found no column; ``off``: classical only."""
    value = os.environ.get(LEARNED_ENV_VAR, "combine").strip().lower()
    if value in ("off", "0", "false", "no"):
        return "off"
    if value in ("fallback", "check-all"):
        return value
    return "combine"


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


def _csf_checks(series: Series, placed: learned.LearnedPlacement, loc: Localisation | None
                ) -> list[QcFlag]:
    """The learned CSF ROI against the two canals: the learned one, and the one the classical
    localiser followed (when it found a column)."""
    out: list[QcFlag] = []
    csf = placed.rois.csf_roi
    if csf is None:
        return out
    r, c = round(csf.row), round(csf.col)
    near = placed.canal[max(r - 1, 0): r + 2, max(c - 1, 0): c + 2]
    if not near.any():
        out.append(QcFlag("csf-outside-canal", "the CSF ROI is not inside the canal the "
                          "learned segmenter found"))
    if loc is None:
        return out
    if not combine.csf_in_classical_canal(loc, csf.slice_index, csf.row, csf.col,
                                          series.pixel_spacing_mm):
        out.append(QcFlag("csf-off-classical-canal", "the CSF ROI is not on the canal the "
                          "classical localiser followed"))
    mine = roi_values(series.pixels[csf.slice_index], csf)
    theirs = roi_values(series.pixels[loc.csf_roi.slice_index], loc.csf_roi)
    if mine.size and theirs.size:
        a, b = float(np.median(mine)), float(np.median(theirs))
        if abs(a - b) > combine.CSF_AGREEMENT * max(min(a, b), 1.0):
            out.append(QcFlag("csf-disagree", f"the CSF ROIs of the learned segmenter and the "
                              f"classical localiser differ by more than "
                              f"{combine.CSF_AGREEMENT:.0%} ({a:g} against {b:g}): one of them "
                              "may hold cord, roots or a wall"))
    return out


def _auto(series: Series, fractured: list[str], flags: list[QcFlag], result: Any
          ) -> VbqMeasurement:
    """Automatic path: the classical localiser; a confident classical result stands. Otherwise
    (``learned_mode`` ``combine``, the default; in ``fallback`` only when the classical
    localiser found no column) the learned segmenter runs (``learned.learned_rois``) and
    ``combine.decide`` chooses the level names: the learned placement (measured like an
    external segmentation), the classical one, or the classical bodies renamed from the
    learned L5. Agreement between the two (``corroborated``) lifts the classical localiser's
    doubts about the level names; a disagreement, an irregular learned chain, no classical
    column to compare with, or a CSF ROI off either canal sends the result to review."""
    base_flags = list(flags)
    loc: Localisation | None = None
    try:
        loc = localize(series)
    except LocalisationError as exc:
        classical = _not_localised(result, "auto", flags, f"automatic localisation failed: "
                                   f"{exc}. Place the ROIs by hand or import a segmentation")
    else:
        classical = _classical(series, fractured, flags, result, loc)
    if classical.status == "succeeded":
        if loc is None or learned_mode() != "check-all":
            return classical
        return _check_confident(series, fractured, base_flags, result, loc, classical)
    if loc is not None and learned_mode() == "fallback":
        return classical
    learned_flags = list(base_flags)
    placed = _try_learned(series, learned_flags)
    if placed is None:
        classical.qc_flags.extend(f for f in learned_flags if f not in base_flags)
        return classical
    inferior = _inferior_px(series)
    chain = combine.chain_check(placed, series.pixel_spacing_mm, inferior)
    repaired = None if chain.regular else combine.repaired_placement(placed, series)
    decision = combine.decide(placed, loc, chain, repaired, None if repaired is None else
                              combine.chain_check(repaired, series.pixel_spacing_mm, inferior))
    if decision.placed is not None:
        placed = decision.placed
    if decision.use != "learned" and decision.loc is not None:
        penalty = 0.0 if decision.use == "relabelled" else 0.6
        chosen = dataclasses.replace(decision.loc, confidence=max(
            0.0, decision.loc.confidence - penalty), flags=[*decision.loc.flags,
                                                             *decision.flags])
        return _classical(series, fractured, list(base_flags), result, chosen)
    found = [*combine.learned_flags(placed, decision), *decision.flags,
             *_csf_checks(series, placed, loc)]
    return _measure_placed(series, fractured, learned_flags, result, "auto", placed.rois.rois,
                           placed.rois.csf_roi, found, "the learned segmentation has no",
                           max_marrow_to_csf=MAX_MARROW_TO_CSF)


def _check_confident(series: Series, fractured: list[str], base_flags: list[QcFlag],
                     result: Any, loc: Localisation, classical: VbqMeasurement
                     ) -> VbqMeasurement:
    """``check-all`` mode: a confident classical result cross-checked by the learned path
    (``combine.confident_check``); a disagreement sends it to review with the classical
    names, anything else leaves it as it is."""
    placed = _try_learned(series, list(base_flags))
    if placed is None:
        return classical
    chain = combine.chain_check(placed, series.pixel_spacing_mm, _inferior_px(series))
    flag = combine.confident_check(placed, loc, chain)
    if flag is None:
        return classical
    chosen = dataclasses.replace(loc, confidence=max(0.0, loc.confidence - 0.6),
                                 flags=[*loc.flags, flag])
    return _classical(series, fractured, list(base_flags), result, chosen)


def _inferior_px(series: Series) -> tuple[float, float]:
    """The head→feet direction on a slice, (row mm, column mm)."""
    inferior, _ = series_directions(series)
    return float(inferior[0]), float(inferior[1])


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
