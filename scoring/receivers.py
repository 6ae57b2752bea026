"""Scoring's receivers of the registry core's events (``registry.events``), connected in
``ScoringConfig.ready``: the registry announces a write, scoring does its part in the same
transaction (the registry never imports scoring)."""

from __future__ import annotations

from typing import Any

from registry import events
from scoring.fractured import results_refresh_fractured
from scoring.models import ImagingStudy, VbqResult
from scoring.services import relink_after_procedures


def on_fractured_levels_changed(sender: Any, *, patient_ids: list[Any], actor: Any,
                                **kwargs: Any) -> None:
    """Recompute the fractured levels of the patients' VBQ results (``scoring.fractured``)."""
    results_refresh_fractured(patient_ids, actor=actor)


def on_procedures_recorded(sender: Any, *, patient_ids: list[Any], **kwargs: Any) -> None:
    """Link the patients' studies that are not linked yet (their index procedure may be new)."""
    relink_after_procedures(patient_ids)


def on_patient_merged(sender: Any, *, source: Any, target: Any, **kwargs: Any) -> None:
    """The merged-away patient's imaging studies and VBQ results move to the target."""
    for model in (ImagingStudy, VbqResult):
        model.objects.filter(patient=source).update(patient=target)


def connect() -> None:
    events.fractured_levels_changed.connect(on_fractured_levels_changed,
                                            dispatch_uid="scoring.fractured_levels")
    events.procedures_recorded.connect(on_procedures_recorded,
                                       dispatch_uid="scoring.relink_after_procedures")
    events.patient_merged.connect(on_patient_merged, dispatch_uid="scoring.patient_merged")
