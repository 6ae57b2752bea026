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
   ``REVIEW_BELOW_CONFIDENCE`` the caller answers ``needs_review``: one doubt about the
   level names or the CSF is enough (``LABEL_DOUBT_PENALTY``), so that a wrong level or a CSF
   ROI outside the sac does not come back confident (measured in docs/engine.md).

Modules: the canal search (step 2) is ``canal.py``, the CSF ROI (step 7) ``csf.py``, the
result types and the doubt penalty ``findings.py``, ROI pixels ``rois.py``; the sampling
(canonical frame, block means, bilinear samples, Otsu, ROIs along the path) is in
``sampling.py``; the 1-D profiles (canal valley, best path, runs, discs) are in
``profiles.py``. The level names can be corrected by the learned segmenter (``combine.py``).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage

from scoring.engine.canal import GRID_MM, find_canal
from scoring.engine.csf import csf_roi_at
from scoring.engine.dicom_io import Series
from scoring.engine.findings import (
    LABEL_DOUBT_PENALTY,
    MAX_MARROW_TO_CSF,
    BodyFinding,
    Localisation,
    LocalisationError,
)
from scoring.engine.model import QcFlag, Roi
from scoring.engine.profiles import (
    disc_minima,
    lordotic_tail,
    run_around,
    runs_of,
    smooth_nan,
    split_merged,
)
from scoring.engine.rois import roi_values
from scoring.engine.sampling import (
    bilinear,
    frame_of,
    nanmedian_rows,
    otsu_threshold,
    path_roi,
)

__all__ = ["LABEL_DOUBT_PENALTY", "MAX_MARROW_TO_CSF", "BodyFinding", "Localisation",
           "LocalisationError", "localize"]

LABELS_UP_FROM_SACRUM = ("S1", "L5", "L4", "L3", "L2", "L1", "T12")
REQUIRED = ("S1", "L5", "L4", "L3", "L2", "L1")
LEVEL_SPACING_MM = (28.0, 48.0)  # adult lumbar segment (body + disc), centre to centre


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

    # 2. the canal (canal.py): its path at ~1 mm, canonical mm
    ys, xs, fine = find_canal(volume, fr, series.pixel_spacing_mm, flags, penalties, debug)

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
    thr = otsu_threshold(np.clip(vals, lo_v, hi_v))
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
                     canal_t=canal_t, mid=mid, depth=depth_arr, end_t=end_t)
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
        roi = path_roi(fr, py, px, ty, tx, ny, nx, t_mid, k_wall - k0 + (k_lo + k_hi) / 2,
                   0.3 * roi_h, (k_hi - k_lo) / 2, mid)
        bodies[lv] = BodyFinding(lv, roi, inferred=labels[lv][2], height_mm=roi_h,
                                 height_ratio=ratio, suggested_fractured=suggested)

    # CSF at L3, else L2, L4
    csf_roi: Roi | None = None
    csf_level = ""
    for lv in ("L3", "L2", "L4"):
        a0, b0 = labels[lv][0], labels[lv][1]
        found = csf_roi_at(fr, volume, straighten, py, px, ty, tx, ny, nx, a0, b0, k0, k_wall,
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
