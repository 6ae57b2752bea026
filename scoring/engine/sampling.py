"""Sampling of a sagittal series for the localiser. Pure (numpy).

The canonical frame (rows superior→inferior, columns anterior→posterior) and the mapping of its
points to the stored pixels; block means on that frame (the canal search's coarse grid);
bilinear samples of every slice at once; per-image Otsu thresholds and NaN-aware medians.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from scoring.engine.dicom_io import PixelStack, Series
from scoring.engine.model import Roi


@dataclass
class Frame:
    """Canonical frame: rows superior→inferior, cols anterior→posterior."""

    transpose: bool
    flip_r: bool
    flip_c: bool
    shape: tuple[int, int]  # canonical shape
    spacing: tuple[float, float]  # canonical (row, col) spacing, mm

    def canon(self, image: np.ndarray) -> np.ndarray:
        out = image.T if self.transpose else image
        if self.flip_r:
            out = out[::-1]
        if self.flip_c:
            out = out[:, ::-1]
        return out

    def to_original(self, r: float, c: float) -> tuple[float, float]:
        if self.flip_r:
            r = self.shape[0] - 1 - r
        if self.flip_c:
            c = self.shape[1] - 1 - c
        return (c, r) if self.transpose else (r, c)

    def points_to_original(self, r: np.ndarray, c: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray]:
        """``to_original`` for arrays of points (canonical → stored pixel coordinates)."""
        if self.flip_r:
            r = (self.shape[0] - 1) - r
        if self.flip_c:
            c = (self.shape[1] - 1) - c
        return (c, r) if self.transpose else (r, c)

    def direction_to_original(self, dr: float, dc: float) -> tuple[float, float]:
        if self.flip_r:
            dr = -dr
        if self.flip_c:
            dc = -dc
        return (dc, dr) if self.transpose else (dr, dc)


def frame_of(series: Series) -> Frame:
    row_dir, col_dir = series.orientation[:3], series.orientation[3:]
    transpose = abs(row_dir[2]) > abs(col_dir[2])
    si_vec, ap_vec = (row_dir, col_dir) if transpose else (col_dir, row_dir)
    rows, cols = series.pixels.shape[1:]
    shape = (cols, rows) if transpose else (rows, cols)
    sp = series.pixel_spacing_mm
    spacing = (sp[1], sp[0]) if transpose else (sp[0], sp[1])
    return Frame(transpose, bool(si_vec[2] > 0), bool(ap_vec[1] < 0), shape, spacing)


def bin_sums(arr: np.ndarray, axis: int, k: int) -> np.ndarray:
    """Sums (float32) of ``k`` consecutive pixels along ``axis`` of a 2-D image (a last
    partial block is dropped)."""
    n = arr.shape[axis] // k
    if axis == 0:  # whole rows: one reduction, no temporary
        return arr[: n * k].reshape(n, k, arr.shape[1]).sum(axis=1, dtype=np.float32)
    out = arr[:, 0: n * k: k].astype(np.float32)
    for m in range(1, k):
        out += arr[:, m: n * k: k]
    return out


@dataclass
class Grid:
    """Block means on the canonical frame: ``images`` (slices, rows, cols), the positions
    (mm, canonical, from the first pixel's centre) of its rows and columns, block sizes (mm)."""

    images: np.ndarray
    row_mm: np.ndarray
    col_mm: np.ndarray
    cell_r: float
    cell_c: float


def block_means(pixels: PixelStack, indices: list[int], fr: Frame, spacing: tuple[float, float],
            step_si: float, steps_ap: tuple[float, ...]) -> list[Grid]:
    """Slices ``indices`` of ``pixels`` (stored orientation, pixel ``spacing`` mm) as means
    of blocks of whole pixels (the integer number closest to the step, at least one):
    ``step_si`` mm along the spine, and each of ``steps_ap`` mm across it (one grid each; the
    pass along the spine is shared). Block means are a cheap pass over the pixels and average
    the noise as a smoothing would. The sums are taken over the stored values (exact for
    integers) and rescaled after, so the slices need not be converted."""
    si_axis, ap_axis = (1, 0) if fr.transpose else (0, 1)  # of one stored image
    k_si = max(1, round(step_si / spacing[si_axis]))
    k_aps = [max(1, round(step_ap / spacing[ap_axis])) for step_ap in steps_ap]
    grids: list[np.ndarray] = []
    rescale = []
    for n, i in enumerate(indices):  # image by image: small temporaries, cache-friendly
        image, slope, intercept = pixels.stored(i)
        rescale.append((slope, intercept))
        along = bin_sums(image, si_axis, k_si)
        for j, k_ap in enumerate(k_aps):
            block = bin_sums(along, ap_axis, k_ap)
            if n == 0:
                grids.append(np.empty((len(indices), *block.shape), np.float32))
            grids[j][n] = block
    for grid, k_ap in zip(grids, k_aps, strict=True):
        grid *= np.float32(1.0 / (k_si * k_ap))
        for n, (slope, intercept) in enumerate(rescale):
            if (slope, intercept) != (1.0, 0.0):
                grid[n] = grid[n] * slope + intercept
    out = []
    for grid, k_ap in zip(grids, k_aps, strict=True):
        pos_r = np.arange(grid.shape[1 + si_axis]) * k_si + (k_si - 1) / 2  # stored pixels
        pos_c = np.arange(grid.shape[1 + ap_axis]) * k_ap + (k_ap - 1) / 2
        view = grid.transpose(0, 2, 1) if fr.transpose else grid
        if fr.flip_r:
            view, pos_r = view[:, ::-1], (fr.shape[0] - 1 - pos_r)[::-1]
        if fr.flip_c:
            view, pos_c = view[:, :, ::-1], (fr.shape[1] - 1 - pos_c)[::-1]
        out.append(Grid(np.ascontiguousarray(view), pos_r * fr.spacing[0],
                         pos_c * fr.spacing[1], k_si * spacing[si_axis],
                         k_ap * spacing[ap_axis]))
    return out


def odd_half_width(width_mm: float, cell: float) -> int:
    """Half-width (cells) of the odd window closest to ``width_mm`` on ``cell`` mm cells."""
    return max(0, round((width_mm / cell - 1) / 2))


def bilinear(stack: np.ndarray | PixelStack, cy: np.ndarray, cx: np.ndarray) -> np.ndarray:
    """Bilinear samples of every image of ``stack`` (slices, rows, cols) at the points (cy, cx)
    (pixels; outside points take the nearest edge value, as ``map_coordinates(order=1,
    mode="nearest")``). Returns (slices, *cy.shape) float32. The four neighbours are taken
    from the flat images by one index; a ``PixelStack`` is sampled without converting its
    slices."""
    h, w = stack.shape[-2:]
    y = np.clip(cy, 0.0, h - 1.0)
    x = np.clip(cx, 0.0, w - 1.0)
    y0 = np.minimum(y.astype(np.intp), max(h - 2, 0))  # floor: y, x are not negative
    x0 = np.minimum(x.astype(np.intp), max(w - 2, 0))
    fy, fx = (y - y0).astype(np.float32), (x - x0).astype(np.float32)
    dy, dx = (w if h > 1 else 0), (1 if w > 1 else 0)
    i = y0 * w + x0
    corners = np.stack([i, i + dx, i + dy, i + dy + dx])  # the four neighbours, one index
    if isinstance(stack, PixelStack):
        values = np.stack([stack.take(s, corners) for s in range(stack.shape[0])], axis=1)
    else:
        values = np.moveaxis(
            np.ascontiguousarray(stack).reshape(stack.shape[0], -1).take(corners, axis=1), 1, 0)
    top, top_r, bottom, bottom_r = values  # each (slices, *cy.shape)
    top += (top_r - top) * fx
    bottom += (bottom_r - bottom) * fx
    top += (bottom - top) * fy
    return top.astype(np.float32, copy=False)


def nanmedian_rows(a: np.ndarray) -> np.ndarray:
    """``np.nanmedian(a, axis=0)`` for a 2-D array, by one sort (NaN sorts last) instead of
    numpy's masked-array path; all-NaN columns give NaN."""
    if a.shape[0] == 0:
        return np.nanmedian(a, axis=0)
    srt = np.sort(a, axis=0)
    n = np.count_nonzero(~np.isnan(a), axis=0)
    lo = np.take_along_axis(srt, np.maximum((n - 1) // 2, 0)[None, :], axis=0)[0]
    hi = np.take_along_axis(srt, np.maximum(n // 2, 0)[None, :], axis=0)[0]
    mid = (lo + hi) / 2
    return np.where(n > 0, mid, np.nan)


def otsu_per_image(stack: np.ndarray) -> np.ndarray:
    """Otsu's threshold of each image of ``stack`` (slices, ...): the same 256-bin histogram
    over each image's range and between-class variance as ``skimage``'s ``threshold_otsu``,
    for all images in one pass."""
    nbins = 256
    flat = stack.reshape(stack.shape[0], -1)
    lo, hi = flat.min(axis=1), flat.max(axis=1)
    span = np.where(hi > lo, hi - lo, 1.0).astype(np.float32)
    scaled = flat - lo[:, None]
    scaled *= (nbins / span)[:, None]
    idx = scaled.astype(np.intp)
    np.minimum(idx, nbins - 1, out=idx)
    idx += (np.arange(flat.shape[0]) * nbins)[:, None]
    hist = np.bincount(idx.ravel(), minlength=flat.shape[0] * nbins).reshape(-1, nbins)
    hist = hist.astype(np.float64)
    centres = lo[:, None] + (np.arange(nbins) + 0.5)[None, :] * (span / nbins)[:, None]
    w1 = np.cumsum(hist, axis=1)
    w2 = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]
    m1 = np.cumsum(hist * centres, axis=1) / np.maximum(w1, 1e-12)
    m2 = (np.cumsum((hist * centres)[:, ::-1], axis=1) / np.maximum(w2[:, ::-1], 1e-12))[:, ::-1]
    between = w1[:, :-1] * w2[:, 1:] * (m1[:, :-1] - m2[:, 1:]) ** 2
    out = centres[np.arange(len(hist)), np.argmax(between, axis=1)]
    return np.where(hi > lo, out, lo)


def otsu_threshold(values: np.ndarray, nbins: int = 256) -> float:
    """Otsu's threshold of ``values``: the histogram of ``nbins`` bins over their range and the
    between-class variance, as ``skimage.filters.threshold_otsu`` computes it (the same
    float32 counts, so the same bin wins)."""
    v = np.asarray(values).reshape(-1)
    if np.all(v == v[0]):
        return float(v[0])
    counts, edges = np.histogram(v, bins=nbins, range=(float(v.min()), float(v.max())))
    centres = (edges[:-1] + edges[1:]) / 2
    hist = counts.astype(np.float32)
    w1 = np.cumsum(hist)
    w2 = np.cumsum(hist[::-1])[::-1]
    m1 = np.cumsum(hist * centres) / w1
    m2 = (np.cumsum((hist * centres)[::-1]) / w2[::-1])[::-1]
    between = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    return float(centres[int(np.argmax(between))])


def path_roi(fr: Frame, py: np.ndarray, px: np.ndarray, ty: np.ndarray, tx: np.ndarray,
             ny: np.ndarray, nx: np.ndarray, t_c: float, k_c: float, half_t: float,
             half_k: float, slice_index: int) -> Roi:
    """A box along the local spine axis, in the original pixel frame: centred at arc length
    ``t_c`` and ``k_c`` mm anterior along the path (``py``, ``px``: canonical mm; ``ty``,
    ``tx`` its unit tangent, ``ny``, ``nx`` its anterior normal), half sizes in mm."""
    i = int(np.clip(round(t_c), 0, len(py) - 1))
    y = py[i] + (t_c - i) * ty[i] + k_c * ny[i]
    x = px[i] + (t_c - i) * tx[i] + k_c * nx[i]
    r, c = fr.to_original(float(y / fr.spacing[0]), float(x / fr.spacing[1]))
    dr, dc = fr.direction_to_original(float(ty[i] / fr.spacing[0]), float(tx[i] / fr.spacing[1]))
    angle = float(np.degrees(np.arctan2(dc, dr)))
    sp_axis = float(np.hypot(ty[i], tx[i]) / max(np.hypot(ty[i] / fr.spacing[0],
                                                          tx[i] / fr.spacing[1]), 1e-9))
    sp_norm = float(1.0 / max(np.hypot(ny[i] / fr.spacing[0], nx[i] / fr.spacing[1]), 1e-9))
    return Roi(slice_index, float(r), float(c), half_t / sp_axis, half_k / sp_norm, "box",
               angle)
