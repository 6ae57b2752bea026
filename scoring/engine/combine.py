"""The classical localiser and the learned segmenter together: which level names to trust, and
how sure to be. Pure (numpy).

The two methods fail differently. The classical localiser (``localize``) finds the bodies
along the canal well but names them by finding the sacrum, and its commonest failure on real
images is taking L5 for S1 (it says so: ``disc-below-s1``, ``sacrum-not-identified``,
``label-crosscheck``). The learned segmenter (``learned``) recognises L5 directly, but where it
misses a disc two bodies merge into one component and every level above is counted one short.
So:

- ``chain_check``: the learned level chain is *regular* when its L1–L5 components are each
  one body tall (0.6–1.45 × their median height) and evenly spaced (consecutive centres
  0.75–1.3 × their median distance): no merged or missing body.
- ``classical_shift``: every classical L1–L4 (and L5, S1 when found) ROI centre lies in one
  learned body, all with the same offset in level names (0: the two agree; -1: the
  classical names are one level low, its L5-for-S1 failure).
- ``decide``: a regular learned chain gives the names when the classical agrees, when the
  classical doubts its sacrum, when it found no column, or when the classical doubts its
  count (``COUNT_DOUBTS``: its names, its spacing, or a body it inferred from a gap and did
  not see) while the learned path counted without a doubt of its own; the result is
  *corroborated* (the classical level doubts no longer count) only when the classical bodies
  are the learned ones with the same names, or named one level low while the classical
  itself doubts its sacrum. The learned path's own doubt about its count is lifted only in
  the first case (``learned-doubt-resolved``: both methods found the same names on their own);
  one level apart, the names rest on the learned L5 alone and its doubt stands.
  An irregular learned chain gives: the classical bodies renamed from the learned L5 when
  that component is a single body holding one classical body (``relabel``); else the learned
  chain with its tall components cut into single bodies (``repaired_bodies``) when that is
  regular and names the classical bodies alike, or when the classical localiser found no
  column or doubts its names (``LABEL_DOUBTS``) and its bodies do not line up with the
  learned ones; else the classical result. All of these go to review.
- ``csf_in_classical_canal``: the CSF ROI of the learned path must also lie on the canal the
  classical localiser followed (two canals found independently), and the two CSF ROIs'
  medians must agree within ``CSF_AGREEMENT`` (checked in ``vbq``): a CSF ROI that takes in
  cord or roots is brighter, and the VBQ error is the same fraction.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np

from scoring.engine.bodies import series_directions
from scoring.engine.dicom_io import Series
from scoring.engine.findings import BodyFinding, Localisation
from scoring.engine.learned import LEVEL_IDS, LearnedPlacement
from scoring.engine.model import VBQ_LEVELS, QcFlag
from scoring.engine.segimport import SegmentationError, rois_from_labels

ORDER = ("T12", "L1", "L2", "L3", "L4", "L5", "S1")
CHAIN = ("L1", "L2", "L3", "L4", "L5")
SACRUM_DOUBTS = frozenset({"disc-below-s1", "sacrum-not-identified", "label-crosscheck"})
# the classical localiser's doubts about its level names: the sacrum, or the spacing of levels
LABEL_DOUBTS = SACRUM_DOUBTS | {"irregular-spacing", "implausible-spacing"}
# the classical localiser's doubts about its count of bodies: its names, or a body it did not
# see but inferred from a gap (the count then rests on that inference)
COUNT_DOUBTS = LABEL_DOUBTS | {"inferred-body"}
LEARNED_DOUBT = "levels-disagree"  # learned.learned_rois: its own count is in doubt
HEIGHT_RANGE = (0.6, 1.45)  # × the median L1–L5 component height: one body, not two
SPACING_RANGE = (0.75, 1.3)  # × the median centre distance: no body missing or merged
CANAL_REACH_MM = 10.0  # the CSF ROI centre within this of the classical canal path
CSF_AGREEMENT = 0.10  # the two CSF ROIs' medians within this fraction (VBQ error alike)


@dataclass
class ChainCheck:
    regular: bool
    reason: str = ""
    heights_mm: dict[str, float] = dataclasses.field(default_factory=dict)


def chain_check(placed: LearnedPlacement, spacing_mm: tuple[float, float],
                inferior: tuple[float, float] = (1.0, 0.0)) -> ChainCheck:
    """Whether the learned L1–L5 components are one body each and evenly spaced.
    ``inferior``: the head→feet direction on the slice, (row mm, column mm)."""
    axis = np.array(inferior, float)
    axis /= max(float(np.linalg.norm(axis)), 1e-9)
    heights: dict[str, float] = {}
    centres: dict[str, np.ndarray] = {}
    for lv in CHAIN:
        mask = placed.bodies.get(lv)
        if mask is None or not mask.any():
            return ChainCheck(False, f"the learned segmentation has no {lv} body")
        rr, cc = np.nonzero(mask)
        pts = np.stack([rr * spacing_mm[0], cc * spacing_mm[1]], axis=1)
        along = pts @ axis
        heights[lv] = float(along.max() - along.min() + min(spacing_mm))
        centres[lv] = pts.mean(axis=0)
    h_med = float(np.median(list(heights.values())))
    odd = [lv for lv, h in heights.items()
           if not HEIGHT_RANGE[0] * h_med <= h <= HEIGHT_RANGE[1] * h_med]
    if odd:
        return ChainCheck(False, "learned bodies " + ", ".join(
            f"{lv} {heights[lv]:.0f} mm" for lv in odd) + f" tall against a median of "
            f"{h_med:.0f} mm (two bodies merged, or a part of one)", heights)
    gaps = [float(np.linalg.norm(centres[b] - centres[a])) for a, b in itertools.pairwise(CHAIN)]
    g_med = float(np.median(gaps))
    if any(not SPACING_RANGE[0] * g_med <= g <= SPACING_RANGE[1] * g_med for g in gaps):
        return ChainCheck(False, "learned L1–L5 spacing irregular (" + ", ".join(
            f"{g:.0f}" for g in gaps) + " mm)", heights)
    return ChainCheck(True, "", heights)


MERGED_AT = 1.6  # a component this many median heights tall holds round(ratio) bodies


def repaired_bodies(placed: LearnedPlacement, spacing_mm: tuple[float, float],
                    inferior: tuple[float, float] = (1.0, 0.0)) -> dict[str, np.ndarray] | None:
    """The learned level masks with each component above L5 that is ``MERGED_AT`` or more
    median heights tall cut into ``round(height / median)`` equal parts along the spine (a
    missed disc merges two bodies), names counted up from L5 again; ``None`` when nothing was
    cut, or when the L5 component itself is merged (which of its parts is L5 is unknown)."""
    order = [lv for lv in ("L5", "L4", "L3", "L2", "L1", "T12") if lv in placed.bodies]
    if not order or order[0] != "L5":
        return None
    axis = np.array(inferior, float)
    axis /= max(float(np.linalg.norm(axis)), 1e-9)
    along: dict[str, np.ndarray] = {}
    heights: dict[str, float] = {}
    for lv in order:
        rr, cc = np.nonzero(placed.bodies[lv])
        a = rr * spacing_mm[0] * axis[0] + cc * spacing_mm[1] * axis[1]
        along[lv] = a
        heights[lv] = float(a.max() - a.min() + min(spacing_mm))
    h_med = float(np.median([heights[lv] for lv in order if heights[lv] < MERGED_AT * max(
        float(np.median(list(heights.values()))), 1e-6)] or list(heights.values())))
    if heights["L5"] >= MERGED_AT * h_med:
        return None
    parts: list[np.ndarray] = []  # from L5 upwards
    cut = False
    for lv in order:
        mask = placed.bodies[lv]
        n = max(1, round(heights[lv] / h_med)) if heights[lv] >= MERGED_AT * h_med else 1
        if n == 1:
            parts.append(mask)
            continue
        cut = True
        rr, cc = np.nonzero(mask)
        a = along[lv]
        edges = np.linspace(a.min(), a.max() + 1e-6, n + 1)
        for k in range(n - 1, -1, -1):  # the inferior part first
            sel = (a >= edges[k]) & (a < edges[k + 1])
            part = np.zeros_like(mask)
            part[rr[sel], cc[sel]] = True
            parts.append(part)
    if not cut:
        return None
    return dict(zip(("L5", "L4", "L3", "L2", "L1", "T12"), parts, strict=False))


def _level_at(placed: LearnedPlacement, row: float, col: float) -> str | None:
    r, c = round(row), round(col)
    for lv, mask in placed.bodies.items():
        if 0 <= r < mask.shape[0] and 0 <= c < mask.shape[1] and bool(
                mask[max(r - 1, 0): r + 2, max(c - 1, 0): c + 2].any()):
            return lv
    return None


def classical_shift(placed: LearnedPlacement, loc: Localisation | None) -> int | None:
    """The offset (learned minus classical, in ``ORDER`` positions) shared by every classical
    body that lies in a learned body, when all of L1–L4 do; ``None`` otherwise."""
    if loc is None:
        return None
    shifts = set()
    for lv, body in loc.bodies.items():
        roi = body.roi
        if abs(roi.slice_index - placed.mid_slice) > 2:
            if lv in VBQ_LEVELS:
                return None
            continue
        got = _level_at(placed, roi.row, roi.col)
        if got is None:
            if lv in VBQ_LEVELS:
                return None
            continue
        shifts.add(ORDER.index(got) - ORDER.index(lv))
    return shifts.pop() if len(shifts) == 1 else None


def relabel(loc: Localisation, placed: LearnedPlacement, chain: ChainCheck
            ) -> Localisation | None:
    """The classical bodies renamed from the learned L5, when that component is one body
    (its height within ``HEIGHT_RANGE`` of the chain's median) and holds exactly one
    classical body; ``None`` when that does not give L1–L4 or changes nothing."""
    if "L5" not in placed.bodies or not chain.heights_mm:
        return None
    h_med = float(np.median(list(chain.heights_mm.values())))
    if not HEIGHT_RANGE[0] * h_med <= chain.heights_mm.get("L5", 0.0) <= HEIGHT_RANGE[1] * h_med:
        return None
    inside = [lv for lv, b in loc.bodies.items()
              if abs(b.roi.slice_index - placed.mid_slice) <= 2
              and _level_at(placed, b.roi.row, b.roi.col) == "L5"]
    if len(inside) != 1:
        return None
    shift = ORDER.index("L5") - ORDER.index(inside[0])
    if shift == 0:
        return None
    bodies: dict[str, BodyFinding] = {}
    for lv, b in loc.bodies.items():
        k = ORDER.index(lv) + shift
        if 0 <= k < len(ORDER):
            bodies[ORDER[k]] = dataclasses.replace(b, level=ORDER[k])
    if not all(lv in bodies for lv in VBQ_LEVELS):
        return None
    k = ORDER.index(loc.csf_level) + shift if loc.csf_level in ORDER else -1
    csf_level = ORDER[k] if 0 <= k < len(ORDER) else "?"
    flags = list(loc.flags)
    flags.append(QcFlag("levels-from-learned-l5", f"the classical bodies renamed from the "
                        f"learned L5 ({-shift:+d} level{'s' if abs(shift) > 1 else ''}): "
                        f"{chain.reason}; check the level labels"))
    if csf_level != "L3":
        flags.append(QcFlag("csf-not-at-l3", f"the CSF ROI lies behind {csf_level} after "
                            "renaming the levels"))
    return dataclasses.replace(loc, bodies=bodies, csf_level=csf_level, flags=flags,
                               confidence=0.0)


def csf_in_classical_canal(loc: Localisation, slice_index: int, row: float, col: float,
                           spacing_mm: tuple[float, float]) -> bool:
    """The point lies within ``CANAL_REACH_MM`` of the classical canal path (a polyline in
    original pixels) and within two slices of the classical mid-sagittal slice."""
    if abs(slice_index - loc.mid_slice) > 2 or len(loc.canal_path_px) < 2:
        return False
    path = np.asarray(loc.canal_path_px, float) * np.asarray(spacing_mm, float)
    p = np.array([row * spacing_mm[0], col * spacing_mm[1]])
    a, b = path[:-1], path[1:]
    d = b - a
    t = np.clip(np.einsum("ij,ij->i", p - a, d) / np.maximum(np.einsum("ij,ij->i", d, d),
                                                             1e-9), 0.0, 1.0)
    dist = np.linalg.norm(a + t[:, None] * d - p, axis=1)
    return bool(dist.min() <= CANAL_REACH_MM)


@dataclass
class Decision:
    """``use``: "learned" (the learned placement), "repaired" (``placed``: the learned
    placement with merged components cut), "classical" (``loc`` as found) or "relabelled"
    (``loc`` renamed from the learned L5); ``corroborated``: the two methods name the same
    bodies alike; ``flags``: the cross-check's findings for the result."""

    use: str
    corroborated: bool
    flags: list[QcFlag]
    loc: Localisation | None = None
    placed: LearnedPlacement | None = None


def repaired_placement(placed: LearnedPlacement, series: Series) -> LearnedPlacement | None:
    """The learned placement with merged components cut (``repaired_bodies``) and its ROIs
    placed again on the same slice; ``None`` when nothing was cut or no body or CSF ROI could
    be placed."""
    inferior = tuple(float(x) for x in series_directions(series)[0])
    bodies = repaired_bodies(placed, series.pixel_spacing_mm, (inferior[0], inferior[1]))
    if bodies is None:
        return None
    labels = np.zeros(placed.canal.shape, np.uint16)
    for lv, mask in bodies.items():
        labels[mask] = LEVEL_IDS[lv]
    try:
        rois = rois_from_labels(labels, {i: lv for lv, i in LEVEL_IDS.items()}, series,
                                placed.mid_slice)
    except SegmentationError:
        return None
    if rois.csf_roi is None:
        return None
    return LearnedPlacement(placed.mid_slice, bodies, placed.canal, rois)


def decide(placed: LearnedPlacement, loc: Localisation | None, chain: ChainCheck,
           repaired: LearnedPlacement | None = None, repaired_chain: ChainCheck | None = None
           ) -> Decision:
    """Which placement names the levels (see the module docstring). ``repaired``: the learned
    placement with merged components cut, and ``repaired_chain`` its check."""
    shift = classical_shift(placed, loc)
    sacrum_doubt = loc is not None and any(f.code in SACRUM_DOUBTS for f in loc.flags)
    count_doubt = loc is not None and any(f.code in COUNT_DOUBTS for f in loc.flags)
    learned_clean = not learned_doubted(placed)
    if chain.regular:
        if shift == 0 or (shift == -1 and sacrum_doubt):
            flags = [QcFlag(
                "levels-agree", "the classical localiser and the learned segmenter name the "
                "same bodies" + ("" if shift == 0 else " once the classical body taken for S1 "
                                 "is named L5, as its own sacrum check suggested"), "info")]
            if shift == 0 and not learned_clean:
                flags.append(QcFlag("learned-doubt-resolved", "the learned level count was in "
                                    "doubt, but the classical localiser found the same bodies "
                                    "with the same names on its own", "info"))
            return Decision("learned", True, flags)
        if loc is None:
            return Decision("learned", False, [QcFlag(
                "no-cross-check", "the classical localiser found no column to check the "
                "learned levels against")])
        if sacrum_doubt or (count_doubt and learned_clean):
            return Decision("learned", False, [_disagree(shift)])
        return Decision("classical", False, [_disagree(shift)], loc)
    irregular = QcFlag("learned-chain-irregular", chain.reason)
    renamed = relabel(loc, placed, chain) if loc is not None else None
    if renamed is not None:
        return Decision("relabelled", False, [], renamed)
    if repaired is not None and repaired_chain is not None and repaired_chain.regular:
        rep_shift = classical_shift(repaired, loc)
        cut = QcFlag("learned-chain-repaired", f"{chain.reason}: the learned levels were "
                     "counted with the tall component cut into single bodies; check the level "
                     "labels")
        label_doubt = loc is None or any(f.code in LABEL_DOUBTS for f in loc.flags)
        if rep_shift == 0 or (rep_shift is None and label_doubt):
            # the same names, or no classical column, or one that doubts its names and whose
            # bodies do not line up with the learned ones one to one
            return Decision("repaired", False, [cut], placed=repaired)
        if rep_shift is None:
            return Decision("classical", False, [irregular], loc)
        return Decision("classical", False, [irregular, _disagree(rep_shift)], loc)
    if loc is None:
        return Decision("learned", False, [irregular])
    return Decision("classical", False, [irregular], loc)


def confident_check(placed: LearnedPlacement, loc: Localisation, chain: ChainCheck
                    ) -> QcFlag | None:
    """The learned cross-check of a *confident* classical result (``check-all`` mode): a
    regular learned chain counted without a doubt of its own whose bodies are not the
    classical ones with the same names gives ``levels-disagree``; an irregular or doubted
    learned chain is no evidence against a classical result that does not doubt itself
    (``None``), nor is agreement."""
    if not chain.regular or learned_doubted(placed):
        return None
    shift = classical_shift(placed, loc)
    return None if shift == 0 else _disagree(shift)


def learned_doubted(placed: LearnedPlacement) -> bool:
    """Whether the learned path doubts its own level count (``learned.learned_rois``: no disc
    between two counted bodies, two L5-like bodies, another central slice counting the bodies
    differently, ...)."""
    return any(f.code == LEARNED_DOUBT for f in placed.rois.flags)


def learned_flags(placed: LearnedPlacement, decision: Decision) -> list[QcFlag]:
    """The learned placement's own flags as they count for ``decision``: its doubt about the
    level count is dropped when ``decide`` resolved it (info ``learned-doubt-resolved``: the
    classical localiser found the same bodies with the same names)."""
    if any(f.code == "learned-doubt-resolved" for f in decision.flags):
        return [f for f in placed.rois.flags if f.code != LEARNED_DOUBT]
    return list(placed.rois.flags)


def _disagree(shift: int | None) -> QcFlag:
    how = "" if shift is None else f" (offset {shift:+d} level{'s' if abs(shift) > 1 else ''})"
    return QcFlag("levels-disagree", "the learned segmenter and the classical localiser "
                  f"disagree on the level names{how}: check the level labels")
