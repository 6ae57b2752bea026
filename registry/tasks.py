"""Celery tasks of the registry. Thin: they take ids and call services."""

import socket

from celery import shared_task
from django.utils import timezone

from registry.models import WorkerProbe


@shared_task(name="registry.worker_probe")
def worker_probe(probe_id: int) -> None:
    """Mark a WorkerProbe as done: proves web → broker → worker → database works."""
    WorkerProbe.objects.filter(pk=probe_id, done_at__isnull=True).update(
        done_at=timezone.now(), worker=socket.gethostname()
    )


@shared_task(name="registry.followup_reevaluate")
def followup_reevaluate(patient_id: str) -> None:
    """Re-evaluate a patient's follow-up rules after new therapy, fractures or VBQ.

    Placeholder until the follow-up rules land.
    """
