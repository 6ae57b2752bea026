"""Time of the VBQ engine per series against pydicom's bare read of the same files.

    .venv/bin/python bench/vbq_engine.py [--repeats 5]

A SYNTHETIC phantom series of 20 sagittal slices of 512 x 512 (uint16, explicit VR little
endian) is written to a temporary folder. Both measurements run in this process, alternately,
on one core: the baseline is ``pydicom.dcmread`` + ``pixel_array`` of every file; the engine is
``compute_vbq(folder)`` (its own read, QC, automatic localisation, ROIs, VBQ). The medians are
reported. Target: engine <= 3x the bare read and <= 1 s per series. Other processes on a shared
machine make both timings noisy; the ratio is from the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core, as the target says

import pydicom  # noqa: E402

from scoring.engine import compute_vbq  # noqa: E402
from scoring.engine.phantom import make_phantom  # noqa: E402


def bare_read(files: list[Path]) -> float:
    start = time.perf_counter()
    for path in files:
        ds = pydicom.dcmread(str(path))
        _ = ds.pixel_array
    return time.perf_counter() - start


def engine(folder: Path) -> tuple[float, str]:
    start = time.perf_counter()
    result = compute_vbq(folder)
    return time.perf_counter() - start, result.status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        phantom = make_phantom(2024, rows=512, cols=512, slices=20, fractured=())
        files = phantom.write(Path(tmp) / "series")
        folder = Path(tmp) / "series"
        bare_read(files)  # warm the file cache and imports for both
        engine(folder)
        reads, runs, statuses = [], [], set()
        for _ in range(args.repeats):
            reads.append(bare_read(files))
            seconds, status = engine(folder)
            runs.append(seconds)
            statuses.add(status)
    read_s, run_s = statistics.median(reads), statistics.median(runs)
    print(f"series: 20 slices x 512 x 512 (SYNTHETIC), {args.repeats} alternating repeats")
    print(f"pydicom bare read (dcmread + pixel_array): {read_s:.3f} s (median)")
    print(f"engine compute_vbq (read + QC + localisation + VBQ): {run_s:.3f} s/series (median); "
          f"status {sorted(statuses)}")
    print(f"target: <= 3x the read and <= 1 s/series: "
          f"{'met' if run_s <= 3 * read_s and run_s <= 1.0 else 'NOT met'}")
    print(f"ratio={run_s / read_s:.2f} engine time / pydicom bare read time "
          f"({run_s:.3f} s vs {read_s:.3f} s per series)")


if __name__ == "__main__":
    main()
