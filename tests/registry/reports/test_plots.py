"""Plots are drawn from report sections without Django; unavailable sections give a placeholder."""

import datetime as dt
import random

import pytest

from registry.reports import plots
from registry.reports.cohort import CohortRow
from registry.reports.survival import build_report

INDEX = dt.date(2024, 1, 1)


def _cohort(n=80, seed=3):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        vbq = rng.uniform(2.0, 4.2)
        event = rng.random() < (0.5 if vbq >= 3.0 else 0.15)
        rows.append(CohortRow(
            patient_key=f"p{i}", index_date=INDEX, age_years=rng.uniform(60, 90),
            sex=rng.choice(["female", "male"]), bmi=rng.uniform(19, 32),
            vbq_all_levels=vbq + rng.gauss(0, 0.1), vbq_excluding_fractured=vbq,
            field_strength_t=rng.choice([1.5, 3.0]), event=event,
            time_days=float(rng.randint(20, 900)),
        ))
    return rows


@pytest.mark.parametrize("name", sorted(plots.PLOTS))
def test_every_plot_renders_svg_and_png_for_a_usable_cohort(name):
    section_name, draw = plots.PLOTS[name]
    section = build_report(_cohort()).sections[section_name]
    assert section.available, section.message
    assert draw(section, "svg", synthetic=True).lstrip().startswith(b"<?xml")
    assert draw(section, "png").startswith(b"\x89PNG")


@pytest.mark.parametrize("name", sorted(plots.PLOTS))
def test_every_plot_of_an_empty_cohort_is_a_placeholder_carrying_the_message(name):
    section_name, draw = plots.PLOTS[name]
    section = build_report([]).sections[section_name]
    assert not section.available
    svg = draw(section, "svg").decode()
    # Text stays text in the SVG (svg.fonttype "none").
    assert f">{section.message}</text>" in svg
    assert "xtick" not in svg


def test_synthetic_figures_carry_the_watermark():
    section = build_report(_cohort()).sections["kaplan_meier"]
    with_mark = plots.km_plot(section, "svg", synthetic=True)
    without = plots.km_plot(section, "svg", synthetic=False)
    assert len(with_mark) > len(without)


def _leukaemia_like():
    # SYNTHETIC: 12 high-VBQ patients fracturing early, 12 normal followed long; numbers at
    # risk at 365 / 730 / 1095 days are 12 / 3 / 2 in the normal group.
    rows = []
    for i in range(12):
        rows.append(CohortRow(f"h{i}", INDEX, 70.0, "female", 24.0, 3.5, 3.5, 1.5, True,
                              float(10 + 5 * i)))
        time = 1200.0 if i < 2 else (800.0 if i < 3 else 400.0)
        rows.append(CohortRow(f"n{i}", INDEX, 70.0, "female", 24.0, 2.0, 2.0, 1.5, i == 5,
                              time if i != 5 else 200.0))
    return rows


def _texts(svg: bytes) -> list[str]:
    import re

    return re.findall(r"<text[^>]*>([^<]*)</text>", svg.decode())


def test_the_km_plot_labels_the_x_axis_at_the_numbers_at_risk_times_in_days():
    section = build_report(_leukaemia_like()).sections["kaplan_meier"]
    texts = _texts(plots.km_plot(section, "svg"))
    for tick in ("0", "90", "180", "365", "730", "1095"):
        assert texts.count(tick) >= 2, tick  # a tick label on each panel
    assert any("Days since index procedure" in t for t in texts)


def test_the_km_title_prints_a_tiny_p_value_as_less_than_0_001():
    section = build_report(_leukaemia_like()).sections["kaplan_meier"]
    assert section.data["logrank"]["p"] < 0.001
    title = next(t for t in _texts(plots.km_plot(section, "svg")) if "log-rank" in t)
    assert "p &lt; 0.001" in title
    assert "0.000" not in title


def test_the_deidentified_km_plot_never_prints_a_number_at_risk_from_1_to_4():
    section = build_report(_leukaemia_like()).sections["kaplan_meier"]
    assert section.data["curves"]["normal"]["at_risk"]["730"] == 3
    identified = _texts(plots.km_plot(section, "svg"))
    deidentified = _texts(plots.km_plot(section, "svg", deidentified=True, small_cell_min=5))
    assert "3" in identified
    assert not {"1", "2", "3", "4"} & set(deidentified)
    assert "&lt;5" in deidentified


def test_the_deidentified_histogram_draws_no_bin_of_1_to_4_fractures():
    # 3 fractures in days 0-89, 6 in days 360-449: the first bin is suppressed.
    days = [10.0, 20.0, 30.0] + [370.0 + i for i in range(6)]
    from registry.reports.cohort import Section

    section = Section(True, "", {"days_to_fracture": days, "followup_days": 60})
    svg = plots.days_histogram(section, "svg", deidentified=True, small_cell_min=5).decode()
    assert "&lt;5" in svg
    identified = plots.days_histogram(section, "svg").decode()
    assert "&lt;5" not in identified


def test_the_schoenfeld_plot_states_the_test_and_its_verdict():
    section = build_report(_cohort(200)).sections["cox"]
    title = next(t for t in _texts(plots.schoenfeld_plot(section, "svg")) if "PH " in t)
    assert ("not rejected" in title) or ("violated" in title)


def test_the_deidentified_histogram_coarsens_its_bins_before_suppressing():
    # 3 + 3 fractures in two 90-day bins, 6 in one 180-day bin: coarsened, nothing hidden.
    from registry.reports.cohort import Section

    section = Section(True, "", {"days_to_fracture": [10.0, 20.0, 30.0, 100.0, 110.0, 120.0],
                                 "followup_days": 60})
    svg = plots.days_histogram(section, "svg", deidentified=True, small_cell_min=5).decode()
    assert "180-day bins" in svg
    assert "&lt;5" not in svg
