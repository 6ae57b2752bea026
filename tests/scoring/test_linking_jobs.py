"""Linking and job creation in few statements (issue 5): the nearest pre-procedure MRI wins, a
study written alone is linked with its jobs by the ingest's own transaction, a replayed
``study_received`` (which links a bundle's studies) creates no second job, a re-stored result
replaces its level rows.
SYNTHETIC patients and phantoms; no PACS is contacted (nothing queued after commit runs under
``django_db``)."""

import dataclasses
import datetime as dt

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from registry.services import Identifier, procedure_record
from registry.timeutil import clinic_today, start_of_clinic_day
from scoring.engine import ALGORITHM_VERSION, compute_vbq
from scoring.engine.phantom import make_phantom
from scoring.models import ImagingStudy, VbqLevel, VbqResult
from scoring.services import SeriesInput, imaging_study_upsert, vbq_jobs_create
from scoring.tasks import STORED_LEVELS, _store, study_received
from tests.factories import PatientFactory

pytestmark = pytest.mark.django_db
ENDPOINT = "http://127.0.0.1:9/dicom-web"  # never contacted here


def _patient_with_index(index_days_ago: int = 5):
    patient = PatientFactory()
    index_day = clinic_today() - dt.timedelta(days=index_days_ago)
    procedure_record(patient=patient, code_system="http://www.ama-assn.org/go/cpt",
                     code="22511", performed_at=start_of_clinic_day(index_day)
                     + dt.timedelta(hours=10), identifier=Identifier("urn:t", str(patient.pk)))
    return patient, index_day


def _study(patient, index_day, uid: str, days_before: int, series=("SAG T1",), link=False):
    """The study written and, with ``link=False``, left ``linking pending`` as a bundle's
    studies are, for ``study_received``."""
    study, _ = imaging_study_upsert(
        study_instance_uid=uid, patient=patient, source="fhir",
        started_at=start_of_clinic_day(index_day - dt.timedelta(days=days_before)),
        modality="MR", endpoint_url=ENDPOINT,
        series=[SeriesInput(f"{uid}.{i}", "MR", desc) for i, desc in enumerate(series, 1)],
        link=link)
    return study


def test_a_study_written_alone_is_linked_with_its_jobs_in_the_ingest_transaction(
    django_capture_on_commit_callbacks
):
    """No ``study_received`` message: the ingest links the study, creates its jobs (the
    outbox rows) and sends only their ``vbq_compute`` messages after commit; a nearer study
    arriving later unlinks the older one in its own ingest."""
    import functools

    patient, index_day = _patient_with_index()
    with django_capture_on_commit_callbacks() as callbacks:
        older = _study(patient, index_day, "2.25.7001", days_before=40,
                       series=("SAG T1", "AX T2"), link=True)
    assert older.linked_procedure_id is not None
    assert older.link_reason == "nearest lumbar MRI, 40 days before the procedure"
    [job] = VbqResult.objects.filter(series__study=older)  # the axial T2 is skipped
    assert (job.status, job.attempts) == ("queued", 0)
    assert [(c.func.__name__, c.args) for c in callbacks if isinstance(c, functools.partial)
            ] == []  # no study_received
    assert len(callbacks) == 1  # vbq_compute for the one job
    with CaptureQueriesContext(connection) as queries:
        nearer = _study(patient, index_day, "2.25.7002", days_before=10, link=True)
    assert nearer.linked_procedure_id == older.linked_procedure_id
    older.refresh_from_db()
    assert (older.linked_procedure_id, older.link_reason) == (
        None, "a nearer pre-procedure MRI arrived")
    if connection.vendor == "postgresql":
        statements = [q["sql"] for q in queries.captured_queries]
        # upsert (+ audit), read back, index procedure, link, series, jobs, savepoints
        assert len(statements) <= 11, statements


def test_the_nearest_study_is_linked_and_an_older_one_unlinked_with_the_reason():
    patient, index_day = _patient_with_index()
    older = _study(patient, index_day, "2.25.7101", days_before=40)
    assert study_received(older.pk)["linked"] is True
    nearer = _study(patient, index_day, "2.25.7102", days_before=10)
    assert study_received(nearer.pk)["linked"] is True
    older.refresh_from_db()
    nearer.refresh_from_db()
    assert (older.linked_procedure_id, older.link_reason) == (
        None, "a nearer pre-procedure MRI arrived")
    assert nearer.linked_procedure_id is not None
    assert nearer.link_reason == "nearest lumbar MRI, 10 days before the procedure"
    # The older study arrives again: the nearer one stays linked.
    assert study_received(older.pk)["linked"] is False
    older.refresh_from_db()
    assert (older.linked_procedure_id, older.link_reason) == (
        None, "a nearer pre-procedure MRI is already linked")
    assert ImagingStudy.objects.get(pk=nearer.pk).linked_procedure_id is not None


def test_a_replayed_study_creates_each_job_once_with_the_model_defaults():
    patient, index_day = _patient_with_index()
    study = _study(patient, index_day, "2.25.7201", days_before=10,
                   series=("SAG T1", "AX T2", "SAG T1 FS"))
    first = study_received(study.pk)
    assert first == {"study": study.pk, "linked": True, "jobs": 2}  # the axial T2 is skipped
    assert study_received(study.pk)["jobs"] == 0  # a duplicate delivery
    assert vbq_jobs_create(study=study) == []
    jobs = VbqResult.objects.filter(series__study=study)
    assert jobs.count() == 2
    for job in jobs:
        assert (job.status, job.review_status, job.source, job.revision, job.attempts) == (
            "queued", "pending", "auto", 0, 0)
        assert (job.algorithm_version, job.patient_id) == (ALGORITHM_VERSION, patient.pk)
        assert (job.qc_flags, job.fractured_levels, job.measurement) == ([], [], {})
        assert job.queued_at is not None
        assert job.started_at is None


def test_study_received_links_and_creates_the_job_in_a_few_statements():
    patient, index_day = _patient_with_index()
    study = _study(patient, index_day, "2.25.7301", days_before=10)
    with CaptureQueriesContext(connection) as queries:
        assert study_received(study.pk)["jobs"] == 1
    statements = [q["sql"] for q in queries.captured_queries]
    if connection.vendor == "postgresql":  # other databases keep the ORM path
        # One savepoint: study_received's own transaction, nested in the test's (job creation
        # and linking add none; get_or_create added two).
        assert sum(sql.startswith("SAVEPOINT") for sql in statements) == 1, statements
        # lock the study, index procedure, link, series, jobs (+ savepoint and release)
        assert len(statements) <= 7, statements  # was 14


def test_storing_a_result_again_replaces_its_level_rows(tmp_path):
    patient, index_day = _patient_with_index()
    study = _study(patient, index_day, "2.25.7401", days_before=10)
    study_received(study.pk)
    result = VbqResult.objects.get(series__study=study)
    measurement = compute_vbq(make_phantom(133, slices=9).datasets)
    assert measurement.levels
    assert measurement.csf is not None

    _store(result.pk, measurement)
    stored = {lv.level: lv for lv in VbqLevel.objects.filter(result=result)}
    assert set(stored) == {*measurement.levels, "csf"} & set(STORED_LEVELS)
    level = next(iter(measurement.levels))
    assert stored[level].median_si == pytest.approx(measurement.levels[level].median_si)
    result.refresh_from_db()
    assert (result.status, result.vbq_all_levels) == (measurement.status,
                                                       measurement.vbq_all_levels)
    assert result.finished_at is not None
    assert result.measurement["status"] == measurement.status

    # A re-run with one level fewer and another value: the dropped level's row goes.
    dropped, changed = [lv for lv in measurement.levels if lv in STORED_LEVELS][:2]
    levels = dict(measurement.levels)
    del levels[dropped]
    levels[changed] = dataclasses.replace(levels[changed], median_si=1234.5)
    _store(result.pk, dataclasses.replace(measurement, levels=levels))
    stored = {lv.level: lv for lv in VbqLevel.objects.filter(result=result)}
    assert set(stored) == {*levels, "csf"} & set(STORED_LEVELS)
    assert stored[changed].median_si == 1234.5


def test_a_study_that_arrived_before_its_procedure_is_linked_when_the_procedure_is_recorded(
    django_capture_on_commit_callbacks
):
    """The usual clinical order: the lumbar MRI is sent weeks before the vertebroplasty. The
    study is written unlinked ("no index procedure yet"); recording the procedure marks it
    ``RELINK_PENDING`` (the outbox) and sends ``link_pending_studies``, which links it and
    creates its job."""
    from scoring.services import RELINK_PENDING
    from scoring.tasks import link_pending_studies, vbq_requeue_stale

    patient = PatientFactory()
    index_day = clinic_today() - dt.timedelta(days=5)
    study = _study(patient, index_day, "2.25.7501", days_before=30, link=True)
    assert (study.linked_procedure_id, study.link_reason) == (None, "no index procedure yet")
    with django_capture_on_commit_callbacks() as callbacks:
        procedure_record(patient=patient, code_system="http://www.ama-assn.org/go/cpt",
                         code="22511", performed_at=start_of_clinic_day(index_day)
                         + dt.timedelta(hours=10), identifier=Identifier("urn:t", "late-proc"))
    study.refresh_from_db()
    assert study.link_reason == RELINK_PENDING
    assert [(c.func.__name__, c.args) for c in callbacks if hasattr(c, "func")] == [
        ("enqueue_link_pending_studies", ([str(patient.pk)],))]
    assert link_pending_studies([str(patient.pk)]) == {"studies": 1, "linked": 1}
    study.refresh_from_db()
    assert study.linked_procedure_id is not None
    assert study.link_reason == "nearest lumbar MRI, 30 days before the procedure"
    assert VbqResult.objects.filter(series__study=study, status="queued").count() == 1
    # Recording the procedure again (an update) marks nothing: the study is linked now.
    procedure_record(patient=patient, code_system="http://www.ama-assn.org/go/cpt",
                     code="22511", performed_at=start_of_clinic_day(index_day)
                     + dt.timedelta(hours=10), identifier=Identifier("urn:t", "late-proc"))
    assert ImagingStudy.objects.get(pk=study.pk).link_reason.startswith("nearest")
    assert vbq_requeue_stale()["linked"] == 0


def test_a_procedure_in_a_fhir_bundle_links_the_patients_earlier_study(client):
    """The same through /fhir: a transaction bundle carrying only the Procedure (its patient
    named by identifier) marks the earlier, unlinked study in the bundle's own final
    statement; the outbox sweep links it even if the message is lost."""
    import json

    from registry.feeds import feed_create
    from registry.models import PatientIdentifier
    from scoring.services import RELINK_PENDING
    from scoring.tasks import vbq_requeue_stale

    patient = PatientFactory()
    mrn = PatientIdentifier.objects.filter(patient=patient).first()
    assert mrn is not None
    index_day = clinic_today() - dt.timedelta(days=5)
    study = _study(patient, index_day, "2.25.7601", days_before=12, link=True)
    assert study.link_reason == "no index procedure yet"
    token = feed_create(name="relink-ehr")[1]
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": {
        "resourceType": "Procedure", "status": "completed",
        "identifier": [{"system": "urn:syn-proc", "value": "RELINK-1"}],
        "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "22511"}]},
        "subject": {"identifier": {"system": mrn.system, "value": mrn.value}},
        "performedDateTime": f"{index_day.isoformat()}T10:00:00Z"}}]}
    response = client.post("/fhir", data=json.dumps(bundle),
                           content_type="application/fhir+json",
                           HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code == 200, response.content
    study.refresh_from_db()
    assert study.link_reason == RELINK_PENDING
    assert vbq_requeue_stale(requeue_after_seconds=0)["linked"] == 1
    study.refresh_from_db()
    assert study.linked_procedure_id is not None
    assert VbqResult.objects.filter(series__study=study).count() == 1


@pytest.mark.postgres
def test_the_sql_and_python_rules_of_a_scorable_series_agree():
    """``vbq_jobs_create`` decides in SQL when the study has a PACS (``SCORABLE_SQL``, an
    ``INSERT .. SELECT``) and in Python otherwise (``_looks_scorable``): the same series must
    be scored either way."""
    from scoring.models import ImagingSeries
    from scoring.services import NOT_SCORED_PATTERNS, SCORABLE_SQL, _looks_scorable

    patient, index_day = _patient_with_index()
    study = _study(patient, index_day, "2.25.7311", days_before=10)
    cases = [("MR", "SAG T1"), ("", "sag t1 tse"), ("MR", ""), ("CT", "SAG T1"),
             ("MR", "AX T1"), ("MR", "t2 sag"), ("MR", "Sag STIR"), ("MR", "localizer"),
             ("MR", "3-pl scout"), ("MR", "SAG T1 FS"), ("SR", ""), ("MR", "SAGITTAL T1 flair"),
             ("MR", "Max T1")]  # "MAX" holds "AX": skipped by both, as the rule says
    rows = [ImagingSeries.objects.create(study=study, series_instance_uid=f"2.25.7311.{n}",
                                         modality=modality, description=description)
            for n, (modality, description) in enumerate(cases, 10)]
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT s.id FROM scoring_imagingseries AS s "  # noqa: S608
                       f"WHERE s.study_id = %s AND {SCORABLE_SQL}", [study.pk, NOT_SCORED_PATTERNS])
        in_sql = {row[0] for row in cursor.fetchall()}
    in_python = {row.pk for row in rows if _looks_scorable(row)} | {
        s.pk for s in study.series.exclude(pk__in=[r.pk for r in rows]) if _looks_scorable(s)}
    assert in_sql == in_python
    assert 0 < len({r.pk for r in rows} & in_sql) < len(rows)


@pytest.mark.postgres
def test_the_ingest_of_one_study_runs_prepared_statements(settings):
    """The fixed-text statements an ingested study costs (the study upsert, its link, its
    jobs) are prepared once per connection (``DB_PREPARED_STATEMENTS``): parse and plan were
    most of their server CPU."""
    settings.DB_PREPARED_STATEMENTS = True
    patient, index_day = _patient_with_index()
    _study(patient, index_day, "2.25.7401", days_before=10, link=True)
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        prepared = [row[0] for row in cursor.fetchall()]
    for marker in ("WITH studies AS", "WITH nearer AS", "INSERT INTO \"scoring_vbqresult\""):
        assert sum(marker in sql for sql in prepared) == 1, (marker, prepared)


@pytest.mark.postgres
def test_the_locking_index_lookup_gives_the_same_procedure_as_the_orm():
    """``scoring.linking`` reads the index procedure with its own prepared statement: the
    instance has the ORM's values (JSON levels as a list, dates as dates), and a patient with
    no procedure gives None."""
    from django.db import transaction

    from registry.selectors import index_procedure
    from scoring.linking import _index_procedure_locking_pg
    from tests.factories import PatientFactory, ProcedureFactory

    patient = PatientFactory()
    ProcedureFactory(patient=patient, levels=["L1", "L2"])
    with transaction.atomic():
        found = _index_procedure_locking_pg(patient.pk)
        assert _index_procedure_locking_pg(PatientFactory().pk) is None
    expected = index_procedure(patient=patient)
    assert found.pk == expected.pk
    assert found.levels == ["L1", "L2"]
    assert {f.attname: getattr(found, f.attname) for f in found._meta.concrete_fields} == {
        f.attname: getattr(expected, f.attname) for f in expected._meta.concrete_fields}


def test_the_periodic_sweep_links_again_a_study_that_lost_its_link_to_a_vanished_one():
    """A study left unlinked because a nearer one was linked, whose patient no longer has a
    linked study (the nearer one was voided or moved by a path that raced the linking), is
    linked again by ``vbq_requeue_stale`` (nearest wins among what is left)."""
    from scoring.linking import NEARER_ARRIVED, NEARER_LINKED
    from scoring.tasks import vbq_requeue_stale

    patient, index_day = _patient_with_index()
    far = _study(patient, index_day, "2.25.7601", days_before=30, link=True)
    near = _study(patient, index_day, "2.25.7602", days_before=10, link=True)
    far.refresh_from_db()
    near.refresh_from_db()
    assert near.linked_procedure_id is not None
    assert far.link_reason in (NEARER_LINKED, NEARER_ARRIVED)
    # the state a race can leave: the nearer study gone, the other one not relinked
    ImagingStudy.objects.filter(pk=near.pk).update(record_status="entered-in-error",
                                                   linked_procedure=None)
    assert vbq_requeue_stale(requeue_after_seconds=0)["linked"] == 1
    far.refresh_from_db()
    assert far.linked_procedure_id is not None
    assert far.link_reason == "nearest lumbar MRI, 30 days before the procedure"
    assert VbqResult.objects.filter(series__study=far).count() == 1
    # nothing left to heal: the next sweep links nothing
    assert vbq_requeue_stale(requeue_after_seconds=0)["linked"] == 0


def test_the_sweep_heals_the_link_when_the_nearer_study_is_voided_through_the_service():
    """Voiding keeps a study's ``linked_procedure`` (history): the linker ignores a voided
    study as "nearer", so the other study is linked again, once (review finding)."""
    from scoring.tasks import vbq_requeue_stale

    patient, index_day = _patient_with_index()
    far = _study(patient, index_day, "2.25.7611", days_before=30, link=True)
    _study(patient, index_day, "2.25.7612", days_before=10, link=True)
    imaging_study_upsert(  # the EHR voids the nearer study
        study_instance_uid="2.25.7612", patient=patient, source="fhir",
        started_at=start_of_clinic_day(index_day - dt.timedelta(days=10)), modality="MR",
        endpoint_url=ENDPOINT, series=[SeriesInput("2.25.7612.1", "MR", "SAG T1")],
        record_status="entered-in-error")
    linked = [vbq_requeue_stale(requeue_after_seconds=0)["linked"] for _ in range(3)]
    far.refresh_from_db()
    assert far.linked_procedure_id is not None
    assert linked[1:] == [0, 0]
