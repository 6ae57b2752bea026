"""Celery application wired to Django settings (``CELERY_*`` keys) with task autodiscovery."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("vbq_registry")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Per-task timing/state log lines (config/task_metrics.py); importing connects the signals.
import config.task_metrics  # noqa: E402, F401
