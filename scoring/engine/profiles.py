"""Profiles along and across the spine for the localiser. Pure (numpy/scipy).

The canal *valley* (a band darker than tissue on both sides), the best continuous path through
it, runs of a 1-D mask, the discs along the bodies' profile (thin bands darker than the marrow
on both sides) and the splitting of runs that hold two bodies, and the lordotic extension of
the canal path below the thecal sac.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from scoring.engine.sampling import odd_half_width, otsu_per_image

BODY_MM = 30.0  # an adult lumbar body's height, at most (L1 ~25 mm, L5 ~28 mm)


def valley_depth(image: np.ndarray, cell: float, tissue: np.ndarray | None = None) -> np.ndarray:
    """How much darker a ~5 mm wide band is than tissue ~7–19 mm away on both sides along the
    AP axis (0–1); ``cell``: the grid's column size, mm. The width requirement ignores thin
    dark lines (cortex, ligaments). ``image``: (slices, rows, cols), each slice on its own.
    The walls must be tissue (above half the slice's Otsu threshold), not air."""
    if tissue is None:
        tissue = (0.5 * otsu_per_image(image)).astype(np.float32)[:, None, None]
    gaps = sorted({max(1, round(g / cell)) for g in (10.0, 12.0, 14.0, 16.0)})
    w = image.shape[-1]
    pad = gaps[-1]
    padded = np.pad(image, [(0, 0), (0, 0), (pad, pad)], mode="edge")
    centre = ndimage.uniform_filter1d(image, 2 * odd_half_width(5.0, cell) + 1, axis=-1,
                                      mode="nearest")
    side = ndimage.uniform_filter1d(padded, 2 * odd_half_width(6.0, cell) + 1, axis=-1,
                                    mode="nearest")
    # the walls at a gap: the darker of the two sides. The depth 1 - centre / walls grows
    # with the walls, so the deepest gap is the one with the brightest walls; and the
    # brightest walls are tissue exactly when some gap's walls are (one division in all)
    brightest = np.minimum(side[..., pad - gaps[0]: pad - gaps[0] + w],
                           side[..., pad + gaps[0]: pad + gaps[0] + w])
    for g in gaps[1:]:
        np.maximum(brightest, np.minimum(side[..., pad - g: pad - g + w],
                                         side[..., pad + g: pad + g + w]), out=brightest)
    seen = brightest > tissue
    depth = np.zeros_like(centre)
    np.divide(centre, brightest, out=depth, where=seen)
    np.subtract(1.0, depth, out=depth, where=seen)
    return np.clip(depth, 0.0, 1.0, out=depth)


def best_path(score: np.ndarray, margin: int) -> np.ndarray:
    """Column per row maximising the summed score; ≤ 1 column change per row (a move costs
    0.02; ties: stay, then from the left, then from the right)."""
    h, w = score.shape
    s = score.astype(np.float64)
    s[:, :margin] = -1.0
    s[:, w - margin:] = -1.0
    # the running best per column, with a column of -inf on each side: per row, the better
    # neighbour (one call for both sides) less the move cost against staying, in four calls
    # on row views made once (the loop is bound by the calls, not by the arithmetic)
    pad = np.full((h, w + 2), -np.inf)
    acc = pad[:, 1:-1]
    acc[0] = s[0]
    nb = np.empty(w)
    rows_l, rows_r, rows, s_rows = list(pad[:, :-2]), list(pad[:, 2:]), list(acc), list(s)
    for r in range(1, h):
        np.maximum(rows_l[r - 1], rows_r[r - 1], out=nb)
        nb -= 0.02
        cur = rows[r]
        np.maximum(rows[r - 1], nb, out=cur)
        cur += s_rows[r]
    # the moves, read back for all rows at once from the stored values
    prev = acc[:-1]
    move = np.argmax(np.stack([prev, pad[:-1, :-2] - 0.02, pad[:-1, 2:] - 0.02]), axis=0)
    back = np.array([0, -1, 1], np.int8)[move]
    path = np.zeros(h, int)
    path[-1] = int(np.argmax(acc[-1]))
    for r in range(h - 1, 0, -1):
        path[r - 1] = path[r] + back[r - 1, path[r]]
    return path


def longest_run(mask: np.ndarray, bridge: int) -> tuple[int, int] | None:
    closed = ndimage.binary_closing(mask, np.ones(bridge)) | mask if bridge > 1 else mask
    labels, n = ndimage.label(closed)
    if n == 0:
        return None
    sizes = ndimage.sum(closed, labels, range(1, n + 1))
    best = int(np.argmax(sizes)) + 1
    idx = np.flatnonzero(labels == best)
    return int(idx[0]), int(idx[-1])


def smooth_nan(profile: np.ndarray, sigma: float) -> np.ndarray:
    ok = np.isfinite(profile)
    num = ndimage.gaussian_filter1d(np.where(ok, profile, 0.0), sigma, mode="nearest")
    den = ndimage.gaussian_filter1d(ok.astype(float), sigma, mode="nearest")
    return np.where(den > 1e-3, num / np.maximum(den, 1e-3), np.nan)


def runs_of(mask: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) index of each run of true values of a 1-D mask, left to right."""
    edges = np.diff(np.concatenate(([0], np.asarray(mask, np.int8), [0])))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return [(int(a), int(b) - 1) for a, b in zip(starts, stops, strict=True)]


def run_around(column: np.ndarray, centre: int, thr: float, limit: int) -> float | None:
    """Length (samples) of the above-threshold run containing (or nearest to) ``centre``."""
    lo_i, hi_i = max(0, centre - limit), min(len(column), centre + limit + 1)
    seg = column[lo_i:hi_i] > thr
    runs = runs_of(seg)
    if not runs:
        return None
    c = centre - lo_i
    best = min(runs, key=lambda r: 0 if r[0] <= c <= r[1] else min(abs(r[0] - c),
                                                                   abs(r[1] - c)))
    return float(best[1] - best[0] + 1)


def disc_minima(flat: np.ndarray) -> list[tuple[int, int, int, float]]:
    """Discs along the posterior-band profile ``flat`` (1 mm samples): thin dark bands, each
    darker than the brightest marrow within 16 mm on *both* sides (a ratio, so the bias and
    a body darker than its neighbours cancel), each the deepest within 20 mm (a lumbar segment
    is at least ~28 mm; endplate lines and marrow texture are closer). The depth threshold comes
    from the profile: 40 % of the median depth of its five deepest bands (at least 0.08).
    Returns (first, centre, last, depth) of each disc's dark run, top to bottom."""
    ok = np.isfinite(flat)
    if ok.sum() < 30:
        return []
    sm = ndimage.gaussian_filter1d(np.where(ok, flat, np.nanmedian(flat)), 1.0)
    reach = 16
    windows = np.lib.stride_tricks.sliding_window_view(
        np.pad(sm, (reach, reach + 1), mode="edge"), reach).max(axis=1)
    left = windows[: len(sm)]  # sm[t - 16: t]
    right = windows[reach + 1: reach + 1 + len(sm)]  # sm[t + 1: t + 17]
    walls = np.minimum(left, right)
    depth = np.where(ok & (walls > 0), 1.0 - sm / np.maximum(walls, 1e-9), 0.0)
    peak = (depth == ndimage.maximum_filter1d(depth, 41, mode="nearest")) & (depth > 0)
    idx = np.flatnonzero(peak)
    if idx.size == 0:
        return []
    top = np.sort(depth[idx])[::-1][:5]
    need = max(0.08, 0.4 * float(np.median(top)))
    out = []
    for i in idx[depth[idx] >= need]:
        level = sm[i] + 0.5 * (walls[i] - sm[i])
        a = i
        while a > 0 and sm[a - 1] < level and i - a < 12:
            a -= 1
        b = i
        while b < len(sm) - 1 and sm[b + 1] < level and b - i < 12:
            b += 1
        if b - a + 1 <= 22:  # a disc is thin; a long dark stretch is a dark body or no spine
            out.append((int(a), int(i), int(b), float(depth[i])))
    return out


def lordotic_tail(py: np.ndarray, px: np.ndarray, d_end: np.ndarray, n: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 1 mm steps below the end of the canal path (canonical mm: rows down, columns
    posterior). Below the thecal sac the column goes on curving posteriorly (lumbar lordosis
    into the sacrum): where the last 60 mm of the path turn posteriorly, the extension keeps
    turning at that rate (at most 45° in all); otherwise it follows the end tangent."""
    theta0 = float(np.arctan2(d_end[1], d_end[0]))
    rate = 0.0
    span = min(60, len(py) - 1)
    if span >= 30:
        a = np.arctan2(px[-span + 10] - px[-span], py[-span + 10] - py[-span])
        rate = max(0.0, (theta0 - float(a)) / (span - 10))
    theta = theta0 + np.minimum(rate * np.arange(1, n + 1), np.radians(45.0))
    return (py[-1] + np.cumsum(np.cos(theta)), px[-1] + np.cumsum(np.sin(theta)))


def split_merged(segments: list[tuple[int, int]], flat: np.ndarray
                  ) -> list[tuple[int, int]]:
    """Split bright runs that hold two bodies at the discs found inside them
    (``disc_minima``). On real T1 a disc can be barely darker than marrow next to a bright
    body, so thresholding the profile joins two bodies; the disc is still a thin band darker
    than the marrow on both sides. A run is split only if it is longer than 1.4 × the typical
    body (the median run, at most ``BODY_MM``; ``BODY_MM`` with fewer than three runs, when
    the runs themselves are merged bodies), at discs at least 8 mm from its ends. ``flat``:
    1 mm samples."""
    if not segments:
        return segments
    typical = BODY_MM
    if len(segments) >= 3:
        typical = min(typical, float(np.median([b - a + 1 for a, b in segments])))
    discs = None
    out: list[tuple[int, int]] = []
    for a, b in segments:
        if b - a + 1 <= 1.4 * typical:
            out.append((a, b))
            continue
        if discs is None:
            discs = disc_minima(flat)
        cuts = [(d0, d1) for d0, c, d1, _ in discs if a + 8 <= c <= b - 8]
        start = a
        for d0, d1 in cuts:
            if d0 - start >= 8:
                out.append((start, d0 - 1))
                start = d1 + 1
        out.append((start, b))
    return out
