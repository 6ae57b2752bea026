"""Run the test suite against whatever real services this machine has.

- ``DATABASE_URL`` unset: PostgreSQL on 127.0.0.1:5432 if it answers, else SQLite (tests marked
  ``postgres`` then skip with a reason). ``REDIS_URL`` likewise for Redis.
- ``REQUIRE_SERVICES=1`` (CI): a missing service makes those tests fail instead of skip.
- Test runs get their own ``VAR_DIR`` (broker folder, SQLite test file, DICOM store), so they
  never touch the demo's ``var/``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.5):
            return True
    except OSError:
        return False


def main() -> int:
    env = dict(os.environ)
    db_name = env.get("TEST_DB_NAME", "vbq")
    if "DATABASE_URL" not in env:
        if _reachable("127.0.0.1", 5432):
            env["DATABASE_URL"] = f"postgres://postgres@127.0.0.1:5432/{db_name}"
        else:
            print("run_tests: PostgreSQL not reachable; using SQLite (postgres tests skip)")
    if "REDIS_URL" not in env and _reachable("127.0.0.1", 6379):
        env["REDIS_URL"] = "redis://127.0.0.1:6379/15"
    env.setdefault("VAR_DIR", tempfile.mkdtemp(prefix="vbq-test-var-"))
    env.setdefault("SECRET_KEY", "test-only-secret-key-not-for-production-0123456789abcdefgh")
    print(
        "run_tests: DATABASE_URL={} REDIS_URL={} VAR_DIR={} REQUIRE_SERVICES={}".format(
            env.get("DATABASE_URL", "sqlite").split("@")[-1],
            env.get("REDIS_URL", "-"),
            env["VAR_DIR"],
            env.get("REQUIRE_SERVICES", "0"),
        )
    )
    cmd = [sys.executable, "-m", "pytest", *sys.argv[1:]]
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
