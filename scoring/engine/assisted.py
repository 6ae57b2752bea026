"""The assisted path: ROIs for L1–L4 and the L3 CSF from one click inside a named body.

Pure (numpy, scipy). For when the automatic localiser fails: the reviewer clicks once inside
one body (default L3) on a sagittal slice and names it; the engine does the rest on that
slice, without the automatic localiser.

1. **Seed body.** The marrow level is the median within ``SEED_RADIUS_MM`` of the click; the
   dark level the 10th percentile within ``WINDOW_MM`` (cortex, CSF, discs). The body is the
   connected region around the click above a threshold between the two, on the image smoothed
   by ~0.7 mm, opened by a ~1.5 mm disc (thin bridges through partial-volumed cortex break),
   holes filled (veins, fatty foci). If the region is not body-sized (height 10–50 mm, depth
   15–70 mm) or reaches the search window's edge (a leak), the threshold moves towards the
   marrow level and the region is grown again.
2. **Counting bodies.** From a body, the profile along its own superior–inferior axis
   (median over the central half of its depth) runs out to ``REACH_HEIGHTS`` body heights
   and is cut into bright runs by the body's threshold (the endplates are dark lines on T1).
   A disc may be nearly as bright as marrow but is short: the next body is the first run
   past the body's own at least ``MIN_RUN_HEIGHTS`` of a body height long, and its middle
   seeds the neighbour, grown as in 1 with its own marrow level. Each neighbour's own axes carry the
   count on (lordosis, tilt). Levels follow the count: one body up from L3 is L2, and so on.
   A darker neighbour (fresh fracture, oedema) that stays under the body's threshold is
   looked for again on a lower cut (``LOW_FRACTION``).
3. **Checks.** A neighbour's height must be within ``HEIGHT_RATIO`` of the clicked body's,
   the gap (disc) 1–20 mm, and the centre-to-centre distance ``SPACING_HEIGHTS`` heights of
   the body it was counted from (a disc grown as a body lies too close, a skipped body too
   far); otherwise the count stops there with the reason (``assist-failed``) and the result
   is ``needs_review`` without a value. A wrong level is worse than none.
4. **ROIs and CSF.** Each body gets ``bodies.body_roi`` (the automatic path's box) and the CSF
   is found behind L3 by ``bodies.csf_roi_behind``, both on the clicked slice.

The result's source is ``assisted``; it always goes to the usual review (info flag
``assisted-placement``; status ``needs_review``): a reviewer accepts or corrects it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from scoring.engine.bodies import (
    BodyAxes,
    body_axes,
    body_roi,
    csf_roi_behind,
    sample,
    series_directions,
)
from scoring.engine.dicom_io import Series
from scoring.engine.model import VBQ_LEVELS, EngineError, QcFlag, Roi

SPINE = ("T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S1")  # superior → inferior
SEED_LEVELS = ("T12", "L1", "L2", "L3", "L4", "L5")
SEED_RADIUS_MM = 4.0
WINDOW_MM = 40.0
SMOOTH_MM = 0.7
OPEN_MM = 1.5
UPPER_FACTOR = 1.5  # the band reaches this many times as far above the marrow as below it
THRESHOLD_FRACTIONS = (0.5, 0.6, 0.7, 0.8)  # from the dark level towards the marrow level
REACH_HEIGHTS = 2.2
MIN_RUN_HEIGHTS = 0.5
HEIGHT_RATIO = (0.6, 1.6)  # against the clicked body
SPACING_HEIGHTS = (1.05, 2.2)  # centre to centre, in heights of the body counted from
LOW_FRACTION = 0.3  # the second, lower cut of the profile (a darker neighbour)
GAP_MM = (1.0, 20.0)


class AssistError(EngineError):
    """The click cannot seed the assisted path (outside the image, unknown level)."""

    code = "bad-seed"


@dataclass(frozen=True)
class Seed:
    """A click inside the body named ``level`` at (``row``, ``col``) of ``slice_index``."""

    level: str
    slice_index: int
    row: float
    col: float

    @classmethod
    def parse(cls, value: Seed | Mapping[str, Any]) -> Seed:
        """A ``Seed`` from itself or a mapping with level, slice_index, row, col."""
        if isinstance(value, Seed):
            return value
        try:
            return cls(str(value.get("level", "L3")).strip().upper(), int(value["slice_index"]),
                       float(value["row"]), float(value["col"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise AssistError("the seed needs a level, a slice_index, a row and a col") from exc


@dataclass
class _Body:
    level: str
    mask: np.ndarray
    axes: BodyAxes
    marrow: float
    threshold: float
    dark: float


@dataclass
class AssistedRois:
    """The bodies placed from the seed (level → ROI), the CSF ROI (``None`` when not found)
    and the QC flags (``assist-failed`` says why counting stopped)."""

    slice_index: int
    rois: dict[str, Roi]
    csf_roi: Roi | None
    flags: list[QcFlag] = field(default_factory=list)


def _disc(radius_px: tuple[float, float]) -> np.ndarray:
    rr = max(1, int(np.ceil(radius_px[0])))
    cc = max(1, int(np.ceil(radius_px[1])))
    y, x = np.ogrid[-rr:rr + 1, -cc:cc + 1]
    return np.asarray((y / max(radius_px[0], 0.5)) ** 2 + (x / max(radius_px[1], 0.5)) ** 2
                      <= 1.0)


class _Slice:
    """The clicked slice with what every body search needs (pixels, spacing, directions)."""

    def __init__(self, series: Series, slice_index: int) -> None:
        self.index = slice_index
        self.spacing = series.pixel_spacing_mm
        self.image = np.asarray(series.pixels[slice_index], np.float32)
        sigma = (SMOOTH_MM / self.spacing[0], SMOOTH_MM / self.spacing[1])
        self.smooth = ndimage.gaussian_filter(self.image, sigma)
        self.inferior, self.posterior = series_directions(series)

    def window(self, row: float, col: float, radius_mm: float) -> tuple[slice, slice]:
        sp = self.spacing
        r0 = max(0, int(row - radius_mm / sp[0]))
        r1 = min(self.image.shape[0], int(row + radius_mm / sp[0]) + 1)
        c0 = max(0, int(col - radius_mm / sp[1]))
        c1 = min(self.image.shape[1], int(col + radius_mm / sp[1]) + 1)
        return slice(r0, r1), slice(c0, c1)

    def grow(self, level: str, row: float, col: float, dark: float | None = None
             ) -> _Body | str:
        """The body around (row, col), or why none was found (also when the point lies
        beyond the image: counting along a tilted column can step off its edge)."""
        sp = self.spacing
        if not (0 <= round(row) < self.image.shape[0] and 0 <= round(col) < self.image.shape[1]):
            return f"{level} lies beyond the edge of the image"
        near = self.window(row, col, SEED_RADIUS_MM)
        marrow = float(np.median(self.smooth[near]))
        box = self.window(row, col, WINDOW_MM)
        crop = self.smooth[box]
        if dark is None:
            dark = float(np.percentile(crop, 10))
        if not marrow > dark:
            return f"the click on {level} is not brighter than its surroundings"
        seed = (round(row) - box[0].start, round(col) - box[1].start)
        opener = _disc((OPEN_MM / sp[0], OPEN_MM / sp[1]))
        why = f"no body-sized bright region around the click on {level}"
        for fraction in THRESHOLD_FRACTIONS:
            threshold = dark + fraction * (marrow - dark)
            upper = marrow + UPPER_FACTOR * (marrow - threshold)
            bright = ndimage.binary_opening((crop >= threshold) & (crop <= upper),
                                            structure=opener)
            labels, n = ndimage.label(bright)
            if n == 0:
                continue
            label = labels[seed]
            if label == 0:  # the click on a dark vein or right on the edge: nearest region
                dist, (ir, ic) = ndimage.distance_transform_edt(
                    labels == 0, sampling=sp, return_indices=True)
                if dist[seed] > 3.0:
                    continue
                label = labels[ir[seed], ic[seed]]
            region = ndimage.binary_fill_holes(labels == label)
            if (region[0].any() or region[-1].any() or region[:, 0].any()
                    or region[:, -1].any()):
                why = f"the region around {level} leaks beyond {WINDOW_MM:.0f} mm"
                continue
            mask = np.zeros(self.image.shape, bool)
            mask[box] = region
            axes = body_axes(mask, sp, self.inferior, self.posterior)
            if axes is None:
                continue
            if not axes.body_sized:
                why = (f"the region around {level} is {axes.height_mm:.0f} × "
                       f"{axes.depth_mm:.0f} mm, not a vertebral body")
                continue
            return _Body(level, mask, axes, marrow, threshold, dark)
        return why

    def neighbour(self, body: _Body, step: int, level: str, seed_height_mm: float
                  ) -> _Body | str:
        """The next body along ``body``'s axis (``step`` +1 inferior, -1 superior)."""
        ax = body.axes
        v_c = (ax.v_range[0] + ax.v_range[1]) / 2
        vs = np.linspace(v_c - 0.25 * ax.depth_mm, v_c + 0.25 * ax.depth_mm, 9)
        reach = REACH_HEIGHTS * ax.height_mm
        ts = np.arange(0.0, reach, 0.5)
        u_c = (ax.u_range[0] + ax.u_range[1]) / 2
        tt, vv = np.meshgrid(u_c + step * ts, vs, indexing="ij")
        with np.errstate(all="ignore"):
            patch = sample(self.smooth, ax.point(tt, vv), self.spacing)
            profile = np.nanmedian(patch, axis=1)
        profile = np.where(np.isfinite(profile), profile, -np.inf)
        where = "below" if step > 0 else "above"
        # a darker neighbour (a fresh fracture, oedema) may stay under the body's own
        # threshold (no run, or a run one body further on): the profile is then cut again
        # lower down
        cuts = [body.threshold]
        low = body.dark + LOW_FRACTION * (body.marrow - body.dark)
        if low < body.threshold:
            cuts.append(low)
        why = ""
        for cut in cuts:
            found = _next_run(profile, ts, cut, ax.height_mm)
            if isinstance(found, str):
                why = f"{found} {where} {body.level}"
                continue
            own_end, run_start, run_end = found
            gap_mm = ts[run_start] - ts[own_end]
            if GAP_MM[0] <= gap_mm <= GAP_MM[1]:
                break
            why = (f"the gap between {body.level} and {level} is {gap_mm:.0f} mm, not a "
                   "disc")
        else:
            return why
        t_mid = (ts[run_start] + min(ts[run_end], ts[run_start] + ax.height_mm)) / 2
        point = ax.point(u_c + step * t_mid, v_c)
        grown = self.grow(level, point[0] / self.spacing[0], point[1] / self.spacing[1])
        if isinstance(grown, str):
            return grown
        ratio = grown.axes.height_mm / seed_height_mm
        if not HEIGHT_RATIO[0] <= ratio <= HEIGHT_RATIO[1]:
            return (f"{level} is {ratio:.1f} times as high as the clicked body: the count "
                    "along the spine is not reliable")
        spacing = abs(float((grown.axes.centre_mm - ax.centre_mm) @ ax.axis)) / ax.height_mm
        if not SPACING_HEIGHTS[0] <= spacing <= SPACING_HEIGHTS[1]:
            return (f"{level} is {spacing:.1f} body heights from {body.level} (a disc or a "
                    "skipped body?): the count along the spine is not reliable")
        if (grown.mask & body.mask).any():
            return f"{level} and {body.level} merge: the disc between them was not found"
        return grown


def _next_run(profile: np.ndarray, ts: np.ndarray, threshold: float, height_mm: float
              ) -> tuple[int, int, int] | str:
    """(end of the body's own run, start and end of the next body's run) on a profile cut
    at ``threshold``, or what is missing. Runs of bright samples: the body's own first, then
    (past the dark endplate lines) a disc, which may be nearly as bright as marrow on T1 but
    is short, then the next body: the first run at least ``MIN_RUN_HEIGHTS`` of a body height
    long."""
    bright = profile >= threshold
    edges = np.flatnonzero(np.diff(np.concatenate([[0], bright.view(np.int8), [0]])))
    runs = list(zip(edges[::2], edges[1::2] - 1, strict=True))
    if not runs or runs[0][0] != 0:
        return "the profile does not start in the body"
    nxt = next(((lo, hi) for lo, hi in runs[1:]
                if ts[hi] - ts[lo] + 0.5 >= MIN_RUN_HEIGHTS * height_mm), None)
    if nxt is None:
        return "no body-sized bright run"
    return int(runs[0][1]), int(nxt[0]), int(nxt[1])


def assisted_rois(series: Series, seed: Seed | Mapping[str, Any]) -> AssistedRois:
    """Bodies L1–L4 and the L3 CSF placed from one click (see the module docstring).

    Raises ``AssistError`` for a click outside the series or an unknown level; a failure to
    find the anatomy comes back as ``assist-failed`` flags (and missing ROIs)."""
    seed = Seed.parse(seed)
    if seed.level not in SEED_LEVELS:
        raise AssistError(f"the clicked body must be one of {', '.join(SEED_LEVELS)}, not "
                          f"{seed.level[:8]!r}")
    n, rows, cols = series.pixels.shape
    if not 0 <= seed.slice_index < n:
        raise AssistError(f"slice {seed.slice_index} is outside the series")
    if not (0 <= seed.row < rows and 0 <= seed.col < cols):
        raise AssistError("the click is outside the image")
    image = _Slice(series, seed.slice_index)
    flags: list[QcFlag] = [QcFlag("assisted-placement", f"ROIs placed from one click inside "
                                  f"{seed.level}: check the levels before accepting", "info")]
    first = image.grow(seed.level, seed.row, seed.col)
    if isinstance(first, str):
        flags.append(QcFlag("assist-failed", first))
        return AssistedRois(seed.slice_index, {}, None, flags)
    found = {seed.level: first}
    at = SPINE.index(seed.level)
    wanted = [SPINE.index(lv) for lv in VBQ_LEVELS]
    for step, last in ((-1, min(wanted)), (1, max(wanted))):
        body = first
        index = at
        while (index - last) * step < 0:
            index += step
            grown = image.neighbour(body, step, SPINE[index], first.axes.height_mm)
            if isinstance(grown, str):
                flags.append(QcFlag("assist-failed", grown))
                break
            found[SPINE[index]] = grown
            body = grown
    rois = {lv: body_roi(b.axes, image.spacing, seed.slice_index) for lv, b in found.items()}
    csf_roi = None
    if "L3" in found:
        l3 = found["L3"]
        csf = csf_roi_behind(image.image, l3.axes, l3.marrow, image.spacing, seed.slice_index,
                             "L3")
        flags.extend(csf.flags)
        csf_roi = csf.roi
    return AssistedRois(seed.slice_index, rois, csf_roi, flags)
