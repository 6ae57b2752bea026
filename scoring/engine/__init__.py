"""The VBQ engine: pure Python (pydicom, numpy), no Django.

``compute_vbq(source, fractured_levels=..., manual_rois=...) -> VbqMeasurement``.
See docs/engine.md for the algorithm, the JSON contract and what is not done yet.
"""

from scoring.engine.model import (
    ALGORITHM_VERSION,
    EmptySeriesError,
    EngineError,
    InconsistentSeriesError,
    NotAnImageError,
    QcFlag,
    Roi,
    TooFewSlicesError,
    UnreadableDicomError,
    VbqMeasurement,
    WrongModalityError,
)
from scoring.engine.vbq import compute_vbq

__all__ = [
    "ALGORITHM_VERSION",
    "EmptySeriesError",
    "EngineError",
    "InconsistentSeriesError",
    "NotAnImageError",
    "QcFlag",
    "Roi",
    "TooFewSlicesError",
    "UnreadableDicomError",
    "VbqMeasurement",
    "WrongModalityError",
    "compute_vbq",
]
