"""The PACS export settings: off unless an endpoint is named, read from the environment."""

import os
import subprocess
import sys

from tests.conftest import ROOT


def _settings(env: dict[str, str], expr: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c",
         f"import django; django.setup(); from django.conf import settings; print({expr})"],
        cwd=ROOT, env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", **env},
        capture_output=True, text=True, timeout=60)


EXPR = "settings.PACS_EXPORT_ENDPOINTS, 'pacs-exports' in settings.CELERY_BEAT_SCHEDULE"


def test_an_empty_endpoint_list_turns_the_export_and_its_sweep_off():
    out = _settings({"PACS_EXPORT_ENDPOINTS": ""}, EXPR)
    assert out.stdout.strip() == "[] False", out.stderr
    out = _settings({"PACS_EXPORT_ENDPOINTS": " , "}, EXPR)
    assert out.stdout.strip() == "[] False", out.stderr


def test_named_endpoints_are_trimmed_and_the_outbox_sweep_is_scheduled():
    out = _settings({"PACS_EXPORT_ENDPOINTS": " default , http://pacs.example/dicom-web/ "},
                    EXPR)
    assert out.stdout.strip() == "['default', 'http://pacs.example/dicom-web/'] True", out.stderr


def test_a_confidence_outside_0_to_1_is_refused_at_startup():
    out = _settings({"PACS_EXPORT_MIN_CONFIDENCE": "90"}, "1")
    assert out.returncode != 0
    assert "PACS_EXPORT_MIN_CONFIDENCE" in out.stderr
