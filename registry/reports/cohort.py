"""The QI report's data model. PURE: no Django import.

One ``CohortRow`` per patient and ``AlertRow``s in (built by ``registry.reports.queries``, or by
hand in tests), a ``Report`` of ``Section``s out; the report's parameters and constants, the VBQ
value and group of a patient, and the helpers every section shares (``safe_section``: a section
that fails degrades to ``available=False`` instead of failing the page). The sections are in
``survival`` (Table 1, incidence, Kaplan–Meier, Cox), ``roc`` and ``kpis``.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

HIGH = "high"
NORMAL = "normal"
KPI_WINDOWS_DAYS = (60, 112, 180, 365)
AT_RISK_TIMES_DAYS = (0, 90, 180, 365, 730, 1095)
ROC_HORIZON_DAYS = 730
TIME_DEPENDENT_AUC_DAYS = (365, 730)
DAYS_PER_MONTH = 30.4375


def format_p(p: float | None) -> str:
    """A p-value as a reader should see it: ``"< 0.001"`` below 0.001 (never ``"0.000"``),
    otherwise three decimals; ``"—"`` when there is none."""
    if p is None or not math.isfinite(p):
        return "—"
    if p < 0.001:
        return "< 0.001"
    return f"{p:.3f}"


@dataclass(frozen=True)
class CohortRow:
    """One patient of the report cohort. ``time_days``: index procedure to first secondary
    fracture (``event``) or censoring (death, last contact or data cut-off).
    ``followup_days``: index procedure to the end of observation (death, last contact or
    cut-off) whether or not the patient fractured; ``None`` means ``time_days``."""

    patient_key: str
    index_date: dt.date
    age_years: float | None
    sex: str
    bmi: float | None
    vbq_all_levels: float | None
    vbq_excluding_fractured: float | None
    field_strength_t: float | None
    event: bool
    time_days: float
    censor_reason: str = ""
    fracture_site: str | None = None
    therapy_start_days: float | None = None
    care_team: str = ""
    followup_days: float | None = None

    @property
    def observed_days(self) -> float:
        """Days the patient was observed, a fracture notwithstanding (KPI denominators)."""
        return self.time_days if self.followup_days is None else self.followup_days


@dataclass(frozen=True)
class AlertRow:
    rule_id: str
    hours_to_acknowledge: float | None
    hours_to_resolve: float | None
    resolution_reason: str = ""


@dataclass(frozen=True)
class ReportParams:
    threshold: float = 3.0
    vbq_value: str = "excluding_fractured"  # or "all_levels"
    followup_days: int = 60
    small_cell_min: int = 5


@dataclass
class Section:
    available: bool
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    params: ReportParams
    n_patients: int
    sections: dict[str, Section]

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dt.date):
        return value.isoformat()
    return value


def vbq_of(row: CohortRow, params: ReportParams) -> float | None:
    """The VBQ value the report uses for ``row`` (by ``params.vbq_value``)."""
    if params.vbq_value == "all_levels":
        return row.vbq_all_levels
    return row.vbq_excluding_fractured if row.vbq_excluding_fractured is not None else (
        row.vbq_all_levels
    )


def vbq_group(row: CohortRow, params: ReportParams) -> str | None:
    value = vbq_of(row, params)
    if value is None:
        return None
    return HIGH if value >= params.threshold else NORMAL


def mean_sd(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, mean, SD, median and quartiles (numpy's linear interpolation, R's type 7)."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if arr.size == 0:
        return {"n": 0, "mean": None, "sd": None, "median": None, "q1": None, "q3": None}
    q1, median, q3 = np.percentile(arr, [25, 50, 75])
    return {
        "n": int(arr.size),
        "mean": float(arr.mean()),
        "sd": float(arr.std(ddof=1)) if arr.size > 1 else None,
        "median": float(median), "q1": float(q1), "q3": float(q3),
    }


def reverse_km_followup(rows: Sequence[CohortRow]) -> dict[str, float | int | None]:
    """Median (IQR) follow-up in months by reverse Kaplan–Meier (Schemper & Smith 1996): the
    Kaplan–Meier estimate of the time to censoring, a fracture counting as censored. Unlike
    the mean time to event or censoring, it does not shorten a group for having more events.
    A quartile the curve never reaches is ``None``."""
    from lifelines import KaplanMeierFitter

    if not rows:
        return {"n": 0, "median": None, "q1": None, "q3": None}
    t = np.array([r.time_days for r in rows], dtype=float)
    censored = np.array([not r.event for r in rows], dtype=bool)
    if not censored.any():
        return {"n": len(rows), "median": None, "q1": None, "q3": None}
    kmf = KaplanMeierFitter().fit(t, censored)

    def quantile(p: float) -> float | None:
        # First time the reverse-KM curve is at or below 1 - p (lifelines' and R's rule when
        # no plateau sits exactly on 1 - p).
        value = float(kmf.percentile(1.0 - p))
        return value / DAYS_PER_MONTH if math.isfinite(value) else None

    return {"n": len(rows), "median": quantile(0.5), "q1": quantile(0.25),
            "q3": quantile(0.75)}


def safe_section(fn: Any, *args: Any, **kwargs: Any) -> Section:
    """Run a section builder; any numerical failure becomes an unavailable section."""
    try:
        result: Section = fn(*args, **kwargs)
        return result
    except (ValueError, ZeroDivisionError, np.linalg.LinAlgError, FloatingPointError) as exc:
        return Section(False, f"Not computable on this cohort: {exc}")
    except Exception as exc:  # lifelines raises its own convergence errors
        return Section(False, f"Not computable on this cohort ({type(exc).__name__}): {exc}")
