"""Automatic localisation of L1–S1 and the L3 CSF on a sagittal T1 series. Pure (numpy/scipy).

Classical image analysis that adapts to each image: every threshold comes from the image's own
statistics (Otsu, medians, ratios of neighbouring tissue) and every size is in millimetres from
the pixel spacing, so neither the matrix nor the intensity scale matters.

1. **Canonical frame.** Rows superior→inferior and columns anterior→posterior, from
   ``ImageOrientationPatient`` (the pixels stay stored as they are; points are mapped).
   The canal search runs on block means of whole pixels about ``DETECT_MM`` (2 mm) wide;
   everything after it samples the original pixels along the canal on a 1 mm grid, and
   ROIs are measured on the original pixels.
2. **Canal.** On each central slice, a *valley* map scores each block by how much darker a
   ~5 mm band is than tissue ~7–19 mm away on both sides along the AP axis (a ratio, so a
   smooth bias field cancels); the best slice counts, smoothed along the spine. Dynamic
   programming finds the best continuous top-to-bottom path (≤ 45°): the CSF canal, the long
   dark band between the bodies and the posterior elements; its extent is where the valley
   stays strong. The chosen path is then placed at ~1 mm: the same valley on ~1 mm columns
   (smoothed across by 1 mm) in a band around it, its peak within 2 mm of the coarse path.
3. **Mid-sagittal slice.** Per slice, how much darker the canal interior is than the bodies
   along the path; the slices through the canal are those deeper than half-way between the
   shallowest and the deepest, and the mid-sagittal slice is the middle of that run (the
   middle of the canal). Detection then uses the mean of that slice and its neighbours (±1);
   measurement uses the slice itself.
4. **Straightening.** The image is resampled along the smoothed canal path (arc length *t*)
   and its anterior normal (*k*, mm): lordosis, tilt and scoliosis become a straight column.
   The canal's anterior wall is where the AP profile rises half-way from CSF to marrow.
5. **Bodies.** In a band 6–23 mm anterior to the canal wall (the posterior part of the
   bodies, which keeps its height in wedge fractures), the profile along *t* alternates
   marrow (bright) and disc/endplate (dark). After flattening the slow bias along the spine,
   Otsu on the central 5–90 % of the profile (bright fat below the sacrum or air above the
   first body must not pull it) separates the two; runs ≥ 8 mm are bodies. On real T1 a
   disc can be barely darker than a bright neighbouring body, so a run longer than 1.4 × the
   median run is split at the discs found inside it (``profiles.disc_minima``: thin bands
   darker than the marrow within 16 mm on both sides). A gap of about twice the median
   spacing holds a body too dark to threshold (e.g. an acute fracture): it is inserted and
   flagged.
6. **Labels.** Counting up from the sacrum: S1 is the lowest body whose bone continues
   inferiorly (run ≥ 1.25 × median body height or reaching the end of the sampled column);
   then L5, L4 … T12. Cross-checks: the thecal sac (end of the canal valley) must end between
   the top of S1 and ~3 levels below it; spacing must be regular (CV < 0.25) and that of an
   adult lumbar segment (28–48 mm); no full disc may lie just below the body called S1 (it
   would be L5). Each failed check costs ``LABEL_DOUBT_PENALTY`` (0.35): one doubt alone
   sends the result to review.
7. **ROIs.** Per body: AP extent from its own profile (half-way between its marrow and the
   disc level), heights at 20/50/85 % of the depth; the ROI is a box along the local spine
   axis covering the central 60 % of the smallest height and 35–80 % of the depth from the
   posterior wall (the posterior third holds the basivertebral vein; the anterior 20 % the
   cortex). Height loss ≥ 20 % against the level's own posterior height or its neighbours ⇒
   ``suggested_fractured``. CSF: at L3 (else L2, L4 with a flag), the thecal sac is the dark
   band (≥ 3 mm, within 30 % of the darkest level towards the brightest) nearest the body,
   searched up to the canal's anterior wall (the sac can lie closer to the body than the
   canal's median wall; a dark band further back, fat or muscle, is not the sac; its darkest
   point is taken 2 mm clear of the wall, whose cortex can join it); the ROI is its darkest
   contiguous part 1.5 mm inside its walls (excludes cord, roots, walls), on the
   slice among mid±1 where it is darkest.
8. **Confidence** starts at 1 and loses weight for each failed check (inferred bodies,
   irregular or implausible spacing, sacrum not seen, label cross-checks, small ROIs, weak
   marrow/CSF contrast, CSF not at L3, CSF more than 6 × darker than marrow). Below
   ``REVIEW_BELOW_CONFIDENCE`` the caller answers ``needs_review``. The penalties were set
   so that no case of the real development set (``bench/vbq_real.py``) comes back confident
   with a wrong level or a CSF ROI outside the sac.

The sampling (canonical frame, block means, bilinear samples) is in ``sampling.py``; the 1-D
profiles (canal valley, best path, runs, discs) are in ``profiles.py``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

from scoring.engine.dicom_io import PixelStack, Series
from scoring.engine.model import QcFlag, Roi
from scoring.engine.profiles import (
    best_path,
    disc_minima,
    longest_run,
    lordotic_tail,
    run_around,
    runs_of,
    smooth_nan,
    split_merged,
    valley_depth,
)
from scoring.engine.sampling import (
    Frame,
    bilinear,
    block_means,
    frame_of,
    nanmedian_rows,
    odd_half_width,
    otsu_per_image,
)

LABELS_UP_FROM_SACRUM = ("S1", "L5", "L4", "L3", "L2", "L1", "T12")
REQUIRED = ("S1", "L5", "L4", "L3", "L2", "L1")
GRID_MM = 1.0  # straightened image and profiles
DETECT_MM = 2.0  # canal search
# one doubt about the level labels or the CSF alone sends the result to review (1 - 0.35 is
# below vbq.REVIEW_BELOW_CONFIDENCE): a wrong level or a CSF ROI outside the thecal sac must
# never come back as a confident value
LABEL_DOUBT_PENALTY = 0.35
MAX_MARROW_TO_CSF = 6.0  # marrow / CSF of L1–L4 above this: the CSF ROI is not in CSF
CSF_NEAR_DARKEST = 0.3  # a band within this fraction from the darkest to the brightest
CSF_BAND_MM = 3  # the sac is at least this wide (1 mm samples)
CSF_WALL_CLEAR_MM = 2  # its darkest point is looked for this far from the anterior wall
LEVEL_SPACING_MM = (28.0, 48.0)  # adult lumbar segment (body + disc), centre to centre


class LocalisationError(Exception):
    """The anatomy needed for VBQ could not be found; ``str`` says what (clinician-readable)."""


@dataclass
class BodyFinding:
    level: str
    roi: Roi
    inferred: bool = False
    height_mm: float | None = None
    height_ratio: float | None = None
    suggested_fractured: bool = False


@dataclass
class Localisation:
    mid_slice: int
    bodies: dict[str, BodyFinding]
    csf_roi: Roi
    csf_level: str
    confidence: float
    flags: list[QcFlag] = field(default_factory=list)
    canal_path_px: list[tuple[float, float]] = field(default_factory=list)  # original (row, col)
    si_direction_px: tuple[float, float] = (1.0, 0.0)  # superior→inferior, original pixels


def localize(series: Series, debug: dict | None = None) -> Localisation:
    """Find the mid-sagittal slice, label T12–S1, and place body and CSF ROIs.

    Raises ``LocalisationError`` when the canal or the lumbar column cannot be found.
    ``debug`` (optional) receives intermediate arrays for inspection.
    """
    with warnings.catch_warnings():
        # all-NaN rows (outside the image after straightening) are expected and handled
        warnings.simplefilter("ignore", RuntimeWarning)
        return _localize(series, debug)


def _localize(series: Series, debug: dict | None) -> Localisation:
    fr = frame_of(series)
    # the pixels stay in their stored orientation (contiguous): points on the canonical frame
    # are mapped to it when sampled
    volume = series.pixels
    n_slices = volume.shape[0]
    flags: list[QcFlag] = []
    penalties: list[float] = []

    # 2. canal on the central third of the slices, each slice on its own (averaging would
    # dilute a canal that is only a few slices wide); per pixel the best slice counts. The
    # search runs on DETECT_MM cells (the canal is 10–20 mm wide); everything after it
    # (straightening, walls, bodies, ROIs) samples the original pixels on a 1 mm grid.
    half = max(0, n_slices // 6)
    centre = n_slices // 2
    central_idx = range(max(0, centre - half), min(n_slices, centre + half + 1))
    coarse, fine = block_means(volume, list(central_idx), fr, series.pixel_spacing_mm, DETECT_MM,
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
    outer = block_means(volume, [0, n_slices - 1], fr, series.pixel_spacing_mm, DETECT_MM,
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

    # arc-length resampling of the path, extended along its end tangents
    seg = np.hypot(np.diff(ys), np.diff(xs))
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.arange(0.0, cum[-1], 1.0)
    py, px = np.interp(t, cum, ys), np.interp(t, cum, xs)
    tail, head = 15, 10
    d_end = np.array([py[-1] - py[-tail], px[-1] - px[-tail]])
    d_end /= max(np.linalg.norm(d_end), 1e-6)
    d_start = np.array([py[head] - py[0], px[head] - px[0]])
    d_start /= max(np.linalg.norm(d_start), 1e-6)
    ext_lo, ext_hi = 15, 90
    tail_y, tail_x = lordotic_tail(py, px, d_end, ext_hi)
    py = np.concatenate([py[0] - d_start[0] * np.arange(ext_lo, 0, -1), py, tail_y])
    px = np.concatenate([px[0] - d_start[1] * np.arange(ext_lo, 0, -1), px, tail_x])
    canal_t = (ext_lo, ext_lo + len(t) - 1)  # where the canal valley itself is
    ty = np.gradient(ndimage.gaussian_filter1d(py, 5.0, mode="nearest"))
    tx = np.gradient(ndimage.gaussian_filter1d(px, 5.0, mode="nearest"))
    norm = np.hypot(ty, tx)
    ty, tx = ty / norm, tx / norm
    ny, nx = tx, -ty  # anterior normal

    ks = np.arange(-30.0, 91.0, 1.0)
    k0 = 30  # index of k = 0

    cy_grid = (py[:, None] + ks[None, :] * ny[:, None]) / fr.spacing[0]
    cx_grid = (px[:, None] + ks[None, :] * nx[:, None]) / fr.spacing[1]
    inside_grid = ((cy_grid >= 0) & (cy_grid <= fr.shape[0] - 1) & (cx_grid >= 0)
                   & (cx_grid <= fr.shape[1] - 1))
    oy_grid, ox_grid = fr.points_to_original(cy_grid, cx_grid)

    def straighten(image: np.ndarray, sigma_mm: float = 0.8,
                   rows: tuple[int, int] | None = None) -> np.ndarray:
        """Sample along the path (1 mm grid), then smooth there (cheaper than the image).
        ``rows`` (start, stop) along the path: only those, with a margin wider than the
        smoothing kernel so the values equal those of the full straightened image."""
        lo, hi = (0, len(cy_grid)) if rows is None else rows
        pad = int(4.0 * sigma_mm / GRID_MM + 0.5) + 1
        a, b = (0, len(cy_grid)) if rows is None else (max(0, lo - pad),
                                                       min(len(cy_grid), hi + pad))
        out = bilinear(image[None], oy_grid[a:b], ox_grid[a:b])[0]
        out = ndimage.gaussian_filter(out, sigma_mm / GRID_MM)
        return np.where(inside_grid[a:b], out, np.nan)[lo - a: hi - a]

    # 3. mid-sagittal slice: where the canal interior is darkest against the bodies. The
    # interior (CSF, not the cortex lining it) comes from the central slices' AP profile.
    sl = slice(canal_t[0], canal_t[1] + 1)
    # the central slices' mean from their ~2 x 1 mm block means (already smooth; the
    # profile is a median along the canal), sampled on the straightened grid
    central = fine.images.mean(axis=0)
    row_step, col_step = fine.row_mm[1] - fine.row_mm[0], fine.col_mm[1] - fine.col_mm[0]
    central_s = bilinear(
        central[None], (cy_grid[sl] * fr.spacing[0] - fine.row_mm[0]) / row_step,
        (cx_grid[sl] * fr.spacing[1] - fine.col_mm[0]) / col_step)[0]
    central_s[~inside_grid[sl]] = np.nan
    prof_c = nanmedian_rows(central_s)
    wide_c = ndimage.median_filter(np.nan_to_num(prof_c, nan=float(np.nanmax(prof_c))), 5)
    trough_k = k0 - 12 + int(np.argmin(wide_c[k0 - 12: k0 + 13]))
    level = float(wide_c[trough_k])
    ant = float(np.max(wide_c[trough_k: trough_k + 30]))
    inner_mask = wide_c < level + 0.3 * (ant - level)
    inner_run = [r for r in runs_of(inner_mask) if r[0] <= trough_k <= r[1]]
    k_in = (np.arange(inner_run[0][0] + 1, inner_run[0][1]) if inner_run and
            inner_run[0][1] - inner_run[0][0] >= 3 else np.array([trough_k]))
    above_c = np.flatnonzero(wide_c[trough_k:] >= (level + ant) / 2)
    k_body = trough_k + (int(above_c[0]) if above_c.size else 8) + np.arange(6, 20)
    rows_sel = np.arange(sl.start, sl.stop, 4)  # every 4 mm along the canal
    # every slice sampled at once on the same points (bilinear, edges replicated)
    kk = ks[np.concatenate([k_in, k_body[k_body < len(ks)]])][None, :]
    both = bilinear(volume, *fr.points_to_original(  # every slice, at a few points
        (py[rows_sel][:, None] + kk * ny[rows_sel][:, None]) / fr.spacing[0],
        (px[rows_sel][:, None] + kk * nx[rows_sel][:, None]) / fr.spacing[1]))
    inner_v = np.median(both[:, :, : len(k_in)].reshape(n_slices, -1), axis=1)
    body_v = np.median(both[:, :, len(k_in):].reshape(n_slices, -1), axis=1)
    depth = 1.0 - inner_v.astype(float) / np.maximum(body_v.astype(float), 1e-6)
    depth_arr = np.array(depth)
    # the canal is deepest over the slices through it; its middle is the middle of the run of
    # slices deeper than half-way between the shallowest and the deepest (an argmax would pick
    # whichever slice of a wide plateau the noise favours)
    peak = int(np.argmax(depth_arr))
    half_depth = 0.5 * (float(depth_arr[peak]) + float(depth_arr.min()))
    lo_run = hi_run = peak
    while lo_run > 0 and depth_arr[lo_run - 1] >= half_depth:
        lo_run -= 1
    while hi_run < n_slices - 1 and depth_arr[hi_run + 1] >= half_depth:
        hi_run += 1
    mid = (lo_run + hi_run) // 2
    if (lo_run + hi_run) % 2 and depth_arr[mid + 1] > depth_arr[mid]:
        mid += 1
    lo_s, hi_s = max(0, mid - 1), min(n_slices, mid + 2)
    total = volume[lo_s].copy()  # the mean of mid ± 1 (as a mean over the stack would add)
    for i in range(lo_s + 1, hi_s):
        total += volume[i]
    detect = straighten(total / np.float32(hi_s - lo_s))

    # 4. canal walls from the AP profile
    valid_t = np.isfinite(detect[:, k0])
    canal_rows = detect[canal_t[0]: canal_t[1] + 1]
    prof = nanmedian_rows(canal_rows)
    centre_k = k0 - 6 + int(np.nanargmin(prof[k0 - 6: k0 + 7]))
    canal_si = float(prof[centre_k])
    body_level = float(np.nanpercentile(prof[centre_k: centre_k + 40], 75))
    above = np.flatnonzero(prof[centre_k: centre_k + 30] >= (canal_si + body_level) / 2)
    if above.size == 0 or body_level <= canal_si * 1.05:
        raise LocalisationError("no vertebral bodies were found in front of the canal")
    k_wall = centre_k + int(above[0])  # index of the anterior canal wall

    # 5. bodies along the posterior band
    band = detect[:, k_wall + 6: k_wall + 23]
    ok_rows = valid_t & np.isfinite(band).all(axis=1)
    prof_t = np.full(len(band), np.nan)
    if ok_rows.any():
        prof_t[ok_rows] = np.median(band[ok_rows], axis=1)
    flat = prof_t / smooth_nan(prof_t, 50.0)  # bias varies slowly; a dark body must stay dark
    vals = flat[np.isfinite(flat)]
    if vals.size < 100:
        raise LocalisationError("the vertebral column is too short in this image")
    # bright fat or dark air beyond the column (below the sacrum, above the first body) must
    # not pull the threshold: it splits the central 5–90 % of the profile (bodies and discs)
    lo_v, hi_v = np.percentile(vals, [5.0, 90.0])
    thr = float(threshold_otsu(np.clip(vals, lo_v, hi_v)))
    bright = np.isfinite(flat) & (flat > thr)
    bright = ndimage.binary_opening(ndimage.binary_closing(bright, np.ones(3)), np.ones(3))
    segments = [(a, b) for a, b in runs_of(bright) if b - a + 1 >= 4]
    if segments:
        # with faint disc contrast the endplates split bodies from discs: keep the long runs
        lens = np.sort([b - a + 1 for a, b in segments])
        ref = float(np.median(lens[len(lens) // 2:]))
        segments = [(a, b) for a, b in segments if b - a + 1 >= max(8.0, 0.55 * ref)]
        segments = split_merged(segments, flat)
    end_t = int(np.flatnonzero(ok_rows)[-1]) if ok_rows.any() else len(flat) - 1
    if debug is not None:
        debug.update(detect=detect, flat=flat, thr=thr, segments=list(segments), k_wall=k_wall,
                     canal_t=canal_t, mid=mid, depth=depth_arr, end_t=end_t, grid=grid,
                     path_x=path_x, run=run, valley=valley)
    if len(segments) < 5:
        raise LocalisationError(f"only {len(segments)} vertebral bodies were found; the lumbar "
                                "spine must show at least L1 to S1")
    lengths = np.array([b - a + 1 for a, b in segments], float)
    centres = np.array([(a + b) / 2 for a, b in segments])
    body_len = float(np.median(lengths[:-1]))
    spacing = float(np.median(np.diff(centres)))

    # sacrum: lowest run continuing inferiorly. Short debris below it is dropped; runs split
    # only by thin dark lines (fused sacral disc remnants) join the sacral complex.
    gaps = np.array([segments[i + 1][0] - segments[i][1] for i in range(len(segments) - 1)])
    disc_gap = float(np.median(gaps))
    merged = [segments[0]]
    for a, b in segments[1:]:
        if a - merged[-1][1] < 0.5 * disc_gap and len(merged) >= 5:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    # 2-D: the sacrum is bone that goes on below S1's body (turning posteriorly), so S1 is
    # the highest body (from the sixth on) whose bright 2-D component reaches well below it.
    band_k = k_wall + 10
    sacral_i = -1
    bone_cache: list[np.ndarray] = []

    def bone_labels() -> np.ndarray:  # the 2-D bone components, made when first needed
        if not bone_cache:
            trend = smooth_nan(prof_t, 50.0)
            flat2d = detect / np.where(np.isfinite(trend), trend, np.nan)[:, None]
            bone = ndimage.binary_opening(np.nan_to_num(flat2d, nan=0.0) > thr,
                                          np.ones((3, 3)))
            bone_cache.extend([bone, ndimage.label(bone)[0]])
        return bone_cache[1]

    def component(i: int) -> np.ndarray | None:
        a, b = merged[i]
        bone_lab = bone_labels()
        lab = bone_lab[(a + b) // 2, band_k]
        return None if lab == 0 else bone_lab == lab

    for i in range(5, len(merged)):  # S1 and sacrum in one run
        if merged[i][1] - merged[i][0] + 1 >= 1.6 * body_len:
            sacral_i = i
            break
    for i in range(5, len(merged) if sacral_i < 0 else 0):  # S1's bone goes on below it
        comp = component(i)
        if comp is not None and np.flatnonzero(comp.any(axis=1))[-1] >= (
                merged[i][1] + 0.6 * body_len):
            sacral_i = i
            break
    for i in range(5, len(merged) - 1 if sacral_i < 0 else 0):
        # else: the next bright run is the sacrum turning posteriorly across the canal line
        nxt = component(i + 1)
        if nxt is None:
            continue
        na = merged[i + 1][0]
        cols_n = np.flatnonzero(nxt[na: int(na + 0.5 * body_len) + 1].any(axis=0))
        if cols_n.size > 0 and cols_n[0] < k_wall - 4:
            sacral_i = i
            break
    sacral = sacral_i >= 0
    if debug is not None:
        bone_labels()
        debug.update(bone=bone_cache[0], merged=merged, sacral_i=sacral_i)
    if sacral:
        segments = merged[: sacral_i + 1]
    else:
        segments = merged
        while len(segments) > 6 and segments[-1][1] - segments[-1][0] + 1 < 0.6 * body_len:
            segments.pop()
    if not sacral:
        flags.append(QcFlag("sacrum-not-identified", "the lowest body does not continue "
                            "inferiorly like the sacrum: the level labels may be shifted"))
        penalties.append(0.4)

    # bodies (top → bottom) with dark ones re-inserted from the spacing
    items: list[tuple[float, float, bool]] = []  # (start, end, inferred)
    a, b = segments[-1]
    segments[-1] = (a, int(min(b, a + body_len * 1.1)))  # S1 body, not the whole sacrum
    spacing = float(np.median(np.diff([(a + b) / 2 for a, b in segments])))
    for i, (a, b) in enumerate(segments):
        if i and (a + b) / 2 - (segments[i - 1][0] + segments[i - 1][1]) / 2 > 1.55 * spacing:
            pa, pb = segments[i - 1]
            gap = (a + b) / 2 - (pa + pb) / 2
            m = max(1, round(gap / spacing) - 1)
            for j in range(1, m + 1):
                c = (pa + pb) / 2 + j * gap / (m + 1)
                items.append((c - body_len / 2, c + body_len / 2, True))
        items.append((float(a), float(b), False))
    chain = items[-len(LABELS_UP_FROM_SACRUM):]
    labels = dict(zip(LABELS_UP_FROM_SACRUM, reversed(chain), strict=False))
    if any(lv not in labels for lv in REQUIRED):
        raise LocalisationError("fewer than six bodies above the sacrum: L1 to S1 are not all "
                                "in the image")
    merged_runs = [lv for lv, it in labels.items()
                   if lv != "S1" and not it[2] and it[1] - it[0] + 1 >= 1.5 * body_len]
    if merged_runs:
        flags.append(QcFlag("merged-bodies", f"{', '.join(merged_runs)}: longer than 1.5 "
                            "bodies (two bodies without a visible disc?): check the labels"))
        penalties.append(LABEL_DOUBT_PENALTY)
    inferred = [lv for lv, it in labels.items() if it[2]]
    if inferred:
        flags.append(QcFlag("inferred-body", f"{', '.join(inferred)}: body too dark to "
                            "separate from the discs, placed from the level spacing "
                            "(fracture or marrow oedema?)"))
        penalties.append(0.1 * len(inferred))
    lumbar_c = [(labels[lv][0] + labels[lv][1]) / 2 for lv in REQUIRED]
    steps = np.abs(np.diff(lumbar_c))
    cv = float(np.std(steps)) / max(float(np.mean(steps)), 1e-6)
    if cv > 0.25:
        flags.append(QcFlag("irregular-spacing", f"level spacing varies by {cv:.0%}: check "
                            "the labels"))
        penalties.append(LABEL_DOUBT_PENALTY)
    if not LEVEL_SPACING_MM[0] <= float(np.mean(steps)) * GRID_MM <= LEVEL_SPACING_MM[1]:
        flags.append(QcFlag("implausible-spacing", f"the levels are {np.mean(steps):.0f} mm "
                            "apart, outside an adult lumbar segment "
                            f"({LEVEL_SPACING_MM[0]:.0f}–{LEVEL_SPACING_MM[1]:.0f} mm): check "
                            "the labels and the pixel spacing"))
        penalties.append(LABEL_DOUBT_PENALTY)
    s1_top = labels["S1"][0]
    # the lumbosacral disc is a full disc; below S1 there is at most a thin remnant. A disc as
    # deep as the lumbar ones just below the body called S1 means that body is L5
    discs = disc_minima(flat)
    lumbar_depths = [d[3] for d in discs if labels["L1"][0] <= d[1] <= s1_top]
    if lumbar_depths:
        need = 0.6 * float(np.median(lumbar_depths))
        below_s1 = [d for d in discs if s1_top + 0.6 * body_len <= d[1] <= s1_top + 1.4 * spacing
                    and d[3] >= need]
        if below_s1:
            flags.append(QcFlag("disc-below-s1", "a full disc lies below the body taken for "
                                "S1: it may be L5 (labels shifted by one)"))
            penalties.append(LABEL_DOUBT_PENALTY)
    if not (s1_top - 0.5 * spacing <= canal_t[1] <= s1_top + 3.0 * spacing):
        flags.append(QcFlag("label-crosscheck", "the thecal sac does not end near S1–S2: "
                            "the level labels may be shifted"))
        penalties.append(LABEL_DOUBT_PENALTY)

    # 7. per-body geometry and ROIs on the mid slice
    prof_disc = prof_t[np.isfinite(flat) & (flat <= thr)]
    disc_level = float(np.nanmedian(prof_disc)) if prof_disc.size else float(np.nanmin(prof_t))
    bodies: dict[str, BodyFinding] = {}
    geo: dict[str, tuple[float, float, float, float | None]] = {}
    dep: float
    depths = []
    for lv, (a0, b0, _inf) in labels.items():
        tc = round((a0 + b0) / 2)
        rows_b = detect[max(0, tc - 4): tc + 5]
        ap = nanmedian_rows(rows_b) if rows_b.size else np.full(len(ks), np.nan)
        ap = ndimage.uniform_filter1d(np.nan_to_num(ap, nan=0.0), 3)
        level_si = float(np.median(ap[k_wall + 2: k_wall + 12]))
        depth_mm: float | None = None
        if level_si > disc_level * 1.08:
            cut = (level_si + disc_level) / 2
            below = np.flatnonzero(ap[k_wall + 12: k_wall + 65] < cut)
            if below.size:
                depth_mm = float(12 + below[0])
        geo[lv] = (float(a0), float(b0), level_si, depth_mm)
        if depth_mm is not None and 15 <= depth_mm <= 60:
            depths.append(depth_mm)
    typical_depth = float(np.median(depths)) if depths else 35.0

    heights: dict[str, tuple[float, float, float] | None] = {}
    detect_s = ndimage.uniform_filter1d(np.nan_to_num(detect, nan=0.0), 3, axis=0)  # columns
    for lv, (a0, b0, level_si, depth_mm) in geo.items():
        dep = depth_mm if depth_mm is not None and 15 <= depth_mm <= 60 else typical_depth
        tc = round((a0 + b0) / 2)
        hs: list[float] = []
        if level_si > disc_level * 1.08:
            cut = (level_si + disc_level) / 2
            for f in (0.25, 0.5, 0.75):
                col = detect_s[:, k_wall + round(f * dep)]
                run_len = run_around(col, tc, cut, int(0.9 * spacing))
                if run_len is not None:
                    hs.append(run_len)
        heights[lv] = (hs[0], hs[1], hs[2]) if len(hs) == 3 else None
        geo[lv] = (a0, b0, level_si, dep)

    for lv in labels:
        a0, b0, _level_si, dep_or_none = geo[lv]
        dep = float(dep_or_none if dep_or_none is not None else typical_depth)
        t_mid = (a0 + b0) / 2
        h = heights[lv]
        own_h = min(b0 - a0 + 1, body_len * 1.3)
        roi_h = min(h) if h else own_h
        roi_h = float(np.clip(roi_h, 0.4 * body_len, 1.3 * body_len))
        ratio: float | None = None
        suggested = False
        if h and lv != "S1":
            ref_list = [h[0]]
            for near in (_neighbour(lv, -1), _neighbour(lv, 1)):
                nh = heights.get(near) if near else None
                if nh:
                    ref_list.append(nh[0])
            ratio = float(min(h) / max(np.median(ref_list), 1e-6))
            suggested = ratio < 0.8
        k_lo, k_hi = 0.35 * dep, 0.8 * dep
        roi = _roi(fr, py, px, ty, tx, ny, nx, t_mid, k_wall - k0 + (k_lo + k_hi) / 2,
                   0.3 * roi_h, (k_hi - k_lo) / 2, mid)
        bodies[lv] = BodyFinding(lv, roi, inferred=labels[lv][2], height_mm=roi_h,
                                 height_ratio=ratio, suggested_fractured=suggested)

    # CSF at L3, else L2, L4
    csf_roi: Roi | None = None
    csf_level = ""
    for lv in ("L3", "L2", "L4"):
        a0, b0 = labels[lv][0], labels[lv][1]
        found = _csf_roi(fr, volume, straighten, py, px, ty, tx, ny, nx, a0, b0, k0, k_wall,
                         mid, n_slices, series)
        if found is not None:
            csf_roi, csf_level = found[0], lv
            if found[1]:
                flags.append(QcFlag("csf-unclear", f"CSF at {lv}: {'; '.join(found[2])}"))
                penalties.append(found[1])
            break
    if csf_roi is None:
        raise LocalisationError("the CSF of the thecal sac at L2–L4 could not be outlined")
    if csf_level != "L3":
        flags.append(QcFlag("csf-not-at-l3", f"the CSF at L3 is obscured: measured at "
                            f"{csf_level}"))
        # VBQ's CSF is the thecal sac at L3: where it cannot be outlined there, the canal is
        # narrow or unclear and the ROI found elsewhere needs a reviewer's look
        penalties.append(LABEL_DOUBT_PENALTY)

    from scoring.engine.vbq import roi_values  # local: vbq imports this module

    marrow = [float(np.median(v)) for lv in ("L1", "L2", "L3", "L4")
              if (v := roi_values(series.pixels[bodies[lv].roi.slice_index],
                                  bodies[lv].roi)).size]
    csf_v = roi_values(series.pixels[csf_roi.slice_index], csf_roi)
    csf_si = float(np.median(csf_v)) if csf_v.size else 0.0
    if marrow and (csf_si <= 0 or float(np.median(marrow)) > MAX_MARROW_TO_CSF * csf_si):
        flags.append(QcFlag("csf-too-dark", f"the CSF ROI is more than {MAX_MARROW_TO_CSF:g} "
                            "times darker than the marrow (VBQ is rarely above 5): it may lie "
                            "on bone, ligament or air, not in the thecal sac"))
        penalties.append(LABEL_DOUBT_PENALTY)
    confidence = float(max(0.0, 1.0 - sum(penalties)))
    path = [fr.to_original(float(y / fr.spacing[0]), float(x / fr.spacing[1]))
            for y, x in zip(py[sl][::5], px[sl][::5], strict=True)]
    return Localisation(mid_slice=mid, bodies=bodies, csf_roi=csf_roi, csf_level=csf_level,
                        confidence=confidence, flags=flags, canal_path_px=path,
                        si_direction_px=fr.direction_to_original(1.0, 0.0))


def _neighbour(level: str, step: int) -> str | None:
    order = ("T12", "L1", "L2", "L3", "L4", "L5", "S1")
    i = order.index(level) + step
    return order[i] if 0 <= i < len(order) - 1 else None


def _roi(fr: Frame, py: np.ndarray, px: np.ndarray, ty: np.ndarray, tx: np.ndarray,
         ny: np.ndarray, nx: np.ndarray, t_c: float, k_c: float, half_t: float,
         half_k: float, slice_index: int) -> Roi:
    """A box along the local spine axis, in the original pixel frame."""
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


def _csf_roi(fr: Frame, volume: PixelStack, straighten, py, px, ty, tx, ny, nx,  # type: ignore[no-untyped-def]
             a0: float, b0: float, k0: int, k_wall: int, mid: int, n_slices: int,
             series: Series) -> tuple[Roi, float, list[str]] | None:
    from scoring.engine.vbq import roi_values  # local: vbq imports this module

    tc = (a0 + b0) / 2
    half_t = 0.3 * (b0 - a0 + 1)
    best: tuple[float, Roi, float, list[str]] | None = None
    for s in range(max(0, mid - 1), min(n_slices, mid + 2)):
        r0, r1 = round(tc - half_t), round(tc + half_t) + 1
        rows = (straighten(volume[s], 0.6, (r0, r1)) if r0 >= 0 else
                straighten(volume[s], 0.6)[r0:r1])
        if rows.size == 0:
            continue
        prof = nanmedian_rows(rows)
        if not np.isfinite(prof[k0 - 25: k_wall + 4]).all():
            continue
        lo_k = k0 - 25
        seg = ndimage.uniform_filter1d(prof[lo_k: k_wall + 8], 2)
        wide = ndimage.median_filter(seg, 5, mode="nearest")  # ignores thin dark lines
        stop = k_wall - lo_k  # up to the anterior wall (the median filter drops its thin cortex)
        trough_i = 5 + int(np.argmin(wide[5:stop]))
        # the thecal sac lies directly behind the body; a dark band further back (fat
        # behind the sac where it is dark, muscle) must not take its place: of the bands
        # nearly as dark as the darkest (≥ CSF_BAND_MM wide), the most anterior one
        floor = float(wide[trough_i])
        cut = floor + CSF_NEAR_DARKEST * (float(np.max(wide[5:])) - floor)
        bands = [r for r in runs_of(wide[5:stop] < cut) if r[1] - r[0] + 1 >= CSF_BAND_MM]
        if bands:
            # its darkest point clear of the wall (the body's posterior cortex, as dark as
            # CSF on T1, can join the band where the sac touches the body)
            lo_b, hi_b = 5 + bands[-1][0], min(5 + bands[-1][1], stop - 1 - CSF_WALL_CLEAR_MM)
            if hi_b >= lo_b:
                trough_i = lo_b + int(np.argmin(wide[lo_b: hi_b + 1]))
        trough = float(wide[trough_i])
        ant_wall = float(np.max(wide[trough_i:]))
        contrast = 1.0 - trough / max(min(ant_wall, float(np.max(wide[: trough_i + 1]))), 1e-6)
        post_wall = float(np.max(wide[: trough_i + 1]))
        wall = min(ant_wall, post_wall)
        if wall <= trough * 1.05:
            continue
        inside = wide < trough + 0.5 * (wall - trough)
        runs = [r for r in runs_of(inside) if r[0] <= trough_i <= r[1]]
        if not runs:
            continue
        lo_c, hi_c = runs[0][0] + 1.5, runs[0][1] - 1.5
        if hi_c - lo_c < 2:
            continue
        # pure CSF: within 8 % of the canal's typical darkness (not cortex, cord or roots);
        # where the CSF is nearly black (below a tenth of its walls) 8 % of it is below the
        # noise, and a tenth of the way to the walls counts instead
        tol = 0.08 * trough if trough >= 0.1 * wall else 0.1 * (wall - trough)
        pure = np.abs(seg - trough) <= tol
        pure[: int(np.ceil(lo_c))] = False
        pure[int(np.floor(hi_c)) + 1:] = False
        pruns = [r for r in runs_of(pure) if r[1] - r[0] + 1 >= 2]
        if not pruns:
            continue
        pr = min(pruns, key=lambda r: 0 if r[0] <= trough_i <= r[1] else
                 min(abs(r[0] - trough_i), abs(r[1] - trough_i)))
        k_c = lo_k + (pr[0] + pr[1]) / 2 - k0
        half_k = max(0.75, (pr[1] - pr[0]) / 2)
        roi = _roi(fr, py, px, ty, tx, ny, nx, tc, k_c, half_t, half_k, s)
        values = roi_values(series.pixels[s], roi)
        if values.size < 20:
            continue
        med = float(np.median(values))
        penalty = 0.0
        why = []
        if contrast < 0.15:
            penalty += 0.3
            why.append(f"CSF only {contrast:.0%} darker than the canal walls")
        if runs[0][1] - runs[0][0] + 1 < 5:
            penalty += 0.3
            why.append("the canal is narrower than 5 mm")
        if best is None or med < best[0]:
            best = (med, roi, penalty, why)
    return (best[1], best[2], best[3]) if best else None
