"""A small learned segmenter for sagittal lumbar MRI (ONNX, run with onnxruntime on CPU).

Pure (numpy, scipy; onnxruntime when installed). The network is a 2-D U-Net trained by
``scripts/train_segmenter.py`` (seeded; torch only at training time) on the SPIDER T2 label maps
with SynthSeg-style contrast randomisation, so that it also applies to T1 images. It works on
one sagittal slice resampled to ``GRID_MM`` millimetres per pixel, rows head→feet and columns
anterior→posterior (the engine's series orientation), and labels each pixel with one of
``CLASSES``:

- ``body``: a vertebral body other than L5 (the part of the vertebra anterior to the canal);
- ``l5``: the L5 body (the body directly above the lowest lumbar disc), so that levels are
  counted from the lumbosacral junction the network recognises, not from the lowest bright
  block (the classical localiser's main failure is taking L5 for S1);
- ``disc``, ``canal`` (spinal canal / thecal sac), ``posterior`` (posterior elements).

``count_levels`` turns a class map into level masks and doubts: the body components
(≥ 80 mm²), cut apart at disc fragments where the network joined two bodies, ordered
head→feet; L5 the component the network calls L5, then L4…T12 counted upwards; doubts when a
disc is missing between counted neighbours, below L5, or sizes and spacing are uneven.
``learned_rois`` runs it on the central slices of a series and places the ROIs.

When onnxruntime or the model file is missing, ``available()`` is False and ``unavailable_reason``
says why; the engine then uses the classical localiser alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from scoring.engine.bodies import body_axes, csf_roi_behind, largest_part, series_directions
from scoring.engine.dicom_io import Series
from scoring.engine.model import VBQ_LEVELS, QcFlag
from scoring.engine.segimport import (
    CSF_LEVELS,
    SegmentationError,
    SegmentationRois,
    marrow_median,
    rois_from_labels,
)

GRID_MM = 2.0
CLASSES = ("background", "body", "l5", "disc", "canal", "posterior")
MODEL_PATH = Path(__file__).with_name("models") / "vbq_seg.onnx"
MIN_BODY_MM2 = 80.0
PAD = 16



def held_out_people(names: list[str]) -> set[str]:
    """The SPIDER people the committed model was never trained on: every 5th name in sorted
    order (9 of the 41). ``scripts/train_segmenter.py`` and ``bench/vbq_real.py`` use this."""
    return set(sorted(names)[::5])


_session: Any = None
unavailable_reason = ""


def _load() -> Any:
    global _session, unavailable_reason
    if _session is not None:
        return _session
    try:
        import onnxruntime as ort  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        unavailable_reason = "onnxruntime is not installed"
        return None
    if not MODEL_PATH.is_file():
        unavailable_reason = f"the model file {MODEL_PATH.name} is missing"
        return None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    _session = ort.InferenceSession(str(MODEL_PATH), opts, providers=["CPUExecutionProvider"])
    return _session


def available() -> bool:
    """Whether the learned segmenter can run here (onnxruntime installed, model present)."""
    return _load() is not None


def normalise(image: np.ndarray) -> np.ndarray:
    """Intensities scaled so that the 1st and 99.5th percentiles map to 0 and 1 (clipped)."""
    x = np.asarray(image, np.float32)
    lo, hi = np.percentile(x, (1.0, 99.5))
    return np.clip((x - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0).astype(np.float32)


def to_grid(image: np.ndarray, spacing_mm: tuple[float, float], order: int = 1) -> np.ndarray:
    """``image`` resampled to ``GRID_MM`` per pixel."""
    zoom = (spacing_mm[0] / GRID_MM, spacing_mm[1] / GRID_MM)
    return ndimage.zoom(np.asarray(image), zoom, order=order, prefilter=False)


def _padded(x: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    h, w = x.shape[-2:]
    ph, pw = (-h) % PAD, (-w) % PAD
    return np.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, ph), (0, pw)]), (h, w)


def probabilities_on_grid(images: np.ndarray) -> np.ndarray:
    """Class probabilities (n, classes, h, w) of normalised grid images (n, h, w)."""
    session = _load()
    if session is None:
        raise RuntimeError(f"learned segmenter unavailable: {unavailable_reason}")
    x, (h, w) = _padded(np.asarray(images, np.float32)[:, None])
    logits = session.run(None, {"image": x})[0][:, :, :h, :w]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True), np.float32)


def segment(image: np.ndarray, spacing_mm: tuple[float, float]) -> np.ndarray:
    """Class map (indices into ``CLASSES``) of one slice at its own resolution."""
    grid = normalise(to_grid(image, spacing_mm))
    prob = probabilities_on_grid(grid[None])[0]
    classes = np.argmax(prob, axis=0).astype(np.uint8)
    zoom = (image.shape[0] / classes.shape[0], image.shape[1] / classes.shape[1])
    full = ndimage.zoom(classes, zoom, order=0)
    return np.asarray(full[: image.shape[0], : image.shape[1]], np.uint8)


MIN_DISC_MM2 = 12.0  # a disc fragment this large counts as a disc between two bodies
MIN_CUT_SIDE_MM2 = 250.0  # both sides of a disc cut must hold this much body (a lumbar body's
# mid-sagittal section is ≥ ~400 mm²): a spurious fragment inside one body does not halve it
CUT_HALF_WIDTH_PX = 0.8  # half-width of the cut along a disc's line (an 8-connected band)
TALL = 1.5  # a component this many times the typical body's height may hold two bodies


def _disc_components(classes: np.ndarray, px_mm2: float) -> list[tuple[np.ndarray, np.ndarray,
                                                                        np.ndarray, float]]:
    """Disc components ≥ ``MIN_DISC_MM2``: (pixel coordinates, centroid, unit normal to the
    disc's long axis, half-length along it in pixels)."""
    lab, n = ndimage.label(classes == 3)
    out = []
    for i in range(1, n + 1):
        pts = np.argwhere(lab == i).astype(float)
        if len(pts) * px_mm2 < MIN_DISC_MM2:
            continue
        centre = pts.mean(axis=0)
        d = pts - centre
        if len(pts) >= 3:
            _, vecs = np.linalg.eigh(d.T @ d)
            along = vecs[:, 1]
        else:
            along = np.array([0.0, 1.0])
        if abs(along[1]) < 0.5:  # a disc runs roughly anterior→posterior
            along = np.array([0.0, 1.0])
        normal = np.array([-along[1], along[0]])
        out.append((pts, centre, normal, float(np.abs(d @ along).max())))
    return out


def _cut_at_discs(bone: np.ndarray, discs: list, px_mm2: float) -> np.ndarray:
    """``bone`` with each component that touches a disc fragment, is at least ``TALL`` times
    the median component's height (measured across the fragment's line) and continues on
    both sides of that line (each side ≥ ``MIN_CUT_SIDE_MM2``) cut along the line: two bodies
    that the network joined where their disc is thin or only partly seen come apart at the
    disc fragment between them."""
    bone = bone.copy()
    rr, cc = np.indices(bone.shape)
    min_side = MIN_CUT_SIDE_MM2 / px_mm2
    lab, n = ndimage.label(bone)
    for pts, centre, normal, half in discs:
        if n == 0:
            break
        signed = (rr - centre[0]) * normal[0] + (cc - centre[1]) * normal[1]
        ids = np.arange(1, n + 1)
        sizes = ndimage.sum_labels(bone, lab, ids)
        extent = (ndimage.maximum(signed, lab, ids) - ndimage.minimum(signed, lab, ids))
        extent = np.asarray(extent)[np.asarray(sizes) >= min_side]
        typical = float(np.median(extent)) if extent.size else 0.0
        # components within 2 pixels of the fragment
        r0, c0 = pts.min(axis=0).astype(int) - 2
        r1, c1 = pts.max(axis=0).astype(int) + 3
        window = lab[max(r0, 0): r1, max(c0, 0): c1]
        cut = False
        for k in np.unique(window[window > 0]):
            comp = lab == k
            v = signed[comp]
            if float(v.max() - v.min()) < TALL * typical:
                continue  # a single body: the fragment is an endplate or a spurious speck
            if min(int((v < -CUT_HALF_WIDTH_PX).sum()), int((v > CUT_HALF_WIDTH_PX).sum())
                   ) < min_side:
                continue
            along = np.abs((rr - centre[0]) * normal[1] - (cc - centre[1]) * normal[0])
            reach = along <= half + 40.0 / np.sqrt(px_mm2)  # ≤ 40 mm beyond the fragment
            bone[comp & reach & (np.abs(signed) <= CUT_HALF_WIDTH_PX)] = False
            cut = True
        if cut:
            lab, n = ndimage.label(bone)
    return bone


@dataclass
class _Body:
    mask: np.ndarray
    row: float
    col: float
    l5: float  # share of its pixels the network calls L5


def body_chain(classes: np.ndarray, spacing_mm: tuple[float, float]
               ) -> tuple[list[_Body], list[tuple[np.ndarray, np.ndarray, np.ndarray, float]]]:
    """The vertebral bodies of a class map, head→feet, and its disc components. Bodies are the
    components of body + L5 pixels ≥ ``MIN_BODY_MM2`` after cutting at the disc fragments
    (``_cut_at_discs``); a component with a substantial L5 part and a substantial other-body
    part (each ≥ ``MIN_BODY_MM2``) is split between the two."""
    px_mm2 = float(spacing_mm[0] * spacing_mm[1])
    min_px = MIN_BODY_MM2 / px_mm2
    discs = _disc_components(classes, px_mm2)
    bone = _cut_at_discs(np.isin(classes, (1, 2)), discs, px_mm2)
    lab, _ = ndimage.label(bone)
    masks: list[np.ndarray] = []
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        comp = lab == i
        area = int(comp.sum())
        if area < min_px:
            continue
        is_l5 = comp & (classes == 2)
        rest = comp & (classes == 1)
        if is_l5.sum() >= min_px and rest.sum() >= min_px:
            parts = [_largest(is_l5), _largest(rest)]
            # stray pixels go to the nearer part
            dist = [ndimage.distance_transform_edt(~p) for p in parts]
            near0 = dist[0] <= dist[1]
            masks += [comp & near0, comp & ~near0]
        else:
            masks.append(comp)
    bodies = []
    for m in masks:
        r, c = np.nonzero(m)
        bodies.append(_Body(m, float(r.mean()), float(c.mean()),
                            float(np.mean(classes[m] == 2))))
    bodies.sort(key=lambda b: b.row)
    return bodies, discs


def _largest(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = ndimage.sum(mask, lab, range(1, n + 1))
    return np.asarray(lab == 1 + int(np.argmax(sizes)))


LEVEL_NAMES = ("L5", "L4", "L3", "L2", "L1", "T12")


def count_levels(classes: np.ndarray, spacing_mm: tuple[float, float]
                 ) -> tuple[dict[str, np.ndarray], list[str]]:
    """Level → body mask (L5 up to T12) counted up from the body the network calls L5, and the
    doubts about that count (empty when consistent): no disc fragment between two counted
    neighbours (a missed split or a spurious body), no disc below L5 (the lumbosacral disc),
    more than one body the network calls L5, uneven spacing or a body less than half or more
    than 1.6 times the size of the others among L5…L1. ({}, [reason]) when no L5 body is found."""
    bodies, discs = body_chain(classes, spacing_mm)
    if not bodies:
        return {}, ["no vertebral body was segmented"]
    l5_idx = max(range(len(bodies)), key=lambda k: bodies[k].l5)
    if bodies[l5_idx].l5 < 0.5:
        return {}, ["no L5 body was segmented"]
    chain = bodies[max(l5_idx - 5, 0): l5_idx + 1][::-1]  # L5, L4, … upwards
    doubts: list[str] = []
    if sum(b.l5 >= 0.5 for b in bodies) > 1:
        doubts.append("more than one body looks like L5")
    out = {name: b.mask for name, b in zip(LEVEL_NAMES, chain, strict=False)}
    disc_rows = [(float(c[0]), float(c[1])) for _p, c, _n, _h in discs]

    def disc_between(upper: _Body, lower: _Body) -> bool:
        return any(upper.row < r < lower.row for r, _c in disc_rows)

    for k in range(1, min(len(chain), 5)):  # L5/L4 … L2/L1
        if not disc_between(chain[k], chain[k - 1]):
            doubts.append(f"no disc between {LEVEL_NAMES[k]} and {LEVEL_NAMES[k - 1]}")
    l5 = chain[0]
    below = [r for r, _c in disc_rows if r > l5.row]
    if not below:
        doubts.append("no lumbosacral disc below L5")
    rows = [b.row for b in chain[:5]]
    if len(rows) >= 3:
        gaps = np.diff(rows[::-1])
        if gaps.max() > 1.6 * np.median(gaps) or gaps.min() < 0.6 * np.median(gaps):
            doubts.append("uneven spacing of the counted bodies")
    areas = [float(b.mask.sum()) for b in chain[:5]]
    if min(areas) < 0.5 * float(np.median(areas)):
        doubts.append("a counted body is less than half the size of the others")
    if max(areas) > 1.6 * float(np.median(areas)):
        doubts.append("a counted body is much larger than the others (two joined?)")
    return out, doubts


def levels_from_classes(classes: np.ndarray, spacing_mm: tuple[float, float]
                        ) -> dict[str, np.ndarray]:
    """Level → body mask (L5 up to T12) from a class map (``count_levels`` without the
    doubts); {} when no L5 body is found."""
    return count_levels(classes, spacing_mm)[0]


class LearnedError(Exception):
    """The learned segmenter found no usable L1–L4 column (the reason is the message)."""


@dataclass
class LearnedPlacement:
    """ROIs from the learned segmentation: the chosen slice, the body masks by level on it,
    the predicted canal, and ``segimport.rois_from_labels``' ROIs and flags."""

    mid_slice: int
    bodies: dict[str, np.ndarray]
    canal: np.ndarray
    rois: SegmentationRois


LEVEL_IDS = {"L1": 1, "L2": 2, "L3": 3, "L4": 4, "L5": 5, "T12": 12}
CANAL_ID = 99  # the canal in the grid label map brought back to the series' pixels
MAX_SLICES = 8  # slices segmented to find the mid-sagittal one (cost bound)


def _candidate_slices(n: int) -> list[int]:
    lo, hi = round(n * 0.25), round(n * 0.75)
    idx = list(range(lo, max(hi, lo + 1)))
    stride = max(1, int(np.ceil(len(idx) / MAX_SLICES)))
    return idx[::stride]


def _centroids(levels: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {lv: np.argwhere(m).mean(axis=0) for lv, m in levels.items()}


def _slices_agree(ca: dict[str, np.ndarray], cb: dict[str, np.ndarray]) -> bool:
    """Whether two slices' counts (level → body centroid) name the same bodies: each of L1–L4
    on ``ca`` has its own level as the nearest counted body on ``cb``."""
    for lv in VBQ_LEVELS:
        if lv not in ca or not cb:
            continue
        nearest = min(cb, key=lambda k: float(np.sum((cb[k] - ca[lv]) ** 2)))
        if nearest != lv:
            return False
    return True


def learned_rois(series: Series) -> LearnedPlacement:
    """Segment the central slices and count the levels on each (``count_levels``); the
    mid-sagittal slice is, among those where L1–L4 are counted, the one whose count most
    other slices share (``_slices_agree``), then one counted without doubt, then the one with
    the largest predicted canal; place the body
    and CSF ROIs there with the external-segmentation path (the level masks brought back from
    the grid to the series' pixels). Doubts about the count on that slice, or another central
    slice that counts the same bodies differently, are reported as a ``levels-disagree`` flag
    (the count is then a proposal for review). Raises ``LearnedError``."""
    try:
        view = _Canonical(series)
    except ValueError as exc:
        raise LearnedError(str(exc)) from exc
    spacing = view.spacing
    pixels = np.asarray(series.pixels)
    cand = _candidate_slices(pixels.shape[0])
    grids = np.stack([normalise(to_grid(view.forward(pixels[k].astype(np.float32)), spacing))
                      for k in cand])
    classes = np.argmax(probabilities_on_grid(grids), axis=1).astype(np.uint8)
    grid_mm = (GRID_MM, GRID_MM)
    counted: list[tuple[bool, int, int, dict[str, np.ndarray], list[str], np.ndarray]] = []
    for k, cls in zip(cand, classes, strict=True):
        levels, doubts = count_levels(cls, grid_mm)
        if all(lv in levels for lv in VBQ_LEVELS):
            counted.append((not doubts, int((cls == 4).sum()), k, levels, doubts, cls))
    if not counted:
        raise LearnedError("the learned segmenter found no slice with L1–L4 counted up from "
                           "L5")
    cents = [_centroids(t[3]) for t in counted]
    agree = [[i != j and _slices_agree(cents[i], cents[j]) for j in range(len(counted))]
             for i in range(len(counted))]
    pick = max(range(len(counted)), key=lambda i: (sum(agree[i]), counted[i][0], counted[i][1]))
    _clean, _canal, best, grid_levels, doubts, cls = counted[pick]
    others = [counted[j][2] for j in range(len(counted)) if j != pick and not agree[pick][j]]
    shape = view.shape(pixels.shape[1:])
    grid_labels = np.zeros(cls.shape, np.uint16)
    for lv, mask in grid_levels.items():
        grid_labels[mask] = LEVEL_IDS[lv]
    grid_labels[(cls == 4) & (grid_labels == 0)] = CANAL_ID
    full = view.back(_to_series(grid_labels, shape))
    canal_full = full == CANAL_ID
    labels = np.where(canal_full, 0, full).astype(np.uint16)
    bodies = {lv: labels == LEVEL_IDS[lv] for lv in grid_levels}
    table = {i: lv for lv, i in LEVEL_IDS.items()}
    try:
        rois = rois_from_labels(labels, table, series, best)
    except SegmentationError as exc:
        raise LearnedError(str(exc)) from exc
    _csf_into_canal(series, labels, canal_full, best, rois)
    reasons = list(doubts)
    if others:
        reasons.append(f"slice(s) {', '.join(str(k + 1) for k in others)} count the bodies "
                       "differently")
    if reasons:
        rois.flags.append(QcFlag("levels-disagree", "the learned level count is in doubt ("
                                 f"{'; '.join(reasons)}): check the level labels"))
    return LearnedPlacement(best, bodies, canal_full, rois)


def _csf_into_canal(series: Series, labels: np.ndarray, canal: np.ndarray, mid: int,
                    rois: SegmentationRois) -> None:
    """When the centre of the CSF ROI that ``rois_from_labels`` found behind the body is not
    at least 1 mm inside the canal the network segmented (a darker band of fat or ligament
    behind the sac, or the sac's wall), search again behind the same levels with everything
    outside that canal set to the marrow level, so that the darkest band must be the sac; the
    new ROI replaces the old one with an info flag. Nothing changes when the old ROI is well
    inside the canal or no band is found in it."""
    roi = rois.csf_roi
    if roi is None or not canal.any():
        return
    spacing = series.pixel_spacing_mm
    grow = max(1, round(1.0 / min(spacing)))
    inner = ndimage.binary_erosion(canal, iterations=grow)
    if not inner.any():
        inner = canal
    r, c = round(roi.row), round(roi.col)
    if 0 <= r < inner.shape[0] and 0 <= c < inner.shape[1] and inner[r, c]:
        return
    image = np.asarray(series.pixels[mid], np.float32)
    inferior, posterior = series_directions(series)
    inside = canal
    table = {i: lv for lv, i in LEVEL_IDS.items()}
    ids = {lv: i for i, lv in table.items()}
    for level in CSF_LEVELS:
        mask = labels == ids[level]
        if mask.sum() < 30:
            continue
        body = largest_part(mask)
        axes = body_axes(body, spacing, inferior, posterior)
        if axes is None:
            continue
        marrow = marrow_median(image, body, spacing)
        found = csf_roi_behind(np.where(inside, image, marrow), axes, marrow, spacing, mid,
                               level)
        if found.roi is None:
            continue
        rois.csf_roi, rois.csf_level = found.roi, level
        rois.flags = [f for f in rois.flags if f.code not in ("csf-unclear", "csf-not-at-l3")]
        rois.flags.extend(found.flags)
        if level != "L3":
            rois.flags.append(QcFlag("csf-not-at-l3", f"the CSF was measured behind {level}"))
        rois.flags.append(QcFlag("csf-in-learned-canal", "the darkest band behind the body lay "
                                 "outside the segmented canal; the CSF ROI was placed in the "
                                 "canal", "info"))
        return


class _Canonical:
    """The network's view of a series' slices: rows head→feet, columns anterior→posterior
    (``bodies.series_directions``); a series stored feet→head, posterior→anterior or with
    rows along anterior–posterior is flipped/transposed for the network and the masks are
    brought back. Raises ``ValueError`` when the slices are not sagittal."""

    def __init__(self, series: Series) -> None:
        inferior, posterior = series_directions(series)
        self.transpose = abs(float(inferior[1])) > abs(float(inferior[0]))
        axis = 1 if self.transpose else 0
        self.flip_rows = float(inferior[axis]) < 0
        self.flip_cols = float(posterior[1 - axis]) < 0
        sp = series.pixel_spacing_mm
        self.spacing = (sp[1], sp[0]) if self.transpose else (sp[0], sp[1])

    def shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return (shape[1], shape[0]) if self.transpose else (shape[0], shape[1])

    def forward(self, image: np.ndarray) -> np.ndarray:
        x = image.T if self.transpose else image
        if self.flip_rows:
            x = x[::-1]
        if self.flip_cols:
            x = x[:, ::-1]
        return np.ascontiguousarray(x)

    def back(self, mask: np.ndarray) -> np.ndarray:
        x = mask[:, ::-1] if self.flip_cols else mask
        if self.flip_rows:
            x = x[::-1]
        return np.ascontiguousarray(x.T if self.transpose else x)


def _to_series(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A grid label map brought back to the series' pixel grid (nearest neighbour; the inverse
    of ``to_grid``'s ``ndimage.zoom``, which puts the first and last pixels' centres on the
    first and last grid pixels)."""
    idx = [np.rint(np.arange(n) * (g - 1) / max(n - 1, 1)).astype(int)
           for n, g in zip(shape[:2], labels.shape, strict=True)]
    return np.asarray(labels[np.ix_(idx[0], idx[1])])
