"""Celery tasks of the registry core. Follow-up's tasks (``registry.followup_*``,
``registry.deliveries_send``) live in ``followup.tasks`` under their registered names."""

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
