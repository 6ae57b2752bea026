"""A Celery task sent from the web process is executed by a real worker process."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.urls import reverse

from registry.models import WorkerProbe
from tests.conftest import ROOT, CeleryWorker, test_database_url

pytestmark = pytest.mark.slow


def _wait_done(probe_id: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if WorkerProbe.objects.filter(pk=probe_id, done_at__isnull=False).exists():
            return True
        time.sleep(0.2)
    return False


def test_task_sent_from_the_web_process_is_executed_by_the_worker(
    client, role_user, celery_worker_process
):
    client.force_login(role_user("admin"))
    response = client.post(reverse("ops-worker-probe"))
    assert response.status_code == 202
    probe_id = response.json()["probe_id"]
    assert _wait_done(probe_id), Path(celery_worker_process.log_path).read_text()[-3000:]
    status = client.get(reverse("ops-worker-probe-status", args=[probe_id])).json()
    assert status["done"] is True


def test_embedded_filesystem_broker_delivers_tasks_to_a_worker(transactional_db, tmp_path):
    """The `make run` default: kombu's filesystem transport, no broker server at all."""
    env = {
        **os.environ,
        "DATABASE_URL": test_database_url(),
        "CELERY_BROKER_URL": "filesystem://",
        "VAR_DIR": str(tmp_path / "var"),
        "PYTHONUNBUFFERED": "1",
    }
    probe = WorkerProbe.objects.create()
    worker = CeleryWorker(env, tmp_path / "worker.log", ["--pool", "solo"])
    worker.start()
    try:
        subprocess.run(  # a separate "web" process sends the task through the folder broker
            [sys.executable, "manage.py", "shell", "-c",
             f"from registry.tasks import worker_probe; worker_probe.delay({probe.pk})"],
            cwd=ROOT, env=env, check=True, timeout=60, capture_output=True,
        )
        assert _wait_done(probe.pk), (tmp_path / "worker.log").read_text()[-3000:]
    finally:
        worker.stop()
