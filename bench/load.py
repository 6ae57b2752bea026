"""Load test: gunicorn + PostgreSQL on 127.0.0.1, concurrent clients mixing FHIR bundle posts
(an EHR feed) and worklist reads (coordinators), for a bounded time.

    .venv/bin/python bench/load.py                 # 50 clients, 60 s, after a 10 s baseline
    .venv/bin/python bench/load.py --clients 20 --duration 15

Steps: (re)create the database ``vbq_bench_load`` (``BENCH_DATABASE_URL``), migrate, load a
SYNTHETIC demo cohort, create a coordinator login and a Feed token; start gunicorn
(``--workers``) with production settings (DEBUG off, Redis DB 9 as broker); run one client
alone (baseline p95), then ``--clients`` concurrently. Every non-2xx answer or exception is an
error. Prints throughput, p50/p95/max and errors per request kind; the LAST line is

    ratio=<p95 under load / p95 of the single-client baseline> ...

Targets: the FHIR endpoint is ``POST /fhir`` (a transaction Bundle, one new patient and
procedure each) and the worklist is ``GET /api/alerts/``. If either is not mounted yet the
script says so and falls back to ``GET /patients/`` reads for that share of the mix.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DB = "postgres://postgres@127.0.0.1:5432/vbq_bench_load"
PASSWORD = "bench-load-password-" + secrets.token_hex(8)


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    error_samples: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, seconds: float, error: str | None) -> None:
        with self.lock:
            self.latencies[kind].append(seconds)
            if error:
                self.errors[kind] += 1
                if len(self.error_samples) < 5:
                    self.error_samples.append(f"{kind}: {error}")

    def all_latencies(self) -> list[float]:
        return [x for values in self.latencies.values() for x in values]


def p95(values: list[float]) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[94]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_database(env: dict[str, str], patients: int) -> str:
    """Fresh database, migrations, demo cohort, a coordinator and a feed. Returns the token."""
    import psycopg

    url = env["DATABASE_URL"]
    name = url.rsplit("/", 1)[1]
    admin_url = url.rsplit("/", 1)[0].replace("postgres://", "postgresql://") + "/postgres"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    run = {"cwd": ROOT, "env": env, "check": True, "timeout": 600}
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v0"], **run)
    subprocess.run(
        [sys.executable, "manage.py", "demo_cohort", "--patients", str(patients)],
        **run, stdout=subprocess.DEVNULL,
    )
    script = (
        "from django.contrib.auth import get_user_model\n"
        "from django.contrib.auth.models import Group\n"
        "from registry.roles import ensure_roles\n"
        "from registry.feeds import feed_create\n"
        "ensure_roles()\n"
        f"u = get_user_model().objects.create_user('bench-coordinator', password='{PASSWORD}')\n"
        "u.groups.add(Group.objects.get(name='coordinator'))\n"
        "f = get_user_model().objects.create_user('bench-feed', password='x' * 20)\n"
        "f.groups.add(Group.objects.get(name='feed'))\n"
        "feed, token = feed_create(name='bench-feed')\n"
        "print('TOKEN=' + token)\n"
    )
    out = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", script], **run, capture_output=True,
        text=True,
    ).stdout
    return re.search(r"TOKEN=(\S+)", out)[1]


def start_gunicorn(env: dict[str, str], port: int, workers: int, log: Path) -> subprocess.Popen:
    with open(log, "wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--config", "docker/gunicorn.conf.py",
             "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
             "--access-logfile", "/dev/null", "config.wsgi:application"],
            cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gunicorn exited:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).ok:
                return proc
        except requests.RequestException:  # still booting
            pass
        time.sleep(0.3)
    proc.terminate()
    raise SystemExit("gunicorn did not answer /healthz in 60 s")


def login(base: str) -> requests.Session:
    session = requests.Session()
    session.get(f"{base}/accounts/login/", timeout=30)
    response = session.post(
        f"{base}/accounts/login/",
        data={"username": "bench-coordinator", "password": PASSWORD,
              "csrfmiddlewaretoken": session.cookies.get("csrftoken", "")},
        headers={"Referer": f"{base}/accounts/login/"}, timeout=30, allow_redirects=False,
    )
    if response.status_code != 302:
        raise SystemExit(f"login failed: HTTP {response.status_code}")
    return session


def fhir_bundle() -> dict:
    """A transaction Bundle: one SYNTHETIC patient and its vertebroplasty."""
    key = uuid.uuid4().hex[:10].upper()
    patient_ref = f"urn:uuid:{uuid.uuid4()}"
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": patient_ref,
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{
                        "system": "https://vbq-registry.example.org/fhir/sid/synthetic-mrn",
                        "value": f"SYN-L{key}",
                        "type": {"coding": [{
                            "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                            "code": "MR"}]},
                    }],
                    "name": [{"family": "SYNTHETIC", "given": [f"Load{key}"]}],
                    "gender": "female",
                    "birthDate": "1950-03-14",
                },
                "request": {
                    "method": "PUT",
                    "url": "Patient?identifier=https://vbq-registry.example.org/fhir/sid/"
                    f"synthetic-mrn|SYN-L{key}",
                },
            },
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": {
                    "resourceType": "Procedure",
                    "identifier": [{"system": "https://ehr.example.org/procedure",
                                    "value": f"LOAD-{key}"}],
                    "status": "completed",
                    "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt",
                                         "code": "22511",
                                         "display": "Vertebroplasty lumbosacral"}]},
                    "subject": {"reference": patient_ref},
                    "performedDateTime": "2026-06-01T10:00:00-04:00",
                    "bodySite": [{"text": "L1"}],
                },
                "request": {"method": "POST", "url": "Procedure"},
            },
        ],
    }


def probe_targets(base: str, token: str) -> tuple[str | None, str, list[str]]:
    """(fhir path or None, worklist path, notes) after checking what is mounted."""
    notes = []
    session = login(base)
    worklist = "/api/alerts/"
    if session.get(f"{base}{worklist}", timeout=30).status_code == 404:
        notes.append("worklist API /api/alerts/ not mounted: reading /patients/ instead")
        worklist = "/patients/"
    fhir: str | None = "/fhir"
    response = requests.post(
        f"{base}/fhir", json=fhir_bundle(), timeout=60,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/fhir+json"},
    )
    if response.status_code == 404:
        notes.append("FHIR endpoint /fhir not mounted: that share of the mix reads "
                     f"{worklist} instead")
        fhir = None
    elif response.status_code >= 400:
        notes.append(f"FHIR probe answered HTTP {response.status_code}: {response.text[:200]}")
    return fhir, worklist, notes


def client_loop(
    base: str, token: str, fhir: str | None, worklist: str, index: int, stop_at: float,
    stats: Stats,
) -> None:
    session = login(base)
    feed = requests.Session()
    feed.headers.update({"Authorization": f"Bearer {token}",
                         "Content-Type": "application/fhir+json"})
    n = 0
    while time.monotonic() < stop_at:
        # One in three clients is a feed posting bundles; the rest read the worklist.
        posting = fhir is not None and index % 3 == 0
        kind = "fhir-post" if posting else "worklist-get"
        started = time.monotonic()
        error = None
        try:
            if posting:
                response = feed.post(f"{base}{fhir}", json=fhir_bundle(), timeout=60)
            else:
                response = session.get(f"{base}{worklist}", params={"offset": n % 3 * 10},
                                       timeout=60)
            if response.status_code >= 400:
                error = f"HTTP {response.status_code} {response.text[:120]!r}"
        except requests.RequestException as exc:
            error = type(exc).__name__
        stats.record(kind, time.monotonic() - started, error)
        n += 1


def run_phase(base: str, token: str, fhir: str | None, worklist: str, clients: int,
              seconds: float) -> tuple[Stats, float]:
    stats = Stats()
    stop_at = time.monotonic() + seconds
    started = time.monotonic()
    threads = [
        threading.Thread(target=client_loop,
                         args=(base, token, fhir, worklist, i, stop_at, stats), daemon=True)
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 120)  # bounded even if a request hangs
    return stats, time.monotonic() - started


def report(label: str, stats: Stats, elapsed: float) -> None:
    total = len(stats.all_latencies())
    print(f"{label}: {total} requests in {elapsed:.1f} s = {total / elapsed:.1f} req/s, "
          f"errors {sum(stats.errors.values())}")
    for kind, values in sorted(stats.latencies.items()):
        print(f"  {kind:13s} n={len(values):6d} p50={statistics.median(values) * 1000:7.1f} ms "
              f"p95={p95(values) * 1000:7.1f} ms max={max(values) * 1000:7.1f} ms "
              f"errors={stats.errors[kind]}")
    for sample in stats.error_samples:
        print(f"  error sample: {sample}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--baseline", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--patients", type=int, default=200)
    args = parser.parse_args()

    var_dir = tempfile.mkdtemp(prefix="vbq-bench-load-")
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": os.environ.get("BENCH_DATABASE_URL", DEFAULT_DB),
        "CELERY_BROKER_URL": os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/9"),
        "DEBUG": "false",
        "SECRET_KEY": secrets.token_urlsafe(64),
        "ALLOWED_HOSTS": "127.0.0.1",
        "VAR_DIR": var_dir,
        "LOG_LEVEL": "WARNING",
        "LOGIN_RATE_LIMIT": "1000",
        "DB_CONN_MAX_AGE": "60",
    }
    print(f"setup: database {env['DATABASE_URL'].rsplit('@', 1)[-1]}, {args.patients} "
          f"patients, gunicorn {args.workers} workers on 127.0.0.1:{port}")
    token = setup_database(env, args.patients)
    server = start_gunicorn(env, port, args.workers, Path(var_dir) / "gunicorn.log")
    base = f"http://127.0.0.1:{port}"
    try:
        fhir, worklist, notes = probe_targets(base, token)
        for note in notes:
            print(f"note: {note}")
        baseline, baseline_elapsed = run_phase(base, token, fhir, worklist, 1, args.baseline)
        # The baseline client 0 is a feed when FHIR is up: add a reader so both kinds count.
        reader, reader_elapsed = run_phase(base, token, fhir, worklist, 2, args.baseline / 2)
        for kind, values in reader.latencies.items():
            if kind not in baseline.latencies:
                baseline.latencies[kind].extend(values)
        report("baseline (1 client)", baseline, baseline_elapsed + reader_elapsed)
        loaded, elapsed = run_phase(base, token, fhir, worklist, args.clients, args.duration)
        report(f"load ({args.clients} clients)", loaded, elapsed)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    errors = sum(loaded.errors.values())
    load_p95 = p95(loaded.all_latencies())
    base_p95 = p95(baseline.all_latencies())
    throughput = len(loaded.all_latencies()) / elapsed
    mix = "fhir-post+worklist" if fhir else f"{worklist} only (FHIR not mounted)"
    print(f"ratio={load_p95 / base_p95:.2f} p95 under {args.clients} clients "
          f"{load_p95 * 1000:.0f} ms / single-client p95 {base_p95 * 1000:.0f} ms; "
          f"throughput {throughput:.1f} req/s; errors {errors}; mix {mix}; worklist {worklist}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
