"""`manage.py check --deploy` with a production environment reports nothing."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def check_deploy_output(tmp_path_factory) -> str:
    env = {
        **os.environ,
        "DEBUG": "false",
        "SECRET_KEY": secrets.token_urlsafe(64),
        "ALLOWED_HOSTS": "vbq.example.org",
        "CSRF_TRUSTED_ORIGINS": "https://vbq.example.org",
        "SECURE_SSL_REDIRECT": "true",
        "SECURE_COOKIES": "true",
        "SECURE_HSTS_SECONDS": "31536000",
        "SECURE_HSTS_PRELOAD": "true",
        "BEHIND_TLS_PROXY": "true",
        "LOG_FORMAT": "json",
        "VAR_DIR": str(tmp_path_factory.mktemp("var")),
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    return result.stdout + result.stderr


def test_check_deploy_reports_nothing_at_all_in_production_settings(check_deploy_output):
    """No security warning and no drf-spectacular warning: every API view is described."""
    issues = re.findall(r"\((security\.\w+|\w+\.[EW]\d+)\)", check_deploy_output)
    assert not issues, check_deploy_output
    assert "System check identified no issues" in check_deploy_output, check_deploy_output


def test_every_api_endpoint_the_pages_call_is_in_the_openapi_schema(admin_client):
    """The schema documents the alert operations, the report API, VBQ jobs and DICOM upload,
    each with a request body where it takes one and a typed response."""
    from django.urls import reverse

    schema = admin_client.get(reverse("api-schema"), {"format": "json"}).json()
    operations = {op["operationId"]: (path, method, op)
                  for path, item in schema["paths"].items()
                  for method, op in item.items()}
    wanted = {"alerts_list", "alert_acknowledge", "alert_assign", "alert_note", "alert_resolve",
              "alert_snooze", "alert_reopen", "report_retrieve", "vbq_jobs_list",
              "vbq_job_retrieve", "dicom_upload"}
    assert wanted <= set(operations), sorted(operations)
    for name in wanted - {"alerts_list", "report_retrieve", "vbq_jobs_list",
                          "vbq_job_retrieve"}:
        assert "requestBody" in operations[name][2], name
    for name in wanted:
        responses = operations[name][2]["responses"]
        ok = next(code for code in responses if code.startswith("2"))
        assert "content" in responses[ok], name
    resolve = schema["components"]["schemas"]["AlertResolveInput"]
    assert "reason" in resolve["required"]


def test_embedded_defaults_are_refused_by_check_deploy(tmp_path):
    """The laptop defaults (DEBUG, embedded key, no HTTPS) must not pass as production."""
    env = {**os.environ, "DEBUG": "true", "VAR_DIR": str(tmp_path)}
    env.pop("SECRET_KEY", None)
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode != 0
    assert "security.W018" in result.stderr + result.stdout  # DEBUG on
