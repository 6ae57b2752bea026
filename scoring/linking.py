"""Link an imaging study to the patient's index procedure (the pre-procedure lumbar MRI).

Rule (DESIGN.md): an MR study in the ``PRE_PROCEDURE_MRI_WINDOW_DAYS`` before the index
procedure (same day allowed); the nearest one wins. The reason is recorded either way.

Concurrency. Two transactions linking two studies of ONE patient at the same moment (two
ingests, an ingest and a ``study_received``) must not both link: under READ COMMITTED each
statement sees only what was committed when it started, so each linker would see the other's
link as absent and both studies would end linked to the index procedure (with a VBQ job each).
On PostgreSQL linking is therefore serialized per patient by a transaction-scoped advisory lock
(``pg_advisory_xact_lock``), taken by the statement that looks the index procedure up, which
linking does anyway (no extra round trip), and so BEFORE the statement that reads and writes the
links: that one starts after the lock is granted, i.e. after the other linker committed, and
sees its link. The lock is held until the transaction ends, or until the savepoint it was
taken in rolls back (``link_or_defer`` on failure), together with the link it protected.

Key: the two-int form, ``(LINK_LOCK_CLASS, first 32 bits of the patient UUID)``. No other code
here takes advisory locks; PostgreSQL keeps the two-int and the one-bigint key
spaces apart, and the class constant keeps any later two-int user apart if it picks another
class. Two patients sharing the 32 bits (about 1 in 4 billion per pair) only wait for each
other, which is harmless.

Deadlocks. Every caller holds the row lock of the study it links (its upsert, or
``study_received``'s ``SELECT .. FOR UPDATE``) before this module runs, and then waits here for
the patient's lock; the lock holder's link statement may UPDATE other studies of the patient
linked to the index procedure (to unlink them). So: B holds study Y's row and waits for the
patient's lock; A holds the lock and, linking a NEARER study X, must unlink Y, which is already
linked and is being linked again by B (a replayed ``study_received``, or a re-ingest of Y that
links inline) at the same moment: a cycle. PostgreSQL detects it (``deadlock_timeout``, 1 s) and
aborts one of them, normally B (the first to wait runs the check first). B aborted: an inline
link (``link_or_defer``) rolls back its savepoint, leaves Y ``LINK_PENDING`` and sends
``study_received``; a ``study_received`` raises and the outbox sweep (``vbq_requeue_stale``)
retries a pending study; either way A then completes and unlinks Y, which is the right end state
(X is nearer). A aborted instead: the same retry paths re-link X, after B found nothing nearer
than Y. So a deadlock costs a retry and a logged error, never a wrong link, and needs a re-link
of an already linked study racing a nearer study of the same patient. Avoiding it would mean
taking the patient's lock BEFORE the study's row lock, i.e. in the callers
(``scoring.services`` / ``scoring.tasks``), not here; not done. Likewise a transaction that
links studies of two patients in opposite order to another one can deadlock on the two patients'
locks, with the same outcome; callers link one study per transaction.

SQLite (the embedded demo) needs no lock: its writers are serialized by the database (IMMEDIATE
transactions), so the ORM path below runs with no other linker in between.
"""

from __future__ import annotations

import functools
import uuid
from typing import Any

from django.conf import settings
from django.db import connection

from db.pg import pg_execute
from registry.models import Procedure
from registry.selectors import index_procedure, index_procedure_query
from scoring.models import ImagingStudy

# Class (first key) of the per-patient linking lock: "VBQL" as a 32-bit integer.
LINK_LOCK_CLASS = int.from_bytes(b"VBQL", "big")

NEARER_LINKED = "a nearer pre-procedure MRI is already linked"
NEARER_ARRIVED = "a nearer pre-procedure MRI arrived"


def link_study(study: ImagingStudy) -> bool:
    """Set ``linked_procedure``/``link_reason``; return whether the study is linked."""
    if study.patient is None:
        study.link_reason = "no patient yet"
    elif "MR" not in (study.modality or "MR"):
        study.link_reason = f"modality {study.modality}, not MR"
    elif study.started_on is None:
        study.link_reason = "the study has no date"
    else:
        index = (_index_procedure_locking_pg(study.patient_id)
                 if connection.vendor == "postgresql" else index_procedure(patient=study.patient))
        if index is None:
            study.link_reason = "no index procedure yet"
        else:
            days = (index.performed_on - study.started_on).days
            window = settings.PRE_PROCEDURE_MRI_WINDOW_DAYS
            if not 0 <= days <= window:
                study.link_reason = (f"{days} days before the index procedure, outside the "
                                     f"0–{window} day window")
            else:
                reason = f"nearest lumbar MRI, {days} days before the procedure"
                if connection.vendor == "postgresql":
                    return _link_nearest_pg(study, index, reason)
                nearer = ImagingStudy.objects.filter(
                    patient=study.patient, linked_procedure=index, record_status="active",
                    started_on__gt=study.started_on, started_on__lte=index.performed_on,
                ).exclude(pk=study.pk).exists()
                if nearer:
                    study.link_reason = NEARER_LINKED
                else:
                    ImagingStudy.objects.filter(linked_procedure=index).exclude(
                        pk=study.pk).update(linked_procedure=None, link_reason=NEARER_ARRIVED)
                    study.linked_procedure = index
                    study.link_reason = reason
    if study.link_reason and study.linked_procedure_id and not study.link_reason.startswith(
        "nearest"
    ):
        study.linked_procedure = None
    study.save(update_fields=["linked_procedure", "link_reason"])
    return study.linked_procedure_id is not None


def _link_nearest_pg(study: ImagingStudy, index: Procedure, reason: str) -> bool:
    """The in-window case in ONE statement (was: an EXISTS, an UPDATE of the other studies and
    the study's own UPDATE): unless a nearer study of the patient is already linked to
    ``index``, the others linked to it are unlinked and this one is linked."""
    table = ImagingStudy._meta.db_table
    sql = f"""
        WITH nearer AS (
            SELECT EXISTS (SELECT 1 FROM {table}
                           WHERE patient_id = %(patient)s AND linked_procedure_id = %(index)s
                             AND record_status = 'active'
                             AND started_on > %(on)s AND started_on <= %(performed)s
                             AND id <> %(id)s) AS found),
        unlinked AS (
            UPDATE {table} SET linked_procedure_id = NULL, link_reason = %(arrived)s
            WHERE linked_procedure_id = %(index)s AND id <> %(id)s
              AND NOT (SELECT found FROM nearer))
        UPDATE {table}
        SET linked_procedure_id = CASE WHEN (SELECT found FROM nearer) THEN NULL
                                       ELSE %(index)s END,
            link_reason = CASE WHEN (SELECT found FROM nearer) THEN %(linked)s
                               ELSE %(reason)s END
        WHERE id = %(id)s
        RETURNING linked_procedure_id, link_reason::text
    """  # noqa: S608 (the table name from the model's metadata; values are parameters)

    # Prepared once per connection: run for every study an ingest links.
    [(linked_procedure_id, study.link_reason)] = pg_execute(sql, {
        "patient": study.patient_id, "index": index.pk, "on": study.started_on,
        "performed": index.performed_on, "id": study.pk, "arrived": NEARER_ARRIVED,
        "linked": NEARER_LINKED, "reason": reason}, prepare=True)
    study.linked_procedure = index if linked_procedure_id is not None else None
    return linked_procedure_id is not None


def link_lock_key(patient_id: Any) -> tuple[int, int]:
    """The two int4 keys of the patient's linking lock (see the module docstring)."""
    value = patient_id if isinstance(patient_id, uuid.UUID) else uuid.UUID(str(patient_id))
    return LINK_LOCK_CLASS, int.from_bytes(value.bytes[:4], "big", signed=True)


def _index_procedure_locking_pg(patient_id: Any) -> Procedure | None:
    """``index_procedure`` in the statement that also takes the patient's linking lock.

    The lock is the driving row of a ``LEFT JOIN LATERAL``, so it is taken whether or not the
    patient has an index procedure (a lock call in the procedure query's own WHERE or SELECT
    would run only for the rows the scan finds). The procedure is read in this statement's
    snapshot, taken before the lock was granted: a procedure recorded meanwhile is not seen,
    as before (``relink_after_procedures`` re-links then); the links are read by the next
    statement, after the lock.

    The statement's text is the same for every patient: it is built from the ORM's query once
    per process and prepared once per connection (building and compiling the query for every
    study was a measurable share of the ingest's CPU: docs/benchmarks.md)."""

    sql, template, slot = _index_statement()
    params = list(template)
    params[slot] = patient_id if isinstance(patient_id, uuid.UUID) else uuid.UUID(str(patient_id))
    [row] = pg_execute(sql, [*link_lock_key(patient_id), *params], prepare=True)
    if len(row) != len(_PROCEDURE_COLUMNS):  # the rule's query changed shape
        raise RuntimeError("index_procedure_query must select the Procedure's columns")
    if row[0] is None:  # the LEFT JOIN's NULL row: no index procedure
        return None
    # Django's own converters (``from_db_value``: the JSON ``levels`` arrive as text), as the
    # ORM applies them to a queryset's rows
    values = [field.from_db_value(value, None, connection)
              if value is not None and hasattr(field, "from_db_value") else value
              for field, value in zip(Procedure._meta.concrete_fields, row, strict=True)]
    return Procedure.from_db(connection.alias, _PROCEDURE_COLUMNS, values)


_PROCEDURE_COLUMNS = [f.attname for f in Procedure._meta.concrete_fields]


@functools.cache
def _index_statement() -> tuple[str, tuple[Any, ...], int]:
    """(sql, its parameters, the position of the patient id among them), built once."""
    probe = uuid.UUID(int=0)
    inner, params = index_procedure_query(patient_id=probe)[:1].query.sql_with_params()
    slots = [i for i, value in enumerate(params) if value == probe]
    if len(slots) != 1:  # the rule's query changed shape: fail loudly, not silently
        raise RuntimeError("index_procedure_query must take the patient id exactly once")
    sql = f"""
        SELECT p.* FROM (SELECT pg_advisory_xact_lock(%s, %s)) AS link_lock
        LEFT JOIN LATERAL ({inner}) AS p ON TRUE
    """  # noqa: S608 (``inner`` is the ORM's own SQL; values are parameters)
    return sql, tuple(params), slots[0]
