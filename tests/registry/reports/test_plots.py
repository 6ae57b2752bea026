"""Plots are drawn from report sections without Django; unavailable sections give a placeholder."""

import datetime as dt
import random

import pytest

from registry.reports import plots
from registry.reports.survival import CohortRow, build_report

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
    # matplotlib draws glyphs as paths but keeps each text string as an XML comment.
    assert f"<!-- {section.message} -->" in svg
    assert "xtick" not in svg


def test_synthetic_figures_carry_the_watermark():
    section = build_report(_cohort()).sections["kaplan_meier"]
    with_mark = plots.km_plot(section, "svg", synthetic=True)
    without = plots.km_plot(section, "svg", synthetic=False)
    assert len(with_mark) > len(without)
