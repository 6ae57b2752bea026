"""Two studies of one patient linked at the same moment: exactly one ends linked (the nearest).

Under READ COMMITTED two linking transactions each see the other's link as not yet committed;
without the per-patient lock (``scoring.linking``) both end linked to the index procedure. Real
concurrency on PostgreSQL: two threads, each with its own Django connection, run the real
``study_received`` (row lock, link, jobs). SYNTHETIC patients; no PACS is contacted (the jobs'
messages go to the test run's own filesystem broker).
"""

import datetime as dt
import threading
import time

import pytest
from django.db import connection, connections, transaction

from registry.services import Identifier, procedure_record
from registry.timeutil import clinic_today, start_of_clinic_day
from scoring.linking import NEARER_ARRIVED, NEARER_LINKED
from scoring.models import ImagingStudy, VbqResult
from scoring.services import LINK_PENDING, SeriesInput, imaging_study_upsert
from scoring.tasks import study_received
from tests.factories import PatientFactory

ENDPOINT = "http://127.0.0.1:9/dicom-web"  # never contacted here


def _setup(first_days_before: int, second_days_before: int):
    patient = PatientFactory()
    index_day = clinic_today() - dt.timedelta(days=5)
    procedure_record(patient=patient, code_system="http://www.ama-assn.org/go/cpt",
                     code="22511", performed_at=start_of_clinic_day(index_day)
                     + dt.timedelta(hours=10), identifier=Identifier("urn:t", str(patient.pk)))
    studies = []
    for uid, days in (("2.25.9101", first_days_before), ("2.25.9102", second_days_before)):
        study, _ = imaging_study_upsert(
            study_instance_uid=uid, patient=patient, source="fhir",
            started_at=start_of_clinic_day(index_day - dt.timedelta(days=days)),
            modality="MR", endpoint_url=ENDPOINT,
            series=[SeriesInput(f"{uid}.1", "MR", "SAG T1")], link=False)
        assert study.link_reason == LINK_PENDING
        studies.append(study)
    return studies


def _backend_waits_on_a_lock(pid: int) -> bool:
    with connections["default"].cursor() as cursor:  # the test thread's own connection
        cursor.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [pid])
        row = cursor.fetchone()
    return bool(row) and row[0] == "Lock"


@pytest.mark.postgres
@pytest.mark.parametrize(("first_days_before", "second_days_before", "second_wins"), [
    (40, 10, True),   # the second linker's study is nearer: it unlinks the first one
    (10, 40, False),  # the first linker's study is nearer: the second sees it linked
], ids=["nearer-arrives-second", "nearer-linked-first"])
def test_two_studies_of_one_patient_linked_concurrently_leave_exactly_one_linked(
    transactional_db, first_days_before, second_days_before, second_wins
):
    """The first linker links its study and keeps its transaction open; the second links the
    other study meanwhile (with the lock it waits for the first to commit, then sees its link);
    then the first commits. Exactly the nearest study is linked, with its job; the other carries
    the reason and has no job."""
    first, second = _setup(first_days_before, second_days_before)
    first_linked, commit_first = threading.Event(), threading.Event()
    second_pid: list[int] = []
    second_done = threading.Event()
    errors: list[BaseException] = []

    def first_linker() -> None:
        try:
            with transaction.atomic(durable=True):
                assert study_received(first.pk)["linked"] is True
                first_linked.set()
                assert commit_first.wait(timeout=30)
        except BaseException as exc:  # reported to the test below
            errors.append(exc)
            first_linked.set()
        finally:
            connection.close()

    def second_linker() -> None:
        try:
            connection.ensure_connection()
            second_pid.append(connection.connection.info.backend_pid)
            study_received(second.pk)
        except BaseException as exc:  # reported to the test below
            errors.append(exc)
        finally:
            second_done.set()
            connection.close()

    one = threading.Thread(target=first_linker)
    one.start()
    assert first_linked.wait(timeout=30)
    two = threading.Thread(target=second_linker)
    two.start()
    # The second linker either finishes (no serialization: it cannot see the first's link) or
    # waits on a lock (serialized); only then may the first commit.
    deadline = time.monotonic() + 30
    while not second_done.is_set() and time.monotonic() < deadline:
        if second_pid and _backend_waits_on_a_lock(second_pid[0]):
            break
        time.sleep(0.05)
    commit_first.set()
    one.join(timeout=30)
    two.join(timeout=30)
    assert not errors, errors

    linked = list(ImagingStudy.objects.filter(pk__in=[first.pk, second.pk],
                                              linked_procedure__isnull=False))
    winner, loser = (second, first) if second_wins else (first, second)
    assert [s.pk for s in linked] == [winner.pk]  # without the lock: both are linked
    loser.refresh_from_db()
    assert loser.linked_procedure_id is None
    assert loser.link_reason == (NEARER_ARRIVED if second_wins else NEARER_LINKED)
    # The winner has its job. The loser has none when the nearer study was linked first; when
    # the nearer one arrives second, the first study was linked (and got its job) before it was
    # unlinked, as for two studies arriving one after the other.
    assert VbqResult.objects.filter(series__study=winner).count() == 1
    if not second_wins:
        assert not VbqResult.objects.filter(series__study=loser).exists()
