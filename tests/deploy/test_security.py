"""Security headers, login and token rate limits, JSON logs with redaction, readyz probes,
and the audit report page."""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.core.cache import cache
from django.test import Client
from django.urls import reverse

from config import ratelimit
from config.logging import REDACTED, JsonFormatter, RedactPhiFilter
from registry.feeds import feed_create
from registry.models import AuditAction
from registry.side_effects import Actor, audit_record
from scoring.models import ImagingSeries, ImagingStudy, VbqResult
from tests.factories import PatientFactory


@pytest.fixture(autouse=True)
def _empty_cache():
    cache.clear()
    yield
    cache.clear()


def test_every_page_sends_a_strict_content_security_policy(client):
    response = client.get(reverse("login"))
    csp = response["Content-Security-Policy"]
    assert "default-src 'self'" in csp
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp


def test_every_page_sends_a_permissions_policy_denying_device_features(client):
    response = client.get(reverse("healthz"))
    assert "camera=()" in response["Permissions-Policy"]
    assert "geolocation=()" in response["Permissions-Policy"]


def test_login_answers_429_after_too_many_failures_for_one_username(db, settings, role_user):
    settings.LOGIN_RATE_LIMIT = 3
    role_user("clinician", username="alice")
    client = Client()
    for _ in range(3):
        failed = client.post(reverse("login"), {"username": "alice", "password": "no"})
        assert failed.status_code == 200
    response = client.post(reverse("login"), {"username": "alice", "password": "no"})
    assert response.status_code == 429
    assert int(response["Retry-After"]) > 0


def test_rate_limited_login_refuses_even_the_right_password(db, settings, role_user):
    settings.LOGIN_RATE_LIMIT = 2
    role_user("clinician", username="bob")
    client = Client()
    for _ in range(2):
        client.post(reverse("login"), {"username": "bob", "password": "wrong"})
    response = client.post(
        reverse("login"), {"username": "bob", "password": "a-long-test-password-1"}
    )
    assert response.status_code == 429
    assert "_auth_user_id" not in client.session


def test_successful_login_is_not_counted_as_a_failure(db, settings, role_user):
    settings.LOGIN_RATE_LIMIT = 1
    role_user("clinician", username="carol")
    response = Client().post(
        reverse("login"), {"username": "carol", "password": "a-long-test-password-1"}
    )
    assert response.status_code == 302
    assert ratelimit.login_blocked(ip="127.0.0.1", username="carol") is None


def test_feed_token_guessing_is_rate_limited_per_ip(db, settings):
    settings.FEED_AUTH_FAILURE_LIMIT = 3
    _, token = feed_create(name="limited-feed")
    for _ in range(3):
        assert ratelimit.feed_authenticate_limited(token="vbqf_wrong", ip="10.0.0.9") is None
    with pytest.raises(ratelimit.RateLimited) as excinfo:
        ratelimit.feed_authenticate_limited(token=token, ip="10.0.0.9")
    assert excinfo.value.retry_after_seconds > 0
    assert ratelimit.feed_authenticate_limited(token=token, ip="10.0.0.10") is not None


def test_client_ip_uses_the_proxy_hop_only_behind_the_tls_proxy(rf, settings):
    request = rf.get("/", HTTP_X_FORWARDED_FOR="6.6.6.6, 10.1.1.1", REMOTE_ADDR="127.0.0.1")
    settings.SECURE_PROXY_SSL_HEADER = None
    assert ratelimit.client_ip(request) == "127.0.0.1"
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    assert ratelimit.client_ip(request) == "10.1.1.1"


def _record(msg: str, *args, **extra) -> logging.LogRecord:
    record = logging.LogRecord("registry.test", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_json_log_lines_are_objects_with_ids_and_redacted_mrns():
    record = _record("patient %s matched MRN %s", "0b9e-uuid", "SYN-000123", patient_id="0b9e")
    RedactPhiFilter().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "INFO"
    assert line["patient_id"] == "0b9e"
    assert "SYN-000123" not in line["msg"]
    assert REDACTED in line["msg"]


def test_redaction_filter_masks_phi_named_extra_fields():
    record = _record("upserted", family_name="SYNTHETIC", given_name="Ann", birth_date="1950")
    RedactPhiFilter().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert line["family_name"] == REDACTED
    assert line["given_name"] == REDACTED
    assert line["birth_date"] == REDACTED


def test_redaction_keeps_uuids_intact():
    record = _record("patient 12345678-1234-4234-8234-123456789012 read")
    RedactPhiFilter().filter(record)
    assert "12345678-1234-4234-8234-123456789012" in record.getMessage()


@pytest.mark.postgres
def test_readyz_reports_the_age_of_the_oldest_queued_vbq_job(db, client):
    patient = PatientFactory()
    study = ImagingStudy.objects.create(
        patient=patient, study_instance_uid="2.25.71", source="fhir"
    )
    series = ImagingSeries.objects.create(study=study, series_instance_uid="2.25.72")
    VbqResult.objects.create(series=series, patient=patient, algorithm_version="t", source="auto")
    body = client.get(reverse("readyz")).json()
    assert int(body["oldest_queued_vbq_seconds"]) >= 0
    assert "pacs" not in body  # PACS_DICOMWEB_URL unset


class _PacsHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path.startswith("/dicom-web/studies") else 404)
        self.send_header("Content-Type", "application/dicom+json")
        self.end_headers()
        self.wfile.write(b"[]")

    def log_message(self, *args):
        pass


@pytest.mark.postgres
def test_readyz_reports_pacs_reachability_when_a_pacs_is_configured(db, client, settings):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _PacsHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        settings.PACS_DICOMWEB_URL = f"http://127.0.0.1:{server.server_port}/dicom-web"
        assert client.get(reverse("readyz")).json()["pacs"] == "ok"
    finally:
        server.shutdown()
        server.server_close()
    body = client.get(reverse("readyz")).json()
    assert body["pacs"].startswith("error")


@pytest.mark.postgres
def test_audit_report_lists_events_filtered_by_action(db, role_user):
    admin = role_user("admin")
    patient = PatientFactory()
    audit_record(actor=Actor(user_id=admin.pk, via="ui"), action=AuditAction.READ,
                 object_type="Patient", object_id=str(patient.pk), patient_id=patient.pk)
    audit_record(actor=Actor(via="command"), action=AuditAction.EXPORT, object_type="Cohort")
    client = Client()
    client.force_login(admin)
    response = client.get(reverse("audit-event-list"), {"action": "read"})
    assert response.status_code == 200
    events = list(response.context["page"])
    assert [e.action for e in events] == ["read"]
    assert events[0].patient_id == patient.pk
    assert patient.given_name.encode() not in response.content


@pytest.mark.postgres
def test_audit_report_pages_fifty_events_at_a_time(db, role_user):
    admin = role_user("admin")
    for i in range(60):
        audit_record(actor=Actor(via="task"), action=AuditAction.EXECUTE, object_type=f"Job{i}")
    client = Client()
    client.force_login(admin)
    first = client.get(reverse("audit-event-list"))
    second = client.get(reverse("audit-event-list"), {"page": 2})
    assert len(first.context["page"]) == 50
    assert len(second.context["page"]) == 10


@pytest.mark.postgres
def test_audit_report_is_forbidden_to_clinicians(db, role_user):
    client = Client()
    client.force_login(role_user("clinician"))
    assert client.get(reverse("audit-event-list")).status_code == 403


def test_a_lost_database_connection_answers_503_with_retry_after(rf):
    from django.db import OperationalError

    from config.security import DatabaseUnavailableMiddleware

    middleware = DatabaseUnavailableMiddleware(lambda request: None)
    response = middleware.process_exception(rf.post("/fhir"), OperationalError("server closed"))
    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    assert json.loads(response.content)["issue"][0]["code"] == "transient"


def test_other_exceptions_are_left_to_django(rf):
    from config.security import DatabaseUnavailableMiddleware

    middleware = DatabaseUnavailableMiddleware(lambda request: None)
    assert middleware.process_exception(rf.get("/"), ValueError("bug")) is None


@pytest.mark.slow
def test_worker_logs_one_json_metrics_line_per_task(transactional_db, tmp_path):
    import os
    import time

    from registry.models import WorkerProbe
    from registry.tasks import worker_probe
    from tests.conftest import CeleryWorker, test_database_url

    env = {**os.environ, "DATABASE_URL": test_database_url(), "LOG_FORMAT": "json",
           "LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"}
    worker = CeleryWorker(env, tmp_path / "worker.log", ["--pool", "solo"])
    worker.start()
    try:
        probe = WorkerProbe.objects.create()
        # Other tests' messages (sent on commit to the same test broker) may come first: the
        # line looked for is this task's, by its id.
        task_id = worker_probe.delay(probe.pk).id
        deadline = time.monotonic() + 30
        lines: list[dict] = []
        while time.monotonic() < deadline and not lines:
            time.sleep(0.3)
            for raw in (tmp_path / "worker.log").read_text().splitlines():
                if raw.startswith("{") and '"runtime_ms"' in raw:
                    line = json.loads(raw)
                    if line.get("task_id") == task_id:
                        lines.append(line)
    finally:
        worker.stop()
    assert len(lines) == 1, (tmp_path / "worker.log").read_text()[-2000:]  # one line per task
    assert lines[0]["task_name"] == "registry.worker_probe"
    assert lines[0]["state"] == "SUCCESS"
    assert lines[0]["runtime_ms"] >= 0
    assert lines[0]["queue_wait_ms"] >= 0


@pytest.mark.postgres
def test_api_docs_page_loads_swagger_from_our_own_static_files(db, role_user):
    client = Client()
    client.force_login(role_user("clinician"))
    page = client.get(reverse("api-docs"))
    assert page.status_code == 200
    html = page.content.decode()
    assert "drf_spectacular_sidecar/swagger-ui-dist" in html
    assert "cdn." not in html
    assert "<script>" not in html.replace(" ", "")  # the split view: no inline script


@pytest.mark.postgres
def test_api_schema_is_openapi_for_logged_in_users_only(db, role_user):
    client = Client()
    assert client.get(reverse("api-schema")).status_code in {401, 403}
    client.force_login(role_user("coordinator"))
    schema = client.get(reverse("api-schema"), HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert schema.status_code == 200
    assert schema.json()["openapi"].startswith("3.")


@pytest.mark.redis
def test_rate_limit_counts_are_shared_through_the_redis_cache(settings):
    """With REDIS_CACHE_URL every web process sees the same counters (Redis DB 9 here)."""
    from django.core.cache import caches

    settings.CACHES = {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache",
                                   "LOCATION": "redis://127.0.0.1:6379/9"}}
    caches["default"].clear()
    scope = f"test-{uuid.uuid4().hex}"
    for _ in range(3):
        ratelimit.hit(scope, "10.0.0.1", limit=3, window_seconds=86400)
    other_process_view = caches.create_connection("default")
    key = ratelimit._key(scope, ("10.0.0.1",), 86400)[0]
    assert int(other_process_view.get(key)) == 3
    assert ratelimit.peek(scope, "10.0.0.1", limit=3, window_seconds=86400).exceeded
    caches["default"].clear()


def test_feed_from_request_authenticates_the_bearer_token_and_ignores_missing_ones(
    db, rf, settings
):
    settings.FEED_AUTH_FAILURE_LIMIT = 1
    feed, token = feed_create(name="request-feed")
    assert ratelimit.feed_from_request(rf.post("/fhir")) is None
    assert ratelimit.feed_from_request(rf.post("/fhir")) is None  # no token: not a failure
    found = ratelimit.feed_from_request(rf.post("/fhir", HTTP_AUTHORIZATION=f"Bearer {token}"))
    assert found == feed
    assert ratelimit.feed_from_request(rf.post("/fhir", HTTP_AUTHORIZATION="Bearer bad")) is None
    with pytest.raises(ratelimit.RateLimited):
        ratelimit.feed_from_request(rf.post("/fhir", HTTP_AUTHORIZATION=f"Bearer {token}"))


def test_no_template_needs_inline_script_or_style_that_the_csp_blocks():
    """The CSP forbids inline script, inline event handlers and style attributes: use files in
    static/ and data-* attributes or ``json_script`` instead."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    templates = [p for p in root.glob("**/templates/**/*.html")
                 if ".venv" not in p.parts and "staticfiles" not in p.parts]
    inline_script = re.compile(r"<script(?![^>]*\bsrc=)(?![^>]*application/json)[^>]*>", re.I)
    blocked = re.compile(r"\sstyle=|<style\b|\son[a-z]+=|javascript:", re.I)
    offenders = []
    for path in templates:
        text = path.read_text()
        for pattern in (inline_script, blocked):
            for match in pattern.finditer(text):
                line = text.count("\n", 0, match.start()) + 1
                offenders.append(f"{path.relative_to(root)}:{line}: {match.group(0).strip()}")
    assert templates
    assert not offenders, "blocked by the Content-Security-Policy:\n" + "\n".join(offenders)


def _patient_bundle(mrn: str) -> dict:
    return {"resourceType": "Bundle", "type": "transaction", "entry": [{
        "fullUrl": f"urn:uuid:{uuid.uuid4()}",
        "resource": {"resourceType": "Patient", "identifier": [{
            "system": "https://vbq-registry.example.org/fhir/sid/synthetic-mrn", "value": mrn}],
            "name": [{"family": "SYNTHETIC", "given": ["Scope"]}], "gender": "female",
            "birthDate": "1950-01-01"},
        "request": {"method": "POST", "url": "Patient"}}]}


@pytest.mark.postgres
def test_a_rotated_feed_token_stops_working_at_once_and_the_new_one_works(db):
    from registry.feeds import feed_rotate_token

    if _fhir_missing():
        pytest.skip("the FHIR endpoint /fhir is not mounted")
    feed, old = feed_create(name="rotating-feed")
    new = feed_rotate_token(feed=feed)
    post = Client().post
    rejected = post("/fhir", data=_patient_bundle("SYN-ROT1"), content_type="application/fhir+json",
                    HTTP_AUTHORIZATION=f"Bearer {old}")
    accepted = post("/fhir", data=_patient_bundle("SYN-ROT2"), content_type="application/fhir+json",
                    HTTP_AUTHORIZATION=f"Bearer {new}")
    assert rejected.status_code == 401
    assert accepted.status_code == 200


@pytest.mark.postgres
def test_a_feed_scoped_to_procedures_cannot_write_patients(db):
    from registry.models import PatientIdentifier

    if _fhir_missing():
        pytest.skip("the FHIR endpoint /fhir is not mounted")
    _, token = feed_create(name="procedure-only-feed", allowed_resource_types=["Procedure"])
    response = Client().post("/fhir", data=_patient_bundle("SYN-SCOPE1"),
                             content_type="application/fhir+json",
                             HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.status_code in {400, 403, 422}
    assert not PatientIdentifier.objects.filter(value="SYN-SCOPE1").exists()


def _fhir_missing() -> bool:
    from django.urls import Resolver404, resolve

    try:
        resolve("/fhir")
    except Resolver404:
        return True
    return False


@pytest.mark.postgres
def test_only_auditors_see_the_audit_link_in_the_navigation(db, role_user):
    admin, clinician = Client(), Client()
    admin.force_login(role_user("admin"))
    clinician.force_login(role_user("clinician"))
    url = reverse("audit-event-list").encode()
    assert url in admin.get(reverse("home")).content
    assert url not in clinician.get(reverse("home")).content


def _expiry(client):
    from django.contrib.sessions.models import Session

    return Session.objects.get(session_key=client.session.session_key).expire_date


def test_an_active_session_is_refreshed_at_most_once_per_refresh_interval(
        db, settings, role_user):
    settings.SESSION_REFRESH_SECONDS = 3600
    role_user("coordinator", username="dora")
    client = Client()
    assert client.post(reverse("login"), {"username": "dora",
                                          "password": "a-long-test-password-1"}).status_code == 302
    first = _expiry(client)
    assert client.get(reverse("worklist")).status_code == 200
    assert _expiry(client) == first  # no session write on an ordinary page view
    settings.SESSION_REFRESH_SECONDS = 0
    assert client.get(reverse("worklist")).status_code == 200
    assert _expiry(client) > first  # refreshed: the idle timeout restarts


def test_an_idle_session_expires_and_the_next_page_asks_to_log_in(db, settings, role_user):
    from django.contrib.sessions.models import Session
    from django.utils import timezone

    role_user("coordinator", username="erin")
    client = Client()
    client.post(reverse("login"), {"username": "erin", "password": "a-long-test-password-1"})
    Session.objects.filter(session_key=client.session.session_key).update(
        expire_date=timezone.now() - dt.timedelta(seconds=1))
    response = client.get(reverse("worklist"))
    assert response.status_code == 302
    assert reverse("login") in response["Location"]
