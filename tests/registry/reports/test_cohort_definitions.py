"""Who and what the QI report counts, on small hand-computable SYNTHETIC cohorts (issue 19)."""

import datetime as dt

import numpy as np
import pytest

from registry.reports.cohort import DAYS_PER_MONTH, CohortRow, ReportParams, format_p
from registry.reports.survival import build_report

INDEX = dt.date(2024, 1, 1)


def _row(key, time, event, vbq, **kw):
    defaults = dict(age_years=70.0, sex="female", bmi=24.0, field_strength_t=1.5)
    defaults.update(kw)
    return CohortRow(patient_key=f"SYN-{key}", index_date=INDEX, vbq_all_levels=vbq,
                     vbq_excluding_fractured=vbq, event=event, time_days=float(time), **defaults)


def test_a_high_vbq_patient_who_fractured_early_stays_in_the_day_365_kpi_denominator():
    rows = [
        # fractured on day 30, untreated, followed (alive, in contact) to day 400
        _row("a", 30, True, 3.5, followup_days=400.0),
        _row("b", 400, False, 3.5, therapy_start_days=100.0),
    ]
    window = build_report(rows).sections["kpis"].data["windows"]["365"]
    assert (window["treated"], window["eligible"]) == (1, 2)
    assert window["pct"] == pytest.approx(50.0)


def test_a_patient_treated_early_but_not_followed_to_the_day_is_not_in_that_kpi():
    rows = [_row("a", 100, False, 3.5, therapy_start_days=20.0, censor_reason="death"),
            _row("b", 400, False, 3.5)]
    window = build_report(rows).sections["kpis"].data["windows"]["365"]
    assert (window["treated"], window["eligible"]) == (0, 1)


def test_median_days_to_therapy_is_over_treated_high_vbq_patients_only():
    rows = [_row("h1", 400, False, 3.5, therapy_start_days=10.0),
            _row("h2", 400, False, 3.6, therapy_start_days=30.0),
            _row("n1", 400, False, 2.0, therapy_start_days=200.0),
            _row("n2", 400, False, 2.1, therapy_start_days=300.0),
            _row("n3", 400, False, 2.2, therapy_start_days=400.0)]
    kpis = build_report(rows).sections["kpis"].data
    assert kpis["median_days_to_therapy"] == pytest.approx(20.0)
    assert kpis["median_days_to_therapy_all_treated"] == pytest.approx(200.0)


def test_table1_follow_up_is_the_reverse_kaplan_meier_median_and_iqr():
    # Reverse KM (censoring is the "event", a fracture censors): risk sets 3, 2, 1 at days
    # 100, 200, 300 give 2/3, 1/3, 0: quartiles 100 / 200 / 300 days. The old "mean time to
    # event or censoring" would say 152.5 days.
    rows = [_row("a", 10, True, 3.5), _row("b", 100, False, 3.5), _row("c", 200, False, 3.5),
            _row("d", 300, False, 3.5)]
    follow = build_report(rows).sections["table1"].data["groups"]["high"]["followup_months"]
    assert follow["median"] == pytest.approx(200 / DAYS_PER_MONTH)
    assert (follow["q1"], follow["q3"]) == pytest.approx((100 / DAYS_PER_MONTH,
                                                          300 / DAYS_PER_MONTH))


def test_table1_gives_median_and_iqr_for_bmi():
    rows = [_row(str(i), 400, False, 3.5, bmi=b) for i, b in enumerate([20, 22, 24, 40])]
    bmi = build_report(rows).sections["table1"].data["groups"]["high"]["bmi"]
    assert bmi["median"] == pytest.approx(23.0)
    assert (bmi["q1"], bmi["q3"]) == pytest.approx((21.5, 28.0))


@pytest.mark.parametrize(("p", "text"), [(0.0, "< 0.001"), (4e-7, "< 0.001"),
                                         (0.001, "0.001"), (0.0494, "0.049"), (None, "—")])
def test_p_values_below_one_in_a_thousand_print_as_less_than_0_001(p, text):
    assert format_p(p) == text


def test_the_plain_roc_leaves_out_patients_censored_before_the_horizon():
    rows = [_row("case", 100, True, 3.5),  # fracture within 730 days
            _row("ctrl", 800, False, 2.0),  # followed fracture-free past 730 days
            _row("lost", 50, False, 4.0)]  # censored on day 50: status at 730 unknown
    roc = build_report(rows).sections["roc"]
    assert roc.data["auc"] == pytest.approx(1.0)
    assert roc.data["excluded_short_followup"] == 1
    assert "left out" in roc.message


def test_the_time_dependent_auc_weights_cases_by_inverse_probability_of_censoring():
    # At 365 days: cases A (day 100) and C (day 300), controls D and E; B (censored on day
    # 200) is neither. Censoring KM: G(100) = 1, G(300) = 3/4, so w_A = 1, w_C = 4/3.
    # Concordant pairs: A > D, A > E, C > D. AUC = (1·2 + 4/3·1) / ((1 + 4/3)·2) = 5/7;
    # unweighted it would be 3/4.
    rows = [_row("A", 100, True, 4.0), _row("B", 200, False, 3.0), _row("C", 300, True, 2.0),
            _row("D", 500, False, 1.0), _row("E", 600, False, 3.5)]
    td = build_report(rows).sections["roc"].data["time_dependent"]
    assert td["365"]["auc"] == pytest.approx(5 / 7, abs=1e-12)
    assert td["730"]["auc"] is None  # beyond the longest follow-up: no estimate, a reason
    assert td["730"]["message"]


def _crossing_hazards(n, seed=3):
    # High VBQ: hazard 4x early, 1/4x after day 200: proportional hazards clearly violated.
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        high = i % 2 == 0
        early = rng.exponential(300 / (4.0 if high else 1.0))
        t = early if early < 200 else 200 + rng.exponential(300 / (0.25 if high else 1.0))
        c = rng.uniform(100, 1500)
        rows.append(_row(str(i), max(1.0, round(min(t, c))), t <= c, 3.5 if high else 2.5,
                         age_years=float(rng.normal(74, 8)), bmi=float(rng.normal(25, 3))))
    return rows


def test_the_proportional_hazards_test_runs_on_every_patient_and_says_violated():
    rows = _crossing_hazards(6000)
    model = build_report(rows).sections["cox"].data["models"]["group_unadjusted"]
    assert model["ph_test_n"] == 6000  # not a 5,000-row subsample
    assert model["ph_test"]["vbq_high"] < 0.05
    assert model["ph_verdict"]["vbq_high"] == "violated"
    assert len(model["schoenfeld"]["bins"]) == 20


def test_proportional_hazards_that_hold_are_worded_not_rejected():
    rng = np.random.default_rng(8)
    rows = []
    for i in range(400):
        high = i % 2 == 0
        t = rng.exponential(600 / (2.0 if high else 1.0))
        c = rng.uniform(100, 1500)
        rows.append(_row(str(i), max(1.0, round(min(t, c))), t <= c, 3.5 if high else 2.5))
    model = build_report(rows).sections["cox"].data["models"]["group_unadjusted"]
    assert model["ph_test"]["vbq_high"] >= 0.05
    assert model["ph_verdict"]["vbq_high"] == "not rejected"


def test_kpi_windows_state_their_definition():
    data = build_report([_row("a", 400, False, 3.5)],
                        params=ReportParams()).sections["kpis"].data
    assert "alive and followed" in data["definition"]


def test_the_vectorised_schoenfeld_residuals_match_lifelines_on_untied_times():
    import pandas as pd
    from lifelines import CoxPHFitter

    from registry.reports.ph_test import scaled_schoenfeld

    rng = np.random.default_rng(11)
    n = 400
    df = pd.DataFrame({"vbq": rng.uniform(2, 4.5, n), "age": rng.normal(74, 9, n)})
    t = rng.exponential(900 / np.exp(0.6 * (df["vbq"] - 3)))
    c = rng.uniform(50, 1500, n)
    df["T"], df["E"] = np.minimum(t, c), (t <= c).astype(int)  # continuous: no ties
    cph = CoxPHFitter().fit(df, "T", "E")
    covariates = ["vbq", "age"]
    _, scaled = scaled_schoenfeld(
        df[covariates].to_numpy(), df["T"].to_numpy(), df["E"].to_numpy(bool),
        cph.params_[covariates].to_numpy(), cph.variance_matrix_.loc[covariates, covariates]
        .to_numpy())
    reference = cph.compute_residuals(df, "scaled_schoenfeld")[covariates]
    assert scaled == pytest.approx(reference.to_numpy(), rel=1e-9, abs=1e-9)
