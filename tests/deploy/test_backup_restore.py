"""The documented backup procedure (docs/deployment.md "Backups") round-trips the registry:
pg_dump -Fc of a database holding the demo cohort, pg_restore into a fresh database, every
table has the same row count."""

from __future__ import annotations

import io
import os
import shutil
import subprocess

import psycopg
import pytest
from django.core.management import call_command
from django.db import connection

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

APP_LABELS = ("registry", "scoring", "integrations", "auth")


def _conninfo(dbname: str) -> dict[str, str]:
    s = connection.settings_dict
    return {
        "host": s.get("HOST") or "127.0.0.1",
        "port": str(s.get("PORT") or 5432),
        "user": s["USER"],
        "password": s.get("PASSWORD") or "",
        "dbname": dbname,
    }


def _libpq_env(info: dict[str, str]) -> dict[str, str]:
    env = {**os.environ, "PGHOST": info["host"], "PGPORT": info["port"], "PGUSER": info["user"]}
    if info["password"]:
        env["PGPASSWORD"] = info["password"]
    return env


def _row_counts(info: dict[str, str], tables: list[str]) -> dict[str, int]:
    with psycopg.connect(**{k: v for k, v in info.items() if v}) as conn:
        return {
            t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]  # noqa: S608 - names from introspection
            for t in tables
        }


@pytest.mark.skipif(not shutil.which("pg_dump"), reason="pg_dump not installed")
def test_pg_dump_and_pg_restore_reproduce_every_table(transactional_db, tmp_path):
    call_command("demo_cohort", patients=15, stdout=io.StringIO())
    tables = sorted(
        t for t in connection.introspection.table_names() if t.startswith(APP_LABELS)
    )
    source = _conninfo(connection.settings_dict["NAME"])
    restored = {**source, "dbname": source["dbname"] + "_restore"}
    env = _libpq_env(source)
    dump = tmp_path / "registry.dump"

    subprocess.run(
        ["pg_dump", "--format=custom", "--no-owner", "--file", str(dump), source["dbname"]],
        env=env, check=True, timeout=120,
    )
    subprocess.run(["dropdb", "--if-exists", restored["dbname"]], env=env, check=True, timeout=60)
    subprocess.run(["createdb", restored["dbname"]], env=env, check=True, timeout=60)
    try:
        subprocess.run(
            ["pg_restore", "--no-owner", "--exit-on-error", "--dbname", restored["dbname"],
             str(dump)],
            env=env, check=True, timeout=120,
        )
        before, after = _row_counts(source, tables), _row_counts(restored, tables)
    finally:
        subprocess.run(["dropdb", "--if-exists", restored["dbname"]], env=env, timeout=60,
                       check=False)
    assert before["registry_patient"] == 15
    assert before == after
