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

from scoring.engine.accuracy import run


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
    print(f"level labels correct: {label_acc:.2%} of {s['labelled']} labelled (target >= 98 %)")
    print(f"non-flagged within 3 % of true VBQ: {within:.1%} of {s['unflagged']} "
          f"(target >= 95 %); 95th percentile |error| {p95:.2%}")
    print(f"flagged needs_review: {flagged:.1%} (target <= 5 %)")
    print(f"refused with the right reason (T2 / fat-sat / axial): {s['refusals_ok']}/"
          f"{s['refusals']}")
    print(f"height-loss fracture suggestion: {s['fractures_found']}/{s['fractures']} wedge "
          f"fractures found; {s['intact_flagged']}/{s['intact']} intact L1-L4 bodies flagged")
    if s["label_bad"]:
        print(f"wrong labels (seeds): {s['label_bad'][:30]}")
    if s["bad"]:
        print(f"outside 3 % (seeds): {s['bad'][:30]}")
    print(f"ratio={within:.4f} within-3% of non-flagged; labels={label_acc:.4f} "
          f"flagged={flagged:.4f} refusals={s['refusals_ok']}/{s['refusals']}")


if __name__ == "__main__":
    main()
