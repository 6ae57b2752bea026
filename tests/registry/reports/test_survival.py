"""The QI statistics reproduce known answers and never fail on awkward cohorts."""

import datetime as dt
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from registry.reports.cohort import AlertRow, CohortRow, ReportParams
from registry.reports.roc import delong_auc_ci
from registry.reports.survival import build_report, poisson_rate_ci

INDEX = dt.date(2024, 1, 1)

# Freireich et al. 1963 / Gehan 1965 6-MP leukaemia remission data (weeks), as tabulated in
# Kleinbaum & Klein, "Survival Analysis", ch. 2. "+" = censored.
SIX_MP = "6 6 6 6+ 7 9+ 10 10+ 11+ 13 16 17+ 19+ 20+ 22 23 25+ 32+ 32+ 34+ 35+".split()
PLACEBO = "1 1 2 2 3 4 4 5 5 8 8 8 8 11 11 12 12 15 17 22 23".split()
# Published product-limit estimates for the 6-MP group (Kleinbaum & Klein table 2.2).
SIX_MP_KM = {6: 0.857, 7: 0.807, 10: 0.753, 13: 0.690, 16: 0.627, 22: 0.538, 23: 0.448}
PUBLISHED_LOGRANK_CHI2 = 16.79


def _row(key, time, event, vbq, **kw):
    defaults = dict(age_years=70.0, sex="female", bmi=24.0, field_strength_t=1.5)
    defaults.update(kw)
    return CohortRow(
        patient_key=key, index_date=INDEX, vbq_all_levels=vbq, vbq_excluding_fractured=vbq,
        event=event, time_days=float(time), **defaults,
    )


def _leukaemia_rows():
    rows = []
    for i, t in enumerate(SIX_MP):
        rows.append(_row(f"mp{i}", t.rstrip("+"), not t.endswith("+"), 2.5))
    for i, t in enumerate(PLACEBO):
        rows.append(_row(f"pl{i}", t, True, 3.5))
    return rows


def _hand_km(times, events):
    """Product-limit estimator written out independently of lifelines."""
    surv, s = {}, 1.0
    for t in sorted(set(t for t, e in zip(times, events, strict=True) if e)):
        at_risk = sum(1 for x in times if x >= t)
        deaths = sum(1 for x, e in zip(times, events, strict=True) if x == t and e)
        s *= 1 - deaths / at_risk
        surv[t] = s
    return surv


def test_kaplan_meier_matches_the_published_6mp_survival_table():
    section = build_report(_leukaemia_rows()).sections["kaplan_meier"]
    curve = section.data["curves"]["normal"]
    table = dict(zip(curve["time_days"], curve["survival"], strict=True))
    for week, published in SIX_MP_KM.items():
        assert table[float(week)] == pytest.approx(published, abs=0.0015)


def test_kaplan_meier_agrees_with_a_hand_written_product_limit_estimator():
    times = [float(t.rstrip("+")) for t in SIX_MP]
    events = [not t.endswith("+") for t in SIX_MP]
    hand = _hand_km(times, events)
    curve = build_report(_leukaemia_rows()).sections["kaplan_meier"].data["curves"]["normal"]
    table = dict(zip(curve["time_days"], curve["survival"], strict=True))
    for t, s in hand.items():
        assert table[t] == pytest.approx(s, rel=1e-12)


def test_log_rank_statistic_matches_the_published_value():
    logrank = build_report(_leukaemia_rows()).sections["kaplan_meier"].data["logrank"]
    assert logrank["statistic"] == pytest.approx(PUBLISHED_LOGRANK_CHI2, abs=0.01)
    assert logrank["p"] < 0.001


def test_numbers_at_risk_count_patients_still_followed():
    curve = build_report(_leukaemia_rows()).sections["kaplan_meier"].data["curves"]["normal"]
    assert curve["at_risk"]["0"] == 21
    assert curve["at_risk"]["90"] == 0


def test_cox_confidence_interval_covers_a_simulated_hazard_ratio_of_2_5():
    rng = np.random.default_rng(20250101)
    n, true_hr, base = 3000, 2.5, 1 / 900
    high = rng.random(n) < 0.45
    event_time = rng.exponential(1 / (base * np.where(high, true_hr, 1.0)))
    censor_time = rng.uniform(30, 1500, n)
    rows = [
        _row(f"s{i}", min(event_time[i], censor_time[i]), event_time[i] <= censor_time[i],
             3.6 if high[i] else 2.4, age_years=float(rng.normal(74, 10)),
             bmi=float(rng.normal(25, 4)), sex="female" if rng.random() < 0.57 else "male")
        for i in range(n)
    ]
    cox = build_report(rows).sections["cox"]
    term = cox.data["models"]["group_unadjusted"]["terms"]["vbq_high"]
    assert term["ci95"][0] < true_hr < term["ci95"][1]
    adjusted = cox.data["models"]["group_adjusted"]["terms"]["vbq_high"]
    assert adjusted["ci95"][0] < true_hr < adjusted["ci95"][1]


def _delong_by_definition(scores, labels):
    """DeLong et al. 1988 structural components, O(m·n), written independently."""
    pos, neg = scores[labels], scores[~labels]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    auc = psi.mean()
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    var = v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg)
    return auc, math.sqrt(var)


def test_delong_auc_and_standard_error_match_the_definition_and_sklearn():
    rng = np.random.default_rng(5)
    labels = rng.random(300) < 0.3
    scores = np.round(rng.normal(2.8, 0.6, 300) + 0.5 * labels, 1)  # rounded: ties included
    auc, se, lo, hi = delong_auc_ci(scores, labels)
    ref_auc, ref_se = _delong_by_definition(scores, labels)
    assert auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert auc == pytest.approx(ref_auc, abs=1e-12)
    assert se == pytest.approx(ref_se, rel=1e-9)
    assert lo < auc < hi


def test_exact_poisson_interval_matches_the_garwood_table():
    # 10 events in 100 person-years: 10.0 per 100 PY, exact 95 % CI 4.80–18.39.
    rate, lo, hi = poisson_rate_ci(10, 100.0)
    assert rate == pytest.approx(10.0)
    assert lo == pytest.approx(4.795, abs=0.005)
    assert hi == pytest.approx(18.39, abs=0.01)


def test_sensitivity_and_specificity_at_the_configured_threshold():
    # Controls followed fracture-free past the ROC horizon (730 days).
    rows = [_row("a", 100, True, 3.2), _row("b", 100, True, 2.9), _row("c", 800, False, 3.1),
            _row("d", 800, False, 2.0), _row("e", 800, False, 2.2)]
    at = build_report(rows, params=ReportParams(threshold=3.0)).sections["roc"].data[
        "at_threshold"]
    assert (at["tp"], at["fn"], at["fp"], at["tn"]) == (1, 1, 1, 2)
    assert at["sensitivity"] == pytest.approx(0.5)
    assert at["specificity"] == pytest.approx(2 / 3)


def test_vbq_exactly_at_the_threshold_counts_as_high():
    rows = [_row("a", 100, True, 3.0), _row("b", 400, False, 2.99)]
    table = build_report(rows, params=ReportParams(threshold=3.0)).sections["table1"]
    assert table.data["groups"]["high"]["n"] == 1


def test_paired_vbq_reports_bland_altman_limits():
    rows = [
        CohortRow(f"p{i}", INDEX, 70, "male", 24, 3.0 + 0.1 * i, 3.02 + 0.1 * i + 0.01 * (i % 3),
                  1.5, False, 300)
        for i in range(12)
    ]
    d = build_report(rows).sections["paired_vbq"].data
    diffs = np.array(d["bland_altman"]["differences"])
    assert d["bland_altman"]["bias"] == pytest.approx(diffs.mean())
    assert d["bland_altman"]["loa"][0] < d["bland_altman"]["bias"] < d["bland_altman"]["loa"][1]
    assert 0 <= d["paired_t"]["p"] <= 1


def test_kpis_count_high_vbq_patients_treated_within_each_window():
    rows = [
        _row("a", 400, False, 3.5, therapy_start_days=30.0),
        _row("b", 400, False, 3.5, therapy_start_days=100.0),
        _row("c", 400, False, 3.5),
        _row("d", 40, False, 3.5),  # followed 40 days only, untreated: not eligible at 60
        _row("e", 400, False, 2.0, therapy_start_days=10.0),  # normal VBQ: not counted
    ]
    alerts = [AlertRow("high-vbq-untreated-60d", 2.0, 30.0, "therapy-started"),
              AlertRow("high-vbq-untreated-60d", None, None, "")]
    d = build_report(rows, alerts).sections["kpis"].data
    assert d["windows"]["60"] == {"eligible": 3, "treated": 1, "pct": pytest.approx(100 / 3)}
    assert d["windows"]["112"]["treated"] == 2
    assert d["alerts"]["pct_resolved_by_therapy_started"] == 100.0


@pytest.mark.parametrize(
    ("name", "rows"),
    [
        ("empty cohort", []),
        ("single group", [_row(f"x{i}", 100 + i, i % 2 == 0, 3.4) for i in range(10)]),
        ("no events", [_row(f"x{i}", 100 + i, False, 2.0 + i * 0.2) for i in range(10)]),
        ("all events", [_row(f"x{i}", 100 + i, True, 2.0 + i * 0.2) for i in range(10)]),
        ("missing vbq", [_row(f"x{i}", 100 + i, i % 2 == 0, None) for i in range(10)]),
        ("one patient", [_row("x", 10, True, 3.1)]),
    ],
)
def test_degenerate_cohorts_give_messages_not_errors(name, rows):
    report = build_report(rows)
    payload = report.to_dict()
    for section_name, section in report.sections.items():
        assert section.available or section.message, f"{name}: {section_name} has no message"
        # A clear message, not a library's exception text passed through.
        assert "readthedocs" not in section.message, f"{name}: {section_name}: {section.message}"
    assert payload["n_patients"] == len(rows)


@pytest.mark.parametrize(
    ("name", "rows", "unavailable"),
    [
        ("empty cohort", [], {"table1", "incidence", "kaplan_meier", "cox", "roc", "kpis"}),
        ("no events", [_row(f"x{i}", 100 + i, False, 2.0 + i * 0.2) for i in range(10)],
         {"cox", "roc"}),
        ("missing vbq", [_row(f"x{i}", 100 + i, i % 2 == 0, None) for i in range(10)],
         {"kaplan_meier", "cox", "roc", "paired_vbq"}),
        ("one vbq value", [_row(f"x{i}", 100 + i, i % 2 == 0, 3.4) for i in range(10)],
         {"cox"}),
    ],
)
def test_sections_that_cannot_be_computed_are_marked_unavailable(name, rows, unavailable):
    report = build_report(rows)
    missing = {k for k, s in report.sections.items() if not s.available}
    assert unavailable <= missing, f"{name}: expected {unavailable} unavailable, got {missing}"


def test_covariates_constant_in_the_cohort_are_left_out_of_adjusted_cox_models_with_a_note():
    # Everyone is a 70-year-old woman with BMI 24: the adjusted models cannot estimate those
    # terms (this used to fail the whole Cox section with a lifelines convergence error).
    rows = [_row(f"x{i}", 100 + i, i % 3 != 0, 2.0 + i * 0.2) for i in range(12)]
    section = build_report(rows).sections["cox"]
    assert section.available
    assert set(section.data["models"]["continuous_adjusted"]["terms"]) == {"vbq"}
    assert "constant in this cohort" in section.message


def test_suppressed_counts_also_hide_the_percentage_next_to_them():
    from registry.reports.deid import suppress_small_cells

    data = {"windows": {"60": {"eligible": 33, "treated": 1, "pct": 3.03}}}
    out, where = suppress_small_cells(data, 5)
    assert out["windows"]["60"] == {"eligible": 33, "treated": None, "pct": None}
    assert where == ["windows.60.treated"]


def test_fracture_counts_by_site_are_suppressed_for_the_deidentified_role():
    from registry.reports.deid import suppress_small_cells

    out, where = suppress_small_cells({"incidence": {"sites": {"hip": 2, "vertebral": 9}}}, 5)
    assert out["incidence"]["sites"] == {"hip": None, "vertebral": 9}
    assert where == ["incidence.sites"]
