"""Result types of the VBQ engine and its typed errors. Pure (no Django)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

ALGORITHM_VERSION = "0.6.0"
VBQ_LEVELS = ("L1", "L2", "L3", "L4")
ALL_LEVELS = ("T12", "L1", "L2", "L3", "L4", "L5", "S1")


class EngineError(Exception):
    """Base of every engine error. ``code`` is stable; ``str(err)`` is clinician-readable."""

    code = "engine-error"


class UnreadableDicomError(EngineError):
    code = "unreadable-dicom"


class EmptySeriesError(EngineError):
    code = "empty-series"


class NotAnImageError(EngineError):
    code = "not-an-image"


class WrongModalityError(EngineError):
    code = "wrong-modality"


class InconsistentSeriesError(EngineError):
    code = "inconsistent-series"


class TooFewSlicesError(EngineError):
    code = "too-few-slices"


@dataclass(frozen=True)
class Roi:
    """An ellipse or box in pixel coordinates of one slice.

    ``row``/``col`` are the centre; ``half_height``/``half_width`` the semi-axes in pixels;
    ``angle_deg`` turns the height axis from the image's row direction towards its column
    direction (0 = axis-aligned; the automatic path aligns ROIs with the local spine axis).
    """

    slice_index: int
    row: float
    col: float
    half_height: float
    half_width: float
    shape: str = "ellipse"
    angle_deg: float = 0.0


@dataclass
class QcFlag:
    code: str
    message: str
    severity: str = "warning"  # info | warning | refusal


@dataclass
class LevelMeasurement:
    level: str
    median_si: float
    pixel_count: int
    roi: Roi
    centroid_pixel: tuple[int, float, float]
    centroid_lps_mm: tuple[float, float, float]
    fractured: bool = False
    suggested_fractured: bool = False
    height_ratio: float | None = None


@dataclass
class Acquisition:
    field_strength_t: float | None = None
    repetition_time_ms: float | None = None
    echo_time_ms: float | None = None
    receive_bandwidth_hz_px: float | None = None
    manufacturer: str = ""
    model: str = ""
    sequence_name: str = ""
    slice_thickness_mm: float | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    series_description: str = ""


@dataclass
class VbqMeasurement:
    """The engine's result: the JSON contract of ``to_dict`` is documented in docs/engine.md."""

    status: str  # succeeded | needs_review | failed
    source: str  # auto | manual | external-seg | assisted
    series_instance_uid: str
    vbq_all_levels: float | None
    vbq_excluding_fractured: float | None
    confidence: float
    qc_flags: list[QcFlag] = field(default_factory=list)
    levels: dict[str, LevelMeasurement] = field(default_factory=dict)
    csf: LevelMeasurement | None = None
    fractured_levels: list[str] = field(default_factory=list)
    acquisition: Acquisition = field(default_factory=Acquisition)
    algorithm_version: str = ALGORITHM_VERSION

    def to_dict(self) -> dict[str, Any]:
        """The measurement as plain JSON-ready data: what ``dataclasses.asdict`` returns (tuples
        stay tuples), without its deep copy of every leaf, which took most of the time a
        worker spends storing a result (~1 ms per series). The leaves are numbers, strings and
        None, which need no copy."""
        return _plain(self)  # type: ignore[no-any-return]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VbqMeasurement:
        def level(d: dict[str, Any] | None) -> LevelMeasurement | None:
            if d is None:
                return None
            d = dict(d)
            d["roi"] = Roi(**d["roi"])
            d["centroid_pixel"] = tuple(d["centroid_pixel"])
            d["centroid_lps_mm"] = tuple(d["centroid_lps_mm"])
            return LevelMeasurement(**d)

        acq = dict(data.get("acquisition") or {})
        if acq.get("pixel_spacing_mm") is not None:
            acq["pixel_spacing_mm"] = tuple(acq["pixel_spacing_mm"])
        levels = {k: level(v) for k, v in (data.get("levels") or {}).items()}
        return cls(
            status=data["status"], source=data["source"],
            series_instance_uid=data["series_instance_uid"],
            vbq_all_levels=data["vbq_all_levels"],
            vbq_excluding_fractured=data["vbq_excluding_fractured"],
            confidence=data["confidence"],
            qc_flags=[QcFlag(**f) for f in data.get("qc_flags", [])],
            levels={k: v for k, v in levels.items() if v is not None},
            csf=level(data.get("csf")),
            fractured_levels=list(data.get("fractured_levels", [])),
            acquisition=Acquisition(**acq),
            algorithm_version=data.get("algorithm_version", ALGORITHM_VERSION),
        )


# Per type: its dataclass field names, or None for any other type (asked once per type).
_FIELD_NAMES: dict[type, tuple[str, ...] | None] = {}
_LEAVES = frozenset({str, int, float, bool, type(None)})


def _plain(value: Any) -> Any:
    """``dataclasses.asdict`` for these result types, minus the deep copy of the leaves."""
    kind = type(value)
    if kind in _LEAVES:
        return value
    try:
        names = _FIELD_NAMES[kind]
    except KeyError:
        names = _FIELD_NAMES[kind] = (tuple(f.name for f in fields(value))
                                      if is_dataclass(kind) else None)
    if names is not None:
        return {name: _plain(getattr(value, name)) for name in names}
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(item) for item in value)
    return value
