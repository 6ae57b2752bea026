"""The external segmentation path on a REAL T1 exam (../shared/mri/siegen/DzZ_T1), on its own.

The exam's expert body masks (``truth.npz``: ``label_level`` on the DICOM grid
[row, col, InstanceNumber-1]; L1–L5 = 1–5, S1 = 6, T10–T12 = 10–12) are written at test time
to a NIfTI label map in ``tmp_path`` with the TotalSegmentator or SPINEPS ids; nothing from
../shared/mri is kept. The reference VBQ (truth.json, 2.90) was measured by hand. The folder
is read in place (``VBQ_REAL_MRI_DIR`` overrides ``<repo>/../shared/mri``); without it the
tests skip.
"""

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scoring.engine import compute_vbq
from scoring.engine.__main__ import main as cli
from scoring.engine.segimport import TABLES

REPO = Path(__file__).resolve().parents[3]
MRI = Path(os.environ.get("VBQ_REAL_MRI_DIR") or REPO.parent / "shared" / "mri")
EXAM = MRI / "siegen" / "DzZ_T1"
TRUTH_CODES = {"L1": 1, "L2": 2, "L3": 3, "L4": 4, "L5": 5, "S1": 6, "T12": 12}

pytestmark = pytest.mark.skipif(
    not (EXAM / "truth.npz").is_file(),
    reason=f"the real MRI set is not here ({EXAM}); set VBQ_REAL_MRI_DIR to its folder")


@pytest.fixture(scope="module")
def truth():
    with np.load(EXAM / "truth.npz") as data:
        return {"label_level": data["label_level"], "ijk_to_lps": data["ijk_to_lps"],
                **json.loads((EXAM / "truth.json").read_text())}


def write_nifti(truth, path, table, *, reorient=False):
    """The truth masks as a label map with ``table``'s ids; ``reorient`` stores the axes in
    another order (slice, col, row) with the matching affine, as a resampling tool might."""
    ids = {level: i for i, level in table.items()}
    label = np.zeros(truth["label_level"].shape, np.int16)
    for level, code in TRUTH_CODES.items():
        label[truth["label_level"] == code] = ids[level]
    ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ truth["ijk_to_lps"]
    if reorient:
        label = np.transpose(label, (2, 1, 0))
        ijk_to_ras = ijk_to_ras[:, [2, 1, 0, 3]]
    nib.save(nib.Nifti1Image(label, ijk_to_ras), str(path))
    return path


@pytest.fixture(scope="module")
def spineps_result(truth, tmp_path_factory):
    path = write_nifti(truth, tmp_path_factory.mktemp("seg") / "dzz.nii.gz", TABLES["spineps"])
    return compute_vbq(EXAM / "dicom", segmentation=path, segmentation_labels="spineps")


def test_truth_masks_as_a_spineps_label_map_give_the_reference_vbq_within_10_percent(
        spineps_result, truth):
    reference = truth["reference_vbq"]["vbq_reference"]
    assert spineps_result.status == "succeeded", spineps_result.qc_flags
    assert spineps_result.source == "external-seg"
    assert abs(spineps_result.vbq_all_levels / reference - 1) < 0.10


def test_the_mid_sagittal_slice_comes_from_the_segmentation(spineps_result, truth):
    assert abs(spineps_result.csf.roi.slice_index - truth["mid_sagittal_slice"]) <= 1
    assert {m.roi.slice_index for m in spineps_result.levels.values()} == {
        spineps_result.csf.roi.slice_index}


def test_each_body_roi_lies_inside_its_own_truth_body(spineps_result, truth):
    for level in ("L1", "L2", "L3", "L4"):
        s, row, col = spineps_result.levels[level].centroid_pixel
        got = truth["label_level"][round(row), round(col), s]
        assert got == TRUTH_CODES[level], level


def test_the_csf_roi_lies_in_the_canal_behind_l3_near_the_hand_placed_one(spineps_result, truth):
    ref = truth["reference_vbq"]
    _, row, col = spineps_result.csf.centroid_pixel
    assert ref["csf_roi_rows"][0] - 5 <= row <= ref["csf_roi_rows"][1] + 5
    assert ref["csf_roi_cols"][0] - 4 <= col <= ref["csf_roi_cols"][1] + 4
    assert abs(spineps_result.csf.median_si - ref["csf_median_si"]) <= 2  # 8-bit grey levels


def test_a_totalsegmentator_label_map_stored_in_another_axis_order_gives_the_same_vbq(
        spineps_result, truth, tmp_path):
    path = write_nifti(truth, tmp_path / "ts.nii.gz", TABLES["totalsegmentator"], reorient=True)
    result = compute_vbq(EXAM / "dicom", segmentation=path,
                         segmentation_labels="totalsegmentator")
    assert result.status == "succeeded"
    assert result.vbq_all_levels == pytest.approx(spineps_result.vbq_all_levels, rel=1e-6)


def test_the_cli_scores_the_exam_from_a_segmentation(truth, tmp_path, capsys):
    path = write_nifti(truth, tmp_path / "sp.nii.gz", TABLES["spineps"])
    code = cli([str(EXAM / "dicom"), "--seg", str(path), "--seg-labels", "spineps", "--json",
                "--png", str(tmp_path / "overlay.png")])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["source"] == "external-seg"
    assert abs(out["vbq_all_levels"] / truth["reference_vbq"]["vbq_reference"] - 1) < 0.10
    assert (tmp_path / "overlay.png").stat().st_size > 0
