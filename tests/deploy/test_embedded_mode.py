"""`make run`'s embedded default (SQLite, filesystem broker, no servers) end to end, in
subprocesses, whatever database the rest of the suite uses: the PostgreSQL fast paths (CTEs,
arrays, FOR UPDATE) each need their SQLite path, and only this test exercises them together.
Every patient is SYNTHETIC."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _manage(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"manage.py {' '.join(args)}:\n{done.stdout[-3000:]}" \
                                 f"\n{done.stderr[-5000:]}"
    return done.stdout


def test_the_embedded_default_loads_the_demo_cohort_through_fhir_and_sweeps(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in {"DATABASE_URL", "CELERY_BROKER_URL", "REDIS_URL", "REDIS_CACHE_URL"}}
    env.update({"DEMO_MODE": "true", "DEBUG": "true", "VAR_DIR": str(tmp_path / "var"),
                "LOG_LEVEL": "WARNING"})
    _manage(env, "migrate", "--noinput", "-v0")
    out = _manage(env, "demo_cohort", "--if-empty", "--patients", "20", "--phantoms", "2")
    assert "Loaded 20 SYNTHETIC patients through FHIR ingestion" in out
    _manage(env, "demo_cohort", "--if-empty", "--patients", "20")  # a second run adds nothing
    _manage(env, "followup_sweep")
    # The HTTP endpoint too (raw payload, outcome recording), twice: the replay adds nothing.
    post = (
        "import json; from django.test import Client; from registry.feeds import feed_create;"
        " _, token = feed_create(name='embedded-feed');"
        " body = open('tests/integrations/fhir/fixtures/transaction-vertebroplasty.json').read();"
        " c = Client(HTTP_AUTHORIZATION='Bearer ' + token);"
        " print([c.post('/fhir', data=body, content_type='application/fhir+json').status_code"
        " for _ in range(2)])")
    assert _manage(env, "shell", "-c", post).strip().splitlines()[-1] == "[200, 200]"
    databases = list((tmp_path / "var").glob("*.sqlite3"))
    assert len(databases) == 1, databases
    with sqlite3.connect(databases[0]) as db:
        assert db.execute("SELECT count(*) FROM registry_patient").fetchone()[0] == 21
        assert db.execute("SELECT count(*) FROM integrations_inboundmessage "
                          "WHERE status_code = 200").fetchone()[0] == 2
        assert db.execute("SELECT count(*) FROM registry_procedure").fetchone()[0] >= 20
        queued = db.execute("SELECT count(*) FROM scoring_vbqresult WHERE status = 'queued'"
                            ).fetchone()[0]
        assert queued >= 2  # the phantoms' jobs wait for the embedded worker
