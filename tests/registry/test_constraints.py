"""The database itself refuses impossible clinical data (not only the forms and services)."""

import datetime as dt

import pytest
from django.db import IntegrityError, InternalError, transaction
from django.utils import timezone

from registry.models import Alert, Patient, PatientIdentifier, Procedure, TherapyExposure
from tests.factories import MRN_SYSTEM, PatientFactory, ProcedureFactory

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]

DB_ERRORS = (IntegrityError, InternalError)


def test_duplicate_identifier_is_rejected_by_the_database():
    first = PatientFactory(mrn="SYN-DUP-1")
    other = PatientFactory()
    with pytest.raises(IntegrityError), transaction.atomic():
        PatientIdentifier.objects.create(patient=other, system=MRN_SYSTEM, value="SYN-DUP-1")
    assert PatientIdentifier.objects.filter(value="SYN-DUP-1").get().patient == first


def test_procedure_dated_before_birth_is_rejected_by_the_database():
    patient = PatientFactory(birth_date=dt.date(1950, 1, 1))
    before_birth = dt.datetime(1949, 12, 31, 10, tzinfo=dt.UTC)
    with pytest.raises(DB_ERRORS), transaction.atomic():
        Procedure.objects.create(
            patient=patient, kind="vertebroplasty", code_system="x", code="22511",
            performed_at=before_birth, performed_on=before_birth.date(),
        )
    assert not Procedure.objects.filter(patient=patient).exists()


def test_birth_date_moved_after_a_recorded_procedure_is_rejected_by_the_database():
    proc = ProcedureFactory(patient__birth_date=dt.date(1950, 1, 1))
    patient = proc.patient
    patient.birth_date = proc.performed_on + dt.timedelta(days=1)
    with pytest.raises(DB_ERRORS), transaction.atomic():
        patient.save()


def test_duplicate_procedure_source_identifier_is_rejected():
    proc = ProcedureFactory()
    with pytest.raises(IntegrityError), transaction.atomic():
        ProcedureFactory(
            identifier_system=proc.identifier_system, identifier_value=proc.identifier_value
        )


def test_therapy_ending_before_it_starts_is_rejected():
    patient = PatientFactory()
    with pytest.raises(IntegrityError), transaction.atomic():
        TherapyExposure.objects.create(
            patient=patient, agent="alendronate", kind="order",
            start_on=dt.date(2024, 5, 1), end_on=dt.date(2024, 4, 1),
        )


def test_vertebral_level_on_a_hip_fracture_is_rejected():
    from registry.models import Fracture

    patient = PatientFactory()
    now = timezone.now()
    with pytest.raises(IntegrityError), transaction.atomic():
        Fracture.objects.create(
            patient=patient, site="hip", vertebral_level="L2", diagnosed_at=now,
            diagnosed_on=now.date(),
        )


def test_death_before_birth_is_rejected():
    with pytest.raises(IntegrityError), transaction.atomic():
        Patient.objects.create(birth_date=dt.date(1950, 1, 1), deceased_on=dt.date(1949, 1, 1))


def test_second_unresolved_alert_for_the_same_rule_is_rejected():
    patient = PatientFactory()
    Alert.objects.create(patient=patient, rule_id="high-vbq-untreated-60d", reason="r",
                         opened_at=timezone.now())
    with pytest.raises(IntegrityError), transaction.atomic():
        Alert.objects.create(patient=patient, rule_id="high-vbq-untreated-60d", reason="r",
                             opened_at=timezone.now(), status="acknowledged")


def test_resolved_alert_does_not_block_a_new_one():
    patient = PatientFactory()
    now = timezone.now()
    Alert.objects.create(patient=patient, rule_id="secondary-fracture", reason="r",
                         opened_at=now, status="resolved", resolved_at=now)
    Alert.objects.create(patient=patient, rule_id="secondary-fracture", reason="r", opened_at=now)
    assert Alert.objects.filter(patient=patient).count() == 2
