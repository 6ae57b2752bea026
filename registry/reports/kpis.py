"""The QI report's service sections: VBQ including vs excluding fractured levels (paired
tests, Bland–Altman), the service KPIs (therapy by day 60/112/180/365, time to therapy, alert
response times) and results by field strength. PURE: no Django import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from registry.reports.cohort import (
    HIGH,
    KPI_WINDOWS_DAYS,
    ROC_HORIZON_DAYS,
    AlertRow,
    CohortRow,
    ReportParams,
    Section,
    mean_sd,
    vbq_group,
    vbq_of,
)
from registry.reports.roc import (
    delong_auc_ci,
)


# --- Paired VBQ including vs excluding fractured levels ---------------------------------------
def paired_vbq(rows: Sequence[CohortRow], params: ReportParams) -> Section:
    pairs = [
        (r.vbq_all_levels, r.vbq_excluding_fractured)
        for r in rows
        if r.vbq_all_levels is not None and r.vbq_excluding_fractured is not None
    ]
    if len(pairs) < 3:
        return Section(False, "Fewer than 3 patients with both VBQ values.")
    a = np.array([p[0] for p in pairs], dtype=float)
    b = np.array([p[1] for p in pairs], dtype=float)
    diff = a - b
    out: dict[str, Any] = {
        "n": len(pairs),
        "all_levels": mean_sd(a.tolist()),
        "excluding_fractured": mean_sd(b.tolist()),
    }
    if np.allclose(diff, 0):
        out["message"] = "Identical values in every pair."
        return Section(True, "The two VBQ values are identical for every patient.", out)
    out["paired_t"] = {"p": float(stats.ttest_rel(a, b).pvalue)}
    out["wilcoxon"] = {"p": float(stats.wilcoxon(a, b).pvalue)}
    bias = float(diff.mean())
    sd = float(diff.std(ddof=1))
    out["bland_altman"] = {
        "bias": bias, "loa": [bias - 1.96 * sd, bias + 1.96 * sd],
        "means": ((a + b) / 2).tolist(), "differences": diff.tolist(),
    }
    return Section(True, "", out)


# --- KPIs ---------------------------------------------------------------------------------------
def kpis(rows: Sequence[CohortRow], alerts: Sequence[AlertRow], params: ReportParams) -> Section:
    high = [r for r in rows if vbq_group(r, params) == HIGH]
    data: dict[str, Any] = {"windows": {}}
    for window in KPI_WINDOWS_DAYS:
        # Denominator (UK FLS-DB KPI style): high-VBQ patients alive and followed to day
        # ``window``, whether or not they fractured meanwhile. Observation ends at death, last
        # contact or the cut-off, never at a fracture.
        eligible = [r for r in high if r.observed_days >= window]
        treated = [
            r for r in eligible if r.therapy_start_days is not None
            and r.therapy_start_days <= window
        ]
        data["windows"][str(window)] = {
            "eligible": len(eligible),
            "treated": len(treated),
            "pct": 100.0 * len(treated) / len(eligible) if eligible else None,
        }
    data["window_labels"] = {
        "60": f"this registry's rule (day {params.followup_days})" if params.followup_days == 60
        else "day 60",
        "112": "16 weeks (UK FLS-DB KPI)",
        "180": "180 days (HEDIS OMW)",
        "365": "1 year",
    }
    data["definition"] = (
        "Eligible: high-VBQ patients alive and followed to the day (death, last contact and "
        "the cut-off end follow-up; a fracture does not). Treated: eligible patients with "
        "therapy started by that day (an exposure running on the index date counts as day 0)."
    )
    high_starts = [r.therapy_start_days for r in high if r.therapy_start_days is not None]
    data["median_days_to_therapy"] = float(np.median(high_starts)) if high_starts else None
    data["treated_high_vbq"] = len(high_starts)
    starts = [r.therapy_start_days for r in rows if r.therapy_start_days is not None]
    data["median_days_to_therapy_all_treated"] = float(np.median(starts)) if starts else None
    data["pct_any_therapy"] = 100.0 * len(starts) / len(rows) if rows else None
    acks = [a.hours_to_acknowledge for a in alerts if a.hours_to_acknowledge is not None]
    resolves = [a.hours_to_resolve for a in alerts if a.hours_to_resolve is not None]
    resolved = [a for a in alerts if a.hours_to_resolve is not None]
    data["alerts"] = {
        "n": len(alerts),
        "median_hours_to_acknowledge": float(np.median(acks)) if acks else None,
        "median_hours_to_resolve": float(np.median(resolves)) if resolves else None,
        "resolved": len(resolved),
        "pct_resolved_by_therapy_started": 100.0
        * sum(a.resolution_reason == "therapy-started" for a in resolved) / len(resolved)
        if resolved else None,
    }
    if not rows:
        return Section(False, "No patients in the cohort.", data)
    message = "" if high else "No high-VBQ patients: treatment KPIs have no denominator."
    return Section(True, message, data)


# --- Field strength ----------------------------------------------------------------------------
def by_field_strength(rows: Sequence[CohortRow], params: ReportParams) -> Section:
    strata: dict[str, Any] = {}
    for label, lo, hi in (("1.5T", 1.0, 2.0), ("3T", 2.5, 3.5)):
        rs = [r for r in rows if r.field_strength_t is not None and lo <= r.field_strength_t < hi
              and vbq_of(r, params) is not None]
        entry: dict[str, Any] = {
            "n": len(rs), "vbq": mean_sd([vbq_of(r, params) or 0.0 for r in rs])
        }
        # Same case/control rule as the ROC: status at the horizon known.
        horizon = ROC_HORIZON_DAYS
        known = [r for r in rs if (r.event and r.time_days <= horizon)
                 or r.time_days >= horizon]
        scores = np.array([vbq_of(r, params) for r in known], dtype=float)
        labels = np.array([r.event and r.time_days <= horizon for r in known], dtype=bool)
        if len(known) and labels.any() and not labels.all():
            auc, _, ci_lo, ci_hi = delong_auc_ci(scores, labels)
            entry["auc"] = {"auc": auc, "ci95": [ci_lo, ci_hi]}
        else:
            entry["auc"] = None
        entry["values"] = scores.tolist()
        strata[label] = entry
    unknown = sum(r.field_strength_t is None for r in rows)
    if not any(s["n"] for s in strata.values()):
        return Section(False, "No field strength recorded for any VBQ measurement.")
    return Section(True, "", {"strata": strata, "unknown_field_strength": unknown})
