"""CLI: ``python -m scoring.engine PATH [--fractured L2] [--rois rois.json] [--seg FILE
[--seg-labels totalsegmentator|spineps|table.json]] [--seed LEVEL,SLICE,ROW,COL] [--png out.png]
[--json]``.

Exit codes: 0 measured (succeeded or needs_review), 1 refused by protocol QC, 2 input error."""

from __future__ import annotations

import argparse
import json
import sys

from scoring.engine import EngineError, Roi, compute_vbq
from scoring.engine.dicom_io import read_series
from scoring.engine.render import render_png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scoring.engine",
                                     description="Measure VBQ on a sagittal T1 lumbar series")
    parser.add_argument("path", help="folder or DICOM file of one series")
    parser.add_argument("--fractured", action="append", default=[],
                        help="a fractured level to exclude (repeatable), e.g. L2")
    parser.add_argument("--rois", help="JSON file: {level: {slice_index, row, col, "
                        "half_height, half_width}} including 'csf'")
    parser.add_argument("--seg", help="external segmentation: NIfTI label map or DICOM SEG")
    parser.add_argument("--seg-labels", default=None,
                        help="label table of a NIfTI map: totalsegmentator (default), spineps, "
                        "or a JSON file {id: level}")
    parser.add_argument("--seed", help="assisted path: one click inside a named body, "
                        "LEVEL,SLICE,ROW,COL (0-based slice in the sorted series, pixel row "
                        "and column), e.g. L3,10,200.5,160")
    parser.add_argument("--png", help="write the slice with ROIs, labels and VBQ to this PNG")
    parser.add_argument("--json", action="store_true", help="print the JSON contract")
    args = parser.parse_args(argv)
    rois = None
    if args.rois:
        with open(args.rois, encoding="utf-8") as handle:
            rois = {k: Roi(**v) for k, v in json.load(handle).items()}
    seed = None
    if args.seed:
        parts = args.seed.split(",")
        if len(parts) != 4:
            parser.error("--seed takes LEVEL,SLICE,ROW,COL")
        seed = dict(zip(("level", "slice_index", "row", "col"), parts, strict=True))
    try:
        series = read_series(args.path)
        result = compute_vbq(series.datasets, fractured_levels=args.fractured,
                             manual_rois=rois, segmentation=args.seg,
                             segmentation_labels=args.seg_labels, seed=seed)
        if args.png:
            render_png(series, result, args.png)
    except EngineError as exc:
        print(f"error [{exc.code}]: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print(f"status={result.status} vbq_all_levels={result.vbq_all_levels} "
              f"vbq_excluding_fractured={result.vbq_excluding_fractured}")
        for flag in result.qc_flags:
            print(f"  [{flag.severity}] {flag.code}: {flag.message}")
    return 0 if result.status != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
