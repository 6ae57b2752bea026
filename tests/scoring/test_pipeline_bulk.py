"""The bulk study upsert (FHIR transaction bundles) keeps the same outbox as the single one: an
active study, new or updated, waits as ``linking pending`` until ``study_received`` links it, so
the sweep re-links it when the message after commit was lost (broker down). SYNTHETIC patients.

Under ``django_db`` the after-commit callbacks never run: that is the lost message."""

import datetime as dt

import pytest
from django.db import transaction

from registry.services import Identifier, procedure_record
from registry.timeutil import clinic_today, start_of_clinic_day
from scoring.models import ImagingStudy
from scoring.services import LINK_PENDING, SeriesInput
from scoring.services_bulk import imaging_study_upsert_many
from scoring.tasks import study_received, vbq_requeue_stale
from tests.factories import PatientFactory

pytestmark = [pytest.mark.django_db]


def _item(patient, uid, *, days_before, record_status="active", description="L-SPINE"):
    index_day = clinic_today() - dt.timedelta(days=5)
    return {"study_instance_uid": uid, "patient": patient, "source": "fhir",
            "started_at": start_of_clinic_day(index_day - dt.timedelta(days=days_before)),
            "modality": "MR", "description": description,
            "endpoint_url": "http://127.0.0.1:9/dicom-web", "record_status": record_status,
            "series": [SeriesInput(uid + ".1", "MR", "SAG T1")]}


def _patient_with_index_procedure():
    patient = PatientFactory()
    procedure_record(patient=patient, code_system="http://www.ama-assn.org/go/cpt",
                     code="22511", performed_at=start_of_clinic_day(
                         clinic_today() - dt.timedelta(days=5)) + dt.timedelta(hours=10),
                     identifier=Identifier("urn:t", str(patient.pk)))
    return patient


def test_an_updated_active_study_written_in_bulk_is_linking_pending_and_the_sweep_relinks_it():
    patient = _patient_with_index_procedure()
    with transaction.atomic():
        [(pk, created)] = imaging_study_upsert_many(
            items=[_item(patient, "2.25.9001", days_before=20)])
    assert created
    assert ImagingStudy.objects.get(pk=pk).link_reason == LINK_PENDING
    study_received(pk)
    assert ImagingStudy.objects.get(pk=pk).link_reason.startswith("nearest lumbar MRI, 20 days")

    # The EHR re-sends the study with a new date; its study_received message is lost.
    with transaction.atomic():
        [(again, created)] = imaging_study_upsert_many(
            items=[_item(patient, "2.25.9001", days_before=30, description="L-SPINE v2")])
    assert (again, created) == (pk, False)
    study = ImagingStudy.objects.get(pk=pk)
    assert study.link_reason == LINK_PENDING
    assert study.linked_procedure_id is not None  # the old link stays until re-linked

    assert vbq_requeue_stale(requeue_after_seconds=0)["linked"] == 1
    study.refresh_from_db()
    assert study.link_reason.startswith("nearest lumbar MRI, 30 days")
    assert vbq_requeue_stale(requeue_after_seconds=0)["linked"] == 0  # nothing left pending


def test_a_study_entered_in_error_in_bulk_keeps_its_reason_and_is_not_relinked():
    patient = _patient_with_index_procedure()
    with transaction.atomic():
        [(pk, _)] = imaging_study_upsert_many(items=[_item(patient, "2.25.9002", days_before=10)])
    study_received(pk)
    reason = ImagingStudy.objects.get(pk=pk).link_reason
    assert reason.startswith("nearest lumbar MRI, 10 days")
    with transaction.atomic():
        imaging_study_upsert_many(items=[_item(patient, "2.25.9002", days_before=10,
                                               record_status="entered-in-error")])
    assert ImagingStudy.objects.get(pk=pk).link_reason == reason
    assert vbq_requeue_stale(requeue_after_seconds=0)["linked"] == 0
