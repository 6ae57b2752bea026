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


@pytest.mark.django_db
def test_demo_phantoms_are_written_as_the_announced_series_and_queued_for_scoring(
        settings, tmp_path):
    from registry.management.commands.demo_cohort import demo_phantom_patients
    from registry.timeutil import clinic_today
    from scoring.engine import compute_vbq
    from scoring.models import ImagingSeries, VbqResult

    settings.DICOM_STORAGE_ROOT = tmp_path
    settings.PACS_DICOMWEB_URL = ""
    call_command("demo_cohort", patients=12, phantoms=2)
    chosen = demo_phantom_patients(generate_demo_cohort(12, seed=2025, today=clinic_today()), 2)
    jobs = VbqResult.objects.filter(source=VbqResult.Source.AUTO)
    assert jobs.count() == len(chosen) == 2
    assert set(jobs.values_list("status", flat=True)) == {VbqResult.Status.QUEUED}
    for demo in chosen:
        uid = f"2.25.{int(demo.key[4:]) + 10**12}.1"
        series = ImagingSeries.objects.get(series_instance_uid=uid)
        assert jobs.filter(series=series).exists()
        measured = compute_vbq(series.local_path)
        assert measured.series_instance_uid == series.series_instance_uid
        # The engine's own measurement of the written SYNTHETIC series lands near the demo value
        # and on the same side of the 3.0 threshold.
        assert measured.vbq_all_levels == pytest.approx(demo.vbq_all_levels, rel=0.08)
        assert (measured.vbq_all_levels >= 3.0) == (demo.vbq_all_levels >= 3.0)


@pytest.mark.django_db
def test_demo_vertebral_fractures_are_stored_at_the_level_the_demo_generated():
    from registry.demo import SYNTHETIC_SOURCE_SYSTEM
    from registry.models import Fracture
    from registry.timeutil import clinic_today

    call_command("demo_cohort", "--patients", "60", "--seed", "2025")
    generated = {fx.key: fx.level
                 for p in generate_demo_cohort(60, seed=2025, today=clinic_today())
                 for fx in p.fractures if fx.site == "vertebral"}
    stored = dict(Fracture.objects.filter(
        identifier_system=SYNTHETIC_SOURCE_SYSTEM, site="vertebral",
    ).values_list("identifier_value", "vertebral_level"))
    assert {"T11", "T12"} & set(generated.values())  # the thoracic pair is exercised
    assert stored == generated
