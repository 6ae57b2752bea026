"""Bulk variant of ``scoring.services.imaging_study_upsert`` for feeds that send many studies
at once (a FHIR transaction bundle): one upsert of the studies and one of their series, the same
audit events, the same outbox marker (every active study, new or updated, is written with
``link_reason = LINK_PENDING`` until ``study_received`` links it) and the same
``study_received`` task queued after commit for each active study."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from django.db import connection, transaction

from registry.services import SYSTEM_ACTOR, Actor, audit_record, deferred_side_effects
from registry.services_bulk import (
    StatementPart,
    _dedupe,
    _expand,
    _pg_insert_sql,
    json_param,
    upsert_returning,
)
from registry.timeutil import clinic_date
from scoring.models import ImagingSeries, ImagingStudy
from scoring.services import LINK_PENDING

STUDY_FIELDS = ["patient", "source", "started_at", "started_on", "modality", "description",
                "endpoint_url", "identifier_system", "identifier_value", "record_status"]
logger = logging.getLogger(__name__)
SERIES_FIELDS = ["study_id", "modality", "description", "number", "body_part", "instance_count"]


def imaging_study_upsert_many(*, items: Sequence[dict[str, Any]], actor: Actor = SYSTEM_ACTOR,
                              queue_linking: bool = True) -> list[tuple[Any, bool]]:
    """Items are ``imaging_study_upsert`` keyword arguments; returns ``(study pk, created)``
    per item, in order (studies by Study Instance UID, series by Series Instance UID).
    ``queue_linking=False``: no ``study_received`` message (the caller links the studies in
    its transaction)."""
    if connection.vendor == "postgresql":
        return imaging_study_statement(items=items, actor=actor,
                                       queue_linking=queue_linking).run()
    rows = _study_rows(items)
    results = upsert_returning(ImagingStudy, rows, conflict=["study_instance_uid"],
                               update=STUDY_FIELDS)
    series_rows = [
        {"series_instance_uid": s.series_instance_uid, "study_id": study_pk,
         "modality": s.modality, "description": s.description, "number": s.number,
         "body_part": s.body_part, "instance_count": s.instance_count}
        for (study_pk, _), item in zip(results, items, strict=True)
        for s in item.get("series", ())
    ]
    upsert_returning(ImagingSeries, series_rows, conflict=["series_instance_uid"],
                     update=SERIES_FIELDS)
    active = _side_effects(results, rows, actor, queue_linking)
    if active:
        # The outbox marker, as in ``imaging_study_upsert``: an updated study keeps its old
        # reason otherwise, and the sweep would never re-link it if the broker is down now.
        ImagingStudy.objects.filter(pk__in=active).update(link_reason=LINK_PENDING)
    return results


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
                  actor: Actor, queue_linking: bool = True) -> list[Any]:
    """The audit rows; ``study_received`` queued after commit for every active study (unless
    ``queue_linking`` is false), whose ids are returned."""
    with deferred_side_effects():
        for (study_pk, created), row in zip(results, rows, strict=True):
            patient = row["patient"]
            audit_record(actor=actor, action="create" if created else "update",
                         object_type="ImagingStudy", object_id=str(study_pk),
                         patient_id=patient.pk if patient else None)
    active = list(dict.fromkeys(pk for (pk, _), row in zip(results, rows, strict=True)
                                if row["record_status"] == "active"))
    if active and queue_linking:
        transaction.on_commit(lambda: _queue_studies(active))
    return active


def imaging_study_statement(*, items: Sequence[dict[str, Any]], actor: Actor = SYSTEM_ACTOR,
                            queue_linking: bool = True) -> StatementPart:
    """PostgreSQL: the studies, their series and the outbox marker as data-modifying CTEs, to
    run alone (``.run()``) or in one statement with other bulk writes
    (``registry.services_bulk.sourced_record_many(extra=...)``). The studies' upsert writes
    ``link_reason = LINK_PENDING`` on every active study (new or updated; a study entered in
    error keeps its reason) and returns the study ids, which the series' upsert joins by Study
    Instance UID. Rows with the same UID are written once (the last one wins), as
    ``upsert_returning`` does. ``finish`` (called with the rows) writes the audit rows and
    queues ``study_received`` after commit."""
    qn = connection.ops.quote_name
    study_table = qn(ImagingStudy._meta.db_table)
    rows = _study_rows(items)
    for row in rows:
        row["link_reason"] = LINK_PENDING if row["record_status"] == "active" else ""
    slot_of, unique = _dedupe(rows, ["study_instance_uid"])
    study_sql, study_records = _pg_insert_sql(
        ImagingStudy, unique, ["study_instance_uid"], STUDY_FIELDS, "", update_sql={
            "link_reason": f"CASE WHEN EXCLUDED.record_status = 'active' THEN "
                           f"EXCLUDED.link_reason ELSE {study_table}.link_reason END"})
    ctes = [f"studies AS ({study_sql}RETURNING id, (xmax = 0) AS inserted, "
            "study_instance_uid)"]
    params = [json_param(study_records)]
    series_rows = {  # by Series Instance UID: the last one wins
        s.series_instance_uid: {
            "series_instance_uid": s.series_instance_uid, "study_id": None,
            "modality": s.modality, "description": s.description, "number": s.number,
            "body_part": s.body_part, "instance_count": s.instance_count,
            "vbq_study_uid": item["study_instance_uid"]}
        for item in items for s in item.get("series", ())}
    if series_rows:
        series_sql, series_records = _pg_insert_sql(
            ImagingSeries, list(series_rows.values()), ["series_instance_uid"], SERIES_FIELDS,
            "", select={"study_id": "s.id"}, source=(
                "json_array_elements(%s::json) AS e CROSS JOIN LATERAL json_populate_record("
                f"NULL::{qn(ImagingSeries._meta.db_table)}, e) AS r JOIN studies AS s "
                "ON s.study_instance_uid = e->>'vbq_study_uid'"))
        for record, row in zip(series_records, series_rows.values(), strict=True):
            record["vbq_study_uid"] = row["vbq_study_uid"]
        ctes.append(f"series AS ({series_sql})")
        params.append(json_param(series_records))

    def finish(returned: Sequence[tuple[Any, bool, Any]]) -> list[tuple[Any, bool]]:
        written = {uid: (pk, bool(inserted)) for pk, inserted, uid in returned}
        results = _expand(slot_of, [written[row["study_instance_uid"]] for row in unique])
        _side_effects(results, rows, actor, queue_linking)
        return results

    return StatementPart(ctes=ctes, params=params,
                         select="SELECT id, inserted, study_instance_uid FROM studies",
                         finish=finish)


def _queue_studies(study_ids: list[Any]) -> None:
    """After commit: ``study_received`` for every study, in one message (Celery chunks) rather
    than one per study. A broker that is down is logged, not raised: the rows are committed."""
    from scoring.tasks import study_received

    try:
        if len(study_ids) == 1:
            study_received.delay(study_ids[0])
        else:
            # argsrepr/kwargsrepr given: Celery would otherwise walk every id to build them
            study_received.chunks([(pk,) for pk in study_ids], 100).apply_async(
                argsrepr=f"({len(study_ids)} studies)", kwargsrepr="{}")
    except Exception as exc:
        logger.warning("study_received not queued for %s study(ies): %s", len(study_ids),
                       type(exc).__name__)
