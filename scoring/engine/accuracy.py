"""Accuracy of the automatic path on SYNTHETIC phantoms (used by bench/vbq_accuracy.py and the
tests). Every phantom is generated in the run from its seed; nothing is cached."""

from __future__ import annotations

import time
from typing import Any

from scoring.engine.phantom import random_phantom
from scoring.engine.vbq import compute_vbq

REFUSALS = ({"contrast": "t2"}, "t2-like"), ({"fat_suppressed": True}, "fat-suppressed"), (
    {"plane": "axial"}, "not-sagittal")


def labels_correct(result: Any, truth: dict) -> bool:
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


def run(n: int, seed0: int = 0, verbose: bool = False) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "n": 0, "labelled": 0, "label_ok": 0, "flagged": 0, "unflagged": 0, "within": 0,
        "errors": [], "refusals_ok": 0, "refusals": 0, "seconds": 0.0, "bad": [], "label_bad": [],
        "fractures": 0, "fractures_found": 0, "intact": 0, "intact_flagged": 0}
    for i in range(n):
        seed = seed0 + i
        phantom = random_phantom(seed)
        start = time.perf_counter()
        result = compute_vbq(phantom.datasets, fractured_levels=phantom.truth["fractured"])
        stats["seconds"] += time.perf_counter() - start
        truth = phantom.truth
        stats["n"] += 1
        for level in ("L1", "L2", "L3", "L4"):
            if level in result.levels:
                suggested = result.levels[level].suggested_fractured
                if level in truth["fractured"]:
                    stats["fractures"] += 1
                    stats["fractures_found"] += suggested
                else:
                    stats["intact"] += 1
                    stats["intact_flagged"] += suggested
        if result.levels:
            stats["labelled"] += 1
            ok_labels = labels_correct(result, truth)
            stats["label_ok"] += ok_labels
            if not ok_labels:
                stats["label_bad"].append(seed)
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
