"""What the classical localiser finds (``localize``): the level bodies with their ROIs, the CSF
ROI, the confidence and its reasons; the error it raises; and the penalty one doubt about the
level names or the CSF costs. Pure (no imports beyond the engine's model)."""

from __future__ import annotations

from dataclasses import dataclass, field

from scoring.engine.model import QcFlag, Roi

# one doubt about the level labels or the CSF alone sends the result to review (1 - 0.35 is
# below vbq.REVIEW_BELOW_CONFIDENCE): a wrong level or a CSF ROI outside the thecal sac must
# never come back as a confident value
LABEL_DOUBT_PENALTY = 0.35
MAX_MARROW_TO_CSF = 6.0  # marrow / CSF of L1–L4 above this: the CSF ROI is not in CSF


class LocalisationError(Exception):
    """The anatomy needed for VBQ could not be found; ``str`` says what (clinician-readable)."""


@dataclass
class BodyFinding:
    level: str
    roi: Roi
    inferred: bool = False
    height_mm: float | None = None
    height_ratio: float | None = None
    suggested_fractured: bool = False


@dataclass
class Localisation:
    mid_slice: int
    bodies: dict[str, BodyFinding]
    csf_roi: Roi
    csf_level: str
    confidence: float
    flags: list[QcFlag] = field(default_factory=list)
    canal_path_px: list[tuple[float, float]] = field(default_factory=list)  # original (row, col)
    si_direction_px: tuple[float, float] = (1.0, 0.0)  # superior→inferior, original pixels
