"""Celery tasks of follow-up. Thin: they take ids and call the sweep.

The task names keep the ``registry.`` prefix they were registered with before follow-up had
its own package: queued messages and the beat schedule name them.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task

from followup.delivery import deliveries_send
from followup.sweep import followup_evaluate
from followup.sweep import followup_sweep as sweep

logger = logging.getLogger(__name__)

__all__ = ["deliveries_send", "followup_reevaluate", "followup_sweep", "queue_reevaluation"]


@shared_task(name="registry.followup_reevaluate", acks_late=True)
def followup_reevaluate(patient_id: str) -> dict:
    """Re-evaluate one patient's follow-up rules after new therapy, fractures, VBQ or death.
    Idempotent: evaluating twice gives the same alerts (unique unresolved alert per rule)."""
    stats = followup_evaluate([patient_id])
    return stats.__dict__


@shared_task(name="registry.followup_sweep")
def followup_sweep() -> dict:
    """The daily sweep: every patient whose follow-up date has come (see followup.sweep)."""
    return sweep().__dict__


def queue_reevaluation(sender: Any, *, patient_ids: list[str], **kwargs: Any) -> None:
    """Receiver of ``registry.events.followup_changed_committed`` (after commit): one
    re-evaluation per patient, one Celery message for many. A broker outage is logged, not
    raised: the patients are already due today, the sweep picks them up."""
    try:
        if len(patient_ids) == 1:
            followup_reevaluate.delay(patient_ids[0])
        else:  # one message for many patients (Celery chunks), not one per patient
            followup_reevaluate.chunks([(i,) for i in patient_ids], 100).apply_async(
                argsrepr=f"({len(patient_ids)} patients)", kwargsrepr="{}")
    except Exception as exc:  # broker down: the sweep picks the patients up
        logger.warning("followup_reevaluate not queued for %s patient(s): %s",
                       len(patient_ids), type(exc).__name__)
