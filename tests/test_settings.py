"""Settings come from the environment and refuse nonsense."""

import os
import subprocess
import sys

from tests.conftest import ROOT


def _settings_value(env: dict[str, str], expr: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c",
         f"import django; django.setup(); from django.conf import settings; print({expr})"],
        cwd=ROOT, env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", **env},
        capture_output=True, text=True, timeout=60,
    )


def test_clinical_knobs_are_read_from_the_environment():
    out = _settings_value(
        {"VBQ_HIGH_THRESHOLD": "2.8", "FOLLOWUP_DAYS": "90", "CLINIC_TIME_ZONE": "Europe/Paris",
         "VBQ_ALERT_VALUE": "all_levels"},
        "settings.VBQ_HIGH_THRESHOLD, settings.FOLLOWUP_DAYS, settings.CLINIC_TIME_ZONE, "
        "settings.VBQ_ALERT_VALUE",
    )
    assert out.stdout.strip() == "2.8 90 Europe/Paris all_levels", out.stderr


def test_field_strength_thresholds_and_the_trust_confidence_are_read_from_the_environment():
    expr = ("settings.VBQ_HIGH_THRESHOLD_1_5T, settings.VBQ_HIGH_THRESHOLD_3T, "
            "settings.VBQ_TRUST_MIN_CONFIDENCE")
    out = _settings_value({"VBQ_HIGH_THRESHOLD_3T": "2.6", "VBQ_TRUST_MIN_CONFIDENCE": "0.9"},
                          expr)
    assert out.stdout.strip() == "None 2.6 0.9", out.stderr  # unset: VBQ_HIGH_THRESHOLD applies


def test_an_unknown_vbq_alert_value_is_refused_at_startup():
    out = _settings_value({"VBQ_ALERT_VALUE": "median"}, "1")
    assert out.returncode != 0
    assert "VBQ_ALERT_VALUE" in out.stderr


def test_default_database_is_sqlite_under_var_and_broker_is_the_filesystem():
    env = {k: "" for k in ()}
    out = subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); from django.conf import settings; "
         "print(settings.DATABASES['default']['ENGINE'], settings.CELERY_BROKER_URL)"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={k: v for k, v in {**os.environ, **env}.items()
             if k not in {"DATABASE_URL", "CELERY_BROKER_URL"}}
        | {"DJANGO_SETTINGS_MODULE": "config.settings"},
    )
    assert out.stdout.split() == ["django.db.backends.sqlite3", "filesystem://"], out.stderr
