"""Benchmark: the follow-up sweep on 1,000,000 SYNTHETIC index procedures over ten years.

Loads the registry with SQL (generate_series) into its own PostgreSQL database, runs the first
catch-up sweep (every patient due), then the next day's sweep, and prints both times, the query
plan of the due-patient claim, and the steady-state sweep's ratio to a bare
``SELECT count(*) FROM registry_procedure`` measured in the same run. Targets: ratio ≤ 1 (the
daily sweep never scans the registry) and catch-up within a few minutes.

    .venv/bin/python bench/followup_sweep.py            # BENCH_PROCEDURES=1000000 by default
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/vbq_bench_followup")
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
os.environ.setdefault("LOG_LEVEL", "WARNING")
N = int(os.environ.get("BENCH_PROCEDURES", "1000000"))


def ensure_database() -> None:
    import psycopg

    name = os.environ["DATABASE_URL"].rsplit("/", 1)[1]
    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        c.execute(f'CREATE DATABASE "{name}"')


LOAD_SQL = """
INSERT INTO registry_patient (id, family_name, given_name, birth_date, sex, care_team,
    is_synthetic, created_at, updated_at, followup_next_check_on)
SELECT md5('p' || g)::uuid, 'SYNTHETIC', 'B' || g, %(today)s::date - 25000 - (g %% 7000),
    CASE WHEN g %% 100 < 57 THEN 'female' ELSE 'male' END, 'fracture-liaison', true, now(),
    now(), %(today)s::date - (g %% 3650)
FROM generate_series(1, %(n)s) g;
INSERT INTO registry_procedure (patient_id, kind, code_system, code, code_display, performed_at,
    performed_on, levels, identifier_system, identifier_value, record_status, created_at,
    updated_at)
SELECT md5('p' || g)::uuid, 'vertebroplasty', 'http://www.ama-assn.org/go/cpt', '22511', '',
    (%(today)s::date - (g %% 3650))::timestamp + interval '15 hours',
    %(today)s::date - (g %% 3650), '["L1"]', 'bench', 'P' || g, 'active', now(), now()
FROM generate_series(1, %(n)s) g;
INSERT INTO scoring_vbqresult (patient_id, algorithm_version, source, revision, status,
    review_status, vbq_all_levels, vbq_excluding_fractured, qc_flags, fractured_levels,
    measurement, error_code, error_message, attempts, queued_at, review_note)
SELECT md5('p' || g)::uuid, 'bench', 'imported', 0, 'succeeded', 'accepted',
    2.0 + (abs(hashtext('v' || g)) %% 25) / 10.0,
    2.0 + (abs(hashtext('v' || g)) %% 25) / 10.0, '[]', '[]', '{}', '', '', 0, now(), ''
FROM generate_series(1, %(n)s) g WHERE abs(hashtext('m' || g)) %% 10 <> 0;
INSERT INTO registry_therapyexposure (patient_id, agent, kind, status, route, rxnorm_code,
    atc_code, start_on, identifier_system, identifier_value, record_status, created_at,
    updated_at)
SELECT md5('p' || g)::uuid, 'alendronate', 'order', 'active', 'oral', '', '',
    %(today)s::date - (g %% 3650) + 30, 'bench', 'R' || g, 'active', now(), now()
FROM generate_series(1, %(n)s) g
WHERE abs(hashtext('t' || g)) %% 3 = 0 AND (g %% 3650) >= 30;
ANALYZE;
"""


def main() -> None:
    reuse = os.environ.get("BENCH_REUSE") == "1"
    if not reuse:
        ensure_database()
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from registry.models import Alert
    from registry.sweep import followup_sweep
    from registry.timeutil import clinic_today

    call_command("migrate", verbosity=0)
    today = clinic_today()
    if reuse:
        # Re-measure the steady state on an already loaded and caught-up database: the next
        # date on which some patients are due plays "tomorrow".
        from registry.models import Patient

        catch_up_s = float(os.environ.get("BENCH_CATCH_UP_S", "nan"))
        nxt = (Patient.objects.filter(followup_next_check_on__isnull=False)
               .order_by("followup_next_check_on").values_list("followup_next_check_on",
                                                               flat=True).first())
        today = (nxt or today) - dt.timedelta(days=1)
        print(f"reusing the loaded database; steady-state day {today + dt.timedelta(days=1)}")
    else:
        t0 = time.perf_counter()
        with connection.cursor() as cursor:
            cursor.execute("SET session_replication_role = replica")  # skip birth triggers
            cursor.execute(LOAD_SQL, {"today": today, "n": N})
            cursor.execute("SET session_replication_role = DEFAULT")
        print(f"loaded {N} synthetic index procedures in {time.perf_counter() - t0:.1f} s",
              flush=True)
        t0 = time.perf_counter()
        catch_up = followup_sweep(today=today)
        catch_up_s = time.perf_counter() - t0
        print(f"catch-up sweep: {catch_up_s:.1f} s, {catch_up}", flush=True)

    with connection.cursor() as cursor:
        # What autovacuum does after a mass change; the catch-up just wrote ~10 % new rows.
        cursor.execute("ANALYZE")
        cursor.execute(
            "EXPLAIN SELECT id FROM registry_patient WHERE followup_next_check_on <= %s "
            "ORDER BY followup_next_check_on LIMIT 1000 FOR UPDATE SKIP LOCKED",
            [today + dt.timedelta(days=1)])
        plan = "\n".join(r[0] for r in cursor.fetchall())
    print("plan of the due-patient claim:\n" + plan)

    def count_all() -> float:
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            with connection.cursor() as cursor:
                cursor.execute("SELECT count(*) FROM registry_procedure")
                cursor.fetchone()
            best = min(best, time.perf_counter() - t)
        return best

    count_s = count_all()
    alerts_before = Alert.objects.count()
    t0 = time.perf_counter()
    next_day = followup_sweep(today=today + dt.timedelta(days=1))
    steady_s = time.perf_counter() - t0
    print(f"next-day sweep: {steady_s * 1000:.0f} ms, {next_day}; "
          f"alerts {alerts_before} -> {Alert.objects.count()}")
    print(f"bare count(*) over {N} procedures: {count_s * 1000:.0f} ms")
    uses_index = "patient_followup_due_idx" in plan
    ratio = steady_s / count_s
    verdict = "meets" if ratio <= 1 and uses_index and catch_up_s < 300 else "MISSES"
    print(f"ratio={ratio:.2f} next-day sweep time / bare count(*) (catch-up {catch_up_s:.0f} s, "
          f"index used: {uses_index}; {verdict} target ratio<=1, catch-up < 5 min)")


if __name__ == "__main__":
    main()
