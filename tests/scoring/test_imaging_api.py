"""Job status API, DICOM upload API and the VBQ Observation read."""

import io
import zipfile

import pytest

from registry.services import feed_create
from scoring.engine.phantom import make_phantom
from scoring.models import ImagingStudy, VbqResult
from tests.factories import PatientFactory

pytestmark = pytest.mark.django_db


def _zip(datasets) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i, ds in enumerate(datasets):
            b = io.BytesIO()
            ds.save_as(b, enforce_file_format=True)
            archive.writestr(f"series/IM{i}.dcm", b.getvalue())
        archive.writestr("README.txt", "not dicom")
    return buffer.getvalue()


def test_uploading_a_zip_registers_the_study_for_the_patient(client, role_user, settings,
                                                             tmp_path):
    settings.DICOM_STORAGE_ROOT = tmp_path
    client.force_login(role_user("coordinator"))
    patient = PatientFactory()
    upload = io.BytesIO(_zip(make_phantom(201, slices=5).datasets))
    upload.name = "study.zip"
    response = client.post(f"/api/imaging/patients/{patient.pk}/dicom/", {"file": upload})
    body = response.json()
    assert response.status_code == 201, body
    assert (body["stored"], body["rejected"]) == (5, 1)
    assert ImagingStudy.objects.get().patient == patient


def test_an_upload_is_linked_and_scored_for_the_patient_it_was_uploaded_for(
    client, role_user, settings, tmp_path
):
    """The files' PatientID names ANOTHER registry patient (a CD of patient A whose DICOM
    PatientID equals patient B's): the study, its link and its VBQ job are A's, and B's own
    pre-procedure MRI stays linked."""
    import datetime as dt

    from registry.models import PatientIdentifier
    from registry.services import Identifier, procedure_record
    from registry.timeutil import start_of_clinic_day
    from scoring.services import SeriesInput, imaging_study_upsert

    settings.DICOM_STORAGE_ROOT = tmp_path
    client.force_login(role_user("coordinator"))
    phantom = make_phantom(202, slices=5)
    study_day = dt.date(int(phantom.datasets[0].StudyDate[:4]),
                        int(phantom.datasets[0].StudyDate[4:6]),
                        int(phantom.datasets[0].StudyDate[6:8]))
    a, b = PatientFactory(), PatientFactory()
    PatientIdentifier.objects.create(patient=b, system=settings.DICOM_PATIENT_ID_SYSTEM,
                                     value=str(phantom.datasets[0].PatientID))
    for patient in (a, b):
        procedure_record(patient=patient, code_system="http://www.ama-assn.org/go/cpt",
                         code="22511", identifier=Identifier("urn:t", f"proc-{patient.pk}"),
                         performed_at=start_of_clinic_day(study_day + dt.timedelta(days=20)))
    b_study, _ = imaging_study_upsert(
        study_instance_uid="2.25.99020201", patient=b, source="fhir",
        started_at=start_of_clinic_day(study_day + dt.timedelta(days=5)), modality="MR",
        endpoint_url="http://127.0.0.1:9/dicom-web",
        series=[SeriesInput("2.25.99020201.1", "MR", "SAG T1")])
    assert b_study.linked_procedure_id is not None

    upload = io.BytesIO(_zip(phantom.datasets))
    upload.name = "study.zip"
    response = client.post(f"/api/imaging/patients/{a.pk}/dicom/", {"file": upload})
    assert response.status_code == 201, response.json()
    study = ImagingStudy.objects.get(study_instance_uid=str(phantom.datasets[0].StudyInstanceUID))
    assert (study.patient_id, study.source) == (a.pk, "upload")
    assert study.linked_procedure.patient_id == a.pk
    assert list(VbqResult.objects.filter(series__study=study).values_list(
        "patient_id", flat=True)) == [a.pk]
    b_study.refresh_from_db()
    assert b_study.linked_procedure_id is not None  # B's own MRI was not displaced


def test_uploading_something_that_is_not_a_zip_is_refused(client, role_user):
    client.force_login(role_user("coordinator"))
    patient = PatientFactory()
    upload = io.BytesIO(b"plain text")
    upload.name = "notes.txt"
    response = client.post(f"/api/imaging/patients/{patient.pk}/dicom/", {"file": upload})
    assert response.status_code == 415


def test_qi_analyst_cannot_upload_or_list_jobs(client, role_user):
    client.force_login(role_user("qi_analyst"))
    patient = PatientFactory()
    assert client.get("/api/imaging/jobs/").status_code == 403
    assert client.post(f"/api/imaging/patients/{patient.pk}/dicom/", {}).status_code == 403


def test_job_list_shows_status_timing_and_errors(client, role_user):
    client.force_login(role_user("clinician"))
    patient = PatientFactory()
    VbqResult.objects.create(patient=patient, algorithm_version="t", source="auto",
                             status="failed", error_code="wrong-modality",
                             error_message="VBQ needs an MR series")
    body = client.get("/api/imaging/jobs/", {"status": "failed"}).json()
    assert body["count"] == 1
    assert body["results"][0]["error_code"] == "wrong-modality"
    assert client.get("/api/imaging/jobs/", {"status": "bogus"}).status_code == 400


def test_a_vbq_result_reads_as_a_fhir_observation(client):
    patient = PatientFactory()
    result = VbqResult.objects.create(patient=patient, algorithm_version="0.1.0",
                                      source="manual", status="succeeded",
                                      review_status="accepted", vbq_all_levels=3.41,
                                      vbq_excluding_fractured=3.38)
    _, token = feed_create(name="obs-reader")
    body = client.get(f"/fhir/Observation/{result.pk}",
                      HTTP_AUTHORIZATION=f"Bearer {token}").json()
    assert body["resourceType"] == "Observation"
    assert body["status"] == "final"
    values = {c["code"]["coding"][0]["code"]: c.get("valueQuantity", {}).get("value")
              for c in body["component"]}
    assert values["vbq-all-levels"] == 3.41
    assert values["vbq-excluding-fractured"] == 3.38


def test_rescore_queues_new_jobs_and_keeps_old_results():
    from io import StringIO

    from django.core.management import call_command

    from scoring.engine import ALGORITHM_VERSION
    from scoring.services import SeriesInput, imaging_study_upsert

    patient = PatientFactory()
    study, _ = imaging_study_upsert(study_instance_uid="2.25.77", patient=patient,
                                    source="upload", series=[SeriesInput("2.25.77.1", "MR")])
    old = VbqResult.objects.create(patient=patient, series=study.series.get(),
                                   algorithm_version="0.0.1", source="auto",
                                   status="succeeded", vbq_all_levels=3.1)
    out = StringIO()
    call_command("vbq_rescore", stdout=out)
    assert "Queued 1" in out.getvalue()
    queued = VbqResult.objects.filter(algorithm_version=ALGORITHM_VERSION, status="queued")
    assert queued.count() == 1
    assert VbqResult.objects.filter(pk=old.pk).exists()
    call_command("vbq_rescore", stdout=StringIO())
    assert VbqResult.objects.count() == 2


def test_a_study_with_no_way_to_fetch_it_is_not_queued_and_says_why(settings):
    from scoring.services import SeriesInput, imaging_study_upsert, vbq_jobs_create

    settings.PACS_DICOMWEB_URL = ""
    patient = PatientFactory()
    study, _ = imaging_study_upsert(study_instance_uid="2.25.88", patient=patient, source="fhir",
                                    series=[SeriesInput("2.25.88.1", "MR", "SAG T1")])
    assert vbq_jobs_create(study=study) == []
    study.refresh_from_db()
    assert "no PACS is configured" in study.link_reason
