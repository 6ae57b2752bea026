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

The sections live by theme: this module (Table 1, incidence, Kaplan–Meier, Cox, and
``build_report``), ``registry.reports.roc``, ``registry.reports.kpis``; the data model is
``registry.reports.cohort``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from registry.reports.cohort import (
    AT_RISK_TIMES_DAYS,
    HIGH,
    NORMAL,
    AlertRow,
    CohortRow,
    Report,
    ReportParams,
    Section,
    mean_sd,
    reverse_km_followup,
    safe_section,
    vbq_group,
    vbq_of,
)
from registry.reports.kpis import (
    by_field_strength,
    kpis,
    paired_vbq,
)
from registry.reports.ph_test import ph_score_test, scaled_schoenfeld, schoenfeld_bins
from registry.reports.roc import (
    roc,
)


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
            "age_years": mean_sd([r.age_years for r in rs if r.age_years is not None]),
            "bmi": mean_sd([r.bmi for r in rs if r.bmi is not None]),
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


def build_report(
    rows: Sequence[CohortRow],
    alerts: Sequence[AlertRow] = (),
    params: ReportParams | None = None,
) -> Report:
    """Compute every section. Never raises for cohort shape: see ``Section.available``."""
    params = params or ReportParams()
    sections = {
        "table1": safe_section(table1, rows, params),
        "incidence": safe_section(incidence, rows, params),
        "kaplan_meier": safe_section(kaplan_meier, rows, params),
        "cox": safe_section(cox, rows, params),
        "roc": safe_section(roc, rows, params),
        "paired_vbq": safe_section(paired_vbq, rows, params),
        "kpis": safe_section(kpis, rows, alerts, params),
        "field_strength": safe_section(by_field_strength, rows, params),
    }
    return Report(params=params, n_patients=len(rows), sections=sections)
