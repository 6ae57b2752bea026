"""Bulk variant of ``scoring.services.imaging_study_upsert`` for feeds that send many studies
at once (a FHIR transaction bundle): one upsert of the studies and one of their series, the same
audit events, the same outbox marker (every active study, new or updated, is written with
``link_reason = LINK_PENDING`` until ``study_received`` links it) and the same
``study_received`` task queued after commit for each active study.

A study re-sent for ANOTHER patient (a misfile the EHR corrects, a DICOM upload for another
patient) takes its VBQ results with it: they belong to the study's images, and left behind
they would raise or suppress the old patient's follow-up alerts on someone else's images (and
the new patient would get none: the jobs are unique per series, so none is created again).
Both patients are re-evaluated, the old patient's other studies are linked again, the
study's link to the old patient's procedure is dropped, and the moved results' fractured
levels become the new patient's (``scoring.fractured``). A study whose record status changes
(e.g. entered in error) gets its patient re-evaluated (``followup.sweep`` counts only the
results of active studies)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from django.db import connection, transaction

from db.pg import (
    StatementPart,
    dedupe_rows,
    expand_results,
    json_param,
    pg_insert_sql,
    upsert_returning,
)
from registry.models import Patient
from registry.side_effects import (
    SYSTEM_ACTOR,
    Actor,
    audit_record,
    deferred_side_effects,
    followup_changed,
)
from registry.timeutil import clinic_date
from scoring import services, tasks
from scoring.fractured import results_refresh_fractured
from scoring.models import ImagingSeries, ImagingStudy, VbqResult

STUDY_FIELDS = ["patient", "source", "started_at", "started_on", "modality", "description",
                "endpoint_url", "identifier_system", "identifier_value", "record_status"]
logger = logging.getLogger(__name__)
SERIES_FIELDS = ["study_id", "modality", "description", "number", "body_part", "instance_count"]
MOVE_REASON = "study patient changed"


@dataclass
class _Before:
    """An updated study as it was before the upsert, and its results the upsert moved to the
    study's (new) patient: ``(result id, patient id it had)``."""

    patient_id: str | None
    record_status: str
    moved: list[tuple[int, str]] = field(default_factory=list)


def imaging_study_upsert_many(*, items: Sequence[dict[str, Any]], actor: Actor = SYSTEM_ACTOR,
                              queue_linking: bool = True, prepare: bool = False
                              ) -> list[tuple[Any, bool]]:
    """Items are ``imaging_study_upsert`` keyword arguments; returns ``(study pk, created)``
    per item, in order (studies by Study Instance UID, series by Series Instance UID).
    ``queue_linking=False``: no ``study_received`` message (the caller links the studies in
    its transaction). ``prepare``: the PostgreSQL statement is prepared once per connection
    (``pg_execute``; for ``imaging_study_upsert``, whose statement text never changes)."""
    if connection.vendor == "postgresql":
        return imaging_study_statement(items=items, actor=actor,
                                       queue_linking=queue_linking).run(prepare=prepare)
    rows = _study_rows(items)
    # Locked first: the patient a study has before the upsert (the rows stay locked until
    # commit, so no concurrent upsert moves them in between).
    existing = list(ImagingStudy.objects.select_for_update().filter(
        study_instance_uid__in=[row["study_instance_uid"] for row in rows])
        .values_list("pk", "study_instance_uid", "patient_id", "record_status"))
    before = {pk: _Before(str(patient) if patient else None, status)
              for pk, _, patient, status in existing}
    # A re-send naming no patient keeps the study's (as the statement's COALESCE does).
    kept = {uid: patient for _, uid, patient, _ in existing if patient}
    for row in rows:
        if row["patient"] is None and row["study_instance_uid"] in kept:
            row["patient"] = Patient(pk=kept[row["study_instance_uid"]])
    results = upsert_returning(ImagingStudy, rows, conflict=["study_instance_uid"],
                               update=STUDY_FIELDS)
    if before:
        _move_results_orm(results, rows, before)
    series_rows = [
        {"series_instance_uid": s.series_instance_uid, "study_id": study_pk,
         "modality": s.modality, "description": s.description, "number": s.number,
         "body_part": s.body_part, "instance_count": s.instance_count}
        for (study_pk, _), item in zip(results, items, strict=True)
        for s in item.get("series", ())
    ]
    upsert_returning(ImagingSeries, series_rows, conflict=["series_instance_uid"],
                     update=SERIES_FIELDS)
    active = _side_effects(results, rows, actor, queue_linking, before)
    if active:
        # The outbox marker, as in ``imaging_study_upsert``: an updated study keeps its old
        # reason otherwise, and the sweep would never re-link it if the broker is down now.
        ImagingStudy.objects.filter(pk__in=active).update(link_reason=services.LINK_PENDING)
    return results


def _move_results_orm(results: Sequence[tuple[Any, bool]], rows: Sequence[dict[str, Any]],
                      before: dict[Any, _Before]) -> None:
    """The ORM twin of the statement's ``moved`` CTE (other databases): the results of the
    updated studies that are not their study's patient's move to it (recorded in ``before``),
    and a study whose patient changed loses its link to the old patient's procedure."""
    new_patient = {pk: row["patient"].pk if row["patient"] else None
                   for (pk, _), row in zip(results, rows, strict=True)}
    changed = [pk for pk, prior in before.items()
               if prior.patient_id != (str(new_patient[pk]) if new_patient[pk] else None)]
    if changed:  # as the statement's upsert does (an active one is LINK_PENDING just after)
        ImagingStudy.objects.filter(pk__in=changed).update(linked_procedure=None, link_reason="")
    for result_id, patient_id, study_id in VbqResult.objects.select_for_update().filter(
            series__study_id__in=list(before), series__study__patient__isnull=False).values_list(
            "pk", "patient_id", "series__study_id"):
        if patient_id != new_patient[study_id]:
            VbqResult.objects.filter(pk=result_id).update(patient_id=new_patient[study_id])
            before[study_id].moved.append((result_id, str(patient_id)))


def _study_rows(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for item in items:
        started_at = item.get("started_at")
        rows.append({
            "study_instance_uid": item["study_instance_uid"],
            "patient": item.get("patient"),
            "source": item["source"],
            "started_at": started_at,
            "started_on": clinic_date(started_at) if started_at else None,
            "modality": item.get("modality", ""),
            "description": item.get("description", ""),
            "endpoint_url": item.get("endpoint_url", ""),
            "identifier_system": item.get("identifier_system", ""),
            "identifier_value": item.get("identifier_value", ""),
            "record_status": item.get("record_status", "active"),
        })
    return rows


def _side_effects(results: Sequence[tuple[Any, bool]], rows: Sequence[dict[str, Any]],
                  actor: Actor, queue_linking: bool = True,
                  before: dict[Any, _Before] | None = None) -> list[Any]:
    """The audit rows; ``study_received`` queued after commit for every active study (unless
    ``queue_linking`` is false), whose ids are returned. ``before``: the updated studies as
    they were (see ``_moves``)."""
    before = before or {}
    with deferred_side_effects():
        for (study_pk, created), row in zip(results, rows, strict=True):
            patient = row["patient"]
            prior = before.get(study_pk)
            moved_from = (prior.patient_id if prior and prior.patient_id
                          and prior.patient_id != (str(patient.pk) if patient else None)
                          else None)
            audit_record(actor=actor, action="create" if created else "update",
                         object_type="ImagingStudy", object_id=str(study_pk),
                         patient_id=patient.pk if patient else None,
                         detail={"moved_from_patient": moved_from} if moved_from else None)
        if before:
            _moves(results, rows, actor, before)
    active = list(dict.fromkeys(pk for (pk, _), row in zip(results, rows, strict=True)
                                if row["record_status"] == "active"))
    if active and queue_linking:
        transaction.on_commit(lambda: _queue_studies(active))
    return active


def _moves(results: Sequence[tuple[Any, bool]], rows: Sequence[dict[str, Any]], actor: Actor,
           before: dict[Any, _Before]) -> None:
    """Inside ``deferred_side_effects``: for the results the upsert moved, an audit row each
    (ids only); the follow-up of both patients re-evaluated (``followup_changed``: due today
    and a re-evaluation queued after commit), and of a study's patient when its record status
    changed; the old patient's unlinked studies linked again (``relink_after_procedures``: the
    study that left may have been the one linked to their index procedure); the fractured
    levels of the moved results recomputed for their new patient
    (``scoring.fractured.results_refresh_fractured``: one statement for every such patient)."""

    now = {pk: (row["patient"].pk if row["patient"] else None, row["record_status"])
           for (pk, _), row in zip(results, rows, strict=True)}  # the last row of a UID wins
    reevaluate: set[uuid.UUID] = set()  # UUIDs, as the other writes of a bundle add them
    relink: set[str] = set()
    received: set[str] = set()  # patients the moved results now belong to
    for study_pk, prior in before.items():
        patient_id, status = now[study_pk]
        if prior.patient_id != (str(patient_id) if patient_id else None):
            if prior.patient_id:
                reevaluate.add(uuid.UUID(prior.patient_id))
                relink.add(prior.patient_id)
            if patient_id:
                reevaluate.add(uuid.UUID(str(patient_id)))
        elif prior.record_status != status and patient_id:
            reevaluate.add(uuid.UUID(str(patient_id)))
        for result_id, moved_from in prior.moved:
            audit_record(actor=actor, action="update", object_type="VbqResult",
                         object_id=str(result_id), patient_id=patient_id,
                         detail={"moved_from_patient": moved_from, "reason": MOVE_REASON,
                                 "study_id": study_pk})
            reevaluate.add(uuid.UUID(moved_from))
            reevaluate.add(uuid.UUID(str(patient_id)))
            received.add(str(patient_id))
    if received:
        # the moved results drop their new patient's fractured levels, not the old one's
        results_refresh_fractured(received, actor=actor, reason=MOVE_REASON)
    for pid in sorted(reevaluate):
        followup_changed(pid)
    if relink:
        services.relink_after_procedures(relink)


def imaging_study_statement(*, items: Sequence[dict[str, Any]], actor: Actor = SYSTEM_ACTOR,
                            queue_linking: bool = True) -> StatementPart:
    """PostgreSQL: the studies, their series and the outbox marker as data-modifying CTEs, to
    run alone (``.run()``) or in one statement with other bulk writes
    (``registry.services_bulk.sourced_record_many(extra=...)``). The studies' upsert writes
    ``link_reason = LINK_PENDING`` on every active study (new or updated; a study entered in
    error keeps its reason) and returns the study ids, which the series' upsert joins by Study
    Instance UID. Rows with the same UID are written once (the last one wins), as
    ``upsert_returning`` does. In the same statement (no round trip more), the results of an
    updated study that are not its patient's move to it (``moved``), a study whose patient
    changes loses its procedure link, and the SELECT reads each study as it was before
    (``key``: a JSON array of the UID, the old patient and record status, the moves).
    ``finish`` (called with the rows) writes the audit rows, marks the patients concerned for
    re-evaluation (``_moves``) and queues ``study_received`` after commit.

    The "before" values are the statement's snapshot: a concurrent transaction that changed
    the same study after it was taken (READ COMMITTED) is not seen in them, so the audit
    could name the patient before that one, and a job a concurrent linker inserted for the
    former patient meanwhile is not moved here: ``scoring.tasks._claim`` moves a job to its
    study's patient when a worker claims it."""
    qn = connection.ops.quote_name
    study_table = qn(ImagingStudy._meta.db_table)
    series_table = qn(ImagingSeries._meta.db_table)
    result_table = qn(VbqResult._meta.db_table)
    rows = _study_rows(items)
    for row in rows:
        row["link_reason"] = services.LINK_PENDING if row["record_status"] == "active" else ""
    slot_of, unique = dedupe_rows(rows, ["study_instance_uid"])
    # A re-send that names no patient (the DICOM receiver, files whose PatientID is not
    # registered) keeps the study's patient: "unknown" is not "unassigned".
    same_patient = (f"(EXCLUDED.patient_id IS NULL OR EXCLUDED.patient_id IS NOT DISTINCT "
                    f"FROM {study_table}.patient_id)")
    study_sql, study_records = pg_insert_sql(
        ImagingStudy, unique, ["study_instance_uid"], STUDY_FIELDS, "", update_sql={
            "patient_id": f"COALESCE(EXCLUDED.patient_id, {study_table}.patient_id)",
            "link_reason": f"CASE WHEN EXCLUDED.record_status = 'active' THEN "
                           f"EXCLUDED.link_reason WHEN {same_patient} THEN "
                           f"{study_table}.link_reason ELSE '' END",
            # a study that changes patient is no longer the old patient's pre-procedure MRI
            "linked_procedure_id": f"CASE WHEN {same_patient} THEN "
                                   f"{study_table}.linked_procedure_id END"})
    ctes = [f"studies AS ({study_sql}RETURNING id, (xmax = 0) AS inserted, "
            "study_instance_uid, patient_id)"]
    params = [json_param(study_records)]
    series_rows = {  # by Series Instance UID: the last one wins
        s.series_instance_uid: {
            "series_instance_uid": s.series_instance_uid, "study_id": None,
            "modality": s.modality, "description": s.description, "number": s.number,
            "body_part": s.body_part, "instance_count": s.instance_count,
            "vbq_study_uid": item["study_instance_uid"]}
        for item in items for s in item.get("series", ())}
    if series_rows:
        series_sql, series_records = pg_insert_sql(
            ImagingSeries, list(series_rows.values()), ["series_instance_uid"], SERIES_FIELDS,
            "", select={"study_id": "s.id"}, source=(
                "json_array_elements(%s::json) AS e CROSS JOIN LATERAL json_populate_record("
                f"NULL::{series_table}, e) AS r JOIN studies AS s "
                "ON s.study_instance_uid = e->>'vbq_study_uid'"))
        for record, row in zip(series_records, series_rows.values(), strict=True):
            record["vbq_study_uid"] = row["vbq_study_uid"]
        ctes.append(f"series AS ({series_sql})")
        params.append(json_param(series_records))
    # Every sub-statement sees the rows as they were BEFORE this statement: ``prev`` and ``se``
    # are the results and series the study already had (of any status, manual and reviewed
    # ones too), and the final SELECT's ``t`` is the study before its update. A result that
    # is not its study's patient's moves to it; ``prev`` gives the patient it had (RETURNING
    # only sees new values before PostgreSQL 18). Index lookups by study (series) and by
    # series (results) per updated study: nothing more for a new or unchanged study.
    ctes.append(
        f"moved AS (UPDATE {result_table} AS r SET patient_id = s.patient_id "  # noqa: S608
        f"FROM studies AS s JOIN {series_table} AS se ON se.study_id = s.id "
        f"JOIN {result_table} AS prev ON prev.series_id = se.id "
        "WHERE r.id = prev.id AND NOT s.inserted AND s.patient_id IS NOT NULL "
        "AND prev.patient_id <> s.patient_id "
        "RETURNING r.id, se.study_id, prev.patient_id AS moved_from)")
    # The third column is the key (text) ``sourced_record_many`` expects: a JSON array of the
    # UID, the patient and status before the upsert (NULL for a new study) and the moves.
    # (the moves grouped once and joined: a subquery per study scanned ``moved`` once per
    # study, quadratic in a bundle that moves thousands of studies)
    select = (
        "SELECT s.id, s.inserted, json_build_array(s.study_instance_uid, t.patient_id, "  # noqa: S608
        "t.record_status, mv.moves)::text "
        f"FROM studies AS s LEFT JOIN {study_table} AS t ON t.id = s.id AND NOT s.inserted "
        "LEFT JOIN (SELECT study_id, json_agg(json_build_array(id, moved_from)) AS moves "
        "FROM moved GROUP BY study_id) AS mv ON mv.study_id = s.id")

    def finish(returned: Sequence[tuple[Any, bool, Any]]) -> list[tuple[Any, bool]]:
        written, before = {}, {}
        for pk, inserted, key in returned:
            uid, patient_id, status, moved = json.loads(key)
            written[uid] = (pk, bool(inserted))
            if status is not None:
                before[pk] = _Before(patient_id, status,
                                     [(rid, moved_from) for rid, moved_from in moved or ()])
        for row in rows:  # a re-send naming no patient kept the study's (``patient_id``)
            prior = before.get(written[row["study_instance_uid"]][0])
            if row["patient"] is None and prior is not None and prior.patient_id:
                row["patient"] = Patient(pk=uuid.UUID(prior.patient_id))
        results = expand_results(slot_of, [written[row["study_instance_uid"]] for row in unique])
        _side_effects(results, rows, actor, queue_linking, before)
        return results

    return StatementPart(ctes=ctes, params=params, select=select, finish=finish)


def _queue_studies(study_ids: list[Any]) -> None:
    """After commit: ``study_received`` for every study, in one message (Celery chunks) rather
    than one per study. A broker that is down is logged, not raised: the rows are committed."""

    try:
        if len(study_ids) == 1:
            tasks.study_received.delay(study_ids[0])
        else:
            # argsrepr/kwargsrepr given: Celery would otherwise walk every id to build them
            tasks.study_received.chunks([(pk,) for pk in study_ids], 100).apply_async(
                argsrepr=f"({len(study_ids)} studies)", kwargsrepr="{}")
    except Exception as exc:
        logger.warning("tasks.study_received not queued for %s study(ies): %s", len(study_ids),
                       type(exc).__name__)
