"""Static validation of docker/: no Docker engine runs here, so the files are checked as data."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yml").read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]
APP_SERVICES = ["migrate", "web", "worker", "beat", "dicom-receiver"]
INFRA_SERVICES = ["postgres", "redis", "orthanc"]
SETTINGS_SOURCE = (ROOT / "config" / "settings.py").read_text()
GUNICORN_CONF = (DOCKER / "gunicorn.conf.py").read_text()
DOCKERFILE = (DOCKER / "Dockerfile").read_text()

# Variables in env.example that configure the containers, not Django, and who reads them.
CONTAINER_ONLY = {
    "POSTGRES_DB": "compose.yml",
    "POSTGRES_USER": "compose.yml",
    "POSTGRES_PASSWORD": "compose.yml",
    "WEB_CONCURRENCY": "gunicorn.conf.py",
    "GUNICORN_MAX_REQUESTS": "gunicorn.conf.py",
    "GUNICORN_MAX_WORKER_MEMORY_MB": "gunicorn.conf.py",
}
# Settings production cannot run without (and the secure-deploy ones): must be in env.example.
REQUIRED_IN_PRODUCTION = {
    "DEBUG", "SECRET_KEY", "ALLOWED_HOSTS", "CSRF_TRUSTED_ORIGINS", "DATABASE_URL",
    "CELERY_BROKER_URL", "REDIS_CACHE_URL", "SECURE_SSL_REDIRECT", "SECURE_COOKIES",
    "SECURE_HSTS_SECONDS", "BEHIND_TLS_PROXY", "LOG_FORMAT", "PACS_DICOMWEB_URL", "SITE_URL",
    "DICOM_SCP_BIND",
}
# Containers have their own storage locations: set by the Dockerfile, not env.example.
SET_BY_DOCKERFILE = {"VAR_DIR", "STATIC_ROOT", "MEDIA_ROOT", "DICOM_STORAGE_ROOT"}


def env_example() -> dict[str, str]:
    values = {}
    for line in (DOCKER / "env.example").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"env.example line without '=': {line!r}"
            values[key] = value
    return values


def settings_env_vars() -> set[str]:
    """Every variable config/settings.py reads through django-environ."""
    pattern = re.compile(r"""env(?:\(\))?(?:\.\w+)?\(\s*["']([A-Z][A-Z0-9_]*)["']""")
    found = set(pattern.findall(SETTINGS_SOURCE))
    found |= set(re.findall(r"""Env\(\)\.\w+\(\s*["']([A-Z][A-Z0-9_]*)["']""", SETTINGS_SOURCE))
    return found


def command_of(service: str) -> list[str]:
    command = SERVICES[service].get("command")
    return shlex.split(command) if isinstance(command, str) else list(command or [])


def test_compose_declares_every_service_of_the_stack():
    assert set(APP_SERVICES + INFRA_SERVICES) <= set(SERVICES)


@pytest.mark.parametrize("service", APP_SERVICES + INFRA_SERVICES)
def test_every_long_running_service_has_a_health_check(service):
    if service == "migrate":
        assert SERVICES[service]["restart"] == "no"
        return
    check = SERVICES[service].get("healthcheck", {})
    assert check.get("test"), f"{service} has no healthcheck"
    test = check["test"]
    if test[0] == "CMD" and test[1:3] == ["python", "-c"]:
        compile(test[3], f"{service}-healthcheck", "exec")


def test_depends_on_names_only_services_that_exist():
    for name, service in SERVICES.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"


@pytest.mark.parametrize("service", ["migrate", "dicom-receiver"])
def test_manage_py_commands_of_services_exist(service):
    from django.core.management import get_commands

    command = command_of(service)
    assert command[:2] == ["python", "manage.py"]
    name = command[2]
    if name not in get_commands():
        pytest.skip(f"`manage.py {name}` is not in the tree yet (imaging is writing it)")
    assert name in get_commands()


@pytest.mark.parametrize("service", ["worker", "beat"])
def test_celery_services_point_at_the_project_celery_app(service):
    from celery import Celery

    command = command_of(service)
    assert command[:3] == ["celery", "-A", "config"]
    assert command[3] in {"worker", "beat"}
    module = importlib.import_module("config.celery")
    assert isinstance(module.app, Celery)


def test_beat_schedule_names_only_registered_tasks():
    from django.conf import settings

    from config.celery import app

    app.loader.import_default_modules()
    for entry in settings.CELERY_BEAT_SCHEDULE.values():
        assert entry["task"] in app.tasks, f"beat schedules unknown task {entry['task']}"


def test_web_service_runs_gunicorn_on_the_wsgi_application():
    command = command_of("web")
    assert command[0] == "gunicorn"
    config_file = command[command.index("--config") + 1]
    assert (ROOT / config_file).is_file()
    module_name, attr = command[-1].split(":")
    assert callable(getattr(importlib.import_module(module_name), attr))
    assert DOCKERFILE.strip().splitlines()[-1].startswith('CMD ["gunicorn"')


def test_every_env_example_variable_is_a_real_setting_or_a_container_variable():
    read_by_settings = settings_env_vars()
    unknown = []
    for key in env_example():
        if key in read_by_settings:
            continue
        reader = CONTAINER_ONLY.get(key)
        if reader is None or key not in (DOCKER / reader).read_text():
            unknown.append(key)
    assert not unknown, f"env.example sets variables nothing reads: {unknown}"


def test_every_required_production_setting_is_in_env_example():
    assert settings_env_vars() >= REQUIRED_IN_PRODUCTION, "required list names a non-setting"
    missing = REQUIRED_IN_PRODUCTION - set(env_example())
    assert not missing, f"env.example lacks required production settings: {sorted(missing)}"


def test_storage_locations_come_from_the_dockerfile_and_are_real_settings():
    assert settings_env_vars() >= SET_BY_DOCKERFILE
    for key in SET_BY_DOCKERFILE:
        assert re.search(rf"\b{key}=/app/", DOCKERFILE), f"Dockerfile does not set {key}"


def test_compose_interpolates_only_variables_from_env_example():
    raw = (DOCKER / "compose.yml").read_text()
    used = set(re.findall(r"(?<!\$)\$\{([A-Z][A-Z0-9_]*)", raw))
    assert used <= set(env_example()), f"compose uses unset variables: {used - set(env_example())}"


def test_service_urls_in_env_example_point_at_compose_services_and_ports():
    env = env_example()
    database = urlparse(env["DATABASE_URL"])
    assert database.hostname == "postgres"
    assert database.port == 5432
    assert database.username == env["POSTGRES_USER"]
    assert database.path.lstrip("/") == env["POSTGRES_DB"]
    for key in ("CELERY_BROKER_URL", "REDIS_CACHE_URL"):
        url = urlparse(env[key])
        assert (url.hostname, url.port) == ("redis", 6379), key
    assert env["CELERY_BROKER_URL"] != env["REDIS_CACHE_URL"], "cache and broker share a DB"
    pacs = urlparse(env["PACS_DICOMWEB_URL"])
    assert pacs.hostname == "orthanc"
    assert pacs.port == 8042


def test_published_ports_match_what_the_processes_listen_on():
    env = env_example()
    assert SERVICES["web"]["ports"] == ["8000:8000"]
    assert '"0.0.0.0:8000"' in GUNICORN_CONF
    port = env["DICOM_SCP_PORT"]
    assert SERVICES["dicom-receiver"]["ports"] == [f"{port}:{port}"]
    # A published port reaches only a process listening on all interfaces of the container.
    assert env["DICOM_SCP_BIND"] == "0.0.0.0"  # noqa: S104 - inside the container
    assert '"GUNICORN_BIND", "0.0.0.0:8000"' in GUNICORN_CONF
    assert re.search(rf"DICOM_SCP_PORT.*default={port}\b", SETTINGS_SOURCE)
    for name in INFRA_SERVICES:
        assert "ports" not in SERVICES[name], f"{name} must stay on the internal network"
    exposed = re.search(r"^EXPOSE (.+)$", DOCKERFILE, re.MULTILINE)
    assert exposed
    assert set(exposed[1].split()) == {"8000", port}


def test_every_named_volume_is_declared_and_every_declared_volume_is_used():
    declared = set(COMPOSE["volumes"])
    used = set()
    for service in SERVICES.values():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if not source.startswith((".", "/")):
                used.add(source)
    assert used == declared


def test_services_that_share_dicom_files_mount_one_volume_at_the_storage_root():
    root = re.search(r"DICOM_STORAGE_ROOT=(\S+)", DOCKERFILE)[1]
    for service in ("dicom-receiver", "worker"):
        assert f"dicom:{root}" in SERVICES[service]["volumes"], service


def test_image_is_slim_python_311_and_runs_as_a_non_root_user():
    assert re.search(r"^FROM python:3\.11-slim\b", DOCKERFILE, re.MULTILINE)
    user = re.findall(r"^USER (\S+)", DOCKERFILE, re.MULTILINE)
    assert user
    assert not user[-1].startswith(("root", "0"))
    assert "pip install --no-cache-dir -r requirements.txt" in DOCKERFILE
    assert "collectstatic --noinput" in DOCKERFILE


def test_runtime_requirements_are_all_pinned():
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.]+", line), f"unpinned: {line}"


def test_gunicorn_recycles_workers_by_request_count_and_by_memory():
    assert "max_requests_jitter" in GUNICORN_CONF
    assert "def post_request(" in GUNICORN_CONF  # the memory cap
    assert "worker.alive = False" in GUNICORN_CONF


def test_gunicorn_access_log_leaves_out_query_strings():
    fmt = re.search(r"access_log_format = '(.*)'", GUNICORN_CONF)[1]
    assert "%(U)s" in fmt
    assert not {"%(r)s", "%(q)s", "%(f)s"} & set(re.findall(r"%\(\w\)s", fmt))


@pytest.mark.postgres
@pytest.mark.slow
def test_web_health_check_passes_against_gunicorn_with_the_production_env(transactional_db,
                                                                         tmp_path):
    """Run the compose health check command against gunicorn started with env.example's
    security settings (HTTPS redirect, allowed hosts): it must succeed."""
    import os
    import socket
    import subprocess
    import sys
    import time

    from tests.conftest import test_database_url

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, **env_example()}
    env.update({"DATABASE_URL": test_database_url(), "CELERY_BROKER_URL": "filesystem://",
                "REDIS_CACHE_URL": "", "PACS_DICOMWEB_URL": "", "VAR_DIR": str(tmp_path),
                "SECRET_KEY": "x" * 64, "LOG_LEVEL": "WARNING"})
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "--config", "docker/gunicorn.conf.py", "--bind",
         f"127.0.0.1:{port}", "--workers", "1", "config.wsgi:application"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    check = SERVICES["web"]["healthcheck"]["test"]
    code = check[3].replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        result = None
        while time.monotonic() < deadline:
            result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                    text=True, timeout=30, check=False)
            if result.returncode == 0:
                break
            time.sleep(0.5)
        assert result is not None
        assert result.returncode == 0, result.stderr[-1500:]
    finally:
        server.terminate()
        server.wait(timeout=30)
