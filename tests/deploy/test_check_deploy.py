"""`manage.py check --deploy` with a production environment reports nothing."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.url_policy import UNDOCUMENTED_API_VIEWS

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


def test_check_deploy_reports_no_security_issue_in_production_settings(check_deploy_output):
    issues = re.findall(r"\((security\.\w+|\w+\.[EW]\d+)\)", check_deploy_output)
    issues = [i for i in issues if i != "drf_spectacular.W002"]
    assert not issues, check_deploy_output


def test_no_new_api_view_lacks_an_openapi_description(check_deploy_output):
    undocumented = set(
        re.findall(r"drf_spectacular\.W002\).*?Error \[(\w+)\]", check_deploy_output)
    )
    new = undocumented - UNDOCUMENTED_API_VIEWS
    assert not new, (
        f"API views drf-spectacular cannot describe: {sorted(new)}. Give them a "
        "serializer_class or @extend_schema (see tests/deploy/url_policy.py)."
    )


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
