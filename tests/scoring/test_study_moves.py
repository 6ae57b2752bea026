"""A study's VBQ results follow the study: a study re-sent for ANOTHER patient (a misfile the EHR
corrects, a DICOM upload for another patient) moves its results to that patient, and a study
entered in error stops counting. Otherwise a follow-up alert could be raised, or suppressed, on
another patient's images. SYNTHETIC patients.

Under ``django_db`` the after-commit callbacks never run (no re-evaluation message is sent):
the tests check the outbox instead (``followup_next_check_on`` = today) and re-evaluate by
calling ``followup_evaluate`` themselves."""

import copy
import datetime as dt
import json
from pathlib import Path

import pytest
from django.db import connection, transaction

from followup.facts import load_facts, patient_facts_sql
from followup.sweep import followup_evaluate
from registry.feeds import feed_create
from registry.followup import HIGH_VBQ, VBQ_MISSING
from registry.models import Alert, AuditEvent, Patient, PatientIdentifier
from registry.timeutil import clinic_today, start_of_clinic_day
from scoring.models import ImagingStudy, VbqResult
from scoring.services import RELINK_PENDING, SeriesInput, imaging_study_upsert
from scoring.services_bulk import imaging_study_upsert_many
from scoring.tasks import study_received
from tests.factories import MRN_SYSTEM, PatientFactory, ProcedureFactory

pytestmark = pytest.mark.django_db
FHIR_FIXTURES = Path(__file__).parent.parent / "integrations" / "fhir" / "fixtures"
UID = "2.25.7100000000000000000001"


def _patient(days_since_procedure=70):
    """A patient whose index procedure was ``days_since_procedure`` clinic days ago."""
    patient = PatientFactory()
    day = clinic_today() - dt.timedelta(days=days_since_procedure)
    ProcedureFactory(patient=patient,
                     performed_at=start_of_clinic_day(day) + dt.timedelta(hours=10))
    return patient


def _send(patient, *, uid=UID, record_status="active", days_before_procedure=20,
          days_since_procedure=70):
    day = clinic_today() - dt.timedelta(days=days_since_procedure + days_before_procedure)
    study, _ = imaging_study_upsert(
        study_instance_uid=uid, patient=patient, source="dicom",
        started_at=start_of_clinic_day(day) + dt.timedelta(hours=9), modality="MR",
        description="L-SPINE", endpoint_url="http://127.0.0.1:9/dicom-web",
        series=[SeriesInput(uid + ".1", "MR", "SAG T1")], record_status=record_status)
    return study


def _score(study, vbq=3.6):
    """The study's job, scored (as the worker would leave it): a high VBQ."""
    assert VbqResult.objects.filter(series__study=study).update(
        status="succeeded", vbq_all_levels=vbq, vbq_excluding_fractured=vbq, qc_clear=True,
        confidence=1.0) == 1
    return VbqResult.objects.get(series__study=study)


def _vbq(patient):
    """The patient's VBQ as the follow-up reads it: the ORM facts and, on PostgreSQL, the
    event path's statement (both must agree)."""
    orm = load_facts([patient.pk])[patient.pk].vbq_all_levels
    if connection.vendor == "postgresql":
        sql, params = patient_facts_sql(patient.pk)
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            assert cursor.fetchone()[5] == orm
    return orm


def _not_due(*patients):
    Patient.objects.filter(pk__in=[p.pk for p in patients]).update(followup_next_check_on=None)


def _due_today(patient):
    return Patient.objects.get(pk=patient.pk).followup_next_check_on == clinic_today()


def _assert_moved(result, old, new):
    result.refresh_from_db()
    assert result.patient_id == new.pk
    assert _vbq(old) is None
    assert _vbq(new) == 3.6
    assert _due_today(old)
    assert _due_today(new)
    audit = AuditEvent.objects.get(object_type="VbqResult", object_id=str(result.pk),
                                   action="update")
    assert audit.patient_id == new.pk
    assert audit.detail == {"moved_from_patient": str(old.pk), "reason": "study patient changed",
                            "study_id": result.series.study_id}


def test_a_study_re_sent_for_another_patient_moves_its_result_to_that_patient():
    a, b = _patient(), _patient()
    result = _score(_send(a))
    assert _vbq(a) == 3.6
    _not_due(a, b)
    _send(a)  # an unchanged re-send: nothing moves, no one is due
    assert not _due_today(a)
    assert not AuditEvent.objects.filter(object_type="VbqResult").exists()

    study = _send(b)

    _assert_moved(result, a, b)
    assert study.linked_procedure.patient_id == b.pk  # re-linked to B's procedure
    assert VbqResult.objects.filter(series__study=study).count() == 1  # no second job


def test_a_reviewed_manual_result_moves_with_its_study_too():
    a, b = _patient(), _patient()
    auto = _score(_send(a))
    manual = VbqResult.objects.create(
        series=auto.series, patient=a, algorithm_version=auto.algorithm_version,
        source="manual", revision=1, status="succeeded", review_status="accepted",
        vbq_all_levels=2.1, vbq_excluding_fractured=2.1)
    VbqResult.objects.filter(pk=auto.pk).update(review_status="rejected")

    _send(b)

    assert set(VbqResult.objects.filter(patient=b).values_list("pk", flat=True)) == {
        auto.pk, manual.pk}
    assert not VbqResult.objects.filter(patient=a).exists()
    assert _vbq(b) == 2.1


def test_the_move_in_bulk_writes_the_same_result_audit_and_outbox():
    a, b = _patient(), _patient()
    result = _score(_send(a))
    _not_due(a, b)
    day = clinic_today() - dt.timedelta(days=90)
    with transaction.atomic():
        imaging_study_upsert_many(items=[{
            "study_instance_uid": UID, "patient": b, "source": "fhir",
            "started_at": start_of_clinic_day(day), "modality": "MR",
            "series": [SeriesInput(UID + ".1", "MR", "SAG T1")]}])
    _assert_moved(result, a, b)
    # Waits for study_received to link it to B's procedure; A's procedure is not B's.
    assert ImagingStudy.objects.get(study_instance_uid=UID).linked_procedure_id is None


def test_the_old_patients_other_study_is_linked_again_once_the_misfiled_one_leaves():
    a, b = _patient(), _patient()
    _score(_send(a, days_before_procedure=5))  # the nearer one: linked to A's procedure
    other = _send(a, uid="2.25.7100000000000000000002", days_before_procedure=30)
    assert other.linked_procedure_id is None

    _send(b, days_before_procedure=5)

    other.refresh_from_db()
    assert other.link_reason == RELINK_PENDING


def test_a_study_entered_in_error_no_longer_counts_and_its_patient_is_re_evaluated():
    a = _patient()
    _score(_send(a))
    followup_evaluate([a.pk])
    assert Alert.objects.get(patient=a).rule_id == HIGH_VBQ  # raised on these images
    _not_due(a)

    _send(a, record_status="entered-in-error")

    assert _vbq(a) is None
    assert _due_today(a)
    followup_evaluate([a.pk])
    # The rules (registry/followup.py, high-VBQ v2): the alert raised on these images loses
    # its premise and resolves; with no usable VBQ on day 70 the "vbq-missing" work item opens.
    assert dict(Alert.objects.filter(patient=a).values_list("rule_id", "status")) == {
        HIGH_VBQ: "resolved", VBQ_MISSING: "open"}
    assert Alert.objects.get(patient=a, rule_id=HIGH_VBQ).resolution_reason == "not-appropriate"


def test_a_result_whose_study_belongs_to_another_patient_does_not_count():
    """Defence in depth (rows written before the move existed, or by another path): the facts
    count a result only if its study is active and is the result's patient's; a result with
    no series (an imported value) still counts."""
    a, b = _patient(), _patient()
    VbqResult.objects.create(patient=a, algorithm_version="t", source="imported",
                             status="succeeded", review_status="accepted", vbq_all_levels=2.0,
                             vbq_excluding_fractured=2.0)
    result = _score(_send(b))  # queued after the imported value: the latest
    VbqResult.objects.filter(pk=result.pk).update(patient=a)
    assert _vbq(a) == 2.0


@pytest.mark.postgres
def test_the_vbq_lookup_still_uses_indexes():
    sql, params = patient_facts_sql(PatientFactory().pk)
    with connection.cursor() as cursor:
        cursor.execute("SET enable_seqscan = off")  # a test database is too small to matter
        cursor.execute("EXPLAIN " + sql, params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
        cursor.execute("RESET enable_seqscan")
    assert "scoring_imagingseries_pkey" in plan, plan
    assert "scoring_imagingstudy_pkey" in plan, plan
    assert "Seq Scan" not in plan, plan


# FHIR: the same correction arriving through the API.

FHIR = "application/fhir+json"


def _post(client, token, body, path):
    return client.post(path, data=json.dumps(body), content_type=FHIR,
                       HTTP_AUTHORIZATION=f"Bearer {token}")


def _fhir_study(patient, days_since_procedure=70):
    started = start_of_clinic_day(clinic_today() - dt.timedelta(
        days=days_since_procedure + 20)) + dt.timedelta(hours=9)
    mrn = PatientIdentifier.objects.get(patient=patient, system=MRN_SYSTEM).value
    return {
        "resourceType": "ImagingStudy", "status": "available",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{UID}"}],
        "contained": [{"resourceType": "Endpoint", "id": "pacs", "status": "active",
                       "connectionType": {"system": "http://terminology.hl7.org/CodeSystem/"
                                          "endpoint-connection-type", "code": "dicom-wado-rs"},
                       "payloadType": [{"text": "DICOM"}],
                       "address": "http://127.0.0.1:9/dicom-web"}],
        "endpoint": [{"reference": "#pacs"}],
        "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "MR"}],
        "subject": {"identifier": {"system": MRN_SYSTEM, "value": mrn}},
        "started": started.isoformat(), "description": "SYNTHETIC MRI LUMBAR SPINE",
        "series": [{"uid": UID + ".1", "number": 3, "description": "SAG T1",
                    "modality": {"system": "http://dicom.nema.org/resources/ontology/DCM",
                                 "code": "MR"}}],
    }


@pytest.fixture
def token(db):
    return feed_create(name="test-ehr")[1]


def test_a_fhir_imaging_study_corrected_to_another_patient_moves_its_result(client, token):
    a, b = _patient(), _patient()
    response = _post(client, token, _fhir_study(a), "/fhir/ImagingStudy")
    assert response.status_code in (200, 201), response.content
    result = _score(ImagingStudy.objects.get(study_instance_uid=UID))
    _not_due(a, b)

    response = _post(client, token, _fhir_study(b), "/fhir/ImagingStudy")

    assert response.status_code in (200, 201), response.content
    _assert_moved(result, a, b)


def test_a_fhir_transaction_bundle_correcting_the_study_moves_its_result(client, token):
    """The bundle's studies go in one statement with its procedures (``sourced_record_many``
    with ``imaging_study_statement``) on PostgreSQL."""
    bundle = json.loads((FHIR_FIXTURES / "transaction-vertebroplasty.json").read_text())
    assert _post(client, token, bundle, "/fhir").status_code == 200
    owner = PatientIdentifier.objects.get(value="SYN-F-0001").patient
    study = ImagingStudy.objects.get(patient=owner)
    study_received(study.pk)  # a bundle's study is linked (and its job created) by this task
    result = _score(study)
    other = _patient()
    _not_due(owner, other)

    corrected = copy.deepcopy(bundle)
    corrected["entry"] = [e for e in corrected["entry"]
                          if e["resource"]["resourceType"] in ("Procedure", "ImagingStudy")]
    other_mrn = PatientIdentifier.objects.get(patient=other, system=MRN_SYSTEM).value
    for entry in corrected["entry"]:
        entry["resource"]["subject"] = {"identifier": {"system": MRN_SYSTEM,
                                                       "value": other_mrn}}
    response = _post(client, token, corrected, "/fhir")
    assert response.status_code == 200, response.content

    result.refresh_from_db()
    assert result.patient_id == other.pk
    assert ImagingStudy.objects.get(pk=study.pk).patient_id == other.pk
    assert _vbq(owner) is None
    assert _due_today(owner)
    assert _due_today(other)
    assert AuditEvent.objects.filter(object_type="VbqResult", object_id=str(result.pk),
                                     detail__moved_from_patient=str(owner.pk)).exists()


def test_a_re_send_that_names_no_patient_keeps_the_studys_patient_and_its_vbq():
    """The DICOM receiver registers files whose PatientID is not (yet) in the registry with
    no patient: for a study already known that means "unknown", not "unassigned". The study
    keeps its patient, the VBQ still counts, nothing is audited as moved and nobody becomes
    due; an open high-VBQ alert would otherwise resolve on a VBQ that merely looked gone."""
    a = _patient()
    result = _score(_send(a))
    _not_due(a)
    study = _send(None)
    assert study.patient_id == a.pk
    assert ImagingStudy.objects.get(pk=study.pk).patient_id == a.pk
    result.refresh_from_db()
    assert result.patient_id == a.pk
    assert _vbq(a) == 3.6
    assert not _due_today(a)
    assert not AuditEvent.objects.filter(object_type="VbqResult").exists()
    assert not AuditEvent.objects.filter(detail__has_key="moved_from_patient").exists()
    # and through the bulk path (a bundle's studies)
    imaging_study_upsert_many(items=[{
        "study_instance_uid": UID, "patient": None, "source": "dicom", "modality": "MR",
        "series": [SeriesInput(UID + ".1", "MR", "SAG T1")]}])
    assert ImagingStudy.objects.get(pk=study.pk).patient_id == a.pk
    assert _vbq(a) == 3.6
    assert not _due_today(a)


def test_a_job_created_for_the_former_patient_is_scored_for_the_studys_patient(tmp_path):
    """The race the correction's statement cannot see: a linker inserts the study's job for
    patient A while the correction to B waits for the study's row lock; the correction then
    moves only the results that existed when it started. The worker's claim scores the job
    for the study's patient as of the claim. (Simulated: the study's patient changed without
    moving its job.)"""
    from scoring.engine.phantom import make_phantom
    from scoring.tasks import vbq_compute

    a, b = _patient(), _patient()
    phantom = make_phantom(171, slices=9)
    folder = tmp_path / "series"
    phantom.write(folder)
    study = _send(a)
    ImagingStudy.objects.filter(pk=study.pk).update(patient=b)
    study.series.update(local_path=str(folder), series_instance_uid=str(
        phantom.datasets[0].SeriesInstanceUID))
    job = VbqResult.objects.get(series__study=study)
    assert job.patient_id == a.pk
    assert vbq_compute(job.pk)["status"] in ("succeeded", "needs_review")
    job.refresh_from_db()
    assert job.patient_id == b.pk


def test_the_qi_report_counts_the_same_results_as_the_alerts():
    """The cohort the QI reports (Kaplan-Meier by VBQ group, ROC, export) are built from drops
    a voided study's result, as the follow-up does: the report must not group a patient by a
    VBQ the alerts no longer use."""
    from registry.reports.queries import build_cohort

    a = _patient()
    _score(_send(a))
    [row] = [r for r in build_cohort().rows if r.vbq_all_levels is not None]
    assert row.vbq_all_levels == 3.6
    _send(a, record_status="entered-in-error")
    assert [r.vbq_all_levels for r in build_cohort().rows] == [None]
