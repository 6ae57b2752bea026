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

``levels_from_classes`` turns a class map into level masks: the body components (≥ 80 mm²)
ordered head→feet, L5 the component the network calls L5, then L4…L1 counted upwards.

When onnxruntime or the model file is missing, ``available()`` is False and ``unavailable_reason``
says why; the engine then uses the classical localiser alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from scoring.engine.dicom_io import Series
from scoring.engine.segimport import SegmentationError, SegmentationRois, rois_from_labels

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


def levels_from_classes(classes: np.ndarray, spacing_mm: tuple[float, float]
                        ) -> dict[str, np.ndarray]:
    """Level → body mask (L5 up to T12) from a class map; {} when no L5 body is found."""
    px_mm2 = float(spacing_mm[0] * spacing_mm[1])
    bone = np.isin(classes, (1, 2))
    lab, _ = ndimage.label(bone)
    comps = []
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        comp = lab[sl] == i
        area = int(comp.sum())
        if area * px_mm2 < MIN_BODY_MM2:
            continue
        l5 = float(np.mean(classes[sl][comp] == 2))
        rr = np.nonzero(comp)[0] + sl[0].start
        comps.append((float(rr.mean()), i, l5))
    if not comps:
        return {}
    comps.sort()
    l5_idx = max(range(len(comps)), key=lambda k: comps[k][2])
    if comps[l5_idx][2] < 0.5:
        return {}
    out: dict[str, np.ndarray] = {}
    names = ("L5", "L4", "L3", "L2", "L1", "T12")
    for k, name in zip(range(l5_idx, -1, -1), names, strict=False):
        out[name] = lab == comps[k][1]
    return out


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
MAX_SLICES = 8  # slices segmented to find the mid-sagittal one (cost bound)


def _candidate_slices(n: int) -> list[int]:
    lo, hi = round(n * 0.25), round(n * 0.75)
    idx = list(range(lo, max(hi, lo + 1)))
    stride = max(1, int(np.ceil(len(idx) / MAX_SLICES)))
    return idx[::stride]


def learned_rois(series: Series) -> LearnedPlacement:
    """Segment the central slices, take the one with the largest predicted canal among those
    where L1–L4 are counted up from the network's L5 as the mid-sagittal slice, and place the
    body and CSF ROIs there with the external-segmentation path. Raises ``LearnedError``."""
    spacing = series.pixel_spacing_mm
    pixels = np.asarray(series.pixels)
    cand = _candidate_slices(pixels.shape[0])
    grids = np.stack([normalise(to_grid(pixels[k].astype(np.float32), spacing)) for k in cand])
    classes = np.argmax(probabilities_on_grid(grids), axis=1).astype(np.uint8)
    grid_mm = (GRID_MM, GRID_MM)
    best, best_canal = None, 0
    for k, cls in zip(cand, classes, strict=True):
        levels = levels_from_classes(cls, grid_mm)
        canal = int((cls == 4).sum())
        if all(lv in levels for lv in ("L1", "L2", "L3", "L4")) and canal > best_canal:
            best, best_canal = k, canal
    if best is None:
        raise LearnedError("the learned segmenter found no slice with L1–L4 counted up from "
                           "L5")
    full = segment(pixels[best].astype(np.float32), spacing)
    bodies = levels_from_classes(full, spacing)
    if not all(lv in bodies for lv in ("L1", "L2", "L3", "L4")):
        raise LearnedError("the learned segmentation lost a level at full resolution")
    labels = np.zeros(full.shape, np.uint16)
    for lv, mask in bodies.items():
        labels[mask] = LEVEL_IDS[lv]
    table = {i: lv for lv, i in LEVEL_IDS.items()}
    try:
        rois = rois_from_labels(labels, table, series, best)
    except SegmentationError as exc:
        raise LearnedError(str(exc)) from exc
    return LearnedPlacement(best, bodies, full == 4, rois)
