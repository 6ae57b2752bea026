"""Celery tasks of the registry. Thin: they take ids and call services."""

from __future__ import annotations

import logging
import socket

from celery import shared_task
from django.utils import timezone

from registry.models import WorkerProbe

logger = logging.getLogger(__name__)


@shared_task(name="registry.worker_probe", acks_late=True)
def worker_probe(probe_id: int) -> None:
    """Mark a WorkerProbe as done: proves web → broker → worker → database works.
    Idempotent, and acknowledged late like the real jobs, so broker faults tests exercise the
    same re-delivery path as ``vbq_compute``."""
    WorkerProbe.objects.filter(pk=probe_id, done_at__isnull=True).update(
        done_at=timezone.now(), worker=socket.gethostname()
    )


@shared_task(name="registry.followup_reevaluate", acks_late=True)
def followup_reevaluate(patient_id: str) -> dict:
    """Re-evaluate one patient's follow-up rules after new therapy, fractures, VBQ or death.
    Idempotent: evaluating twice gives the same alerts (unique unresolved alert per rule)."""
    from registry.sweep import followup_evaluate

    stats = followup_evaluate([patient_id])
    return stats.__dict__


@shared_task(name="registry.followup_sweep")
def followup_sweep() -> dict:
    """The daily sweep: every patient whose follow-up date has come (see registry.sweep)."""
    from registry.sweep import followup_sweep as sweep

    return sweep().__dict__


@shared_task(name="registry.deliveries_send")
def deliveries_send() -> dict:
    """Send due outbox rows (in-app, email digest per care team, FHIR Communication)."""
    from integrations.notify.delivery import send_due_deliveries

    return send_due_deliveries()
