"""Fault tests: the broker and the database restart under load without losing or half-writing
anything.

- Redis restart: runs everywhere (a private redis-server with the compose configuration:
  append-only file), not disruptive.
- PostgreSQL restart during ingest: restarts the SHARED cluster, so it is marked
  ``disruptive`` and runs only with ``RUN_DISRUPTIVE=1`` (CI sets it in .ci/run).
Worker SIGKILL (job done once) is covered by the imaging tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from registry.models import Patient, WorkerProbe
from tests.conftest import CeleryWorker, test_database_url

ROOT = Path(__file__).resolve().parents[2]
RUN_DISRUPTIVE = os.environ.get("RUN_DISRUPTIVE") == "1"
disruptive = pytest.mark.skipif(
    not RUN_DISRUPTIVE, reason="restarts the shared PostgreSQL; set RUN_DISRUPTIVE=1"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private redis-server configured like docker/compose.yml (AOF on)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.directory), "--appendonly", "yes", "--appendfsync", "always",
             "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


def _wait_until(predicate, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.25)
    return predicate()


def _enqueue_probes(broker_url: str, count: int) -> list[int]:
    from config.celery import app
    from registry.tasks import worker_probe

    probes = [WorkerProbe.objects.create().pk for _ in range(count)]
    with app.connection_for_write(broker_url) as conn:
        for pk in probes:
            worker_probe.apply_async(args=[pk], connection=conn)
    return probes


def _done(probes: list[int]) -> int:
    return WorkerProbe.objects.filter(pk__in=probes, done_at__isnull=False).count()


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("redis-server"), reason="redis-server not installed")
def test_jobs_queued_before_a_redis_crash_are_all_done_after_it_restarts(
    transactional_db, tmp_path
):
    redis = RedisServer(tmp_path)
    redis.start()
    worker = None
    try:
        queued = _enqueue_probes(redis.url, 20)
        redis.kill()  # SIGKILL: no shutdown save; only the append-only file survives
        redis.start()
        env = {**os.environ, "DATABASE_URL": test_database_url(),
               "CELERY_BROKER_URL": redis.url, "PYTHONUNBUFFERED": "1"}
        worker = CeleryWorker(env, tmp_path / "worker.log", ["--pool", "solo"])
        worker.start()
        assert _wait_until(lambda: _done(queued) == len(queued), 60), _done(queued)

        # A crash while the worker is connected: it reconnects and finishes the rest.
        more = _enqueue_probes(redis.url, 20)
        redis.kill()
        time.sleep(1)
        redis.start()
        assert _wait_until(lambda: _done(more) == len(more), 90), (
            _done(more), (tmp_path / "worker.log").read_text()[-2000:]
        )
    finally:
        if worker:
            worker.stop()
        redis.kill()


def _pg_restart() -> None:
    version = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
        check=True, timeout=120,
    )
    subprocess.run(["pg_isready", "-h", "127.0.0.1", "-t", "60"], check=True, timeout=90)


def _incomplete_patients(*, require_vbq: bool = True) -> list[str]:
    """Patients written without their procedure (or VBQ result): a half-written load."""
    from django.db import connection

    connection.close()  # the old connection died with the restart
    return [
        str(p.pk)
        for p in Patient.objects.filter(is_synthetic=True).prefetch_related(
            "procedures", "vbq_results"
        )
        if not p.procedures.all() or (require_vbq and not p.vbq_results.all())
    ]


@disruptive
@pytest.mark.disruptive
@pytest.mark.postgres
@pytest.mark.slow
def test_postgres_restart_during_a_cohort_load_half_writes_nothing_and_replay_completes(
    transactional_db, tmp_path
):
    patients = 1500
    env = {**os.environ, "DATABASE_URL": test_database_url(), "VAR_DIR": str(tmp_path),
           "CELERY_BROKER_URL": "filesystem://", "LOG_LEVEL": "WARNING"}
    command = [sys.executable, "manage.py", "demo_cohort", "--patients", str(patients)]
    load = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        assert _wait_until(lambda: Patient.objects.count() >= 20, 120)
        _pg_restart()
        output = load.communicate(timeout=300)[0].decode(errors="replace")
    finally:
        if load.poll() is None:
            load.kill()
    assert load.returncode != 0, "the load finished before the restart: nothing was tested"
    assert "OperationalError" in output or "InterfaceError" in output, output[-2000:]
    assert _incomplete_patients() == []
    written = Patient.objects.count()
    assert 20 <= written < patients

    replay = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    assert replay.returncode == 0, replay.stdout[-2000:] + replay.stderr[-2000:]
    assert Patient.objects.count() == patients
    assert _incomplete_patients() == []


def _fhir_bundle(key: str) -> dict:
    return {
        "resourceType": "Bundle", "type": "transaction",
        "entry": [
            {"fullUrl": f"urn:uuid:{uuid.UUID(int=int(key, 16))}", "resource": {
                "resourceType": "Patient",
                "identifier": [{"system": "https://vbq-registry.example.org/fhir/sid/"
                                "synthetic-mrn", "value": f"SYN-F{key}"}],
                "name": [{"family": "SYNTHETIC", "given": [f"Fault{key}"]}],
                "gender": "female", "birthDate": "1950-01-01"},
             "request": {"method": "PUT", "url": "Patient?identifier=https://vbq-registry."
                         f"example.org/fhir/sid/synthetic-mrn|SYN-F{key}"}},
            {"fullUrl": f"urn:uuid:{uuid.UUID(int=int(key, 16) + 1)}", "resource": {
                "resourceType": "Procedure", "status": "completed",
                "identifier": [{"system": "https://ehr.example.org/procedure",
                                "value": f"FAULT-{key}"}],
                "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt",
                                     "code": "22511"}]},
                "subject": {"reference": f"urn:uuid:{uuid.UUID(int=int(key, 16))}"},
                "performedDateTime": "2026-06-01T10:00:00-04:00"},
             "request": {"method": "POST", "url": "Procedure"}},
        ],
    }


@disruptive
@pytest.mark.disruptive
@pytest.mark.postgres
@pytest.mark.slow
def test_fhir_clients_get_a_retryable_error_during_a_postgres_restart_and_replay_succeeds(
    transactional_db, tmp_path
):
    from django.urls import Resolver404, resolve

    try:
        resolve("/fhir")
    except Resolver404:
        pytest.skip("the FHIR endpoint /fhir is not mounted")
    from registry.services import feed_create

    _, token = feed_create(name="fault-feed")
    port = _free_port()
    env = {**os.environ, "DATABASE_URL": test_database_url(), "VAR_DIR": str(tmp_path),
           "CELERY_BROKER_URL": "filesystem://", "DEBUG": "false",
           "ALLOWED_HOSTS": "127.0.0.1", "LOG_LEVEL": "WARNING"}
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--config", "docker/gunicorn.conf.py", "--bind",
         f"127.0.0.1:{port}", "--workers", "2", "config.wsgi:application"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    try:
        assert _wait_until(lambda: _healthy(base), 60)
        keys = [uuid.uuid4().hex[:10].upper() for _ in range(60)]
        statuses: dict[str, int] = {}
        for i, key in enumerate(keys):
            if i == 15:
                restart = subprocess.Popen([sys.executable, "-c",
                                            "from tests.deploy.test_faults import _pg_restart;"
                                            "_pg_restart()"], cwd=ROOT, env=env)
            try:
                response = requests.post(f"{base}/fhir", json=_fhir_bundle(key),
                                         headers=headers, timeout=30)
                statuses[key] = response.status_code
            except requests.RequestException:
                statuses[key] = 0  # connection dropped: also retryable
            time.sleep(0.1)
        restart.wait(timeout=180)
        server_errors = {k: s for k, s in statuses.items() if s >= 500 and s != 503}
        assert not server_errors, f"non-retryable server errors: {server_errors}"
        # Retryable: a dropped connection, 503 (database unavailable), 409 (transaction
        # conflict after the view's own retries).
        retryable = {0, 409, 503}
        assert any(s in retryable for s in statuses.values()), "the restart went unnoticed"
        assert all(s < 300 or s in retryable for s in statuses.values()), statuses
        for key, status in statuses.items():
            if status in retryable:
                retried = requests.post(f"{base}/fhir", json=_fhir_bundle(key),
                                        headers=headers, timeout=30)
                assert retried.status_code < 300, retried.text[:300]
        assert _incomplete_patients(require_vbq=False) == []
        assert Patient.objects.filter(identifiers__value__startswith="SYN-F").count() == len(keys)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _healthy(base: str) -> bool:
    try:
        return requests.get(f"{base}/healthz", timeout=2).ok
    except requests.RequestException:
        return False


@pytest.mark.postgres
def test_the_fault_test_bundle_is_accepted_and_its_replay_writes_no_duplicate(db):
    from django.test import Client
    from django.urls import Resolver404, resolve

    try:
        resolve("/fhir")
    except Resolver404:
        pytest.skip("the FHIR endpoint /fhir is not mounted")
    from registry.models import Procedure
    from registry.services import feed_create

    _, token = feed_create(name="replay-feed")
    client = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
    key = uuid.uuid4().hex[:10].upper()
    for _ in range(2):
        response = client.post("/fhir", data=_fhir_bundle(key),
                               content_type="application/fhir+json")
        assert response.status_code == 200, response.content[:500]
    assert Patient.objects.filter(identifiers__value=f"SYN-F{key}").count() == 1
    assert Procedure.objects.filter(identifier_value=f"FAULT-{key}").count() == 1
