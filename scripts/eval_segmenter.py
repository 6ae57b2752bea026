"""Measure the learned segmenter (ONNX through scoring/engine/learned.py) on ../shared/mri.

    nice -n 10 .venv/bin/python scripts/eval_segmenter.py [MODEL.onnx]

SPIDER: the people held out of training (``learned.held_out_people``) and, separately, the
trained ones: Dice per class on the 2 mm grid (all 7 slices), and levels on the central slice
(slice 3) counted by ``learned.count_levels``: each predicted L1–L4 body's centroid inside the
truth body of that level (``realset.spider_levels``, counted up from the lumbosacral disc), and
whether the count came with a doubt (flagged) or not; "wrong without doubt" is the figure that
must stay 0. Siegen: the truth mid-sagittal slice (2 mm grid), bodies Dice (T10–L5; S1
ignored) and the same level check against ``label_level`` (DzZ_T1/DzZ_T2 never trained on;
F02 is trained on since this model, so it is reported but is no held-out figure). SYNTHETIC
phantoms (seeds 5000–5039, the accuracy test's, never trained on: training uses 900000…): the
whole learned path (``learned.learned_rois``) with ``accuracy.labels_correct``'s tolerance.
Prints a table per case and a machine-readable last line.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from scoring.engine import learned  # noqa: E402
from scoring.engine.realset import (  # noqa: E402
    default_dir,
    siegen_folders,
    spider_files,
    spider_levels,
    spider_spacing_mm,
)

LEVELS = ("L1", "L2", "L3", "L4")
CODES = {"L1": 1, "L2": 2, "L3": 3, "L4": 4, "L5": 5}


def _dice(a: np.ndarray, b: np.ndarray) -> float | None:
    if not b.any():
        return None
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def _centroid_in(pred: dict[str, np.ndarray], truth_of: dict[str, np.ndarray]) -> dict[str, bool]:
    out = {}
    for lv in LEVELS:
        if lv not in pred or lv not in truth_of:
            out[lv] = False
            continue
        rr, cc = np.nonzero(pred[lv])
        out[lv] = bool(truth_of[lv][round(rr.mean()), round(cc.mean())])
    return out


PHANTOM_SEEDS = range(5000, 5040)


def _phantoms(seeds: range) -> tuple[int, int, int]:
    """The whole learned path on SYNTHETIC phantoms: (levels right, flagged, wrong & unflagged);
    a failure (``LearnedError``) counts as flagged and not right."""
    from scoring.engine.accuracy import labels_correct
    from scoring.engine.dicom_io import read_series
    from scoring.engine.phantom import random_phantom

    right = flagged = wrong_sure = 0
    for seed in seeds:
        ph = random_phantom(seed)
        series = read_series(ph.datasets)
        try:
            placed = learned.learned_rois(series)
        except learned.LearnedError:
            flagged += 1
            continue
        doubt = any(f.code == "levels-disagree" for f in placed.rois.flags)
        ok = _phantom_labels_ok(placed, ph.truth, labels_correct)
        right += ok
        flagged += doubt
        wrong_sure += not ok and not doubt
    return right, flagged, wrong_sure


def _phantom_labels_ok(placed: learned.LearnedPlacement, truth: dict, labels_correct: Any
                       ) -> bool:
    class _M:
        def __init__(self, roi: Any) -> None:
            self.centroid_pixel = (roi.slice_index, roi.row, roi.col)

    class _R:
        levels = {lv: _M(roi) for lv, roi in placed.rois.rois.items()}

    return bool(labels_correct(_R(), truth))


def main() -> int:
    if len(sys.argv) > 1:
        learned.MODEL_PATH = Path(sys.argv[1])
    if not learned.available():
        print(f"learned segmenter unavailable: {learned.unavailable_reason}")
        return 0
    root = default_dir(ROOT)
    files = spider_files(root)
    held = learned.held_out_people([f.stem for f in files])
    from train_segmenter import spider_targets  # torch-free import path not needed at runtime

    t0 = time.perf_counter()
    grid_mm = (learned.GRID_MM, learned.GRID_MM)
    groups: dict[str, dict[str, list]] = {"held": {}, "train": {}}
    print("| person | split | body | l5 | disc | canal | L1-L4 right (central slice) |")
    print("|---|---|---|---|---|---|---|")
    for f in files:
        d = np.load(f)
        image, mask = d["image"], d["mask"]
        sp = spider_spacing_mm(mask)
        split = "held" if f.stem in held else "train"
        g = groups[split]
        scores: dict[str, list[float]] = {k: [] for k in ("body", "l5", "disc", "canal")}
        grids = np.stack([learned.normalise(learned.to_grid(image[s].astype(np.float32),
                                                            (sp, sp))) for s in range(7)])
        pred = np.argmax(learned.probabilities_on_grid(grids), axis=1)
        for s in range(7):
            tgt = learned.to_grid(spider_targets(mask[s], sp), (sp, sp), order=0)
            valid = tgt != 255
            p, t = pred[s], tgt
            for name, ks in (("body", (1, 2)), ("l5", (2,)), ("disc", (3,)), ("canal", (4,))):
                v = _dice(np.isin(p, ks) & valid, np.isin(t, ks) & valid)
                if v is not None:
                    scores[name].append(v)
        levels, doubts = learned.count_levels(pred[3].astype(np.uint8), grid_mm)
        truth3 = {lv: learned.to_grid(m.astype(np.uint8), (sp, sp), order=0) > 0
                  for lv, m in spider_levels(mask[3], sp).items()}
        ok = _centroid_in(levels, truth3)
        right = all(ok.values())
        for k, v in scores.items():
            g.setdefault(k, []).extend(v)
        g.setdefault("right", []).append(right)
        g.setdefault("wrong_sure", []).append(not right and not doubts)
        g.setdefault("right_sure", []).append(right and not doubts)
        print(f"| {f.stem} | {split} | " + " | ".join(f"{np.mean(scores[k]):.2f}" for k in
                                                     ("body", "l5", "disc", "canal"))
              + f" | {''.join('Y' if ok[x] else 'n' for x in LEVELS)}"
              + f"{' (doubt: ' + '; '.join(doubts) + ')' if doubts else ''} |")
    siegen_right = 0
    siegen = siegen_folders(root)
    for folder in siegen:
        truth = np.load(folder / "truth.npz")
        lab = truth["label_level"]
        k = int(truth["mid_sagittal_slice"])
        dss = sorted((pydicom.dcmread(p) for p in (folder / "dicom").glob("*.dcm")),
                     key=lambda ds: int(ds.InstanceNumber))
        ds = dss[k]
        sp = (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1]))
        grid = learned.normalise(learned.to_grid(ds.pixel_array.astype(np.float32), sp))
        classes = np.argmax(learned.probabilities_on_grid(grid[None])[0], axis=0).astype(np.uint8)
        sl = learned.to_grid(lab[:, :, k], sp, order=0)
        siegen_levels, doubts = learned.count_levels(classes, grid_mm)
        keep = sl != 6
        body_d = _dice(np.isin(classes, (1, 2)) & keep, (sl > 0) & keep)
        l5_d = _dice(classes == 2, sl == 5)
        truth_of = {lv: sl == c for lv, c in CODES.items()}
        ok = _centroid_in(siegen_levels, truth_of)
        siegen_right += all(ok.values())
        split = "siegen (trained)" if folder.name == "F02" else "siegen (not trained)"
        print(f"| {folder.name} | {split} | {body_d:.2f} | {l5_d or 0:.2f} | - | - | "
              f"{''.join('Y' if ok[x] else 'n' for x in LEVELS)}"
              f"{' (doubt: ' + '; '.join(doubts) + ')' if doubts else ''} |")
    phantom_right, phantom_flagged, phantom_wrong_sure = _phantoms(PHANTOM_SEEDS)
    summary = []
    for split, g in groups.items():
        summary.append(f"{split}_levels_right={sum(g['right'])}/{len(g['right'])} "
                       f"{split}_right_without_doubt={sum(g['right_sure'])} "
                       f"{split}_wrong_without_doubt={sum(g['wrong_sure'])} " + " ".join(
            f"{split}_dice_{k}={np.mean(g[k]):.3f}" for k in ("body", "l5", "disc", "canal")))
    print(f"\n{time.perf_counter() - t0:.0f} s")
    print("learned: " + " ".join(summary) + f" siegen_levels_right={siegen_right}/{len(siegen)}"
          f" phantom_levels_right={phantom_right}/{len(PHANTOM_SEEDS)}"
          f" phantom_flagged={phantom_flagged} phantom_wrong_without_doubt={phantom_wrong_sure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
