"""SYNTHETIC imaging data for the clinic-page tests: a phantom series stored on disk the way the
DICOM receiver stores it, and a VBQ result waiting for review (with or without ROIs)."""

from __future__ import annotations

import uuid
from pathlib import Path

from scoring.engine import Roi, compute_vbq
from scoring.engine.phantom import make_phantom
from scoring.models import ImagingSeries, ImagingStudy, VbqLevel, VbqResult


def phantom_rois(truth: dict) -> dict[str, Roi]:
    """ROIs at the phantom's true level centres (bodies) and in the canal behind L3 (CSF)."""
    spacing = truth["spacing_mm"]
    rois = {}
    for level in ("L1", "L2", "L3", "L4"):
        s, row, col = truth["centres_px"][level]
        rois[level] = Roi(slice_index=s, row=row, col=col, half_height=6 / spacing,
                          half_width=9 / spacing)
    s, row, col = truth["centres_px"]["L3"]
    rois["csf"] = Roi(slice_index=s, row=row, col=col + 27 / spacing, half_height=8 / spacing,
                      half_width=3.5 / spacing)  # >= 40 pixels: no small-csf-roi flag
    return rois


def reviewable_result(patient, folder: Path, *, seed: int = 7, with_rois: bool = True
                      ) -> VbqResult:
    """A ``needs_review`` automatic result on a SYNTHETIC phantom written under ``folder``.

    With ``with_rois`` the result carries stored per-level ROI geometry (as an automatic
    localisation would leave it); without, the reviewer has to place them.
    """
    phantom = make_phantom(seed, fractured=())
    study_uid = phantom.datasets[0].StudyInstanceUID
    series_uid = phantom.datasets[0].SeriesInstanceUID
    series_dir = Path(folder) / study_uid / series_uid
    phantom.write(series_dir)
    study = ImagingStudy.objects.create(
        patient=patient, study_instance_uid=study_uid, source="upload", modality="MR",
        description="SYNTHETIC lumbar MRI")
    series = ImagingSeries.objects.create(
        study=study, series_instance_uid=series_uid, modality="MR",
        description="SAG T1 (SYNTHETIC)", local_path=str(series_dir))
    result = VbqResult.objects.create(
        series=series, patient=patient, algorithm_version="0.1.0", source="auto",
        status=VbqResult.Status.NEEDS_REVIEW, confidence=0.0,
        qc_flags=[{"code": "auto-localisation-unavailable", "severity": "info",
                   "message": "place the ROIs by hand"}] if not with_rois else
        [{"code": "low-confidence", "severity": "warning", "message": "SYNTHETIC test"}])
    if with_rois:
        measured = compute_vbq(str(series_dir), manual_rois=phantom_rois(phantom.truth))
        VbqResult.objects.filter(pk=result.pk).update(
            vbq_all_levels=measured.vbq_all_levels,
            vbq_excluding_fractured=measured.vbq_excluding_fractured, confidence=0.5)
        rows = [*measured.levels.values(), measured.csf]
        VbqLevel.objects.bulk_create([
            VbqLevel(result=result, level=m.level, median_si=m.median_si,
                     pixel_count=m.pixel_count, roi=m.roi.__dict__) for m in rows])
        result.refresh_from_db()
    result.truth = phantom.truth  # type: ignore[attr-defined]
    result.series_cols = int(phantom.datasets[0].Columns)  # type: ignore[attr-defined]
    return result


def unique_uid() -> str:
    return f"2.25.{uuid.uuid4().int}"
