"""Shared fixtures: service requirements, role users, a real Celery worker process."""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REQUIRE_SERVICES = os.environ.get("REQUIRE_SERVICES", "") in {"1", "true", "yes"}


def _missing(reason: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"REQUIRE_SERVICES=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("postgres"):
        from django.conf import settings

        if settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
            _missing("this test needs PostgreSQL (set DATABASE_URL=postgres://...)")
    if item.get_closest_marker("redis") and not os.environ.get("REDIS_URL"):
        _missing("this test needs Redis (set REDIS_URL=redis://...)")
    if item.get_closest_marker("rscript") and not _r_packages_present():
        _missing("this test needs Rscript with the R packages survival and pROC "
                 "(Debian: r-base-core r-cran-survival r-cran-proc)")


@functools.cache
def _r_packages_present() -> bool:
    if shutil.which("Rscript") is None:
        return False
    check = subprocess.run(
        ["Rscript", "-e", "quit(status = !all(sapply(c('survival', 'pROC'), "
         "requireNamespace, quietly = TRUE)))"],
        capture_output=True, timeout=60, check=False,
    )
    return check.returncode == 0


def _service_up(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def role_user(db, django_user_model):
    """Factory: a user in the given role group (``role_user("coordinator")``)."""
    from django.contrib.auth.models import Group

    from registry.roles import ensure_roles

    ensure_roles()

    def make(role: str, username: str | None = None):
        user = django_user_model.objects.create_user(
            username=username or f"user-{role}", password="a-long-test-password-1"
        )
        user.groups.add(Group.objects.get(name=role))
        return user

    return make


def test_database_url() -> str:
    """A DATABASE_URL pointing a subprocess at the pytest-django test database."""
    from django.db import connection

    s = connection.settings_dict
    if s["ENGINE"] == "django.db.backends.sqlite3":
        return f"sqlite:///{s['NAME']}"
    host = s.get("HOST") or "127.0.0.1"
    port = s.get("PORT") or 5432
    auth = s["USER"] + (f":{s['PASSWORD']}" if s.get("PASSWORD") else "")
    return f"postgres://{auth}@{host}:{port}/{s['NAME']}"


test_database_url.__test__ = False  # type: ignore[attr-defined]


class CeleryWorker:
    """A real ``celery worker`` subprocess sharing this test's database and broker."""

    def __init__(self, env: dict[str, str], log_path: Path, extra_args: list[str]) -> None:
        self.env = env
        self.log_path = log_path
        self.extra_args = extra_args
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "config", "worker", "--loglevel", "INFO",
             "--without-gossip", "--without-mingle", "--without-heartbeat", *self.extra_args],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited: {self.log_path.read_text()[-2000:]}")
            if b"ready." in self.log_path.read_bytes():
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready: {self.log_path.read_text()[-2000:]}")

    def stop(self, sig: int | None = None) -> None:
        if self.proc and self.proc.poll() is None:
            if sig is None:
                self.proc.terminate()
            else:
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()


@pytest.fixture
def celery_worker_process(transactional_db, tmp_path) -> Iterator[CeleryWorker]:
    """Start a real Celery worker (solo pool) on the configured broker and the test DB."""
    env = {
        **os.environ,
        "DATABASE_URL": test_database_url(),
        "PYTHONUNBUFFERED": "1",
    }
    worker = CeleryWorker(env, tmp_path / "worker.log", ["--pool", "solo"])
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()
