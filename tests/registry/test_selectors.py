"""Read paths: index procedure, secondary fractures, timeline."""

import datetime as dt

import pytest
from django.utils import timezone

from followup import selectors as followup_selectors
from registry import selectors
from tests.factories import (
    FractureFactory,
    PatientFactory,
    ProcedureFactory,
    TherapyExposureFactory,
)

pytestmark = pytest.mark.django_db


def test_index_procedure_is_the_first_active_one():
    patient = PatientFactory()
    now = timezone.now()
    ProcedureFactory(patient=patient, performed_at=now - dt.timedelta(days=10))
    first = ProcedureFactory(patient=patient, performed_at=now - dt.timedelta(days=100))
    ProcedureFactory(patient=patient, performed_at=now - dt.timedelta(days=200),
                     record_status="entered-in-error")
    assert selectors.index_procedure(patient=patient) == first


def test_secondary_fractures_exclude_the_treated_level_and_earlier_ones():
    patient = PatientFactory()
    now = timezone.now()
    ProcedureFactory(patient=patient, performed_at=now - dt.timedelta(days=100), levels=["L1"])
    FractureFactory(patient=patient, site="vertebral", vertebral_level="L1",
                    diagnosed_at=now - dt.timedelta(days=120))
    FractureFactory(patient=patient, site="vertebral", vertebral_level="L1",
                    diagnosed_at=now - dt.timedelta(days=50))
    hip = FractureFactory(patient=patient, site="hip", diagnosed_at=now - dt.timedelta(days=20))
    assert selectors.secondary_fractures(patient=patient) == [hip]


def test_timeline_lists_events_in_date_order():
    patient = PatientFactory()
    now = timezone.now()
    ProcedureFactory(patient=patient, performed_at=now - dt.timedelta(days=100))
    FractureFactory(patient=patient, diagnosed_at=now - dt.timedelta(days=20))
    TherapyExposureFactory(patient=patient, start_on=(now - dt.timedelta(days=60)).date())
    kinds = [e.kind for e in followup_selectors.patient_timeline(patient=patient)]
    assert kinds == ["procedure", "therapy", "fracture"]


def test_patient_list_finds_a_patient_by_exact_mrn():
    target = PatientFactory(mrn="SYN-FIND-ME")
    PatientFactory()
    assert list(selectors.patient_list(search="SYN-FIND-ME")) == [target]


def test_timeline_includes_mri_vbq_and_alerts():
    from followup.alerts import alert_open
    from scoring.models import VbqResult
    from scoring.services import imaging_study_upsert

    patient = PatientFactory()
    now = timezone.now()
    imaging_study_upsert(study_instance_uid="2.25.5", patient=patient, source="upload",
                         started_at=now - dt.timedelta(days=30), modality="MR")
    VbqResult.objects.create(patient=patient, algorithm_version="t", source="manual",
                             status="succeeded", review_status="accepted", vbq_all_levels=3.2)
    alert_open(patient=patient, rule_id="vbq-missing", reason="r")
    kinds = {e.kind for e in followup_selectors.patient_timeline(patient=patient)}
    assert {"mri", "vbq", "alert"} <= kinds
    assert followup_selectors.current_vbq(patient=patient).vbq_all_levels == 3.2
