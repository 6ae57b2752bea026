"""Outbox delivery against a real SMTP server and a real HTTP server on 127.0.0.1."""

import datetime as dt
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from aiosmtpd.controller import Controller
from django.utils import timezone

from followup.alerts import alert_open
from followup.delivery import send_due_deliveries
from registry.models import AlertDelivery
from tests.factories import PatientFactory

pytestmark = pytest.mark.django_db


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FlakySmtpHandler:
    """Rejects the first message with a transient 451, accepts the rest."""

    def __init__(self):
        self.attempts = 0
        self.accepted = []

    async def handle_DATA(self, server, session, envelope):
        self.attempts += 1
        if self.attempts == 1:
            return "451 4.3.0 Temporary failure, try again"
        self.accepted.append(envelope.content.decode("utf-8", "replace"))
        return "250 OK"


@pytest.fixture
def smtp_server(settings):
    handler = FlakySmtpHandler()
    port = _free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT = "127.0.0.1", port
    settings.CARE_TEAM_EMAILS = {"fracture-liaison": ["fls-team@example.org"]}
    yield handler
    controller.stop()


def _run_until_quiet(rounds=4):
    """Run the delivery task repeatedly, moving the clock past each backoff."""
    moment = timezone.now()
    for _ in range(rounds):
        send_due_deliveries(now=moment)
        moment += dt.timedelta(hours=1)


def test_email_digest_arrives_once_even_when_the_first_attempt_fails(smtp_server):
    alert = alert_open(patient=PatientFactory(given_name="Nameless"), rule_id="vbq-missing",
                       reason="no MRI")
    _run_until_quiet()
    assert smtp_server.attempts == 2
    assert len(smtp_server.accepted) == 1
    assert f"Alert {alert.pk}" in smtp_server.accepted[0]
    assert "Nameless" not in smtp_server.accepted[0]  # no PHI in email
    row = AlertDelivery.objects.get(alert=alert, channel="email")
    assert (row.status, row.attempts) == ("sent", 2)


def test_one_digest_per_care_team_carries_all_its_alerts(smtp_server):
    smtp_server.attempts = 1  # no failure this time
    for _ in range(3):
        alert_open(patient=PatientFactory(), rule_id="vbq-missing", reason="no MRI")
    send_due_deliveries()
    assert len(smtp_server.accepted) == 1
    assert smtp_server.accepted[0].count("- Alert ") == 3


class FhirEhr(BaseHTTPRequestHandler):
    """A minimal FHIR server: first POST answers 503, later ones 201 and are stored."""

    received: list = []
    calls = 0

    def do_POST(self):
        type(self).calls += 1
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if type(self).calls == 1:
            self.send_response(503)
            self.end_headers()
            return
        type(self).received.append((self.path, self.headers.get("If-None-Exist"),
                                    json.loads(body)))
        self.send_response(201)
        self.send_header("Content-Type", "application/fhir+json")
        self.end_headers()
        self.wfile.write(b'{"resourceType": "Communication", "id": "1"}')

    def log_message(self, *args):
        pass


def test_fhir_communication_is_retried_and_posted_once(settings):
    FhirEhr.received, FhirEhr.calls = [], 0
    server = HTTPServer(("127.0.0.1", 0), FhirEhr)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    settings.EHR_OUTBOUND_FHIR_URL = f"http://127.0.0.1:{server.server_port}/fhir"
    try:
        alert = alert_open(patient=PatientFactory(), rule_id="high-vbq-untreated-60d",
                           reason="VBQ 3.5", vbq_value=3.5)
        _run_until_quiet()
    finally:
        server.shutdown()
    assert FhirEhr.calls == 2
    assert len(FhirEhr.received) == 1
    path, if_none_exist, resource = FhirEhr.received[0]
    assert path == "/fhir/Communication"
    assert resource["resourceType"] == "Communication"
    assert if_none_exist.endswith(resource["identifier"][0]["value"])
    assert AlertDelivery.objects.get(alert=alert, channel="fhir").status == "sent"


def test_a_delivery_marked_sent_is_never_sent_again(smtp_server):
    smtp_server.attempts = 1
    alert_open(patient=PatientFactory(), rule_id="vbq-missing", reason="no MRI")
    send_due_deliveries()
    AlertDelivery.objects.update(next_attempt_at=timezone.now() - dt.timedelta(days=1))
    send_due_deliveries()
    assert len(smtp_server.accepted) == 1
