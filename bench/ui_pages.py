"""Benchmark: the worklist's first page with 10,000 open alerts (SYNTHETIC) in PostgreSQL.

Measures, in the same run, the server time of ``GET /worklist/`` as a coordinator (Django test
client: URL routing, middleware, session, queries, template) and a bare SQL query selecting the
same 25 rows (alert, patient, assignee, index-procedure day, MRN) in the same order (the
default sort). The page's lookup of the 25 patients' therapy records (the "Last therapy"
column) is a query of its own, counted in the page's time only. Prints both
medians; the last line is ``ratio=<page / bare query>``. Targets: page < 300 ms, ratio <= 3.

    .venv/bin/python bench/ui_pages.py          # DATABASE_URL defaults to .../vbq_bench_ui

The database is created if missing and filled once (re-runs reuse it). The machine is shared:
the two measurements alternate and the medians are kept.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/vbq_bench_ui")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
N = int(os.environ.get("BENCH_ALERTS", "10000"))
REPEATS = int(os.environ.get("BENCH_REPEATS", "21"))

BARE_SQL = """
SELECT a.id, a.rule_id, a.status, a.vbq_value, a.vbq_threshold, a.escalation_level, a.due_on,
       a.resolution_reason, a.resolved_at, p.id, p.family_name, p.given_name, p.birth_date,
       p.is_synthetic, u.username,
       (SELECT MIN(pr.performed_on) FROM registry_procedure pr
         WHERE pr.patient_id = a.patient_id AND pr.record_status = 'active') AS index_on,
       (SELECT i.value FROM registry_patientidentifier i
         WHERE i.patient_id = a.patient_id AND i.type_code = 'MR' ORDER BY i.id LIMIT 1) AS mrn
  FROM registry_alert a
  JOIN registry_patient p ON p.id = a.patient_id
  LEFT JOIN auth_user u ON u.id = a.assignee_id
 WHERE a.status IN ('open', 'acknowledged', 'snoozed')
 ORDER BY a.due_on ASC, a.escalation_level DESC, a.id ASC
 LIMIT 25
"""


def ensure_database() -> None:
    import psycopg

    name = os.environ["DATABASE_URL"].rsplit("/", 1)[1]
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as c:
        if not c.execute("SELECT 1 FROM pg_database WHERE datname=%s", (name,)).fetchone():
            c.execute(f'CREATE DATABASE "{name}"')


def fill(n: int) -> None:
    from django.db import transaction
    from django.utils import timezone

    from registry.models import Alert, Patient, PatientIdentifier, Procedure

    rng = random.Random(7)
    today = dt.date(2026, 11, 1)
    with transaction.atomic():
        for start in range(0, n, 5000):
            patients, ids, procs, alerts = [], [], [], []
            for i in range(start, min(n, start + 5000)):
                pid = uuid.uuid4()
                index = today - dt.timedelta(days=rng.randint(60, 400))
                patients.append(Patient(id=pid, family_name="SYNTHETIC", given_name=f"W{i}",
                                        birth_date=dt.date(1950, 1, 1) + dt.timedelta(
                                            days=rng.randint(0, 9000)),
                                        sex="female", is_synthetic=True,
                                        care_team="fracture-liaison"))
                ids.append(PatientIdentifier(patient_id=pid, system="bench-mrn",
                                             value=f"SYN-W{i:06d}", type_code="MR"))
                at = dt.datetime.combine(index, dt.time(10), tzinfo=dt.UTC)
                procs.append(Procedure(patient_id=pid, kind="vertebroplasty", code_system="cpt",
                                       code="22511", performed_at=at, performed_on=index,
                                       levels=["L1"], identifier_system="bench",
                                       identifier_value=f"WP{i}"))
                vbq = round(rng.uniform(3.0, 4.6), 2)
                alerts.append(Alert(patient_id=pid, rule_id="high-vbq-untreated-60d",
                                    status=rng.choice(["open", "open", "acknowledged"]),
                                    reason="SYNTHETIC bench", vbq_value=vbq, vbq_threshold=3.0,
                                    escalation_level=rng.choice([0, 0, 0, 1]),
                                    opened_at=timezone.now(),
                                    due_on=index + dt.timedelta(days=60),
                                    care_team="fracture-liaison"))
            Patient.objects.bulk_create(patients)
            PatientIdentifier.objects.bulk_create(ids)
            Procedure.objects.bulk_create(procs)
            Alert.objects.bulk_create(alerts)
            print(f"  loaded {min(n, start + 5000)} / {n}", flush=True)


def main() -> None:
    ensure_database()
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client

    from registry.models import OPEN_ALERT_STATUSES, Alert
    from registry.roles import ensure_roles

    call_command("migrate", verbosity=0)
    ensure_roles()
    have = Alert.objects.filter(status__in=OPEN_ALERT_STATUSES).count()
    if have < N:
        from registry.models import Patient

        Patient.objects.filter(given_name__startswith="W", family_name="SYNTHETIC").delete()
        print(f"filling {N} synthetic patients with an open alert ...", flush=True)
        fill(N)
        with connection.cursor() as cursor:
            cursor.execute("ANALYZE")
    user, _ = get_user_model().objects.get_or_create(username="bench-coordinator")
    user.groups.add(Group.objects.get(name="coordinator"))
    client = Client()
    client.force_login(user)

    def page() -> float:
        t0 = time.perf_counter()
        response = client.get("/worklist/")
        elapsed = time.perf_counter() - t0
        assert response.status_code == 200, response.status_code
        return elapsed

    def bare() -> float:
        t0 = time.perf_counter()
        with connection.cursor() as cursor:
            cursor.execute(BARE_SQL)
            rows = cursor.fetchall()
        elapsed = time.perf_counter() - t0
        assert len(rows) == 25
        return elapsed

    for _ in range(3):  # warm: imports, template cache, connection, plan cache
        page()
        bare()
    queries: list[str] = []

    def count(execute, sql, params, many, context):  # type: ignore[no-untyped-def]
        queries.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(count):
        html = client.get("/worklist/").content.decode()
    rows_on_page = html.count('<tr data-alert="')
    pages, bares = [], []
    for _ in range(REPEATS):
        pages.append(page())
        bares.append(bare())
    t_page, t_bare = statistics.median(pages), statistics.median(bares)
    open_alerts = Alert.objects.filter(status__in=OPEN_ALERT_STATUSES).count()
    print(f"open_alerts={open_alerts} rows_on_page={rows_on_page} "
          f"queries_per_page={len(queries)}")
    print(f"worklist_page_ms={t_page * 1000:.1f} bare_query_ms={t_bare * 1000:.1f} "
          f"(medians of {REPEATS}; min page {min(pages) * 1000:.1f} ms; "
          f"loadavg {os.getloadavg()[0]:.2f})")
    ratio = t_page / t_bare
    verdict = "meets" if t_page < 0.3 and ratio <= 3 else "MISSES"
    print(f"ratio={ratio:.2f} worklist first page / bare query of the same 25 rows "
          f"(page {t_page * 1000:.1f} ms; {verdict} target page<300 ms, ratio<=3)")


if __name__ == "__main__":
    main()
