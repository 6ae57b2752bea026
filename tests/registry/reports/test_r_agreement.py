"""The report recomputed with R (survival, pROC) from the exported analysis table agrees to
1e-3 (SYNTHETIC cohort). Skips without Rscript unless REQUIRE_SERVICES=1 (then fails)."""

import datetime as dt
import subprocess
from pathlib import Path

import numpy as np
import pytest

from registry.reports.cohort import AT_RISK_TIMES_DAYS, KPI_WINDOWS_DAYS, CohortRow, ReportParams
from registry.reports.deid import cohort_csv
from registry.reports.survival import build_report

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "scripts" / "recompute_report.R"


def _synthetic_cohort(n=1500, seed=19):
    """Days are whole (ties), VBQ has two decimals (ties), some BMI missing, therapy and
    follow-up past fractures: the awkward parts of real registry data."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        high = rng.random() < 0.45
        vbq = round(float(rng.uniform(3.0, 4.6) if high else rng.uniform(1.8, 2.99)), 2)
        age = float(rng.normal(74, 9))
        rate = (2.2 if high else 1.0) * np.exp(0.02 * (age - 74)) / 1400
        event_day = float(np.ceil(rng.exponential(1 / rate)))
        observed = float(rng.integers(20, 1800))
        event = event_day <= observed
        therapy = float(rng.integers(0, 500)) if rng.random() < 0.55 else None
        rows.append(CohortRow(
            patient_key=f"SYN-R-{i:05d}", index_date=dt.date(2022, 1, 1), age_years=age,
            sex="female" if rng.random() < 0.57 else "male",
            bmi=None if rng.random() < 0.05 else float(round(rng.normal(25, 4), 1)),
            vbq_all_levels=vbq, vbq_excluding_fractured=vbq, field_strength_t=1.5,
            event=bool(event), time_days=event_day if event else observed,
            followup_days=observed, censor_reason="fracture" if event else "last_contact",
            therapy_start_days=therapy,
        ))
    return rows


def _python_figures(report):
    s = {k: v.data for k, v in report.sections.items()}
    f = {"inc.rate": s["incidence"]["rate_per_100py"], "inc.lo": s["incidence"]["ci95"][0],
         "inc.hi": s["incidence"]["ci95"][1]}
    for g, curve in s["kaplan_meier"]["curves"].items():
        times = np.array(curve["time_days"])
        for t in (90, 180, 365, 730):
            f[f"km.{g}.surv.{t}"] = curve["survival"][int(np.searchsorted(times, t, "right")) - 1]
        for t in AT_RISK_TIMES_DAYS:
            f[f"km.{g}.at_risk.{t}"] = curve["at_risk"][str(t)]
        fu = s["table1"]["groups"][g]["followup_months"]
        bmi = s["table1"]["groups"][g]["bmi"]
        f.update({f"fu.{g}.q1": fu["q1"], f"fu.{g}.median": fu["median"], f"fu.{g}.q3": fu["q3"],
                  f"t1.{g}.bmi.median": bmi["median"], f"t1.{g}.bmi.q1": bmi["q1"],
                  f"t1.{g}.bmi.q3": bmi["q3"]})
    f["t1.age.p"] = s["table1"]["p_values"]["age_years"]["p"]
    f["t1.bmi.p"] = s["table1"]["p_values"]["bmi"]["p"]
    f["logrank.chisq"] = s["kaplan_meier"]["logrank"]["statistic"]
    f["logrank.p"] = s["kaplan_meier"]["logrank"]["p"]
    for name, term in (("group_unadjusted", "vbq_high"), ("continuous_unadjusted", "vbq"),
                       ("group_adjusted", "vbq_high")):
        t = s["cox"]["models"][name]["terms"][term]
        f.update({f"cox.{name}.hr": t["hr"], f"cox.{name}.lo": t["ci95"][0],
                  f"cox.{name}.hi": t["ci95"][1], f"cox.{name}.p": t["p"]})
        r_names = {"vbq_high": "high", "vbq": "vbq_used", "age": "age_years"}
        for covariate, p in s["cox"]["models"][name]["ph_test"].items():
            f[f"ph.{name}.{r_names.get(covariate, covariate)}"] = p
    roc = s["roc"]
    f.update({"roc.n": roc["n"], "roc.auc": roc["auc"], "roc.lo": roc["ci95"][0],
              "roc.hi": roc["ci95"][1], "roc.sensitivity": roc["at_threshold"]["sensitivity"],
              "roc.specificity": roc["at_threshold"]["specificity"]})
    for t in (365, 730):
        f[f"tdauc.{t}"] = roc["time_dependent"][str(t)]["auc"]
    for w in KPI_WINDOWS_DAYS:
        f[f"kpi.{w}.eligible"] = s["kpis"]["windows"][str(w)]["eligible"]
        f[f"kpi.{w}.pct"] = s["kpis"]["windows"][str(w)]["pct"]
    return f


@pytest.mark.rscript
@pytest.mark.slow
def test_r_survival_and_proc_recompute_every_figure_from_the_exported_table(tmp_path):
    rows = _synthetic_cohort()
    params = ReportParams()
    report = build_report(rows, params=params)
    table = tmp_path / "cohort.csv"
    table.write_text(cohort_csv(rows, params, deidentified=False))
    result = subprocess.run(["Rscript", str(SCRIPT), str(table), str(params.threshold)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    r_figures = {k: float(v) for k, v in (line.split() for line in result.stdout.splitlines())}
    python = _python_figures(report)
    assert set(python) == set(r_figures)
    disagree = {k: (python[k], r_figures[k]) for k in python
                if python[k] is None or abs(python[k] - r_figures[k]) > 1e-3}
    assert not disagree
    assert report.sections["roc"].data["excluded_short_followup"] > 0  # the restriction bites


def test_the_identified_export_keeps_full_precision():
    row = _synthetic_cohort(1)[0]
    text = cohort_csv([row], ReportParams(), deidentified=False)
    values = dict(zip(*[line.split(",") for line in text.splitlines()], strict=True))
    assert float(values["age_years"]) == row.age_years
