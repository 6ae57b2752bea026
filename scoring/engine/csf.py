"""Step 7b of the automatic localisation (``localize``): the CSF ROI in the thecal sac behind a
body. Pure (numpy/scipy).

Across the canal on the straightened image, up to its anterior wall (a median filter drops the
thin posterior cortex of the body; the sac can lie closer to the body than the canal's median
wall), the sac is the dark band nearest the body among those at least ``CSF_BAND_MM`` wide and
within ``CSF_NEAR_DARKEST`` of the darkest level towards the brightest (fat behind the sac
where it is dark, or muscle further back, is not the sac); its darkest point is taken
``CSF_WALL_CLEAR_MM`` clear of the wall, whose cortex can join the band. The ROI is its
contiguous part within 8 % of its darkest level (a tenth of the way to the walls where the
CSF is nearly black), 1.5 mm inside its walls (excludes cortex, cord, cauda roots), on the
slice among mid ± 1 where it is darkest.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from scoring.engine.dicom_io import PixelStack, Series
from scoring.engine.model import Roi
from scoring.engine.profiles import runs_of
from scoring.engine.rois import roi_values
from scoring.engine.sampling import Frame, nanmedian_rows, path_roi

CSF_NEAR_DARKEST = 0.3  # a band within this fraction from the darkest to the brightest
CSF_BAND_MM = 3  # the sac is at least this wide (1 mm samples)
CSF_WALL_CLEAR_MM = 2  # its darkest point is looked for this far from the anterior wall


def csf_roi_at(fr: Frame, volume: PixelStack, straighten, py, px, ty, tx, ny, nx,  # type: ignore[no-untyped-def]
                 a0: float, b0: float, k0: int, k_wall: int, mid: int, n_slices: int,
               series: Series) -> tuple[Roi, float, list[str]] | None:
    """The CSF ROI behind the body spanning arc lengths ``a0``–``b0`` of the straightened
    path (see the module docstring), its confidence penalty and the reasons; ``None`` when no
    sac is outlined on any of the slices ``mid`` ± 1. ``straighten(image, sigma, rows)``
    samples an image along the path; ``k0`` is the index of the path on the AP axis, ``k_wall``
    that of the canal's anterior wall."""
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
        roi = path_roi(fr, py, px, ty, tx, ny, nx, tc, k_c, half_t, half_k, s)
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
