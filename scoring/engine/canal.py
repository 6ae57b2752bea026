"""Step 2 of the automatic localisation (``localize``): the spinal canal. Pure (numpy/scipy).

On each central slice a *valley* map scores each block of about ``DETECT_MM`` by how much
darker a ~5 mm band is than tissue ~7–19 mm away on both sides along the AP axis (a ratio, so
a smooth bias field cancels); the best slice counts, smoothed along the spine. Dynamic
programming finds continuous top-to-bottom paths (≤ 45°); among the strong candidates the
canal is the darkest over ~7 mm (CSF is the darkest long structure on T1), that fades
laterally (a midline structure) and has tissue, not air, 15–30 mm behind it (else it is the
skin line). The chosen path is then placed at ~1 mm: the same valley on ~1 mm columns
(smoothed across by 1 mm) in a band of whole rows around it; per row its peak within 2 mm of
the coarse path, between columns the vertex of the parabola through the best column and its
neighbours.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from scoring.engine.dicom_io import PixelStack
from scoring.engine.findings import LABEL_DOUBT_PENALTY, LocalisationError
from scoring.engine.model import QcFlag
from scoring.engine.profiles import best_path, longest_run, valley_depth
from scoring.engine.sampling import Frame, Grid, block_means, odd_half_width, otsu_per_image

GRID_MM = 1.0  # straightened image and profiles
DETECT_MM = 2.0  # canal search


def find_canal(volume: PixelStack, fr: Frame, spacing_mm: tuple[float, float],
               flags: list[QcFlag], penalties: list[float], debug: dict | None
               ) -> tuple[np.ndarray, np.ndarray, Grid]:
    """The canal's path: rows ``ys`` and columns ``xs`` (canonical mm, ~``GRID_MM`` apart
    along the rows where the canal valley is strong) and the central slices' ~2 × 1 mm block
    means (``Grid``) for the next steps. A doubt (``canal-uncertain``) goes to ``flags`` with
    its penalty; raises ``LocalisationError`` when no canal is found."""
    n_slices = volume.shape[0]
    # 2. canal on the central third of the slices, each slice on its own (averaging would
    # dilute a canal that is only a few slices wide); per pixel the best slice counts. The
    # search runs on DETECT_MM cells (the canal is 10–20 mm wide); everything after it
    # (straightening, walls, bodies, ROIs) samples the original pixels on a 1 mm grid.
    half = max(0, n_slices // 6)
    centre = n_slices // 2
    central_idx = range(max(0, centre - half), min(n_slices, centre + half + 1))
    coarse, fine = block_means(volume, list(central_idx), fr, spacing_mm, DETECT_MM,
                               (DETECT_MM, GRID_MM))
    grids, yc, xc, cell_r, cell_c = (coarse.images, coarse.row_mm, coarse.col_mm,
                                     coarse.cell_r, coarse.cell_c)
    tissue = (0.5 * otsu_per_image(grids)).astype(np.float32)[:, None, None]
    grid = grids.min(axis=0)
    valley = ndimage.gaussian_filter1d(valley_depth(grids, cell_c, tissue).max(axis=0),
                                       10.0 / cell_r, axis=0)
    rows_idx = np.arange(grid.shape[0])
    dark_w = 2 * odd_half_width(7.0, cell_c) + 1  # the canal is ≥ ~7 mm wide
    wide_dark = ndimage.uniform_filter1d(grid, dark_w, axis=1, mode="nearest")
    # the canal is a midline structure: laterally (pedicles, foramina) the band is brighter
    outer = block_means(volume, [0, n_slices - 1], fr, spacing_mm, DETECT_MM,
                        (DETECT_MM,))[0].images  # the first and last slices
    wide_outer = ndimage.uniform_filter1d(outer.mean(axis=0), dark_w, axis=1, mode="nearest")
    near_c = np.arange(-round(6.0 / cell_c), round(6.0 / cell_c) + 1)
    behind_c = np.arange(round(15.0 / cell_c), round(30.0 / cell_c) + 1)
    tissue_level = float(np.median(tissue))
    candidates = []
    masked = valley.copy()
    for _ in range(4):
        # the canal, and other long dark bands (muscle between the spinous processes and the
        # subcutaneous fat, vessels): the canal holds CSF, the darkest of them on T1
        cand = best_path(masked, margin=round(20.0 / cell_c))
        along_c = masked[rows_idx, cand]
        strong = float(np.percentile(along_c, 75))
        run_c = longest_run(along_c > 0.4 * strong, bridge=round(12.0 / cell_r))
        if run_c is not None and yc[run_c[1]] - yc[run_c[0]] >= 120 and strong >= 0.05:
            seg_rows = rows_idx[run_c[0]: run_c[1] + 1]
            # darkest ~7 mm window within 6 mm of the path (the path may hug a wall)
            near_cols = np.clip(cand[seg_rows][:, None] + near_c[None, :], 0, grid.shape[1] - 1)
            centre_dark = wide_dark[seg_rows[:, None], near_cols]
            pick = np.argmin(centre_dark, axis=1)
            darkness = float(np.median(centre_dark[np.arange(len(seg_rows)), pick]))
            outer_v = wide_outer[seg_rows, near_cols[np.arange(len(seg_rows)), pick]]
            lateral = darkness / max(float(np.median(outer_v)), 1e-6)
            # the canal has the posterior elements and the back muscles behind it: a band
            # with air 15-30 mm behind it is the skin line, not the canal
            behind = np.clip(cand[seg_rows][:, None] + behind_c[None, :], 0, grid.shape[1] - 1)
            if float(np.median(grid[seg_rows[:, None], behind])) >= tissue_level:
                candidates.append((darkness, cand, run_c, float(np.mean(along_c[seg_rows]))
                                   * len(seg_rows) * cell_r, lateral))
        cols = np.arange(grid.shape[1])[None, :]
        masked = np.where(np.abs(cols - cand[:, None]) <= round(8.0 / cell_c), 0.0, masked)
    if not candidates:
        raise LocalisationError("the spinal canal was not found (no long dark band between "
                                "the vertebral bodies and the posterior elements)")
    if debug is not None:
        debug["candidates"] = [(round(c[0]), round(c[3]), round(c[4], 3), int(np.median(c[1])))
                               for c in candidates]
    top_score = max(c[3] for c in candidates)
    strong_c = [c for c in candidates if c[3] >= 0.5 * top_score]
    midline = [c for c in strong_c if c[4] < 0.9] if n_slices >= 5 else strong_c
    if not midline:
        midline = strong_c
        flags.append(QcFlag("canal-uncertain", "the darkest long band does not fade "
                            "laterally like the spinal canal: check the slice and the levels"))
        penalties.append(LABEL_DOUBT_PENALTY)
    _, path_x, run, _, _ = min(midline, key=lambda c: c[0])
    top, bottom = run
    ys = yc[top: bottom + 1]
    # the path's column at ~1 mm: the valley again on ~1 mm columns (smoothed across by 1 mm,
    # as the image would be), in a band of whole rows around it (so the smoothing along the
    # spine mixes the same columns); per row its peak within 2 mm of the coarse path, between
    # columns the vertex of the parabola through the best column and its neighbours
    ys = yc[top: bottom + 1]
    xf, cell_f = fine.col_mm, fine.cell_c
    seg_r = rows_idx[top: bottom + 1]
    jc = np.rint(np.interp(xc[path_x[top: bottom + 1]], xf, np.arange(len(xf)))).astype(int)
    reach = round(22.0 / cell_f)
    c0, c1 = max(0, int(jc.min()) - reach), min(len(xf), int(jc.max()) + reach + 1)
    band = ndimage.gaussian_filter1d(fine.images[:, :, c0:c1], 1.0 / cell_f, axis=-1)
    v_f = ndimage.gaussian_filter1d(valley_depth(band, cell_f, tissue).max(axis=0), 10.0 / cell_r,
                                    axis=0)[seg_r]
    off = max(1, round(2.0 / cell_f))
    width = v_f.shape[1]
    window = np.clip((jc - c0)[:, None] + np.arange(-off, off + 1)[None, :], 1,
                     max(1, width - 2))
    at = np.arange(len(seg_r))
    pick_f = window[at, np.argmax(v_f[at[:, None], window], axis=1)]
    v_l, v_c = v_f[at, pick_f - 1], v_f[at, pick_f]
    v_r = v_f[at, np.minimum(pick_f + 1, width - 1)]
    curv = v_l - 2.0 * v_c + v_r
    vertex = np.where(curv < 0, 0.5 * (v_l - v_r) / np.where(curv < 0, curv, -1.0), 0.0)
    x_mm = xf[c0 + pick_f] + np.clip(vertex, -0.5, 0.5) * (xf[1] - xf[0])
    xs = ndimage.gaussian_filter1d(x_mm, 6.0 / cell_r, mode="nearest")
    if debug is not None:
        debug.update(grid=grid, path_x=path_x, run=run, valley=valley)
    return ys, xs, fine
