"""Write paths validate input, upsert by identifier and leave an audit trail."""

import datetime as dt

import pytest
from django.utils import timezone

from registry import codes
from registry.feeds import feed_authenticate, feed_create, feed_rotate_token
from registry.models import AuditEvent, Feed, Patient, Procedure
from registry.services import (
    Identifier,
    RegistryValidationError,
    fracture_record,
    patient_upsert,
    procedure_record,
    therapy_record,
)
from tests.factories import MRN_SYSTEM, PatientFactory

pytestmark = pytest.mark.django_db

MRN = Identifier(MRN_SYSTEM, "SYN-S-0001")


def test_patient_upsert_creates_then_updates_the_same_patient():
    first, created = patient_upsert(identifiers=[MRN], birth_date=dt.date(1948, 2, 1), sex="male")
    second, created_again = patient_upsert(
        identifiers=[MRN], birth_date=dt.date(1948, 2, 1), sex="female", is_synthetic=True
    )
    assert created
    assert not created_again
    assert first.pk == second.pk
    assert Patient.objects.get().sex == "female"


def test_patient_upsert_attaches_a_new_identifier_to_the_known_patient():
    patient, _ = patient_upsert(identifiers=[MRN])
    again, _ = patient_upsert(identifiers=[MRN, Identifier("urn:other", "X-9")])
    assert again.pk == patient.pk
    assert patient.identifiers.count() == 2


def test_patient_upsert_refuses_identifiers_of_two_different_patients():
    patient_upsert(identifiers=[MRN])
    patient_upsert(identifiers=[Identifier("urn:other", "X-9")])
    with pytest.raises(RegistryValidationError) as err:
        patient_upsert(identifiers=[MRN, Identifier("urn:other", "X-9")])
    assert err.value.field == "identifier"


def test_patient_upsert_refuses_a_birth_date_in_the_future():
    with pytest.raises(RegistryValidationError) as err:
        patient_upsert(identifiers=[MRN], birth_date=dt.date.today() + dt.timedelta(days=400))
    assert err.value.code == "future"


def test_procedure_record_refuses_a_non_augmentation_code():
    patient = PatientFactory()
    with pytest.raises(RegistryValidationError) as err:
        procedure_record(patient=patient, code_system=codes.CPT, code="22558",
                         performed_at=timezone.now())
    assert err.value.field == "code"
    assert not Procedure.objects.exists()


def test_procedure_record_refuses_a_date_before_birth_with_a_clear_message():
    patient = PatientFactory(birth_date=dt.date(1950, 1, 1))
    with pytest.raises(RegistryValidationError, match="before the patient's birth date"):
        procedure_record(patient=patient, code_system=codes.CPT, code="22511",
                         performed_at=dt.datetime(1940, 1, 1, tzinfo=dt.UTC))


def test_procedure_record_refuses_a_naive_datetime():
    patient = PatientFactory()
    with pytest.raises(RegistryValidationError, match="time zone"):
        procedure_record(patient=patient, code_system=codes.CPT, code="22511",
                         performed_at=dt.datetime(2024, 1, 1, 10))


def test_resent_procedure_updates_rather_than_duplicates():
    patient = PatientFactory()
    ident = Identifier("https://ehr.example.org/procedure", "P-1")
    at = timezone.now() - dt.timedelta(days=3)
    procedure_record(patient=patient, code_system=codes.CPT, code="22511", performed_at=at,
                     identifier=ident, levels=["l1"])
    proc, created = procedure_record(patient=patient, code_system=codes.CPT, code="22514",
                                     performed_at=at, identifier=ident, levels=["L1", "L2"])
    assert not created
    assert Procedure.objects.count() == 1
    assert proc.kind == "kyphoplasty"
    assert proc.levels == ["L1", "L2"]


def test_procedure_performed_on_is_the_clinic_local_date(settings):
    settings.CLINIC_TIME_ZONE = "America/New_York"
    patient = PatientFactory()
    # 02:30 UTC on 10 March is still 9 March in New York.
    proc, _ = procedure_record(patient=patient, code_system=codes.CPT, code="22511",
                               performed_at=dt.datetime(2024, 3, 10, 2, 30, tzinfo=dt.UTC))
    assert proc.performed_on == dt.date(2024, 3, 9)


def test_fracture_record_refuses_a_level_on_a_non_vertebral_site():
    patient = PatientFactory()
    with pytest.raises(RegistryValidationError):
        fracture_record(patient=patient, site="hip", vertebral_level="L2",
                        diagnosed_at=timezone.now())


def test_therapy_record_refuses_an_agent_that_is_not_anti_osteoporosis():
    patient = PatientFactory()
    with pytest.raises(RegistryValidationError, match="not an anti-osteoporosis agent"):
        therapy_record(patient=patient, agent="atorvastatin", kind="order",
                       start_on=dt.date(2024, 1, 1))


def test_every_write_leaves_an_audit_event_without_phi():
    patient, _ = patient_upsert(identifiers=[MRN], family_name="SYNTHETIC", given_name="Zed")
    events = AuditEvent.objects.filter(patient=patient)
    assert events.count() == 1
    assert "Zed" not in str(list(events.values()))
    assert "SYN-S-0001" not in str(list(events.values()))


def test_feed_token_is_stored_only_as_a_hash_and_rotation_revokes_the_old_one():
    feed, token = feed_create(name="ehr-adt", allowed_resource_types=["Patient"])
    assert token not in Feed.objects.filter(pk=feed.pk).values_list("token_hash", flat=True)[0]
    assert feed_authenticate(token=token) == feed
    new_token = feed_rotate_token(feed=feed)
    assert feed_authenticate(token=token) is None
    assert feed_authenticate(token=new_token) == feed
    assert feed.allows("Patient")
    assert not feed.allows("Procedure")
