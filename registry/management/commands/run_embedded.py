"""Run the embedded stack in one terminal: web server + Celery worker with embedded beat.

Used by ``make run``. The worker and beat use the broker from settings (by default kombu's
filesystem transport under ``var/``, so no server is needed). Ctrl-C stops everything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser


class Command(BaseCommand):
    help = "Start web (runserver) + Celery worker + beat for the embedded demo."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--addr", default="127.0.0.1:8000")

    def handle(self, *args, **options) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        python = sys.executable
        beat_schedule = str(settings.VAR_DIR / "celerybeat-schedule")
        procs = [
            subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                [python, "-m", "celery", "-A", "config", "worker", "--beat",
                 "--schedule", beat_schedule, "--loglevel", "INFO", "--concurrency", "2",
                 "--hostname", "embedded@%h"],
                env=env,
            ),
            subprocess.Popen(  # noqa: S603
                [python, "manage.py", "runserver", "--noreload", options["addr"]], env=env
            ),
        ]
        self.stdout.write(
            self.style.SUCCESS(
                f"\nVBQ Registry (embedded, SYNTHETIC demo data) at http://{options['addr']}/\n"
                "Log in as demo-coordinator / demo-password-change-me "
                "(also demo-clinician, demo-qi_analyst, demo-admin).\n"
            )
        )
        try:
            while all(p.poll() is None for p in procs):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
