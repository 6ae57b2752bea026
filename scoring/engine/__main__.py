"""CLI: ``python -m scoring.engine PATH [--fractured L2] [--rois rois.json] [--json]``."""

from __future__ import annotations

import argparse
import json
import sys

from scoring.engine import EngineError, Roi, compute_vbq


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scoring.engine",
                                     description="Measure VBQ on a sagittal T1 lumbar series")
    parser.add_argument("path", help="folder or DICOM file of one series")
    parser.add_argument("--fractured", action="append", default=[],
                        help="a fractured level to exclude (repeatable), e.g. L2")
    parser.add_argument("--rois", help="JSON file: {level: {slice_index, row, col, "
                        "half_height, half_width}} including 'csf'")
    parser.add_argument("--json", action="store_true", help="print the JSON contract")
    args = parser.parse_args(argv)
    rois = None
    if args.rois:
        with open(args.rois, encoding="utf-8") as handle:
            rois = {k: Roi(**v) for k, v in json.load(handle).items()}
    try:
        result = compute_vbq(args.path, fractured_levels=args.fractured, manual_rois=rois)
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
