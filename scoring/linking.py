"""Link an imaging study to the patient's index procedure (the pre-procedure lumbar MRI).

Rule (DESIGN.md): an MR study in the ``PRE_PROCEDURE_MRI_WINDOW_DAYS`` before the index
procedure (same day allowed); the nearest one wins. The reason is recorded either way.
"""

from __future__ import annotations

from django.conf import settings
from django.db import connection

from registry.models import Procedure
from registry.selectors import index_procedure
from scoring.models import ImagingStudy

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
        index = index_procedure(patient=study.patient)
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
                    patient=study.patient, linked_procedure=index,
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
        RETURNING linked_procedure_id, link_reason
    """  # noqa: S608 (the table name from the model's metadata; values are parameters)
    with connection.cursor() as cursor:
        cursor.execute(sql, {"patient": study.patient_id, "index": index.pk,
                             "on": study.started_on, "performed": index.performed_on,
                             "id": study.pk, "arrived": NEARER_ARRIVED,
                             "linked": NEARER_LINKED, "reason": reason})
        linked_procedure_id, study.link_reason = cursor.fetchone()
    study.linked_procedure = index if linked_procedure_id is not None else None
    return linked_procedure_id is not None
