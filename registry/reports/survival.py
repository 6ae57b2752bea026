"""Quality-improvement statistics for the VBQ registry. PURE: no Django import.

Input: one ``CohortRow`` per patient (built by ``registry.reports.queries`` from the ORM, or by
hand in tests) and optional ``AlertRow``s; output: a ``Report`` of ``Section``s. Every section
degrades gracefully: an empty cohort, a single VBQ group, no events, all censored or missing VBQ
give ``Section(available=False, message=...)`` instead of raising, so a page never fails.

Methods (reproducing Kadri et al. 2025 and standard fracture-liaison KPIs; docs/reports.md
gives each definition in words, with its reference):
- Table 1 by VBQ group: age mean (SD) and median (IQR), Welch t-test; BMI median (IQR),
  Mann–Whitney U; follow-up median (IQR) by reverse Kaplan–Meier (Schemper & Smith 1996);
  chi-square for sex, or Fisher's exact test when an expected count is < 5.
- Incidence: events / person-years ×100 with an exact Poisson 95 % CI (chi-square quantiles).
- Kaplan–Meier by group with Greenwood / exponential-log-log 95 % CI (lifelines), numbers at
  risk, log-rank test.
- Cox proportional hazards (lifelines): VBQ group and VBQ continuous, unadjusted and adjusted for
  age, sex and BMI (complete cases), with the proportional-hazards test of R survival's
  ``cox.zph`` (rank of time; ``registry.reports.ph_test``) on every patient of the model,
  worded "not rejected" / "violated", and the scaled Schoenfeld residuals (binned) for the plot.
- ROC of VBQ for a secondary fracture within ``ROC_HORIZON_DAYS``: only patients with a
  fracture within the horizon (cases) or followed fracture-free to it (controls); AUC with the
  DeLong 95 % CI (fast midrank algorithm of Sun & Xu 2014), Youden-optimal threshold,
  sensitivity / specificity / PPV / NPV at the configured threshold. Cumulative/dynamic AUC at
  1 and 2 years on every patient with inverse-probability-of-censoring weights (Uno et al.
  2007; scikit-survival ``cumulative_dynamic_auc``).
- VBQ including vs excluding fractured levels: paired t-test, Wilcoxon signed-rank, Bland–Altman.
- Service KPIs: % of high-VBQ patients on therapy by day 60 (this registry's rule), 112 (16 weeks,
  UK FLS-DB), 180 (HEDIS OMW) and 365, among those alive and followed to that day whether or
  not they fractured (numerator / denominator given); median days to therapy among treated
  high-VBQ patients; alert response times.
"""

from __future__ import annotations

import datetime as dt
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from registry.reports.ph_test import ph_score_test, scaled_schoenfeld, schoenfeld_bins

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


def _mean_sd(values: Sequence[float]) -> dict[str, float | int | None]:
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


def _safe(fn: Any, *args: Any, **kwargs: Any) -> Section:
    """Run a section builder; any numerical failure becomes an unavailable section."""
    try:
        result: Section = fn(*args, **kwargs)
        return result
    except (ValueError, ZeroDivisionError, np.linalg.LinAlgError, FloatingPointError) as exc:
        return Section(False, f"Not computable on this cohort: {exc}")
    except Exception as exc:  # lifelines raises its own convergence errors
        return Section(False, f"Not computable on this cohort ({type(exc).__name__}): {exc}")


# --- Table 1 ----------------------------------------------------------------------------------
def table1(rows: Sequence[CohortRow], params: ReportParams) -> Section:
    grouped = {HIGH: [], NORMAL: []}  # type: dict[str, list[CohortRow]]
    for r in rows:
        g = vbq_group(r, params)
        if g:
            grouped[g].append(r)
    if not rows:
        return Section(False, "No patients in the cohort.")
    out: dict[str, Any] = {"groups": {}}
    for name, rs in (("all", list(rows)), (HIGH, grouped[HIGH]), (NORMAL, grouped[NORMAL])):
        out["groups"][name] = {
            "n": len(rs),
            "age_years": _mean_sd([r.age_years for r in rs if r.age_years is not None]),
            "bmi": _mean_sd([r.bmi for r in rs if r.bmi is not None]),
            "followup_months": reverse_km_followup(rs),
            "female_pct": 100.0 * sum(r.sex == "female" for r in rs) / len(rs) if rs else None,
            "events": sum(r.event for r in rs),
        }
    pvalues: dict[str, Any] = {}
    message = ""
    if grouped[HIGH] and grouped[NORMAL]:
        age_a = [r.age_years for r in grouped[HIGH] if r.age_years is not None]
        age_b = [r.age_years for r in grouped[NORMAL] if r.age_years is not None]
        if len(age_a) >= 2 and len(age_b) >= 2:
            pvalues["age_years"] = {
                "test": "Welch t-test",
                "p": float(stats.ttest_ind(age_a, age_b, equal_var=False).pvalue),
            }
        bmi_a = [r.bmi for r in grouped[HIGH] if r.bmi is not None]
        bmi_b = [r.bmi for r in grouped[NORMAL] if r.bmi is not None]
        if bmi_a and bmi_b:
            pvalues["bmi"] = {
                "test": "Mann–Whitney U",
                "p": float(stats.mannwhitneyu(bmi_a, bmi_b, alternative="two-sided").pvalue),
            }
        table = np.array(
            [
                [sum(r.sex == "female" for r in grouped[g]) for g in (HIGH, NORMAL)],
                [sum(r.sex != "female" for r in grouped[g]) for g in (HIGH, NORMAL)],
            ]
        )
        pvalues["female"] = _categorical_p(table)
        pvalues["events"] = _categorical_p(
            np.array(
                [
                    [sum(r.event for r in grouped[g]) for g in (HIGH, NORMAL)],
                    [sum(not r.event for r in grouped[g]) for g in (HIGH, NORMAL)],
                ]
            )
        )
    else:
        message = "Only one VBQ group present: no between-group p-values."
    out["p_values"] = pvalues
    out["missing_vbq"] = sum(vbq_group(r, params) is None for r in rows)
    return Section(True, message, out)


def _categorical_p(table: np.ndarray) -> dict[str, Any]:
    if table.sum() == 0 or (table.sum(axis=0) == 0).any() or (table.sum(axis=1) == 0).any():
        return {"test": "none", "p": None}
    expected = stats.contingency.expected_freq(table)
    if (expected < 5).any():
        return {"test": "Fisher exact", "p": float(stats.fisher_exact(table).pvalue)}
    return {"test": "chi-square", "p": float(stats.chi2_contingency(table).pvalue)}


# --- Incidence --------------------------------------------------------------------------------
def poisson_rate_ci(events: int, person_years: float, per: float = 100.0) -> tuple[float, ...]:
    """Rate per ``per`` person-years with the exact (Garwood) Poisson 95 % CI."""
    if person_years <= 0:
        raise ValueError("no person-time")
    lower = stats.chi2.ppf(0.025, 2 * events) / 2 if events > 0 else 0.0
    upper = stats.chi2.ppf(0.975, 2 * (events + 1)) / 2
    return (events / person_years * per, lower / person_years * per, upper / person_years * per)


def incidence(rows: Sequence[CohortRow], params: ReportParams) -> Section:
    if not rows:
        return Section(False, "No patients in the cohort.")
    n = len(rows)
    events = [r for r in rows if r.event]
    person_years = sum(r.time_days for r in rows) / 365.25
    rate, lo, hi = poisson_rate_ci(len(events), person_years)
    late = [r for r in events if r.time_days > params.followup_days]
    fractured_with_vbq = [r for r in events if vbq_group(r, params) is not None]
    by_group = {}
    for g in (HIGH, NORMAL):
        rs = [r for r in rows if vbq_group(r, params) == g]
        py = sum(r.time_days for r in rs) / 365.25
        ev = sum(r.event for r in rs)
        if rs and py > 0:
            g_rate, g_lo, g_hi = poisson_rate_ci(ev, py)
            by_group[g] = {"n": len(rs), "events": ev, "person_years": py,
                           "rate_per_100py": g_rate, "ci95": [g_lo, g_hi]}
    sites: dict[str, int] = {}
    for r in events:
        sites[r.fracture_site or "unknown"] = sites.get(r.fracture_site or "unknown", 0) + 1
    return Section(
        True,
        "" if events else "No secondary fractures in this cohort.",
        {
            "patients": n,
            "patients_with_secondary_fracture": len(events),
            "pct_with_secondary_fracture": 100.0 * len(events) / n,
            "person_years": person_years,
            "rate_per_100py": rate,
            "ci95": [lo, hi],
            "pct_fractures_after_followup_days": (
                100.0 * len(late) / len(events) if events else None
            ),
            "followup_days": params.followup_days,
            "pct_fractured_with_high_vbq": 100.0
            * sum(vbq_group(r, params) == HIGH for r in fractured_with_vbq)
            / len(fractured_with_vbq)
            if fractured_with_vbq
            else None,
            "by_group": by_group,
            "sites": sites,
            "days_to_fracture": sorted(float(r.time_days) for r in events),
        },
    )


# --- Kaplan–Meier / log-rank ------------------------------------------------------------------
def kaplan_meier(rows: Sequence[CohortRow], params: ReportParams) -> Section:
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test

    groups = {g: [r for r in rows if vbq_group(r, params) == g] for g in (HIGH, NORMAL)}
    present = {g: rs for g, rs in groups.items() if rs}
    if not present:
        return Section(False, "No patients with a VBQ value: no Kaplan–Meier curves.")
    curves: dict[str, Any] = {}
    for g, rs in present.items():
        t = np.array([r.time_days for r in rs], dtype=float)
        e = np.array([r.event for r in rs], dtype=bool)
        kmf = KaplanMeierFitter().fit(t, e, label=g)
        sf = kmf.survival_function_
        ci = kmf.confidence_interval_survival_function_
        curves[g] = {
            "time_days": sf.index.to_numpy(dtype=float).tolist(),
            "survival": sf.iloc[:, 0].to_numpy(dtype=float).tolist(),
            "ci_lower": ci.iloc[:, 0].to_numpy(dtype=float).tolist(),
            "ci_upper": ci.iloc[:, 1].to_numpy(dtype=float).tolist(),
            "at_risk": {str(tp): int((t >= tp).sum()) for tp in AT_RISK_TIMES_DAYS},
            "events": int(e.sum()),
            "n": len(rs),
        }
    data: dict[str, Any] = {"curves": curves, "at_risk_times_days": list(AT_RISK_TIMES_DAYS)}
    message = ""
    if len(present) == 2 and sum(r.event for r in rows if vbq_group(r, params)) > 0:
        a, b = present[HIGH], present[NORMAL]
        result = logrank_test(
            [r.time_days for r in a], [r.time_days for r in b],
            event_observed_A=[r.event for r in a], event_observed_B=[r.event for r in b],
        )
        data["logrank"] = {"statistic": float(result.test_statistic), "p": float(result.p_value)}
    elif len(present) < 2:
        message = "Only one VBQ group present: no log-rank test."
    else:
        message = "No events: no log-rank test."
    return Section(True, message, data)


# --- Cox ----------------------------------------------------------------------------------------
def _cox_fit(df: Any, covariates: list[str]) -> dict[str, Any]:
    from lifelines import CoxPHFitter

    cph = CoxPHFitter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # batch mode: the vectorised Efron computation, much faster with many tied times.
        cph.fit(df[[*covariates, "T", "E"]], duration_col="T", event_col="E", batch_mode=True)
    summary = cph.summary
    out: dict[str, Any] = {"n": len(df), "events": int(df["E"].sum()), "terms": {}}
    out["warnings"] = sorted({str(w.message).split(".")[0] for w in caught})[:3]
    for name in covariates:
        out["terms"][name] = {
            "hr": float(summary.loc[name, "exp(coef)"]),
            "ci95": [
                float(summary.loc[name, "exp(coef) lower 95%"]),
                float(summary.loc[name, "exp(coef) upper 95%"]),
            ],
            "p": float(summary.loc[name, "p"]),
        }
    # Proportional-hazards test on every row of the model (no subsample), as R's cox.zph.
    x = df[covariates].to_numpy(dtype=float)
    t = df["T"].to_numpy(dtype=float)
    e = df["E"].to_numpy(dtype=bool)
    beta = cph.params_[covariates].to_numpy(dtype=float)
    out["ph_test_n"] = len(df)
    out["ph_test"] = dict(zip(covariates, ph_score_test(x, t, e, beta), strict=True))
    out["ph_ok"] = all(p >= 0.05 for p in out["ph_test"].values())
    out["ph_verdict"] = {
        name: "not computable" if not math.isfinite(p) else
        "not rejected" if p >= 0.05 else "violated"
        for name, p in out["ph_test"].items()
    }
    event_times, scaled = scaled_schoenfeld(
        x, t, e, beta, cph.variance_matrix_.loc[covariates, covariates].to_numpy(dtype=float))
    out["schoenfeld"] = schoenfeld_bins(event_times, scaled[:, 0] + beta[0], covariates[0],
                                        float(beta[0]))
    return out


def cox(rows: Sequence[CohortRow], params: ReportParams) -> Section:
    import pandas as pd

    usable = [r for r in rows if vbq_of(r, params) is not None]
    if not usable:
        return Section(False, "No patients with a VBQ value: no Cox model.")
    events = sum(r.event for r in usable)
    if events == 0:
        return Section(False, "No secondary fractures: hazard ratios are not estimable.")
    if events < 2 or len(usable) < 10:
        return Section(False, "Too few patients or events for a Cox model (need ≥ 10 and ≥ 2).")
    groups = {vbq_group(r, params) for r in usable}
    df = pd.DataFrame(
        {
            "T": [max(r.time_days, 0.5) for r in usable],
            "E": [int(r.event) for r in usable],
            "vbq_high": [int(vbq_group(r, params) == HIGH) for r in usable],
            "vbq": [float(vbq_of(r, params) or 0.0) for r in usable],
            "age": [r.age_years for r in usable],
            "female": [int(r.sex == "female") for r in usable],
            "bmi": [r.bmi for r in usable],
        }
    )
    models: dict[str, Any] = {}
    messages: list[str] = []

    def fit(name: str, data: Any, covariates: list[str]) -> None:
        # A covariate with one value (e.g. an all-female cohort) has no hazard ratio; drop it
        # and say so rather than letting the optimiser fail on a singular design.
        constant = [c for c in covariates if data[c].nunique() < 2]
        kept = [c for c in covariates if c not in constant]
        if not kept or kept[0] != covariates[0]:
            messages.append(f"{name}: VBQ does not vary in this cohort; model not fitted.")
            return
        try:
            models[name] = _cox_fit(data, kept)
        except Exception as exc:  # lifelines ConvergenceError and numerical failures
            messages.append(
                f"{name}: the Cox model did not converge ({type(exc).__name__}); typical cause "
                "is complete separation (every fracture on one side of the VBQ values)."
            )
            return
        if constant:
            messages.append(f"{name}: {', '.join(constant)} constant in this cohort, left out.")

    if len(groups) == 2:
        fit("group_unadjusted", df, ["vbq_high"])
    else:
        messages.append("Only one VBQ group present: no group hazard ratio.")
    fit("continuous_unadjusted", df, ["vbq"])
    adj = df.dropna(subset=["age", "bmi"])
    if len(adj) >= 10 and adj["E"].sum() >= 2:
        if len(groups) == 2 and adj["vbq_high"].nunique() == 2:
            fit("group_adjusted", adj, ["vbq_high", "age", "female", "bmi"])
        fit("continuous_adjusted", adj, ["vbq", "age", "female", "bmi"])
    else:
        messages.append("Too few complete cases for the adjusted models (age, sex, BMI).")
    if not models:
        return Section(False, "No Cox model could be fitted. " + " ".join(messages))
    return Section(True, " ".join(messages), {"models": models})


# --- ROC --------------------------------------------------------------------------------------
def _midrank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    n = len(x)
    ranks_sorted = np.empty(n, dtype=float)
    i = 0
    while i < n:
        j = i
        while j < n and sorted_x[j] == sorted_x[i]:
            j += 1
        ranks_sorted[i:j] = 0.5 * (i + j - 1) + 1
        i = j
    ranks = np.empty(n, dtype=float)
    ranks[order] = ranks_sorted
    return ranks


def delong_auc_ci(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float, float]:
    """AUC, its DeLong standard error and 95 % CI (Sun & Xu 2014 fast algorithm)."""
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels, dtype=bool)
    pos, neg = scores[labels], scores[~labels]
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        raise ValueError("ROC needs both patients with and without a secondary fracture")
    tx, ty = _midrank(pos), _midrank(neg)
    tz = _midrank(np.concatenate([pos, neg]))
    auc = (tz[:m].sum() / m - (m + 1) / 2) / n
    v01 = (tz[:m] - tx) / n
    v10 = 1.0 - (tz[m:] - ty) / m
    s01 = np.var(v01, ddof=1) if m > 1 else 0.0
    s10 = np.var(v10, ddof=1) if n > 1 else 0.0
    se = math.sqrt(s01 / m + s10 / n)
    return float(auc), se, max(0.0, auc - 1.96 * se), min(1.0, auc + 1.96 * se)


def _confusion(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    pred = scores >= threshold
    tp = int((pred & labels).sum())
    fp = int((pred & ~labels).sum())
    fn = int((~pred & labels).sum())
    tn = int((~pred & ~labels).sum())

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {
        "threshold": threshold, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn),
    }


def roc(rows: Sequence[CohortRow], params: ReportParams) -> Section:
    """ROC of VBQ for a secondary fracture within ``ROC_HORIZON_DAYS``, on the patients whose
    status at the horizon is known: a fracture within it (case) or fracture-free follow-up
    reaching it (control). Patients censored earlier are left out (counted), never taken for
    non-fractured. Plus the IPCW cumulative/dynamic AUC at 1 and 2 years on every patient."""
    from sklearn.metrics import roc_curve

    usable = [r for r in rows if vbq_of(r, params) is not None]
    if len(usable) == 0:
        return Section(False, "No patients with a VBQ value: no ROC.")
    horizon = ROC_HORIZON_DAYS
    known = [r for r in usable if (r.event and r.time_days <= horizon) or r.time_days >= horizon]
    scores = np.array([vbq_of(r, params) for r in known], dtype=float)
    labels = np.array([r.event and r.time_days <= horizon for r in known], dtype=bool)
    excluded = len(usable) - len(known)
    restriction = (
        f"Cases: secondary fracture within {horizon} days; controls: followed "
        f"fracture-free for {horizon} days. Patients censored earlier without a fracture "
        "are left out of this ROC (their number: excluded_short_followup)."
    )
    data: dict[str, Any] = {"horizon_days": horizon, "n": len(known),
                            "excluded_short_followup": excluded, "time_dependent": {}}
    data["time_dependent"] = _time_dependent_auc(usable, params)
    if not known or labels.all() or not labels.any():
        return Section(False, "ROC needs patients both with a secondary fracture within "
                       f"{horizon} days and followed fracture-free for {horizon} days. "
                       + restriction, data)
    auc, se, lo, hi = delong_auc_ci(scores, labels)
    fpr, tpr, thresholds = roc_curve(labels, scores)
    youden_idx = int(np.argmax(tpr - fpr))
    data.update({
        "auc": auc, "se": se, "ci95": [lo, hi], "method": "DeLong",
        "fpr": fpr.tolist(), "tpr": tpr.tolist(),
        "youden_threshold": float(thresholds[youden_idx]),
        "youden_j": float(tpr[youden_idx] - fpr[youden_idx]),
        "at_threshold": _confusion(scores, labels, params.threshold),
        "cases": int(labels.sum()), "controls": int((~labels).sum()),
    })
    return Section(True, restriction, data)


def _time_dependent_auc(rows: Sequence[CohortRow], params: ReportParams) -> dict[str, Any]:
    """Cumulative/dynamic AUC at ``TIME_DEPENDENT_AUC_DAYS`` with inverse-probability-of-
    censoring weights (Uno et al. 2007; scikit-survival): cases = fracture by t, weighted by
    1 / G(T_i) with G the Kaplan–Meier estimate of the censoring distribution; controls =
    fracture-free beyond t. A horizon outside the follow-up, or with no case or no control,
    is reported with the reason instead of a value."""
    from sksurv.metrics import cumulative_dynamic_auc
    from sksurv.util import Surv

    out: dict[str, Any] = {}
    if not rows:
        return out
    times = np.array([r.time_days for r in rows], dtype=float)
    events = np.array([r.event for r in rows], dtype=bool)
    scores = np.array([vbq_of(r, params) for r in rows], dtype=float)
    y = Surv.from_arrays(event=events, time=times)
    for horizon in TIME_DEPENDENT_AUC_DAYS:
        cases = int((events & (times <= horizon)).sum())
        controls = int((times > horizon).sum())
        entry: dict[str, Any] = {"cases": cases, "controls": controls, "method": "IPCW (Uno)"}
        if cases == 0 or controls == 0:
            entry["auc"] = None
            entry["message"] = "no case or no control at this horizon"
        else:
            try:
                auc, _ = cumulative_dynamic_auc(y, y, scores, [float(horizon)])
                entry["auc"] = float(auc[0])
            except ValueError as exc:
                entry["auc"] = None
                entry["message"] = str(exc)
        out[str(horizon)] = entry
    return out


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
        "all_levels": _mean_sd(a.tolist()),
        "excluding_fractured": _mean_sd(b.tolist()),
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
            "n": len(rs), "vbq": _mean_sd([vbq_of(r, params) or 0.0 for r in rs])
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


def build_report(
    rows: Sequence[CohortRow],
    alerts: Sequence[AlertRow] = (),
    params: ReportParams | None = None,
) -> Report:
    """Compute every section. Never raises for cohort shape: see ``Section.available``."""
    params = params or ReportParams()
    sections = {
        "table1": _safe(table1, rows, params),
        "incidence": _safe(incidence, rows, params),
        "kaplan_meier": _safe(kaplan_meier, rows, params),
        "cox": _safe(cox, rows, params),
        "roc": _safe(roc, rows, params),
        "paired_vbq": _safe(paired_vbq, rows, params),
        "kpis": _safe(kpis, rows, alerts, params),
        "field_strength": _safe(by_field_strength, rows, params),
    }
    return Report(params=params, n_patients=len(rows), sections=sections)
