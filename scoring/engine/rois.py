"""ROI geometry: the pixels an ``Roi`` (box or ellipse, turned along the spine) covers on its
slice. Pure (numpy). Used by the measurement (``vbq``), the classical localiser's checks
(``localize``, ``csf``) and the QC of placed ROIs (``roi_qc``)."""

from __future__ import annotations

import numpy as np

from scoring.engine.model import Roi


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
