"""The assisted path on a REAL T1 exam (../shared/mri/siegen/DzZ_T1): one click inside a named
body on the mid-sagittal slice places L1–L4 and the CSF. The clicks are taken from the exam's
expert masks (read in place; skipped when the folder is absent, see test_real_segmentation)."""

import numpy as np
import pytest

from scoring.engine import compute_vbq
from tests.scoring.engine.test_real_segmentation import EXAM, TRUTH_CODES, pytestmark, truth

__all__ = ["pytestmark", "truth"]


def click(truth, level, offset=(0.0, 0.0)):
    mid = truth["mid_sagittal_slice"]
    rows, cols = np.nonzero(truth["label_level"][:, :, mid] == TRUTH_CODES[level])
    return {"level": level, "slice_index": mid, "row": rows.mean() + offset[0],
            "col": cols.mean() + offset[1]}


@pytest.mark.parametrize(("level", "offset"), [("L3", (0, 0)), ("L3", (-6, 5)),
                                                ("L1", (0, 0)), ("L4", (4, -6))])
def test_one_click_places_l1_to_l4_in_their_own_bodies_and_the_reference_vbq(
        truth, level, offset):
    result = compute_vbq(EXAM / "dicom", seed=click(truth, level, offset))
    assert result.source == "assisted"
    assert result.status == "needs_review"
    for lv in ("L1", "L2", "L3", "L4"):
        s, row, col = result.levels[lv].centroid_pixel
        assert truth["label_level"][round(row), round(col), s] == TRUTH_CODES[lv], lv
    reference = truth["reference_vbq"]["vbq_reference"]
    assert abs(result.vbq_all_levels / reference - 1) < 0.10
