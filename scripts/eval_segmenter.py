"""Measure the learned segmenter (ONNX through scoring/engine/learned.py) on ../shared/mri.

    nice -n 10 .venv/bin/python scripts/eval_segmenter.py [MODEL.onnx]

SPIDER: the people held out of training (``learned.held_out_people``) and, separately, the
trained ones: Dice per class on the 2 mm grid (all 7 slices), and levels on the central slice
(slice 3): each predicted L1–L4 body's centroid inside the truth body of that level
(``realset.spider_levels``, counted up from the lumbosacral disc). Siegen (never trained on):
the truth mid-sagittal slice, bodies Dice (T10–L5; S1 ignored) and the same level check against
``label_level``. Prints a table per person and a machine-readable last line.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

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
        classes = learned.segment(image[3].astype(np.float32), (sp, sp))
        ok = _centroid_in(learned.levels_from_classes(classes, (sp, sp)),
                          spider_levels(mask[3], sp))
        right = all(ok.values())
        for k, v in scores.items():
            g.setdefault(k, []).extend(v)
        g.setdefault("right", []).append(right)
        print(f"| {f.stem} | {split} | " + " | ".join(f"{np.mean(scores[k]):.2f}" for k in
                                                     ("body", "l5", "disc", "canal"))
              + f" | {''.join('Y' if ok[x] else 'n' for x in LEVELS)} |")
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
        classes = learned.segment(ds.pixel_array.astype(np.float32), sp)
        sl = lab[:, :, k]
        keep = sl != 6
        body_d = _dice(np.isin(classes, (1, 2)) & keep, (sl > 0) & keep)
        l5_d = _dice(classes == 2, sl == 5)
        truth_of = {lv: sl == c for lv, c in CODES.items()}
        ok = _centroid_in(learned.levels_from_classes(classes, sp), truth_of)
        siegen_right += all(ok.values())
        print(f"| {folder.name} | siegen (not trained) | {body_d:.2f} | {l5_d or 0:.2f} | - | - | "
              f"{''.join('Y' if ok[x] else 'n' for x in LEVELS)} |")
    summary = []
    for split, g in groups.items():
        summary.append(f"{split}_levels_right={sum(g['right'])}/{len(g['right'])} " + " ".join(
            f"{split}_dice_{k}={np.mean(g[k]):.3f}" for k in ("body", "l5", "disc", "canal")))
    print(f"\n{time.perf_counter() - t0:.0f} s")
    print("learned: " + " ".join(summary) + f" siegen_levels_right={siegen_right}/{len(siegen)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
