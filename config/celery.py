"""Celery application wired to Django settings (``CELERY_*`` keys) with task autodiscovery."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("vbq_registry")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
