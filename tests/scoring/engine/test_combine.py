"""The classical localiser and the learned segmenter together (``scoring/engine/combine.py``):
which level names are trusted and when the result is corroborated. The columns here are
SYNTHETIC (1 mm pixels, bodies 26 mm tall, segments 36 mm apart); the real cases are in
test_real_mri.py and test_learned.py."""

from __future__ import annotations

import numpy as np

from scoring.engine import combine
from scoring.engine.findings import BodyFinding, Localisation
from scoring.engine.learned import LearnedPlacement
from scoring.engine.model import QcFlag, Roi
from scoring.engine.segimport import SegmentationRois

TOP = 20  # row of T12's top
SEGMENT = 36
BODY = 26
NAMES = ("T12", "L1", "L2", "L3", "L4", "L5", "S1")


def centre_row(k: int) -> float:
    """Centre row of the k-th body from the top (T12 = 0)."""
    return TOP + k * SEGMENT + BODY / 2


def learned_column(merge: tuple[str, str] | None = None) -> LearnedPlacement:
    """SYNTHETIC learned placement: T12–L5 body masks on slice 5; ``merge`` joins two
    neighbouring bodies into one component counted as the lower one (a missed disc), every
    name above it moving up one level, as ``learned.levels_from_classes`` counts."""
    shape = (300, 120)
    comps = []
    k = 0
    while k < 6:
        top = TOP + k * SEGMENT
        height = BODY
        if merge and NAMES[k] == merge[0]:
            height = SEGMENT + BODY
            k += 1
        m = np.zeros(shape, bool)
        m[top: top + height, 20:60] = True
        comps.append(m)
        k += 1
    names = ("L5", "L4", "L3", "L2", "L1", "T12")
    bodies = dict(zip(names, reversed(comps), strict=False))
    canal = np.zeros(shape, bool)
    canal[:, 66:78] = True
    return LearnedPlacement(5, bodies, canal, SegmentationRois(5, {}, None, None))


def classical_column(first: str, flags: tuple[str, ...] = ()) -> Localisation:
    """SYNTHETIC classical result: bodies at the T12…S1 positions named from ``first`` at the
    top (``"T12"``: right; ``"L1"``: every name one level low, L5 taken for S1)."""
    start = NAMES.index(first)
    bodies = {}
    for k in range(7):
        j = start + k
        if j >= len(NAMES):
            break
        roi = Roi(5, centre_row(k), 40.0, 6.0, 8.0, "box")
        bodies[NAMES[j]] = BodyFinding(NAMES[j], roi)
    csf = Roi(5, centre_row(3), 72.0, 6.0, 3.0, "box")
    return Localisation(5, bodies, csf, "L3", 0.3, [QcFlag(c, c) for c in flags],
                        canal_path_px=[(float(r), 72.0) for r in range(0, 300, 5)])


def test_a_learned_chain_of_single_evenly_spaced_bodies_is_regular():
    assert combine.chain_check(learned_column(), (1.0, 1.0)).regular


def test_a_missed_disc_makes_the_learned_chain_irregular():
    check = combine.chain_check(learned_column(merge=("L2", "L3")), (1.0, 1.0))
    assert not check.regular
    assert "merged" in check.reason


def test_the_classical_names_are_compared_body_by_body():
    placed = learned_column()
    assert combine.classical_shift(placed, classical_column("T12")) == 0
    assert combine.classical_shift(placed, classical_column("L1")) == -1


def test_l5_taken_for_s1_is_corrected_by_the_learned_l5_when_the_classical_doubts_its_sacrum():
    placed = learned_column()
    loc = classical_column("L1", ("disc-below-s1",))
    decision = combine.decide(placed, loc, combine.chain_check(placed, (1.0, 1.0)))
    assert decision.use == "learned"
    assert decision.corroborated


def test_a_disagreement_the_classical_does_not_doubt_keeps_its_names_for_review():
    # the learned segmenter can take a sacrum-like block for L5 (as on the SYNTHETIC
    # phantoms): without a doubt of its own about the sacrum the classical names stand
    placed = learned_column()
    loc = classical_column("L1", ("merged-bodies",))
    decision = combine.decide(placed, loc, combine.chain_check(placed, (1.0, 1.0)))
    assert decision.use == "classical"
    assert not decision.corroborated
    assert [f.code for f in decision.flags] == ["levels-disagree"]


def doubted(placed: LearnedPlacement) -> LearnedPlacement:
    """The same placement with the learned path's own doubt about its count (as
    ``learned.learned_rois`` reports it)."""
    placed.rois.flags.append(QcFlag("levels-disagree", "the learned level count is in doubt"))
    return placed


def test_a_classical_count_resting_on_an_inferred_body_yields_to_a_clean_learned_count():
    # the classical localiser filled a gap with a body it did not see: its count rests on
    # that inference, the regular learned chain counted without doubt names the levels
    placed = learned_column()
    loc = classical_column("L1", ("inferred-body",))
    decision = combine.decide(placed, loc, combine.chain_check(placed, (1.0, 1.0)))
    assert decision.use == "learned"
    assert not decision.corroborated
    assert [f.code for f in decision.flags] == ["levels-disagree"]


def test_a_learned_count_in_doubt_does_not_overrule_an_inferred_body():
    placed = doubted(learned_column())
    loc = classical_column("L1", ("inferred-body",))
    decision = combine.decide(placed, loc, combine.chain_check(placed, (1.0, 1.0)))
    assert decision.use == "classical"
    assert [f.code for f in decision.flags] == ["levels-disagree"]


def test_the_learned_doubt_is_resolved_only_when_the_classical_names_are_the_same():
    placed = doubted(learned_column())
    chain = combine.chain_check(placed, (1.0, 1.0))
    same = combine.decide(placed, classical_column("T12", ("inferred-body",)), chain)
    assert same.corroborated
    assert [f.code for f in same.flags] == ["levels-agree", "learned-doubt-resolved"]
    assert "levels-disagree" not in [f.code for f in combine.learned_flags(placed, same)]
    # one level apart, explained by the classical sacrum doubt: the names rest on the learned
    # L5 alone, so the learned doubt about its count stands
    step = combine.decide(placed, classical_column("L1", ("disc-below-s1",)), chain)
    assert step.corroborated
    assert [f.code for f in step.flags] == ["levels-agree"]
    assert "levels-disagree" in [f.code for f in combine.learned_flags(placed, step)]


def test_without_a_classical_column_the_learned_names_are_not_corroborated():
    placed = learned_column()
    decision = combine.decide(placed, None, combine.chain_check(placed, (1.0, 1.0)))
    assert decision.use == "learned"
    assert not decision.corroborated
    assert [f.code for f in decision.flags] == ["no-cross-check"]


def test_an_irregular_learned_chain_renames_the_classical_bodies_from_its_l5_for_review():
    placed = learned_column(merge=("L1", "L2"))
    loc = classical_column("L1", ("sacrum-not-identified",))
    decision = combine.decide(placed, loc, combine.chain_check(placed, (1.0, 1.0)))
    assert decision.use == "relabelled"
    assert not decision.corroborated
    assert decision.loc is not None
    rows = {lv: b.roi.row for lv, b in decision.loc.bodies.items()}
    assert rows["L5"] == centre_row(5)
    assert rows["L1"] == centre_row(1)
    assert "levels-from-learned-l5" in [f.code for f in decision.loc.flags]
    assert "csf-not-at-l3" in [f.code for f in decision.loc.flags]  # the CSF is behind L2 now


def test_the_csf_must_lie_on_the_classical_canal():
    loc = classical_column("T12")
    assert combine.csf_in_classical_canal(loc, 5, 120.0, 74.0, (1.0, 1.0))
    assert not combine.csf_in_classical_canal(loc, 5, 120.0, 100.0, (1.0, 1.0))
    assert not combine.csf_in_classical_canal(loc, 9, 120.0, 74.0, (1.0, 1.0))


def test_a_component_two_bodies_tall_is_cut_and_the_levels_counted_again():
    placed = learned_column(merge=("L1", "L2"))
    bodies = combine.repaired_bodies(placed, (1.0, 1.0))
    assert bodies is not None
    rows = {lv: float(np.nonzero(m)[0].mean()) for lv, m in bodies.items()}
    assert sorted(bodies) == ["L1", "L2", "L3", "L4", "L5", "T12"]
    for k, lv in enumerate(("T12", "L1", "L2", "L3", "L4", "L5")):
        assert abs(rows[lv] - centre_row(k)) < SEGMENT / 4


def test_a_tall_l5_component_is_not_cut_which_part_is_l5_is_unknown():
    placed = learned_column(merge=("L4", "L5"))
    assert combine.repaired_bodies(placed, (1.0, 1.0)) is None


def test_a_confident_classical_result_is_sent_to_review_only_by_a_clean_regular_learned_chain():
    # check-all mode: a confident classical result is cross-checked by the learned path
    placed = learned_column()
    chain = combine.chain_check(placed, (1.0, 1.0))
    assert combine.confident_check(placed, classical_column("T12"), chain) is None
    flag = combine.confident_check(placed, classical_column("L1"), chain)
    assert flag is not None
    assert flag.code == "levels-disagree"
    # a learned count in doubt, or an irregular chain, is no evidence against it
    assert combine.confident_check(doubted(learned_column()), classical_column("L1"),
                                   chain) is None
    merged = learned_column(merge=("L2", "L3"))
    assert combine.confident_check(merged, classical_column("L1"),
                                   combine.chain_check(merged, (1.0, 1.0))) is None
