"""Accuracy of the automatic VBQ path on SYNTHETIC phantoms (seeded, generated in the run).

    .venv/bin/python bench/vbq_accuracy.py [--n 300] [--seed0 0]

Each phantom draws every variation of ``scoring.engine.phantom.random_phantom`` (matrix 256–512,
11–19 slices, marrow/CSF 1.5–5, bias, noise, lordosis, tilt, scoliosis, wedge fractures,
AP-flipped storage). Prints: level-label accuracy (every labelled body within half a level of
its true centre), the share of non-flagged results whose VBQ is within 3 % of the truth, the
share flagged ``needs_review``, and that every T2 / fat-suppressed / axial variant is refused
with the right reason. Last line: ``ratio=<fraction within 3 %> ...``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scoring.engine import compute_vbq
from scoring.engine.phantom import random_phantom

REFUSALS = ({"contrast": "t2"}, "t2-like"), ({"fat_suppressed": True}, "fat-suppressed"), (
    {"plane": "axial"}, "not-sagittal")


def labels_correct(result, truth) -> bool:
    """Every labelled L1–S1 body lies within half a level spacing of its true centre."""
    spacing = truth["spacing_rc_mm"]
    pitch = truth["body_height_mm"]["L3"] * 1.2
    for level, m in result.levels.items():
        if level not in truth["centres_px"]:
            continue
        _, r, c = truth["centres_px"][level]
        dr = (m.centroid_pixel[1] - r) * spacing[0]
        dc = (m.centroid_pixel[2] - c) * spacing[1]
        if (dr * dr + dc * dc) ** 0.5 > pitch / 2:
            return False
    return bool(result.levels)


def run(n: int, seed0: int = 0, verbose: bool = False) -> dict:
    stats = {"n": 0, "labelled": 0, "label_ok": 0, "flagged": 0, "unflagged": 0, "within": 0,
             "errors": [], "refusals_ok": 0, "refusals": 0, "seconds": 0.0, "bad": []}
    for i in range(n):
        seed = seed0 + i
        phantom = random_phantom(seed)
        start = time.perf_counter()
        result = compute_vbq(phantom.datasets, fractured_levels=phantom.truth["fractured"])
        stats["seconds"] += time.perf_counter() - start
        truth = phantom.truth
        stats["n"] += 1
        if result.levels:
            stats["labelled"] += 1
            stats["label_ok"] += labels_correct(result, truth)
        if result.status != "succeeded":
            stats["flagged"] += 1
            if verbose:
                print(f"  seed {seed}: {result.status} {[f.code for f in result.qc_flags]}")
            continue
        stats["unflagged"] += 1
        err = result.vbq_all_levels / truth["vbq_all_levels"] - 1
        stats["errors"].append(err)
        ok = abs(err) <= 0.03 and labels_correct(result, truth)
        stats["within"] += ok
        if not ok:
            stats["bad"].append(seed)
            if verbose:
                print(f"  seed {seed}: error {err:+.2%} labels_ok={labels_correct(result, truth)}"
                      f" {[f.code for f in result.qc_flags]}")
    for j in range(max(1, n // 20)):
        for variant, code in REFUSALS:
            result = compute_vbq(random_phantom(seed0 + 10_000 + j, **variant).datasets)
            stats["refusals"] += 1
            stats["refusals_ok"] += result.status == "failed" and code in {
                f.code for f in result.qc_flags if f.severity == "refusal"}
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--seed0", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    t0 = time.perf_counter()
    s = run(args.n, args.seed0, args.verbose)
    label_acc = s["label_ok"] / max(s["labelled"], 1)
    within = s["within"] / max(s["unflagged"], 1)
    flagged = s["flagged"] / max(s["n"], 1)
    errs = sorted(abs(e) for e in s["errors"])
    p95 = errs[int(0.95 * (len(errs) - 1))] if errs else float("nan")
    print(f"phantoms: {s['n']} (SYNTHETIC), engine {s['seconds'] / max(s['n'], 1):.3f} s/series,"
          f" wall {time.perf_counter() - t0:.0f} s")
    print(f"level labels correct: {label_acc:.1%} of {s['labelled']} labelled (target >= 98 %)")
    print(f"non-flagged within 3 % of true VBQ: {within:.1%} of {s['unflagged']} "
          f"(target >= 95 %); 95th percentile |error| {p95:.2%}")
    print(f"flagged needs_review: {flagged:.1%} (target <= 5 %)")
    print(f"refused with the right reason (T2 / fat-sat / axial): {s['refusals_ok']}/"
          f"{s['refusals']}")
    if s["bad"]:
        print(f"outside 3 % (seeds): {s['bad'][:30]}")
    print(f"ratio={within:.4f} within-3% of non-flagged; labels={label_acc:.4f} "
          f"flagged={flagged:.4f} refusals={s['refusals_ok']}/{s['refusals']}")


if __name__ == "__main__":
    main()
