"""Job status API, DICOM upload API and the VBQ Observation read."""

import datetime as dt
import io
import zipfile

import pytest

from registry.feeds import feed_create
from registry.models import AuditEvent
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
    upload = io.BytesIO(_zip(_phantom_of(patient, 201).datasets))
    upload.name = "study.zip"
    response = client.post(f"/api/imaging/patients/{patient.pk}/dicom/", {"file": upload})
    body = response.json()
    assert response.status_code == 201, body
    assert (body["stored"], body["rejected"]) == (5, 1)
    assert ImagingStudy.objects.get().patient == patient
    # no index procedure: no job, and the answer says so (the upload page shows the reason)
    assert body["outcome"] == [{"id": ImagingStudy.objects.get().pk, "linked": False,
                                "link_reason": "no index procedure yet", "jobs": 0,
                                "scored": 0}]


def _phantom_of(patient, seed, **kw):
    """A SYNTHETIC phantom whose DICOM PatientID is ``patient``'s MRN."""
    phantom = make_phantom(seed, slices=5, **kw)
    for ds in phantom.datasets:
        ds.PatientID = patient.identifiers.first().value
    return phantom


def _post(client, patient, datasets, **extra):
    upload = io.BytesIO(_zip(datasets))
    upload.name = "study.zip"
    return client.post(f"/api/imaging/patients/{patient.pk}/dicom/", {"file": upload, **extra})


def test_an_upload_of_another_patients_images_is_refused_and_nothing_is_stored(
        client, role_user, settings, tmp_path):
    settings.DICOM_STORAGE_ROOT = tmp_path / "dicom"
    client.force_login(role_user("clinician"))
    patient, other = PatientFactory(), PatientFactory()
    response = _post(client, patient, _phantom_of(other, 203).datasets)
    body = response.json()
    assert response.status_code == 409, body
    assert body["code"] == "patient-mismatch"
    assert body["mismatches"] == ["patient-id"]
    assert "not one of this patient's identifiers" in body["detail"]
    assert body["can_override"] is False  # a clinician: only a coordinator may override
    assert not ImagingStudy.objects.exists()
    assert not (tmp_path / "dicom").exists()  # not a file written
    assert AuditEvent.objects.filter(patient_id=patient.pk, detail__upload="refused",
                                     detail__identity=["patient-id"]).exists()
    forced = _post(client, patient, _phantom_of(other, 203).datasets,
                   override_reason="verified-other")
    assert forced.status_code == 403
    assert not ImagingStudy.objects.exists()


def test_a_matching_id_with_another_birth_date_or_family_name_is_refused(
        client, role_user, settings, tmp_path):
    settings.DICOM_STORAGE_ROOT = tmp_path
    client.force_login(role_user("coordinator"))
    patient = PatientFactory(birth_date=dt.date(1950, 3, 14))
    phantom = _phantom_of(patient, 204)
    for ds in phantom.datasets:
        ds.PatientBirthDate = "19510314"
        ds.PatientName = "OTHERNAME^Test"
    body = _post(client, patient, phantom.datasets).json()
    assert body["mismatches"] == ["family-name", "birth-date"]
    for ds in phantom.datasets:  # same person written another way: accepted
        ds.PatientBirthDate, ds.PatientName = "19500314", "Synthétic^T"
    assert _post(client, patient, phantom.datasets).status_code == 201


def test_an_upload_is_linked_and_scored_for_the_patient_it_was_uploaded_for(
    client, role_user, settings, tmp_path
):
    """The files' PatientID names ANOTHER registry patient (a CD of patient A whose DICOM
    PatientID equals patient B's): refused, unless a coordinator overrides with a reason; then
    the study, its link and its VBQ job are A's, and B's own pre-procedure MRI stays
    linked."""
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

    # B's images on A's page: refused, nothing stored
    assert _post(client, a, phantom.datasets).status_code == 409
    assert not ImagingStudy.objects.filter(
        study_instance_uid=str(phantom.datasets[0].StudyInstanceUID)).exists()
    # a coordinator who checked that they are A's stores them with a coded reason (audited)
    response = _post(client, a, phantom.datasets, override_reason="outside-id")
    assert response.status_code == 201, response.json()
    assert response.json()["outcome"][0]["jobs"] == 1
    study = ImagingStudy.objects.get(study_instance_uid=str(phantom.datasets[0].StudyInstanceUID))
    assert AuditEvent.objects.filter(object_type="ImagingStudy", object_id=str(study.pk),
                                     detail__identity_override="outside-id").exists()
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


def test_a_received_study_whose_birth_date_disagrees_is_held_unassigned(
        settings, tmp_path, client, role_user):
    """C-STORE: the PatientID names a registry patient but the birth date is another's: the
    study is registered without a patient (never linked or scored for them), audited."""
    from registry.models import PatientIdentifier
    from scoring.receive import register_study

    patient = PatientFactory(birth_date=dt.date(1950, 3, 14))
    phantom = make_phantom(205, slices=5)
    ds0 = phantom.datasets[0]
    PatientIdentifier.objects.create(patient=patient, system=settings.DICOM_PATIENT_ID_SYSTEM,
                                     value=str(ds0.PatientID))
    for ds in phantom.datasets:
        ds.PatientBirthDate = "19610101"
    phantom.write(tmp_path / str(ds0.StudyInstanceUID) / str(ds0.SeriesInstanceUID))
    study = register_study(tmp_path, str(ds0.StudyInstanceUID))
    study.refresh_from_db()
    assert study.patient_id is None
    assert study.link_reason.startswith("held: DICOM patient does not match")
    assert not VbqResult.objects.exists()
    assert AuditEvent.objects.filter(object_type="ImagingStudy", object_id=str(study.pk),
                                     detail__held="patient-mismatch",
                                     detail__identity=["birth-date"]).exists()
    client.force_login(role_user("clinician"))
    queue = client.get("/vbq/review/").content.decode()
    assert 'id="held-studies"' in queue
    assert f"<td>{study.pk}</td>" in queue


def test_received_files_of_another_patient_for_a_known_study_are_not_used(settings, tmp_path):
    """C-STORE of a study already known from a FHIR ImagingStudy of patient A, whose files
    carry another PatientID: the study stays A's but the received files are not recorded as
    its source, nor linked or scored from them (audited)."""
    from scoring.models import ImagingSeries
    from scoring.receive import register_study
    from scoring.services import SeriesInput, imaging_study_upsert

    a = PatientFactory()
    phantom = make_phantom(206, slices=5)
    ds0 = phantom.datasets[0]
    study, _ = imaging_study_upsert(
        study_instance_uid=str(ds0.StudyInstanceUID), patient=a, source="fhir", modality="MR",
        series=[SeriesInput(str(ds0.SeriesInstanceUID), "MR", "SAG T1")])
    phantom.write(tmp_path / str(ds0.StudyInstanceUID) / str(ds0.SeriesInstanceUID))
    register_study(tmp_path, str(ds0.StudyInstanceUID))
    study.refresh_from_db()
    assert study.patient_id == a.pk
    assert ImagingSeries.objects.get(study=study).local_path == ""
    assert AuditEvent.objects.filter(object_type="ImagingStudy", object_id=str(study.pk),
                                     detail__held="patient-mismatch",
                                     detail__identity=["patient-id"]).exists()

