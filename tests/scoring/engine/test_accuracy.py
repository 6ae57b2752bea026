"""The automatic path on 300 seeded random SYNTHETIC phantoms meets the issue's targets.

The phantoms are generated in the test from their seeds (about 1.5 min on one core). Seeds
5000–5299 are a held-out set: the algorithm was developed looking at seeds 0–299 (the bench's
default) and a few others, never at these. ``VBQ_ACCURACY_PHANTOMS`` lowers the count for a
quick local run.
"""

import os

import pytest

from scoring.engine.accuracy import REFUSALS, run
from scoring.engine.phantom import random_phantom
from scoring.engine.vbq import compute_vbq

PHANTOMS = int(os.environ.get("VBQ_ACCURACY_PHANTOMS", "300"))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sample():
    return run(PHANTOMS, seed0=5000)


def test_level_labels_are_correct_in_at_least_98_percent(sample):
    assert sample["label_ok"] / sample["labelled"] >= 0.98


def test_non_flagged_vbq_is_within_3_percent_of_truth_in_at_least_95_percent(sample):
    assert sample["within"] / sample["unflagged"] >= 0.95


def test_at_most_5_percent_are_flagged_for_review(sample):
    assert sample["flagged"] / sample["n"] <= 0.05


@pytest.mark.parametrize(("variant", "code"), REFUSALS)
@pytest.mark.parametrize("seed", [2000, 2001])
def test_t2_fat_suppressed_and_axial_series_are_refused_with_the_reason(variant, code, seed):
    result = compute_vbq(random_phantom(seed, **variant).datasets)
    assert result.status == "failed"
    assert result.vbq_all_levels is None
    assert code in {f.code for f in result.qc_flags if f.severity == "refusal"}
