"""Celery task metrics as structured log lines (ids and timings only).

Every finished task logs one ``celery.task`` record with ``task_name``, ``task_id``,
``state`` (SUCCESS / FAILURE / RETRY), ``runtime_ms`` and ``queue_wait_ms`` (time from publish
to start, when the message carries its publish time). With ``LOG_FORMAT=json`` these are
fields a log pipeline can aggregate into rates, error ratios and latency percentiles. Task
arguments are never logged (they are ids anyway, but results may not be).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import signals

logger = logging.getLogger("celery.task.metrics")
_started: dict[str, float] = {}


@signals.before_task_publish.connect
def _stamp_publish_time(headers: dict[str, Any] | None = None, **_: Any) -> None:
    if headers is not None:
        headers.setdefault("vbq_published_at", time.time())


@signals.task_prerun.connect
def _task_started(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if task_id:
        _started[task_id] = time.monotonic()
        published = getattr(getattr(task, "request", None), "vbq_published_at", None)
        if published:
            task.request.vbq_queue_wait_ms = round((time.time() - float(published)) * 1000)


@signals.task_postrun.connect
def _task_finished(
    task_id: str | None = None, task: Any = None, state: str | None = None, **_: Any
) -> None:
    started = _started.pop(task_id or "", None)
    extra: dict[str, Any] = {
        "task_name": getattr(task, "name", ""),
        "task_id": task_id,
        "state": state or "",
    }
    if started is not None:
        extra["runtime_ms"] = round((time.monotonic() - started) * 1000, 1)
    wait = getattr(getattr(task, "request", None), "vbq_queue_wait_ms", None)
    if wait is not None:
        extra["queue_wait_ms"] = wait
    logger.info("task %s %s", extra["task_name"], extra["state"], extra=extra)


@signals.setup_logging.connect
def _use_django_logging(**_: Any) -> None:
    """Workers and beat log through settings.LOGGING (JSON + PHI redaction), not Celery's own."""
    from logging.config import dictConfig

    from django.conf import settings

    dictConfig(settings.LOGGING)
