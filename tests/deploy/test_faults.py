"""Fault tests: the broker and the database restart under load without losing or half-writing
anything.

- Redis crash (SIGKILL) with jobs queued and with a worker connected: a private redis-server
  with the compose configuration (append-only file); every job is done afterwards.
- PostgreSQL restart during ingest (a cohort load through the services, and FHIR bundles
  through gunicorn): nothing half-written, clients get a retryable error (dropped connection,
  503 + Retry-After, 409), the replay completes. These run against a PRIVATE throwaway
  cluster (initdb + pg_ctl on a free port), so they run everywhere; the same scenarios
  against the SHARED cluster are marked ``disruptive`` and run only with ``RUN_DISRUPTIVE=1``
  (CI sets it in .ci/run).
Worker SIGKILL (job done once) is covered by the imaging tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

from registry.models import Patient, WorkerProbe
from tests.conftest import CeleryWorker, test_database_url
from tests.redis_server import PrivateRedis, free_port

ROOT = Path(__file__).resolve().parents[2]
RUN_DISRUPTIVE = os.environ.get("RUN_DISRUPTIVE") == "1"
disruptive = pytest.mark.skipif(
    not RUN_DISRUPTIVE, reason="restarts the shared PostgreSQL; set RUN_DISRUPTIVE=1"
)


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
    redis = PrivateRedis(tmp_path, appendonly=True)
    redis.start()
    worker = None
    try:
        queued = _enqueue_probes(redis.url, 20)
        redis.kill()  # SIGKILL: no shutdown save; only the append-only file survives
        redis.start()
        # A message the worker held when Redis died sits in the transport's unacked set until
        # the visibility timeout re-delivers it (production: CELERY_VISIBILITY_TIMEOUT, 1 h).
        env = {**os.environ, "DATABASE_URL": test_database_url(),
               "CELERY_BROKER_URL": redis.url, "CELERY_VISIBILITY_TIMEOUT": "5",
               "PYTHONUNBUFFERED": "1"}
        worker = CeleryWorker(env, tmp_path / "worker.log", ["--pool", "solo"])
        worker.start()
        assert _wait_until(lambda: _done(queued) == len(queued), 60), _done(queued)

        # A crash while the worker is connected: it reconnects and finishes the rest. A message
        # the worker held at the crash stays in the transport's unacked set and is re-delivered
        # once the visibility timeout has passed, but kombu's Redis transport looks for overdue
        # messages only on every 10th tick of a 10 s timer (unacked_restore_throttle x
        # unacked_restore_interval): up to ~100 s, hence the long bound (met at once otherwise).
        #
        # One message can be LOST by the transport itself: the one whose BRPOP reply was in
        # flight when Redis died (Redis had removed it from the list, persisted; the worker
        # never received it; it was never in the unacked set). Seen in CI: 39 of 40 received,
        # the AOF holding neither the message nor an unacked entry. Real jobs do not depend on
        # the broker for this: queued VbqResult rows and "linking pending" studies are the
        # outbox the beat re-sends (tests/scoring/test_pipeline_faults.py). So here: every
        # other message is done, at most the one in flight is missing, and re-sending what is
        # missing, as the outbox does, completes them all.
        more = _enqueue_probes(redis.url, 20)
        redis.kill()
        time.sleep(1)
        redis.start()
        log = tmp_path / "worker.log"
        _wait_until(lambda: _done(more) == len(more), 150)
        missing = list(WorkerProbe.objects.filter(pk__in=more, done_at__isnull=True)
                       .values_list("pk", flat=True))
        assert len(missing) <= 1, (missing, log.read_text()[-2000:])  # solo pool, prefetch 1
        if missing:
            from config.celery import app
            from registry.tasks import worker_probe

            with app.connection_for_write(redis.url) as conn:
                for pk in missing:
                    worker_probe.apply_async(args=[pk], connection=conn)
        assert _wait_until(lambda: _done(more) == len(more), 60), (
            _done(more), log.read_text()[-2000:])
    finally:
        if worker:
            worker.stop()
        redis.kill()


def _pg_restart() -> None:
    """Restart the SHARED PostgreSQL cluster of this machine (disruptive)."""
    version = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
        check=True, timeout=120,
    )
    subprocess.run(["pg_isready", "-h", "127.0.0.1", "-t", "60"], check=True, timeout=90)


def _pg_bin() -> Path | None:
    root = Path("/usr/lib/postgresql")
    versions = sorted(root.iterdir(), reverse=True) if root.is_dir() else []
    for version in versions:
        if (version / "bin" / "initdb").is_file():
            return version / "bin"
    return None


class PrivatePostgres:
    """A throwaway PostgreSQL cluster on a free port, restartable without touching anyone."""

    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="vbq-fault-pg-", dir="/tmp"))
        self.data = self.dir / "data"
        self.as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/vbq"

    def _run(self, *args: str) -> None:
        subprocess.run([*self.as_postgres, *args], check=True, timeout=120,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def start(self) -> None:
        if self.as_postgres:
            self.dir.chmod(0o755)
            shutil.chown(self.dir, "postgres", "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                  "--auth=trust", "-E", "UTF8", "--no-sync")
        self._ctl("start")
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                  "-U", "postgres", "vbq")

    def _ctl(self, action: str) -> None:
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c max_connections=50")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-m", "fast",
                  "-w", "-l", str(self.dir / "log"), action)

    def restart(self) -> None:
        self._ctl("restart")

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._ctl("stop")
        shutil.rmtree(self.dir, ignore_errors=True)

    def query(self, sql: str) -> int:
        import psycopg

        with psycopg.connect(self.url.replace("postgres://", "postgresql://")) as conn:
            return conn.execute(sql).fetchone()[0]


INCOMPLETE_SQL = (
    "SELECT count(*) FROM registry_patient p WHERE NOT EXISTS "
    "(SELECT 1 FROM registry_procedure x WHERE x.patient_id = p.id)"
)
INCOMPLETE_VBQ_SQL = (
    "SELECT count(*) FROM registry_patient p WHERE NOT EXISTS "
    "(SELECT 1 FROM registry_procedure x WHERE x.patient_id = p.id) "
    "OR NOT EXISTS (SELECT 1 FROM scoring_vbqresult v WHERE v.patient_id = p.id)"
)


@pytest.fixture
def private_postgres(tmp_path):
    if _pg_bin() is None or (os.geteuid() == 0 and not shutil.which("runuser")):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed")
    cluster = PrivatePostgres()
    cluster.start()
    env = {**os.environ, "DATABASE_URL": cluster.url, "VAR_DIR": str(tmp_path),
           "CELERY_BROKER_URL": "filesystem://", "LOG_LEVEL": "WARNING"}
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v0"], cwd=ROOT,
                   env=env, check=True, timeout=300)
    try:
        yield cluster, env
    finally:
        cluster.stop()


def _load_restart_replay(env: dict[str, str], restart, count) -> None:
    """Load a cohort, restart PostgreSQL mid-way, check nothing is half-written, replay."""
    patients = 1500
    command = [sys.executable, "manage.py", "demo_cohort", "--patients", str(patients)]
    load = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        assert _wait_until(lambda: count("SELECT count(*) FROM registry_patient") >= 20, 120)
        restart()
        output = load.communicate(timeout=300)[0].decode(errors="replace")
    finally:
        if load.poll() is None:
            load.kill()
    assert load.returncode != 0, "the load finished before the restart: nothing was tested"
    assert "OperationalError" in output or "InterfaceError" in output, output[-2000:]
    assert count(INCOMPLETE_VBQ_SQL) == 0
    written = count("SELECT count(*) FROM registry_patient")
    assert 20 <= written < patients

    replay = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600, check=False)
    assert replay.returncode == 0, replay.stdout[-2000:] + replay.stderr[-2000:]
    assert count("SELECT count(*) FROM registry_patient") == patients
    assert count(INCOMPLETE_VBQ_SQL) == 0


@pytest.mark.slow
def test_postgres_restart_during_a_cohort_load_half_writes_nothing_and_replay_completes(
    private_postgres,
):
    cluster, env = private_postgres
    _load_restart_replay(env, cluster.restart, cluster.query)


_SEND_PROBE = ("from registry.models import WorkerProbe; from registry.tasks import worker_probe; "
               "p = WorkerProbe.objects.create(); worker_probe.delay(p.pk); print(p.pk)")
_OTHER_SESSIONS = ("SELECT coalesce(string_agg(pid::text || '@' || backend_start::text, ',' "
                   "ORDER BY pid), '') FROM pg_stat_activity WHERE datname = 'vbq' "
                   "AND pid <> pg_backend_pid()")


@pytest.mark.slow
def test_a_worker_reuses_its_database_connection_and_recovers_after_a_postgres_restart(
    private_postgres, tmp_path,
):
    """Workers keep their PostgreSQL connection between tasks (CELERY_DB_REUSE_MAX); a
    connection killed by a database restart is dropped and the next task still runs."""
    cluster, env = private_postgres
    env = {**env, "DB_CONN_MAX_AGE": "600", "LOG_LEVEL": "INFO"}  # INFO: the "ready." line
    worker = CeleryWorker(env, tmp_path / "worker.log", ["--pool", "solo"])
    worker.start()

    def send() -> int:
        out = subprocess.run([sys.executable, "manage.py", "shell", "-c", _SEND_PROBE],
                             cwd=ROOT, env=env, check=True, timeout=60, capture_output=True,
                             text=True)
        return int(out.stdout.strip().splitlines()[-1])

    def done(pk: int) -> bool:
        return cluster.query(
            f"SELECT count(*) FROM registry_workerprobe WHERE id = {pk} "  # noqa: S608
            "AND done_at IS NOT NULL") == 1

    log = tmp_path / "worker.log"
    try:
        first = send()
        assert _wait_until(lambda: done(first), 60), log.read_text()[-3000:]
        sessions = cluster.query(_OTHER_SESSIONS)
        assert sessions, "the worker holds no connection between tasks"
        second = send()
        assert _wait_until(lambda: done(second), 60), log.read_text()[-3000:]
        assert cluster.query(_OTHER_SESSIONS) == sessions  # the same backend served both
        cluster.restart()
        third = send()
        assert _wait_until(lambda: done(third), 60), log.read_text()[-3000:]
    finally:
        worker.stop()


def _shared_count(sql: str) -> int:
    from django.db import connection

    connection.close()  # a connection from before the restart is dead
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchone()[0]


@disruptive
@pytest.mark.disruptive
@pytest.mark.postgres
@pytest.mark.slow
def test_shared_postgres_restart_during_a_cohort_load_half_writes_nothing(
    transactional_db, tmp_path
):
    env = {**os.environ, "DATABASE_URL": test_database_url(), "VAR_DIR": str(tmp_path),
           "CELERY_BROKER_URL": "filesystem://", "LOG_LEVEL": "WARNING"}
    _load_restart_replay(env, _pg_restart, _shared_count)


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


def _fhir_restart_and_replay(env: dict[str, str], restart, count) -> None:
    """Post bundles through gunicorn, restart PostgreSQL mid-way, retry what failed."""
    from django.urls import Resolver404, resolve

    try:
        resolve("/fhir")
    except Resolver404:
        pytest.skip("the FHIR endpoint /fhir is not mounted")
    script = ("from registry.feeds import feed_create; "
              "print(feed_create(name='fault-feed-' + __import__('uuid').uuid4().hex)[1])")
    token = subprocess.run([sys.executable, "manage.py", "shell", "-c", script], cwd=ROOT,
                           env=env, check=True, capture_output=True, text=True,
                           timeout=120).stdout.strip().splitlines()[-1]
    port = free_port()
    server_env = {**env, "DEBUG": "false", "ALLOWED_HOSTS": "127.0.0.1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--config", "docker/gunicorn.conf.py", "--bind",
         f"127.0.0.1:{port}", "--workers", "2", "config.wsgi:application"],
        cwd=ROOT, env=server_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"}
    restarter = None
    try:
        assert _wait_until(lambda: _healthy(base), 60)
        keys = [uuid.uuid4().hex[:10].upper() for _ in range(60)]
        statuses: dict[str, int] = {}
        for i, key in enumerate(keys):
            if i == 15:
                restarter = threading.Thread(target=restart)
                restarter.start()
            try:
                response = requests.post(f"{base}/fhir", json=_fhir_bundle(key),
                                         headers=headers, timeout=30)
                statuses[key] = response.status_code
            except requests.RequestException:
                statuses[key] = 0  # connection dropped: also retryable
            time.sleep(0.05)
        if restarter:
            restarter.join(timeout=180)
        # Retryable: a dropped connection, 503 (database unavailable), 409 (transaction
        # conflict after the view's own retries).
        retryable = {0, 409, 503}
        assert any(s in retryable for s in statuses.values()), "the restart went unnoticed"
        assert all(s < 300 or s in retryable for s in statuses.values()), statuses
        assert count(INCOMPLETE_SQL) == 0, "half-written bundle"
        for key, status in statuses.items():
            if status in retryable:
                retried = requests.post(f"{base}/fhir", json=_fhir_bundle(key),
                                        headers=headers, timeout=30)
                assert retried.status_code < 300, retried.text[:300]
        assert count(INCOMPLETE_SQL) == 0
        assert count("SELECT count(DISTINCT patient_id) FROM registry_patientidentifier "
                     "WHERE value LIKE 'SYN-F%'") == len(keys)
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_fhir_clients_get_a_retryable_error_during_a_postgres_restart_and_replay_succeeds(
    private_postgres,
):
    cluster, env = private_postgres
    _fhir_restart_and_replay(env, cluster.restart, cluster.query)


@disruptive
@pytest.mark.disruptive
@pytest.mark.postgres
@pytest.mark.slow
def test_fhir_clients_survive_a_shared_postgres_restart(transactional_db, tmp_path):
    env = {**os.environ, "DATABASE_URL": test_database_url(), "VAR_DIR": str(tmp_path),
           "CELERY_BROKER_URL": "filesystem://", "LOG_LEVEL": "WARNING"}
    _fhir_restart_and_replay(env, _pg_restart, _shared_count)


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
    from registry.feeds import feed_create
    from registry.models import Procedure

    _, token = feed_create(name="replay-feed")
    client = Client(HTTP_AUTHORIZATION=f"Bearer {token}")
    key = uuid.uuid4().hex[:10].upper()
    for _ in range(2):
        response = client.post("/fhir", data=_fhir_bundle(key),
                               content_type="application/fhir+json")
        assert response.status_code == 200, response.content[:500]
    assert Patient.objects.filter(identifiers__value=f"SYN-F{key}").count() == 1
    assert Procedure.objects.filter(identifier_value=f"FAULT-{key}").count() == 1
