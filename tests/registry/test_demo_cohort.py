"""The SYNTHETIC demo cohort has the paper's shape and loads idempotently."""

import datetime as dt
import statistics

import pytest
from django.core.management import call_command

from registry.demo import generate_demo_cohort
from registry.models import Patient

TODAY = dt.date(2026, 6, 1)


def test_demo_cohort_has_the_shape_of_the_paper():
    cohort = generate_demo_cohort(60, seed=7, today=TODAY)
    ages = [(p.index_date - p.birth_date).days / 365.25 for p in cohort]
    fractured = [p for p in cohort if p.fractures]
    assert len(cohort) == 60
    assert 68 <= statistics.mean(ages) <= 79
    assert 6 <= statistics.stdev(ages) <= 14
    assert sum(p.sex == "female" for p in cohort) == round(0.57 * 60)
    assert len(fractured) == 20
    high_share = sum(p.vbq_excluding_fractured >= 3.0 for p in fractured) / len(fractured)
    assert high_share == pytest.approx(0.85, abs=0.01)
    late = sum(p.fractures[0].day_offset > 60 for p in fractured) / len(fractured)
    assert late == pytest.approx(0.80, abs=0.01)


def test_demo_cohort_never_dates_events_after_today_or_before_birth():
    for p in generate_demo_cohort(200, seed=3, today=TODAY):
        assert p.birth_date < p.index_date <= TODAY
        for fx in p.fractures:
            assert p.index_date + dt.timedelta(days=fx.day_offset) < TODAY
        assert all(p.family_name == "SYNTHETIC" for p in [p])


@pytest.mark.django_db
def test_demo_cohort_command_loads_60_synthetic_patients_once():
    call_command("demo_cohort")
    call_command("demo_cohort", "--if-empty")
    assert Patient.objects.count() == 60
    assert Patient.objects.filter(is_synthetic=True).count() == 60
