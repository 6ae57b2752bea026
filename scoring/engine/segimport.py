"""External segmentations → vertebral-body ROIs and the CSF ROI. Pure (nibabel, highdicom,
numpy, scipy); no use of the automatic localiser.

Accepted inputs:
- a **NIfTI label map** (``.nii`` / ``.nii.gz``) with a label table (id → level). Presets:

  ``totalsegmentator`` (TotalSegmentator ``vertebrae_mr`` / ``total_mr`` vertebra order in
  ``map_to_binary``): 1 sacrum (→ S1), 2 vertebrae_L5, 3 L4, 4 L3, 5 L2, 6 L1, 7 T12.
  ``spineps`` (SPINEPS / TPTBox ``v_name2idx``): 19 T12, 20 L1, 21 L2, 22 L3, 23 L4, 24 L5,
  26 S1 (25 = L6 of a transitional spine is not a VBQ level and is ignored).

  Check the table against the segmentation tool's version; any other table can be given as a
  mapping (CLI: a JSON file ``{"4": "L3", ...}``).
- a **DICOM SEG** (read with highdicom) whose segments are labelled with the level
  (``L3``, ``vertebrae_L3``, ``Vertebra L3``, ``S1``/``sacrum`` …), referencing the series' images.

The label map is sampled onto the series' own pixel grid through the two affines (NIfTI RAS ↔
DICOM LPS), so it may come from a resampled or reoriented volume.

``segmentation_rois`` does the whole path from the segmentation alone:
1. **Mid-sagittal slice**: the slice of the series nearest the centroid of all L1–L4 voxels
   (projected on the slice normal; for a SEG, the area-weighted mean of its frames).
2. **Bodies**: on that slice each level's label, opened by a 2 mm disc, keeps its largest
   connected part (the body: the canal separates it from the posterior elements, which
   whole-vertebra labels include; the opening breaks thin partial-volume bridges) and gets
   the box of ``bodies.body_roi`` along its own axes (the automatic path's definition).
3. **CSF**: ``bodies.csf_roi_behind`` the L3 body (L2, then L4, with ``csf-not-at-l3``): the
   darkest band in the canal just behind its posterior wall, with thresholds from the body's
   own marrow and the band's level and sizes in millimetres, on the same slice (the
   reference measurement's definition; picking the darkest of three slices biases the CSF
   low by about one grey level on 8-bit data).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from scoring.engine.bodies import (
    BodyAxes,
    body_axes,
    body_roi,
    csf_roi_behind,
    largest_part,
    series_directions,
)
from scoring.engine.dicom_io import Series
from scoring.engine.model import VBQ_LEVELS, EngineError, QcFlag, Roi

TABLES: dict[str, dict[int, str]] = {
    "totalsegmentator": {1: "S1", 2: "L5", 3: "L4", 4: "L3", 5: "L2", 6: "L1", 7: "T12"},
    "spineps": {19: "T12", 20: "L1", 21: "L2", 22: "L3", 23: "L4", 24: "L5", 26: "S1"},
}
OPEN_MM = 2.0  # breaks bridges to the arch (see _opened)
CSF_LEVELS = ("L3", "L2", "L4")  # where the CSF is measured, in order of preference
_LEVEL = re.compile(r"\b(?:VERTEBRA(?:E)?[_ ]?)?([TLS])(\d{1,2})\b|\bSACRUM\b", re.I)


class SegmentationError(EngineError):
    code = "bad-segmentation"


def label_table(spec: str | Mapping[Any, str] | None) -> dict[int, str]:
    """A preset name, a JSON file path, or a mapping; ids as ints, levels upper-case."""
    if spec is None:
        return dict(TABLES["totalsegmentator"])
    if isinstance(spec, str):
        if spec in TABLES:
            return dict(TABLES[spec])
        try:
            spec = json.loads(Path(spec).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SegmentationError(f"label table {spec!r} is neither a preset "
                                    f"({', '.join(TABLES)}) nor a readable JSON file") from exc
    if not isinstance(spec, Mapping):
        raise SegmentationError("the label table must map integer ids to levels")
    try:
        return {int(k): str(v).strip().upper() for k, v in spec.items()}
    except (TypeError, ValueError) as exc:
        raise SegmentationError("the label table must map integer ids to levels") from exc


def _level_of(name: str) -> str | None:
    m = _LEVEL.search(name.replace("_", " "))
    if not m:
        return None
    return "S1" if m.group(1) is None else f"{m.group(1).upper()}{int(m.group(2))}"


def _series_lps(series: Series, slice_index: int) -> np.ndarray:
    """(rows, cols, 3) LPS coordinates (mm) of every pixel of a slice."""
    rows, cols = series.pixels.shape[1:]
    rr, cc = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    row_dir, col_dir = series.orientation[:3], series.orientation[3:]
    sp = series.pixel_spacing_mm
    return (series.positions[slice_index][None, None, :] + cc[..., None] * sp[1] * row_dir
            + rr[..., None] * sp[0] * col_dir)


class _NiftiMap:
    """A NIfTI label map read once, sampled (nearest voxel) on the series' slices."""

    def __init__(self, path: str | Path, table: dict[int, str]) -> None:
        import nibabel as nib

        try:
            img: Any = nib.load(str(path))
            data = np.asarray(img.dataobj)
            affine = np.asarray(img.affine, float)
        except Exception as exc:  # nibabel raises many types for bad files
            raise SegmentationError(f"{Path(path).name} is not a readable NIfTI label map "
                                    f"({type(exc).__name__})") from exc
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise SegmentationError("the label map must be a 3-D volume")
        if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
            raise SegmentationError("the label map's affine is not invertible")
        self.data = data
        self.affine = affine
        self.table = table

    def on_slice(self, series: Series, slice_index: int) -> np.ndarray:
        lps = _series_lps(series, slice_index)
        ras = lps * np.array([-1.0, -1.0, 1.0])
        homog = np.concatenate([ras, np.ones((*ras.shape[:2], 1))], axis=-1)
        vox = np.rint(homog @ np.linalg.inv(self.affine).T)[..., :3].astype(int)
        inside = np.all((vox >= 0) & (vox < np.array(self.data.shape)), axis=-1)
        out = np.zeros(lps.shape[:2], np.int32)
        v = vox[inside]
        out[inside] = self.data[v[:, 0], v[:, 1], v[:, 2]]
        return out

    def mid_slice(self, series: Series, ids: list[int]) -> int | None:
        """The series slice nearest the centroid of the voxels labelled ``ids``."""
        voxels = np.argwhere(np.isin(self.data, ids))
        if voxels.size == 0:
            return None
        centre_ras = self.affine[:3, :3] @ voxels.mean(axis=0) + self.affine[:3, 3]
        centre_lps = centre_ras * np.array([-1.0, -1.0, 1.0])
        offsets = (series.positions - centre_lps) @ series.normal
        return int(np.argmin(np.abs(offsets)))


class _DicomSegMap:
    """A DICOM SEG's segments (numbers matched to levels by their labels) per source image."""

    def __init__(self, path: str | Path, series: Series) -> None:
        import highdicom as hd

        try:
            self.seg = hd.seg.segread(str(path))
        except Exception as exc:
            raise SegmentationError(f"{Path(path).name} is not a readable DICOM SEG "
                                    f"({type(exc).__name__})") from exc
        self.table: dict[int, str] = {}
        for desc in self.seg.SegmentSequence:
            level = _level_of(str(desc.SegmentLabel))
            if level:
                self.table[int(desc.SegmentNumber)] = level
        if not self.table:
            raise SegmentationError("no segment of the SEG is labelled with a vertebral level")
        referenced = {str(uid[2]) for uid in self.seg.get_source_image_uids()}
        self.uids = [str(ds.SOPInstanceUID) for ds in series.datasets]
        self.covered = [i for i, uid in enumerate(self.uids) if uid in referenced]
        if not self.covered:
            raise SegmentationError("the SEG does not reference any image of this series")

    def on_slice(self, series: Series, slice_index: int) -> np.ndarray:
        if slice_index not in self.covered:
            return np.zeros(series.pixels.shape[1:], np.int32)
        try:
            pixels = self.seg.get_pixels_by_source_instance(
                source_sop_instance_uids=[self.uids[slice_index]],
                segment_numbers=sorted(self.table), combine_segments=True,
                skip_overlap_checks=True)
        except (ValueError, KeyError, AttributeError, IndexError) as exc:
            raise SegmentationError("the SEG cannot be read on the images of this "
                                    "series") from exc
        return np.asarray(pixels[0]).astype(np.int32)

    def mid_slice(self, series: Series, ids: list[int]) -> int | None:
        areas = np.array([float(np.isin(self.on_slice(series, i), ids).sum())
                          for i in self.covered])
        if areas.sum() == 0:
            return None
        return round(float(np.average(self.covered, weights=areas)))


def nifti_labels_on_slice(path: str | Path, series: Series, slice_index: int) -> np.ndarray:
    """The NIfTI label map sampled (nearest voxel) on one slice of the series."""
    return _NiftiMap(path, {}).on_slice(series, slice_index)


@dataclass
class SegmentationRois:
    """What the segmentation gives on its mid-sagittal slice: body ROIs per level, the CSF ROI
    (``None`` when not found: see ``flags``), the level it was taken at, and QC flags."""

    mid_slice: int
    rois: dict[str, Roi]
    csf_roi: Roi | None
    csf_level: str | None
    flags: list[QcFlag] = field(default_factory=list)


def segmentation_rois(path: str | Path, series: Series,
                      table: str | Mapping[Any, str] | None = None) -> SegmentationRois:
    """Mid-sagittal slice, level → body ROI and the CSF ROI from a NIfTI label map or a DICOM
    SEG alone (see the module docstring). Raises ``SegmentationError`` when the file cannot be
    read or holds no L1–L4 vertebra of the label table on this series."""
    name = str(path).lower()
    label_map: _NiftiMap | _DicomSegMap
    if name.endswith((".nii", ".nii.gz")):
        label_map = _NiftiMap(path, label_table(table))
    else:
        label_map = _DicomSegMap(path, series)
    ids = {level: i for i, level in label_map.table.items()}
    vbq_ids = [ids[lv] for lv in VBQ_LEVELS if lv in ids]
    mid = label_map.mid_slice(series, vbq_ids) if vbq_ids else None
    if mid is None:
        raise SegmentationError("the segmentation holds no vertebra of the label table "
                                "(L1–L4) on this series")
    return rois_from_labels(label_map.on_slice(series, mid), label_map.table, series, mid)


def rois_from_labels(labels: np.ndarray, table: Mapping[int, str], series: Series,
                     mid: int) -> SegmentationRois:
    """Level → body ROI and the CSF ROI from a label map on the series' slice ``mid`` (steps
    2 and 3 of the module docstring; also the learned segmenter's path, ``learned.py``).
    Raises ``SegmentationError`` when no L1–L4 body is on the slice."""
    image = np.asarray(series.pixels[mid], np.float32)
    spacing = series.pixel_spacing_mm
    inferior, posterior = series_directions(series)
    rois: dict[str, Roi] = {}
    bodies: dict[str, tuple[BodyAxes, np.ndarray]] = {}
    odd: list[str] = []
    for label_id, level in table.items():
        mask = labels == label_id
        if mask.sum() < 30:
            continue
        body = largest_part(_opened(mask, spacing))
        axes = body_axes(body, spacing, inferior, posterior)
        if axes is not None:
            rois[level] = body_roi(axes, spacing, mid)
            bodies[level] = (axes, body)
            if level in VBQ_LEVELS and not axes.body_sized:
                odd.append(f"{level} {axes.height_mm:.0f} × {axes.depth_mm:.0f} mm")
    if not any(lv in rois for lv in VBQ_LEVELS):
        raise SegmentationError("the segmentation holds no vertebra of the label table on the "
                                "mid-sagittal slice")
    flags: list[QcFlag] = []
    if odd:
        flags.append(QcFlag("implausible-body", f"segmented bodies not shaped like a lumbar "
                            f"body on the mid-sagittal slice ({'; '.join(odd)}, height × "
                            "depth): check the segmentation's labels"))
    for level in CSF_LEVELS:
        if level not in bodies:
            continue
        axes, body = bodies[level]
        found = csf_roi_behind(image, axes, marrow_median(image, body, spacing), spacing, mid,
                               level)
        if found.roi is None:
            flags.extend(found.flags)
            continue
        if level != "L3":
            flags.append(QcFlag("csf-not-at-l3", f"the CSF was measured behind {level}"))
        flags.extend(found.flags)
        return SegmentationRois(mid, rois, found.roi, level, flags)
    return SegmentationRois(mid, rois, None, None, flags)


def _opened(mask: np.ndarray, spacing_mm: tuple[float, float]) -> np.ndarray:
    """``mask`` opened by a disc of ``OPEN_MM``: a whole-vertebra label (TotalSegmentator's
    and SPINEPS' instance labels include the arch) touching the body through a thin partial-
    volume bridge comes apart, so that the largest part is the body. A mask the opening
    empties is kept as it is."""
    ry, rx = (max(1, round(OPEN_MM / sp)) for sp in spacing_mm)
    y, x = np.ogrid[-ry:ry + 1, -rx:rx + 1]
    disc = (y * spacing_mm[0]) ** 2 + (x * spacing_mm[1]) ** 2 <= OPEN_MM ** 2
    box = _box(mask, 2 * max(ry, rx) + 2)
    if box is None:
        return mask
    opened = np.zeros_like(mask)
    opened[box] = ndimage.binary_opening(mask[box], structure=disc)
    return opened if opened.sum() >= 30 else mask


def _box(mask: np.ndarray, margin: int) -> tuple[slice, slice] | None:
    """The bounding box of ``mask`` widened by ``margin`` pixels (clipped to the image): the
    morphology and distances below run there only (the same result as on the whole image,
    whose pixels outside it are all background)."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return (slice(max(0, rows[0] - margin), rows[-1] + margin + 1),
            slice(max(0, cols[0] - margin), cols[-1] + margin + 1))


def marrow_median(image: np.ndarray, body: np.ndarray, spacing_mm: tuple[float, float],
                  erode_mm: float = 2.0) -> float:
    """Median SI of a body mask eroded by ``erode_mm`` (the whole mask when that empties it)."""
    margin = int(np.ceil(erode_mm / min(spacing_mm))) + 2
    box = _box(body, margin)
    inner = np.zeros_like(body, dtype=bool)
    if box is not None:
        inner[box] = ndimage.distance_transform_edt(body[box], sampling=spacing_mm) > erode_mm
    values = image[inner] if inner.sum() >= 10 else image[body]
    return float(np.median(values))
