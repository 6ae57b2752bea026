"""The cohort query: follow-up, events and therapy as known at the cut-off (SYNTHETIC rows)."""

import datetime as dt

import pytest

from registry.models import Alert, Fracture, Procedure, TherapyExposure
from registry.reports.queries import CohortFilters, build_cohort
from registry.timeutil import start_of_clinic_day
from tests.factories import (
    FractureFactory,
    PatientFactory,
    ProcedureFactory,
    TherapyExposureFactory,
)

pytestmark = pytest.mark.django_db
INDEX = dt.date(2024, 1, 10)


def _at(day, hour=10):
    return start_of_clinic_day(day) + dt.timedelta(hours=hour)


def _patient(**kw):
    patient = PatientFactory(**kw)
    procedure = ProcedureFactory(patient=patient, performed_at=_at(INDEX), performed_on=INDEX,
                                 levels=["T11"])
    # Recorded on the day it was performed (rows written now would be unknown at a past cut-off).
    Procedure.objects.filter(pk=procedure.pk).update(created_at=_at(INDEX, 18))
    return patient


def _fracture(patient, day, **kw):
    return FractureFactory(patient=patient, diagnosed_at=_at(day), diagnosed_on=day, **kw)


def _only_row(**filters):
    rows = build_cohort(CohortFilters(**filters)).rows
    assert len(rows) == 1
    return rows[0]


def test_a_fracture_after_the_recorded_last_contact_is_an_event_and_extends_follow_up():
    patient = _patient(last_contact_on=INDEX + dt.timedelta(days=100))
    _fracture(patient, INDEX + dt.timedelta(days=200))
    row = _only_row()
    assert (row.event, row.time_days, row.followup_days) == (True, 200.0, 200.0)


def test_a_fracture_at_a_level_outside_the_treated_one_is_a_secondary_fracture():
    patient = _patient()
    # S22.080A (T11–T12) with bodySite T12, after a T11 procedure
    _fracture(patient, INDEX + dt.timedelta(days=50), site="vertebral", vertebral_level="T12",
              code="S22.080A")
    assert _only_row().event is True


def test_a_fracture_with_no_single_known_level_is_not_taken_for_the_index_fracture():
    patient = _patient()
    _fracture(patient, INDEX + dt.timedelta(days=50), site="vertebral", vertebral_level="",
              code="S22.080A")
    assert _only_row().event is True


def test_the_follow_up_of_a_fractured_patient_runs_to_the_end_of_observation():
    patient = _patient(last_contact_on=INDEX + dt.timedelta(days=400))
    _fracture(patient, INDEX + dt.timedelta(days=30))
    row = _only_row()
    assert (row.time_days, row.followup_days) == (30.0, 400.0)


def test_therapy_started_after_the_cut_off_is_not_counted():
    patient = _patient()
    TherapyExposureFactory(patient=patient, start_on=dt.date(2024, 8, 1))
    assert _only_row(cutoff=dt.date(2024, 6, 1), as_recorded=False).therapy_start_days is None
    assert _only_row(cutoff=dt.date(2024, 9, 1), as_recorded=False).therapy_start_days == (
        dt.date(2024, 8, 1) - INDEX).days


def test_facts_recorded_after_the_cut_off_are_not_known_at_it():
    patient = _patient()
    fracture = _fracture(patient, INDEX + dt.timedelta(days=50))
    therapy = TherapyExposureFactory(patient=patient, start_on=INDEX + dt.timedelta(days=20))
    # Entered into the registry only on 2024-07-01 (a late feed), dated in February.
    late = _at(dt.date(2024, 7, 1))
    Fracture.objects.filter(pk=fracture.pk).update(created_at=late)
    TherapyExposure.objects.filter(pk=therapy.pk).update(created_at=late)
    row = _only_row(cutoff=dt.date(2024, 6, 1))
    assert (row.event, row.therapy_start_days) == (False, None)
    dated = _only_row(cutoff=dt.date(2024, 6, 1), as_recorded=False)
    assert (dated.event, dated.therapy_start_days) == (True, 20)


def test_an_alert_resolved_after_the_cut_off_is_open_at_it():
    patient = _patient()
    Alert.objects.create(
        patient=patient, rule_id="high-vbq-untreated-60d", status="resolved", reason="SYNTHETIC",
        opened_at=_at(dt.date(2024, 3, 10)), acknowledged_at=_at(dt.date(2024, 3, 11)),
        resolved_at=_at(dt.date(2024, 8, 1)), resolution_reason="therapy-started",
        vbq_threshold=3.0)
    alert = build_cohort(CohortFilters(cutoff=dt.date(2024, 6, 1))).alerts[0]
    assert alert.hours_to_acknowledge == pytest.approx(24.0)
    assert (alert.hours_to_resolve, alert.resolution_reason) == (None, "")


def _vbq(patient, value, *, status="succeeded", review="pending", finished, reviewed=None,
         version="h19-test"):
    from scoring.models import VbqResult

    return VbqResult.objects.create(
        patient=patient, algorithm_version=version, source="auto", status=status,
        review_status=review, vbq_all_levels=value, vbq_excluding_fractured=value,
        qc_clear=status == "succeeded", confidence=0.95 if status == "succeeded" else 0.5,
        finished_at=finished, reviewed_at=reviewed)


def test_the_vbq_known_at_the_cut_off_is_the_one_finished_and_reviewed_by_then():
    patient = _patient()
    _vbq(patient, 2.5, finished=_at(dt.date(2024, 1, 5)), version="a")
    # Needs review at the cut-off, accepted only afterwards: not usable at the cut-off.
    _vbq(patient, 3.4, status="needs_review", review="accepted",
         finished=_at(dt.date(2024, 2, 1)), reviewed=_at(dt.date(2024, 7, 1)), version="b")
    assert _only_row(cutoff=dt.date(2024, 6, 1)).vbq_excluding_fractured == 2.5
    assert _only_row(cutoff=dt.date(2024, 8, 1)).vbq_excluding_fractured == 3.4
