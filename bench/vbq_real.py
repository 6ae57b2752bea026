"""The engine on REAL lumbar MRI: ``../shared/mri`` (3 Siegen exams, 41 SPIDER people).

    nice .venv/bin/python bench/vbq_real.py [DIR]

``DIR`` defaults to ``$VBQ_REAL_MRI_DIR`` or ``../shared/mri`` relative to the repository root;
an absent folder prints why and exits 0. How each case is scored (T2 through a T1-like fold,
SPIDER levels counted up from the lumbosacral disc, SPIDER pixel spacing from the anatomy, the
Siegen CSF check) is in ``scoring/engine/realset.py`` and docs/engine.md. Per case: bodies
found, L1–L4 ROI centre in the right body (±1 voxel), CSF ROI in the thecal sac, VBQ against the
reference (DzZ_T1), confidence and status. ``VBQ_REAL_FOLD=csf`` scores SPIDER through the
CSF-preserving fold (``realset.fold_mode``). "Confident" = status ``succeeded``; everything else
(``needs_review``, a refusal) is "flagged". Last line (machine-readable)::

    real: siegen_levels_right=a/b spider_levels_right=c/d spider_csf_in_canal=e/f
    dzz_t1_vbq_error=x% wrong_and_confident=n ...
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scoring.engine import learned  # noqa: E402
from scoring.engine.realset import (  # noqa: E402
    CaseResult,
    default_dir,
    fold_mode,
    score_siegen,
    score_spider,
    siegen_folders,
    spider_files,
)
from scoring.engine.vbq import learned_enabled, learned_mode  # noqa: E402


def _row(c: CaseResult) -> str:
    lv = "".join("Y" if c.level_ok.get(x) else "n" for x in ("L1", "L2", "L3", "L4"))
    csf = "-" if c.csf_ok is None else ("Y" if c.csf_ok else "n")
    vbq = "-" if c.vbq is None else f"{c.vbq:.2f}"
    if c.vbq_error is not None:
        vbq += f" (ref {c.vbq_reference:.2f}, {c.vbq_error:+.1%})"
    notes = f"refused ({c.protocol_refusal}), localised on T1-like; " if c.protocol_refusal else ""
    notes += ", ".join(c.flags)
    if "localisation-failed" in c.flags:
        notes += ": " + c.reason.split("localisation-failed: ", 1)[-1].split(". Place")[0]
    return (f"| {c.name} | {c.bodies_found} | {lv} | {csf} | {vbq} | {c.confidence:.2f} | "
            f"{c.status} | {notes} |")


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else default_dir(ROOT)
    if not folder.is_dir():
        print(f"no real MRI folder at {folder}: nothing to measure (set VBQ_REAL_MRI_DIR or pass "
              "DIR)")
        return
    print(f"real MRI from {folder}; load average {os.getloadavg()[0]:.1f}; SPIDER fold "
          f"{fold_mode()} (VBQ_REAL_FOLD); learned segmenter mode {learned_mode()}")
    header = ("| case | bodies | L1-L4 right | CSF in sac | VBQ | confidence | status | "
              "notes |\n|---|---|---|---|---|---|---|---|")
    t0 = time.perf_counter()
    siegen = [score_siegen(f) for f in siegen_folders(folder)]
    print("\nSiegen exams\n" + header)
    for c in siegen:
        print(_row(c))
    spider = [score_spider(p) for p in spider_files(folder)]
    print("\nSPIDER people (T2 SPACE, T1-like fold, spacing from the anatomy)\n" + header)
    for c in spider:
        print(_row(c))
    cases = siegen + spider
    right_conf = sum(c.levels_right and c.confident for c in cases)
    right_flag = sum(c.levels_right and not c.confident for c in cases)
    wrong_flag = sum(not c.levels_right and not c.confident for c in cases)
    wrong_conf = sum(not c.levels_right and c.confident for c in cases)
    # a confident result with the CSF outside the sac is also a confident wrong one
    wrong_conf += sum(c.levels_right and c.confident and c.csf_ok is False for c in cases)
    dzz = next((c for c in siegen if c.vbq_reference), None)
    dzz_err = ("n/a" if dzz is None or dzz.vbq_error is None
               else f"{abs(dzz.vbq_error) * 100:.1f}%")
    print(f"\nsummary: {len(cases)} cases in {time.perf_counter() - t0:.0f} s; right & confident "
          f"{right_conf}, right & flagged {right_flag}, wrong & flagged {wrong_flag}, wrong & "
          f"confident {wrong_conf}")
    held = learned.held_out_people([c.name for c in spider])
    print(f"learned segmenter: {'on' if learned_enabled() and learned.available() else 'off'}; "
          "SPIDER people it was never trained on: spider_levels_right="
          f"{sum(c.levels_right for c in spider if c.name in held)}/{len(held)} "
          f"spider_csf_in_canal={sum(bool(c.csf_ok) for c in spider if c.name in held)}"
          f"/{len(held)}")
    print(f"real: siegen_levels_right={sum(c.levels_right for c in siegen)}/{len(siegen)} "
          f"spider_levels_right={sum(c.levels_right for c in spider)}/{len(spider)} "
          f"spider_csf_in_canal={sum(bool(c.csf_ok) for c in spider)}/{len(spider)} "
          f"dzz_t1_vbq_error={dzz_err} wrong_and_confident={wrong_conf} "
          f"right_and_confident={right_conf} right_and_flagged={right_flag} "
          f"wrong_and_flagged={wrong_flag}")


if __name__ == "__main__":
    main()
