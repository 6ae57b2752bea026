"""De-identification for the qi_analyst role. Pure (no Django).

- Cohort rows: no names, identifiers or dates. The patient key becomes a per-export sequence
  number; dates become day offsets from the index procedure; only the index *year* is kept;
  ages ≥ 90 are top-coded (HIPAA Safe Harbor).
- Aggregates: counts in (0, small_cell_min) are suppressed (``None`` plus a ``suppressed`` list
  naming where), so no small group can be singled out.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from registry.reports.cohort import CohortRow, ReportParams, vbq_group, vbq_of

COUNT_KEYS = {
    "n", "events", "eligible", "treated", "patients", "patients_with_secondary_fracture",
    "tp", "fp", "fn", "tn", "resolved", "missing_vbq", "unknown_field_strength",
    "cases", "controls", "excluded_short_followup", "treated_high_vbq", "ph_test_n",
}
# Dicts whose every value is a count (time -> number at risk, site -> fractures).
COUNT_MAPS = {"at_risk", "sites"}
# Lists of individual values that would re-identify in a small cohort; dropped when de-identified
# (the figures are drawn from the identified data server-side and carry no identifiers).
ROW_LEVEL_KEYS = {"days_to_fracture", "values", "means", "differences", "points",
                  "points_time_days"}

IDENTIFIED_COLUMNS = [
    "patient_id", "index_date", "age_years", "sex", "bmi", "care_team", "vbq_all_levels",
    "vbq_excluding_fractured", "vbq_used", "vbq_group", "field_strength_t", "event", "time_days",
    "followup_days", "censor_reason", "fracture_site", "therapy_start_days",
]
DEID_COLUMNS = [
    "row", "index_year", "age_years", "sex", "bmi", "vbq_all_levels", "vbq_excluding_fractured",
    "vbq_used", "vbq_group", "field_strength_t", "event", "time_days", "followup_days",
    "censor_reason", "fracture_site", "therapy_start_days",
]


def suppress_small_cells(data: Any, minimum: int, path: str = "") -> tuple[Any, list[str]]:
    """Return a copy of ``data`` with small counts replaced by ``None``, and where it did so."""
    suppressed: list[str] = []

    def walk(value: Any, where: str, key: str) -> Any:
        if isinstance(value, dict):
            before = len(suppressed)
            out: dict[Any, Any] = {}
            for k, v in value.items():
                if str(k) in ROW_LEVEL_KEYS:
                    continue
                child = f"{where}.{k}" if where else str(k)
                if k in COUNT_MAPS and isinstance(v, dict):
                    out[k] = {
                        t: (None if isinstance(c, int) and 0 < c < minimum else c)
                        for t, c in v.items()
                    }
                    if any(isinstance(c, int) and 0 < c < minimum for c in v.values()):
                        suppressed.append(child)
                    continue
                out[k] = walk(v, child, str(k))
            if len(suppressed) > before:
                # A percentage next to a suppressed count would give the count away.
                for k in list(out):
                    if str(k) == "pct" or str(k).startswith("pct_"):
                        out[k] = None
            return out
        if isinstance(value, list):
            return [walk(v, where, key) for v in value]
        is_count = key in COUNT_KEYS and isinstance(value, int) and not isinstance(value, bool)
        if is_count and 0 < value < minimum:
            suppressed.append(where)
            return None
        return value

    return walk(data, path, ""), suppressed


def cohort_csv(
    rows: Sequence[CohortRow], params: ReportParams, *, deidentified: bool
) -> str:
    """The analysis table as CSV text, one row per patient: what every report figure is
    computed from (``scripts/recompute_report.R`` recomputes them with R). ``vbq_used`` is the
    VBQ value the report uses (``params.vbq_value``); ``time_days`` / ``event`` the time to
    the first secondary fracture or censoring; ``followup_days`` the observation time whatever
    happened. Identified rows keep full precision (Python's shortest round-trip float text);
    de-identified rows carry no identifier and no date, ages to one decimal and top-coded at
    90 (HIPAA Safe Harbor)."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(DEID_COLUMNS if deidentified else IDENTIFIED_COLUMNS)
    for number, r in enumerate(rows, start=1):
        measured = [
            r.vbq_all_levels, r.vbq_excluding_fractured, _blank(vbq_of(r, params)),
            vbq_group(r, params) or "", r.field_strength_t, int(r.event), r.time_days,
            r.observed_days, r.censor_reason, r.fracture_site or "",
            _blank(r.therapy_start_days),
        ]
        if deidentified:
            age = None if r.age_years is None else round(r.age_years, 1)
            if age is not None and age >= 90:
                age = 90.0  # top-coded: "90 or older"
            writer.writerow([number, r.index_date.year, _blank(age), r.sex, _blank(r.bmi),
                             *measured])
        else:
            writer.writerow([r.patient_key, r.index_date.isoformat(), _blank(r.age_years),
                             r.sex, _blank(r.bmi), r.care_team, *measured])
    return buf.getvalue()


def _blank(value: Any) -> Any:
    return "" if value is None else value
