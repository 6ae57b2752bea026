"""External segmentations → vertebral-body ROIs. Pure (nibabel, highdicom, numpy, scipy).

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
DICOM LPS), so it may come from a resampled or reoriented volume. On the mid-sagittal slice
chosen by our localisation, each level's label keeps its largest connected part (the body:
on a mid-sagittal slice the canal separates it from the spinous process); the ROI is a box
along the body's own axes covering its eroded interior without the posterior third (cortex,
endplates and basivertebral vein excluded), the same definition as the automatic path.
The CSF ROI always comes from our localisation: neither TotalSegmentator's MR vertebra task
nor SPINEPS gives a CSF label usable on T1.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from scoring.engine.dicom_io import Series
from scoring.engine.model import EngineError, Roi

TABLES: dict[str, dict[int, str]] = {
    "totalsegmentator": {1: "S1", 2: "L5", 3: "L4", 4: "L3", 5: "L2", 6: "L1", 7: "T12"},
    "spineps": {19: "T12", 20: "L1", 21: "L2", 22: "L3", 23: "L4", 24: "L5", 26: "S1"},
}
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


def nifti_labels_on_slice(path: str | Path, series: Series, slice_index: int) -> np.ndarray:
    """The NIfTI label map sampled (nearest voxel) on one slice of the series."""
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
    lps = _series_lps(series, slice_index)
    ras = lps * np.array([-1.0, -1.0, 1.0])
    homog = np.concatenate([ras, np.ones((*ras.shape[:2], 1))], axis=-1)
    vox = np.rint(homog @ np.linalg.inv(affine).T)[..., :3].astype(int)
    inside = np.all((vox >= 0) & (vox < np.array(data.shape)), axis=-1)
    out = np.zeros(lps.shape[:2], np.int32)
    v = vox[inside]
    out[inside] = data[v[:, 0], v[:, 1], v[:, 2]]
    return out


def seg_labels_on_slice(path: str | Path, series: Series, slice_index: int
                        ) -> tuple[np.ndarray, dict[int, str]]:
    """A DICOM SEG's segments on one slice: (label image of segment numbers, number → level)."""
    import highdicom as hd

    try:
        seg = hd.seg.segread(str(path))
    except Exception as exc:
        raise SegmentationError(f"{Path(path).name} is not a readable DICOM SEG "
                                f"({type(exc).__name__})") from exc
    table: dict[int, str] = {}
    for desc in seg.SegmentSequence:
        level = _level_of(str(desc.SegmentLabel))
        if level:
            table[int(desc.SegmentNumber)] = level
    if not table:
        raise SegmentationError("no segment of the SEG is labelled with a vertebral level")
    uid = str(series.datasets[slice_index].SOPInstanceUID)
    try:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[uid], segment_numbers=sorted(table),
            combine_segments=True, skip_overlap_checks=True)
    except (ValueError, KeyError, AttributeError) as exc:
        raise SegmentationError("the SEG does not cover the mid-sagittal image of this "
                                "series") from exc
    return np.asarray(pixels[0]), table


def body_roi(mask: np.ndarray, series: Series, slice_index: int,
             si_direction_px: tuple[float, float]) -> Roi | None:
    """Box over the body's eroded interior without its posterior third (pixels)."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    body = labels == int(np.argmax(sizes)) + 1
    sp = series.pixel_spacing_mm
    dist = ndimage.distance_transform_edt(body, sampling=sp)
    rr, cc = np.nonzero(body)
    if rr.size < 30:
        return None
    # axes: along the body's own SI axis (principal axis nearest the image SI direction)
    pts = np.stack([rr * sp[0], cc * sp[1]], axis=1)
    centre = pts.mean(axis=0)
    cov = np.cov((pts - centre).T)
    _, vecs = np.linalg.eigh(cov)
    si = np.array([si_direction_px[0] * sp[0], si_direction_px[1] * sp[1]])
    si /= np.linalg.norm(si)
    axis = vecs[:, int(np.argmax(np.abs(vecs.T @ si)))]
    axis = axis if axis @ si >= 0 else -axis
    normal = np.array([-axis[1], axis[0]])
    u = (pts - centre) @ axis
    v = (pts - centre) @ normal
    # posterior = +y in LPS: orient the normal so that v grows posteriorly
    lps = _series_lps(series, slice_index)[rr, cc]
    if np.corrcoef(v, lps[:, 1])[0, 1] < 0:
        normal, v = -normal, -v
    h_lo, h_hi = np.percentile(u, [1, 99])
    w_lo, w_hi = np.percentile(v, [1, 99])
    height, depth = h_hi - h_lo, w_hi - w_lo
    del dist
    u_c = (h_lo + h_hi) / 2
    v_lo, v_hi = w_lo + 0.2 * depth, w_hi - 0.35 * depth  # anterior 20 %, posterior 35 % out
    c_mm = centre + axis * u_c + normal * (v_lo + v_hi) / 2
    angle = float(np.degrees(np.arctan2(axis[1] / sp[1], axis[0] / sp[0])))
    return Roi(slice_index, float(c_mm[0] / sp[0]), float(c_mm[1] / sp[1]),
               float(0.3 * height / sp[0]), float((v_hi - v_lo) / 2 / sp[1]), "box", angle)


def rois_from_segmentation(path: str | Path, series: Series, slice_index: int,
                           si_direction_px: tuple[float, float],
                           table: str | Mapping[Any, str] | None = None) -> dict[str, Roi]:
    """Level → body ROI on ``slice_index`` from a NIfTI label map or a DICOM SEG."""
    name = str(path).lower()
    if name.endswith((".nii", ".nii.gz")):
        labels = nifti_labels_on_slice(path, series, slice_index)
        ids = label_table(table)
    else:
        labels, ids = seg_labels_on_slice(path, series, slice_index)
    rois: dict[str, Roi] = {}
    for label_id, level in ids.items():
        mask = labels == label_id
        if mask.sum() < 30:
            continue
        roi = body_roi(mask, series, slice_index, si_direction_px)
        if roi is not None:
            rois[level] = roi
    if not rois:
        raise SegmentationError("the segmentation holds no vertebra of the label table on the "
                                "mid-sagittal slice")
    return rois
