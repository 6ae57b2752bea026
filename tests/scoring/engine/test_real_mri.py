"""The engine on REAL lumbar MRI (``../shared/mri``, or ``$VBQ_REAL_MRI_DIR``).

The set is development material that is never copied into the repository: these tests read it
in place and skip, with the reason, where it is absent (CI has it at ``../shared/mri`` relative
to the clone). What they hold is what ``bench/vbq_real.py`` measures; the figures are in
docs/engine.md.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scoring.engine.dicom_io import read_series
from scoring.engine.localize import localize
from scoring.engine.realset import (
    default_dir,
    score_siegen,
    score_spider,
    siegen_folders,
    spider_files,
    spider_levels,
    spider_spacing_mm,
    t1_like,
)
from scoring.engine.vbq import compute_vbq

ROOT = Path(__file__).resolve().parents[3]
MRI = default_dir(ROOT)

pytestmark = pytest.mark.skipif(not (MRI / "siegen").is_dir(),
                                reason=f"the real MRI set is not at {MRI} (set VBQ_REAL_MRI_DIR)")


@pytest.fixture(scope="module")
def cases():
    return [score_siegen(f) for f in siegen_folders(MRI)] + [
        score_spider(p) for p in spider_files(MRI)]


def test_no_real_exam_or_person_comes_back_confident_with_a_wrong_level_or_csf(cases):
    wrong = [c.name for c in cases if c.confident and not (c.levels_right and c.csf_ok)]
    assert wrong == []


def test_spider_levels_and_csf_hold_at_least_the_measured_figures(cases):
    # floors at the figures of docs/engine.md (0.3.0: 13/41 and 15/41; 0.5.0 classical: 20/41
    # and 31/41; 0.6.0 combined: 37/41 and 39/41, Siegen 3/3; with the model trained with
    # phantom slices and the inferred-body rule: 38/41 and 41/41)
    spider = [c for c in cases if c.kind == "spider"]
    assert sum(c.levels_right for c in spider) >= 38
    assert sum(bool(c.csf_ok) for c in spider) >= 40
    assert sum(c.levels_right for c in cases if c.kind == "siegen") == 3


def test_the_csf_roi_is_the_sac_behind_the_body_not_a_dark_band_further_back(cases):
    # SPIDER 034, 061 and 161: the sac reaches closer to the body than the canal's median
    # anterior wall, and the fat behind it is dark on the fold; 0.4.0 put the ROI behind the
    # sac on all three
    by_name = {c.name: c for c in cases}
    assert [n for n in ("spider_034", "spider_061", "spider_161") if not by_name[n].csf_ok] == []


def test_t2_exams_are_refused_by_protocol_qc():
    for exam in ("DzZ_T2", "F02"):
        m = compute_vbq(sorted((MRI / "siegen" / exam / "dicom").glob("*.dcm")))
        assert m.status == "failed"
        assert "t2-like" in [f.code for f in m.qc_flags]


def test_dzz_t1_localises_its_bodies_despite_bright_fat_below_the_column():
    # the body/disc threshold used to be pulled above every body by the fat below the sacrum
    # ("only 1 vertebral bodies were found")
    series = read_series(sorted((MRI / "siegen" / "DzZ_T1" / "dicom").glob("*.dcm")))
    loc = localize(series)
    assert len(loc.bodies) >= 6


def test_dzz_t1_vbq_is_within_ten_percent_of_the_hand_measured_reference(cases):
    dzz = next(c for c in cases if c.name == "DzZ_T1")
    assert dzz.vbq_error is not None
    assert abs(dzz.vbq_error) <= 0.10


def test_spider_levels_are_counted_up_from_the_lumbosacral_disc():
    for path in spider_files(MRI)[:5]:
        mask = np.load(path)["mask"]
        levels = spider_levels(mask[3], spider_spacing_mm(mask))
        rows = [np.nonzero(levels[lv])[0].mean() for lv in ("L1", "L2", "L3", "L4", "L5")]
        assert rows == sorted(rows)  # L1 above L2 ... above L5
        # L5 sits directly above the lowest disc
        discs = np.nonzero(mask[3] == 2)[0]
        assert rows[-1] < discs.max()


def test_spider_pixel_spacing_from_the_anatomy_is_about_half_a_millimetre():
    spacings = [spider_spacing_mm(np.load(p)["mask"]) for p in spider_files(MRI)]
    assert min(spacings) >= 0.4
    assert max(spacings) <= 0.7


def test_the_benchmark_says_why_and_exits_zero_without_the_folder(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "vbq_real.py"),
                          str(tmp_path / "absent")], capture_output=True, text=True, check=False,
                         timeout=60)
    assert out.returncode == 0
    assert "no real MRI folder" in out.stdout


def test_the_csf_fold_brings_the_canal_to_a_third_of_the_marrow_level():
    # SYNTHETIC T2-like values: marrow 40, canal 100, fat 190, muscle 20
    volume = np.array([[[40, 100, 190, 20]]], np.uint8)
    marrow = volume == 40
    assert t1_like(volume, marrow)[0, 0].tolist() == [40, 0, 0, 20]
    folded = t1_like(volume, marrow, volume == 100)[0, 0].tolist()
    assert folded[0] == 40
    assert folded[3] == 20
    assert folded[1] == round(40 / 3)
    assert folded[2] == 0  # brighter than CSF on T2 (fat): darker still


def test_names_from_a_repaired_or_renamed_chain_always_go_to_review(cases):
    reviewed = {"learned-chain-repaired", "levels-from-learned-l5", "levels-disagree",
                "learned-chain-irregular", "no-cross-check"}
    assert [c.name for c in cases if c.confident and reviewed & set(c.flags)] == []
    used = [c.name for c in cases if reviewed & set(c.flags)]
    assert len(used) >= 10  # the rule is exercised on the set


def test_f02_fracture_and_spondylolisthesis_gets_its_levels_right_and_goes_to_review(cases):
    # the classical names are wrong (merged bodies, an inferred body); the learned levels are
    # right, and the learned path doubts its own count (another slice counts differently)
    f02 = next(c for c in cases if c.name == "F02")
    assert f02.levels_right
    assert "levels-disagree" in f02.flags
    assert not f02.confident


def test_a_classical_count_resting_on_an_inferred_body_yields_to_a_clean_learned_count(cases):
    # spider_050 and spider_177: the classical localiser inferred a body it did not see and
    # names the levels differently from a regular learned chain counted without doubt; the
    # learned names are right, and the result goes to review (levels-disagree)
    by_name = {c.name: c for c in cases}
    for name in ("spider_050", "spider_177"):
        c = by_name[name]
        assert c.levels_right, name
        assert "levels-disagree" in c.flags, name
        assert not c.confident, name
