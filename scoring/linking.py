"""Link an imaging study to the patient's index procedure (the pre-procedure lumbar MRI).

Rule (DESIGN.md): an MR study in the ``PRE_PROCEDURE_MRI_WINDOW_DAYS`` before the index
procedure (same day allowed); the nearest one wins. The reason is recorded either way.
"""

from __future__ import annotations

from django.conf import settings

from registry.selectors import index_procedure
from scoring.models import ImagingStudy


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
                nearer = ImagingStudy.objects.filter(
                    patient=study.patient, linked_procedure=index,
                    started_on__gt=study.started_on, started_on__lte=index.performed_on,
                ).exclude(pk=study.pk).exists()
                if nearer:
                    study.link_reason = "a nearer pre-procedure MRI is already linked"
                else:
                    ImagingStudy.objects.filter(linked_procedure=index).exclude(
                        pk=study.pk).update(linked_procedure=None,
                                            link_reason="a nearer pre-procedure MRI arrived")
                    study.linked_procedure = index
                    study.link_reason = f"nearest lumbar MRI, {days} days before the procedure"
    if study.link_reason and study.linked_procedure_id and not study.link_reason.startswith(
        "nearest"
    ):
        study.linked_procedure = None
    study.save(update_fields=["linked_procedure", "link_reason"])
    return study.linked_procedure_id is not None
