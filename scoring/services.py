"""Write paths for imaging studies and VBQ jobs.

Owned by the imaging pipeline work; the FHIR ImagingStudy mapper, the DICOM receiver and the
upload API all call ``imaging_study_upsert`` so linking and queueing happen in one place: in the
transaction that writes the study (``link_or_defer``), so the study is linked and its jobs are
queued rows when the write commits, with no Celery hop in between. A FHIR bundle's studies
(``scoring.services_bulk``) stay ``LINK_PENDING`` and are linked by ``study_received``, one
Celery ``chunks`` message per bundle, so a feed of many studies is not linked inside its request.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from django.db import connection, transaction
from django.db.models import F

from db.pg import pg_execute
from registry.models import Patient, Procedure
from registry.side_effects import SYSTEM_ACTOR, Actor, execute_or_defer
from registry.timeutil import clinic_date
from scoring import services_bulk, tasks
from scoring.engine import ALGORITHM_VERSION
from scoring.linking import link_study
from scoring.models import ImagingSeries, ImagingStudy, VbqResult

# Link reason of a study whose linking has not run yet (a bundle's studies, linked by
# ``study_received``; a study whose inline linking failed).
LINK_PENDING = "linking pending"
# Link reason of a study not linked so far, to be linked again because a procedure was
# recorded for its patient since (``relink_after_procedures``).
RELINK_PENDING = "linking pending: a procedure was recorded"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeriesInput:
    series_instance_uid: str
    modality: str = ""
    description: str = ""
    number: int | None = None
    body_part: str = ""
    instance_count: int | None = None


@transaction.atomic
def imaging_study_upsert(
    *,
    study_instance_uid: str,
    patient: Patient | None,
    source: str,
    started_at: dt.datetime | None = None,
    modality: str = "",
    description: str = "",
    endpoint_url: str = "",
    identifier_system: str = "",
    identifier_value: str = "",
    series: Sequence[SeriesInput] = (),
    record_status: str = "active",
    actor: Actor = SYSTEM_ACTOR,
    link: bool = True,
) -> tuple[ImagingStudy, bool]:
    """Create or update a study (by Study Instance UID) and its series (by Series UID), and
    link it and create its VBQ jobs in the same transaction (``link_or_defer``).

    Returns ``(study, created)``. The jobs are queued ``VbqResult`` rows committed with the
    study (the outbox): their ``vbq_compute`` messages are sent after commit, and a broker
    outage then is logged, not raised, so the ingest still succeeds; ``vbq_requeue_stale``
    re-sends queued jobs a few minutes later. ``link=False`` leaves the study ``LINK_PENDING``
    for a caller that links it itself later in its transaction (the DICOM receiver, once it has
    recorded where the files are).
    """

    # One path for one study or many: an INSERT .. ON CONFLICT of the study, one of its series,
    # the audit row and the outbox marker (a few statements instead of a get-then-write per row).
    [(pk, created)] = services_bulk.imaging_study_upsert_many(items=[{
        "study_instance_uid": study_instance_uid, "patient": patient, "source": source,
        "started_at": started_at, "modality": modality, "description": description,
        "endpoint_url": endpoint_url, "identifier_system": identifier_system,
        "identifier_value": identifier_value, "series": series,
        "record_status": record_status}], actor=actor, queue_linking=False, prepare=True)
    if patient is None and not created:
        # A study already known keeps its patient (the upsert's COALESCE): read it back.
        study = ImagingStudy.objects.select_related("patient").get(pk=pk)
    else:  # the values just written are the row
        study = _as_written(pk, patient, {
            "study_instance_uid": study_instance_uid, "identifier_system": identifier_system,
            "identifier_value": identifier_value, "started_at": started_at,
            "started_on": clinic_date(started_at) if started_at else None,
            "modality": modality, "description": description, "source": source,
            "endpoint_url": endpoint_url, "record_status": record_status,
            # the upsert marks an active study "linking pending" and keeps another's reason
            **({"link_reason": LINK_PENDING} if record_status == "active" else {})})
    if link:
        link_or_defer(study)
    return study, created


def _as_written(pk: Any, patient: Patient | None, values: dict[str, Any]) -> ImagingStudy:
    """The study row as the upsert just wrote it, built from the values written instead of
    read back (one query fewer per study on the ingest path). The columns the upsert leaves as
    they were (``linked_procedure``, the timestamps, an inactive study's ``link_reason``) are
    deferred: Django loads them from the database if anything reads them, as for ``.only()``."""
    values = {"id": pk, "patient_id": patient.pk if patient else None, **values}
    names = [f.attname for f in ImagingStudy._meta.concrete_fields if f.attname in values]
    study = ImagingStudy.from_db(ImagingStudy.objects.db, names, [values[n] for n in names])
    study.patient = patient  # the caller's instance: no query to read it back
    return study


def link_and_create_jobs(study: ImagingStudy) -> tuple[bool, list[int]]:
    """Link the study to the patient's index procedure (``scoring.linking``) and, if linked,
    create its VBQ jobs (queued after commit), in the caller's transaction, which must hold the
    study's row lock (its upsert, or ``study_received``'s ``SELECT .. FOR UPDATE``).
    Returns ``(linked, ids of the jobs created)``."""

    linked = link_study(study)
    return linked, (vbq_jobs_create(study=study) if linked else [])


def link_or_defer(study: ImagingStudy) -> bool:
    """Link an active study and create its jobs now, in a savepoint of the caller's
    transaction. If that fails, the write still commits: the study stays ``LINK_PENDING`` and
    ``study_received`` is sent after commit (and ``vbq_requeue_stale`` links it if that message
    is lost too). Returns whether the study is linked."""
    if study.record_status != "active":
        return False
    try:
        with transaction.atomic():
            linked, _ = link_and_create_jobs(study)
    except Exception:
        logger.exception("inline linking failed study=%s; left to study_received", study.pk)
        study.linked_procedure, study.link_reason = None, LINK_PENDING

        transaction.on_commit(functools.partial(tasks.enqueue_study_received, study.pk))
        return False
    return linked


def relink_after_procedures(patient_ids: Iterable[Any]) -> None:
    """A procedure was recorded for these patients: it may be (or change) their index
    procedure, and the pre-procedure MRI usually arrives BEFORE the procedure it precedes (or
    earlier in the same request). Their active studies that are not linked wait as
    ``RELINK_PENDING`` (the outbox: ``vbq_requeue_stale`` links them if the message is lost),
    and one ``link_pending_studies`` message after commit links them. On PostgreSQL inside
    ``deferred_side_effects`` the marking joins that block's final statement (no round trip of
    its own)."""

    ids = sorted({str(pk) for pk in patient_ids})
    if not ids:
        return
    pending = [LINK_PENDING, RELINK_PENDING]
    # Also a study of these patients still linked to a procedure that is now ANOTHER
    # patient's (the procedure was re-sent for another patient: an EHR misfile correction):
    # unlinked, and linked again to its own patient's index procedure, if any.
    if connection.vendor == "postgresql":
        study, procedure = ImagingStudy._meta.db_table, Procedure._meta.db_table
        execute_or_defer(
            f"UPDATE {study} AS s SET link_reason = %s, linked_procedure_id = NULL "  # noqa: S608
            "WHERE s.patient_id = ANY(%s::uuid[]) AND s.record_status = 'active' "
            "AND ((s.linked_procedure_id IS NULL AND s.link_reason <> ALL(%s::varchar[])) "
            f"OR EXISTS (SELECT 1 FROM {procedure} AS p WHERE p.id = s.linked_procedure_id "
            "AND p.patient_id IS DISTINCT FROM s.patient_id))",
            [RELINK_PENDING, ids, pending])
    else:
        ImagingStudy.objects.filter(
            patient_id__in=ids, record_status="active", linked_procedure__isnull=True,
        ).exclude(link_reason__in=pending).update(link_reason=RELINK_PENDING)
        ImagingStudy.objects.filter(
            patient_id__in=ids, record_status="active", linked_procedure__isnull=False,
        ).exclude(linked_procedure__patient_id=F("patient_id")).update(
            link_reason=RELINK_PENDING, linked_procedure=None)

    transaction.on_commit(functools.partial(tasks.enqueue_link_pending_studies, ids))


# Words of a series description that mark it as not worth scoring (axial, T2, STIR, scouts).
NOT_SCORED_WORDS = ("AX", "T2", "STIR", "LOCALIZER", "SCOUT")
# The same rule as ``_looks_scorable``, in SQL over ``scoring_imagingseries AS s`` (one
# parameter: the LIKE patterns); tests/scoring check that both agree.
SCORABLE_SQL = ("(s.modality = '' OR s.modality = 'MR') "
                "AND NOT (upper(s.description) LIKE ANY (%s::text[]))")
NOT_SCORED_PATTERNS = [f"%{word}%" for word in NOT_SCORED_WORDS]


def _looks_scorable(series: ImagingSeries) -> bool:
    """Series worth a VBQ job: MR, and not obviously axial / T2 / STIR by its description.
    Unknown descriptions are scored (the engine's QC refuses wrong protocols with reasons)."""
    text = (series.description or "").upper()
    if series.modality and series.modality != "MR":
        return False
    return not any(word in text for word in NOT_SCORED_WORDS)


def vbq_jobs_create(*, study: ImagingStudy) -> list[int]:
    """One queued automatic VBQ job per scorable series (unique on series, algorithm version,
    source, revision: a replay creates nothing). Queues ``vbq_compute`` after commit.

    On PostgreSQL the jobs are ONE ``INSERT .. ON CONFLICT DO NOTHING RETURNING id`` (the ids
    returned are exactly the rows this call created; a concurrent or repeated call gets none);
    when the study has a PACS to fetch from, it is an ``INSERT .. SELECT`` over the study's
    series (no read of the series first: one round trip fewer per ingested study). No
    savepoint: inside the caller's transaction (``link_or_defer``'s savepoint or
    ``study_received``) a failure here rolls the link back with it."""
    from django.conf import settings

    created_ids: list[int] = []
    if study.patient_id is None:
        return created_ids
    with transaction.atomic(savepoint=False):
        if connection.vendor == "postgresql" and (study.endpoint_url
                                                  or settings.PACS_DICOMWEB_URL):
            # Every scorable series has a source (the PACS): one INSERT .. SELECT of the
            # series, no read of them first.
            created_ids = _insert_jobs_for_study(study)
            _queue_jobs(created_ids)
            return created_ids
        to_score = []
        for series in study.series.all():
            if not _looks_scorable(series):
                continue
            if not (series.local_path or study.endpoint_url or settings.PACS_DICOMWEB_URL):
                note = "; not scored: no PACS is configured and the images are not stored here"
                if note not in study.link_reason:
                    ImagingStudy.objects.filter(pk=study.pk).update(
                        link_reason=(study.link_reason + note)[:300])
                continue
            to_score.append(series)
        jobs = [_new_job(study, series) for series in to_score]
        if connection.vendor == "postgresql":
            created_ids = _insert_new_jobs(jobs)
        else:
            for job in jobs:
                result, created = VbqResult.objects.get_or_create(
                    series=job.series, algorithm_version=job.algorithm_version,
                    source=job.source, revision=job.revision,
                    defaults={"patient_id": job.patient_id})
                if created:
                    created_ids.append(result.pk)
        _queue_jobs(created_ids)
    return created_ids


def _queue_jobs(created_ids: Sequence[int]) -> None:
    for pk in created_ids:
        transaction.on_commit(lambda pk=pk: tasks.enqueue_vbq_compute(pk))


def _new_job(study: ImagingStudy, series: ImagingSeries | None = None) -> VbqResult:
    """The unsaved queued automatic job of one series of the study (model defaults apply)."""

    return VbqResult(series=series, patient_id=study.patient_id,
                     algorithm_version=ALGORITHM_VERSION, source=VbqResult.Source.AUTO,
                     revision=0)


def _insert_jobs(rows_sql: str, params: Sequence[Any], *, prepare: bool = False) -> list[int]:
    """``INSERT INTO <jobs> (<every column but the id>) <rows_sql> ON CONFLICT (series,
    algorithm version, source, revision) DO NOTHING RETURNING id``: the ids of the rows
    created. ``rows_sql`` gives the rows in the columns' order (``_job_fields``)."""

    meta = VbqResult._meta
    quote = connection.ops.quote_name
    columns = ", ".join(quote(f.column) for f in _job_fields())
    # Names from the model's metadata; values are parameters.
    sql = (f"INSERT INTO {quote(meta.db_table)} ({columns}) {rows_sql} "
           "ON CONFLICT (series_id, algorithm_version, source, revision) DO NOTHING "
           f"RETURNING {quote(meta.pk.column)}")
    return [row[0] for row in pg_execute(sql, params, prepare=prepare)]


def _job_fields() -> list[Any]:
    return [f for f in VbqResult._meta.concrete_fields if not f.primary_key]


def _db_value(field: Any, job: VbqResult) -> Any:
    """The column value ``save()`` would write for this new job."""
    return field.get_db_prep_save(field.pre_save(job, add=True), connection)


def _insert_jobs_for_study(study: ImagingStudy) -> list[int]:
    """PostgreSQL: ``INSERT .. SELECT`` one queued automatic job per scorable series of the
    study (``SCORABLE_SQL``), every other column with its model default as ``save()`` would
    write it, ``ON CONFLICT DO NOTHING``; the ids of the rows created. Prepared once per
    connection (its text never changes)."""
    template = _new_job(study)
    fields = _job_fields()
    select = ", ".join("s.id" if f.attname == "series_id" else "%s" for f in fields)
    params = [_db_value(f, template) for f in fields if f.attname != "series_id"]
    series_table = connection.ops.quote_name(ImagingSeries._meta.db_table)
    rows_sql = (f"SELECT {select} FROM {series_table} AS s "  # noqa: S608 (names from metadata)
                f"WHERE s.study_id = %s AND {SCORABLE_SQL} ORDER BY s.id")
    return _insert_jobs(rows_sql, [*params, study.pk, NOT_SCORED_PATTERNS], prepare=True)


def _insert_new_jobs(jobs: Sequence[VbqResult]) -> list[int]:
    """``INSERT .. VALUES`` of these unsaved rows (every column with its model default, as
    ``save()`` would write it), ``ON CONFLICT DO NOTHING``; the ids of the rows created."""
    if not jobs:
        return []
    fields = _job_fields()
    row = "(" + ", ".join(["%s"] * len(fields)) + ")"
    return _insert_jobs("VALUES " + ", ".join([row] * len(jobs)),
                        [_db_value(f, job) for job in jobs for f in fields])
