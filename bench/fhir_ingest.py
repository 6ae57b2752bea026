"""Benchmark: FHIR ingestion through the HTTP endpoint vs bare fhir.resources parsing.

Builds SYNTHETIC transaction bundles of ~100 entries (27 patients × Patient, procedure, MRI
study, fractures, therapy) totalling ≥ 20,000 resources (``BENCH_RESOURCES``), starts gunicorn
(2 workers) on 127.0.0.1 against its own PostgreSQL database, and posts the bundles from 2 client
threads. Every resource is new: each one is an INSERT (plus its audit row).

Baselines, measured in this process in the same run, alternating with the ingest in slices of
10 bundles so that both see the same machine load (the times are summed); a warm-up bundle set
(other patients, not counted) loads the model classes in the server workers and here first:
- ``bundle``: ``Bundle.model_validate_json`` of each payload — fhir.resources R4B parse and
  validation of the bundle, its entries and every resource in them (single thread);
- ``per-resource``: ``json.loads`` + ``model_validate`` of each entry's resource with its own
  R4B class — exactly the parse the endpoint does, and faster than the bundle-level parse.
Prints resources/s for the ingest and both baselines; the LAST line is
``ratio=<ingest throughput / bundle parse throughput>`` (target ≥ 0.5), and the line before it
gives the ratio against the stricter per-resource baseline too. The bundles are kept as JSON
text only: the Python objects they were built from are freed before anything is timed (alive,
their ~300,000 containers slowed every full garbage collection of the baseline parse).

What a bundle costs in the ingest (see docs/fhir.md, "How a transaction bundle is written"):
the per-resource parse above, then 6 PostgreSQL round trips for a bundle of new patients
(feed check, raw payload + BEGIN in one pipeline, patient/held lookup, every clinical row,
audit + due dates + the payload's outcome, COMMIT) and two Celery publishes. The ratio
depends on the other load on the machine (the ingest is a chain of processes waking each
other; the baseline is one busy thread): report the load average with the figures.

    .venv/bin/python bench/fhir_ingest.py
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DB_URL = os.environ.get("BENCH_DATABASE_URL",
                        "postgres://postgres@127.0.0.1:5432/vbq_bench_fhir")
TARGET = int(os.environ.get("BENCH_RESOURCES", "20000"))
SLICE = 10


def bundles(seed: int = 1, target: int = TARGET) -> list[dict]:
    from integrations.fhir.demo import demo_bundle
    from registry.demo import generate_demo_cohort

    out: list[dict] = []
    total = 0
    while total < target:
        cohort = generate_demo_cohort(27, seed=seed, today=dt.date(2026, 11, 1), recent=0)
        entries = []
        for p in cohort:
            old_key, p.key = p.key, f"SYN-{seed:04d}{p.key[4:]}"
            # fracture and therapy identifiers too, so that every resource is new (with the
            # demo keys they were the same 27 rows in every bundle: updates, and row locks
            # contended by the two workers)
            p.fractures = [dataclasses.replace(fx, key=p.key + fx.key[len(old_key):])
                           for fx in p.fractures]
            p.therapies = [dataclasses.replace(rx, key=p.key + rx.key[len(old_key):])
                           for rx in p.therapies]
            entries.extend(demo_bundle(p)["entry"])
        out.append({"resourceType": "Bundle", "type": "transaction", "entry": entries})
        total += len(entries)
        seed += 1
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    import psycopg

    name = DB_URL.rsplit("/", 1)[1]
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        c.execute(f'CREATE DATABASE "{name}"')
    env = {**os.environ, "DATABASE_URL": DB_URL, "DJANGO_SETTINGS_MODULE": "config.settings",
           "LOG_LEVEL": "WARNING", "VAR_DIR": tempfile.mkdtemp(prefix="vbq-bench-fhir-")}
    os.environ.update(env)
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env,
                   check=True)
    import django

    django.setup()
    from fhir.resources.R4B import get_fhir_model_class
    from fhir.resources.R4B.bundle import Bundle

    from registry.feeds import feed_create

    _, token = feed_create(name="bench-ehr")
    data = bundles()
    warmup = [json.dumps(b) for b in bundles(seed=9000, target=400)]
    payloads = [json.dumps(b) for b in data]
    n_resources = sum(len(b["entry"]) for b in data)
    # The bundles as Python objects are not needed any more: kept alive, their ~300,000
    # containers made every full garbage collection during the timed parse slower (a slower
    # baseline, a flattering ratio).
    del data
    gc.collect()

    def parse_bundles(chunk: list[str]) -> float:
        t0 = time.perf_counter()
        for payload in chunk:
            Bundle.model_validate_json(payload)
        return time.perf_counter() - t0

    def parse_resources(chunk: list[str]) -> float:
        t0 = time.perf_counter()
        for payload in chunk:
            for entry in json.loads(payload)["entry"]:
                resource = entry["resource"]
                get_fhir_model_class(resource["resourceType"]).model_validate(resource)
        return time.perf_counter() - t0

    parse_bundles(warmup)  # import and build every model class before timing
    parse_resources(warmup)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "config.wsgi", "-w", "2", "-b", f"127.0.0.1:{port}",
         "--timeout", "300", "--log-level", "warning"], cwd=ROOT, env=env)
    headers = {"Content-Type": "application/fhir+json", "Authorization": f"Bearer {token}"}
    errors: list[int] = []

    def ingest(chunk: list[str]) -> float:
        queue = list(chunk)
        lock = threading.Lock()

        def client() -> None:
            session = requests.Session()
            while True:
                with lock:
                    if not queue:
                        return
                    payload = queue.pop(0)
                r = session.post(f"http://127.0.0.1:{port}/fhir", data=payload, headers=headers,
                                 timeout=300)
                if r.status_code != 200:
                    errors.append(r.status_code)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0

    # The machine is shared: parse and ingest alternate in slices of SLICE bundles, so both
    # see the same load; the times are summed over the slices.
    parse_s = strict_s = ingest_s = 0.0
    try:
        for _ in range(100):
            try:
                requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except requests.RequestException:
                time.sleep(0.2)
        ingest(warmup)  # both workers load their model classes and connections (not counted)
        if errors:
            raise SystemExit(f"warm-up failed: {errors}")
        for start in range(0, len(payloads), SLICE):
            chunk = payloads[start:start + SLICE]
            parse_s += parse_bundles(chunk)
            strict_s += parse_resources(chunk)
            ingest_s += ingest(chunk)
    finally:
        server.terminate()
        server.wait(30)
    parse_rate, strict_rate = n_resources / parse_s, n_resources / strict_s
    ingest_rate = n_resources / ingest_s
    print(f"bundles={len(payloads)} resources={n_resources} "
          f"entries/bundle={n_resources / len(payloads):.0f} errors={len(errors)} "
          f"{dict(Counter(errors)) if errors else ''}"
          f"(alternating slices of {SLICE} bundles)")
    print(f"baseline bundle parse+validate (Bundle.model_validate_json): {parse_s:.2f} s = "
          f"{parse_rate:.0f} resources/s (1 thread)")
    print(f"baseline per-resource parse+validate (json.loads + model_validate): {strict_s:.2f} s "
          f"= {strict_rate:.0f} resources/s (1 thread)")
    print(f"HTTP ingest into PostgreSQL: {ingest_s:.2f} s = {ingest_rate:.0f} resources/s "
          "(gunicorn 2 workers, 2 clients, 2 cores shared with PostgreSQL)")
    print(f"ratio against the per-resource baseline: {ingest_rate / strict_rate:.2f}")
    ratio = ingest_rate / parse_rate
    print(f"ratio={ratio:.2f} ingest throughput / bare fhir.resources bundle parse throughput "
          f"({'meets' if ratio >= 0.5 and not errors else 'MISSES'} target >= 0.5)")


if __name__ == "__main__":
    main()
