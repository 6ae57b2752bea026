"""Celery application wired to Django settings (``CELERY_*`` keys) with task autodiscovery."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("vbq_registry")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Per-task timing/state log lines (config/task_metrics.py); importing connects the signals.
# With CELERY_DB_REUSE_MAX the Django fixup keeps the worker's database connection between
# tasks; Django's own request-cycle rule still applies around each task: a connection past
# CONN_MAX_AGE, or broken (the database was restarted), is closed and reopened on next use.
# Eager tasks run inside their caller's transaction and are left alone.
from celery.signals import (  # noqa: E402
    task_postrun,
    task_prerun,
    worker_init,
    worker_process_init,
)

import config.task_metrics  # noqa: E402, F401
from config import worker_memory  # noqa: E402


@task_prerun.connect
@task_postrun.connect
def _close_old_db_connections(sender=None, **kwargs) -> None:  # type: ignore[no-untyped-def]
    if getattr(getattr(sender, "request", None), "is_eager", False):
        return
    from django.db import close_old_connections

    close_old_connections()


@worker_init.connect
@worker_process_init.connect
def _tune_worker_malloc(**kwargs) -> None:  # type: ignore[no-untyped-def]
    """glibc malloc settings of config/worker_memory.py in the worker's process (``worker_init``:
    the solo and threads pools run tasks in it; ``worker_process_init``: each prefork child)."""
    from django.conf import settings

    if settings.WORKER_MALLOC_TUNING:

        worker_memory.tune_malloc()
