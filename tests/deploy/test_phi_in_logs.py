"""No PHI in logs or audit details: run a representative flow with the production log
configuration and grep everything emitted for the synthetic names and MRNs."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest
from django.core.management import call_command
from django.test import Client
from django.urls import NoReverseMatch, reverse

from config.logging import JsonFormatter, RedactPhiFilter
from registry.models import AuditAction, AuditEvent, Patient, PatientIdentifier


class _Capture(logging.Handler):
    """Keeps raw messages (before redaction) and the emitted JSON lines (after)."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.raw: list[str] = []
        self.emitted: list[str] = []
        self.formatter_ = JsonFormatter()
        self.redact = RedactPhiFilter()

    def emit(self, record: logging.LogRecord) -> None:
        raw = record.getMessage()
        if record.exc_info:
            raw += "\n" + logging.Formatter().formatException(record.exc_info)
        extras = {k: v for k, v in record.__dict__.items() if k not in {"msg", "args", "request"}}
        self.raw.append(raw + " " + json.dumps(extras, default=str))
        self.redact.filter(record)
        self.emitted.append(self.formatter_.format(record))


@pytest.fixture
def captured_logs() -> Iterator[_Capture]:
    handler = _Capture()
    root = logging.getLogger()
    root.handlers.insert(0, handler)  # before the console handler's redaction filter
    try:
        yield handler
    finally:
        root.removeHandler(handler)


def _phi_pattern() -> re.Pattern[str]:
    values = set(PatientIdentifier.objects.values_list("value", flat=True))
    for given, family in Patient.objects.values_list("given_name", "family_name"):
        values |= {given, f"{given} {family}", f"{family}, {given}"}
    return re.compile(r"\b(" + "|".join(re.escape(v) for v in sorted(values) if v) + r")\b")


def _get(client: Client, name: str, *args) -> None:
    with contextlib.suppress(NoReverseMatch):  # an area not built yet
        client.get(reverse(name, args=args))


@pytest.mark.postgres
def test_a_representative_flow_logs_no_names_or_mrns(db, role_user, captured_logs):
    call_command("demo_cohort", patients=12, stdout=io.StringIO())
    patients = list(Patient.objects.all()[:6])
    admin = Client(raise_request_exception=False)
    admin.force_login(role_user("admin"))
    analyst = Client(raise_request_exception=False)
    analyst.force_login(role_user("qi_analyst"))
    for patient in patients:
        admin.get(reverse("patient-detail", args=[patient.pk]))
        analyst.get(reverse("patient-detail", args=[patient.pk]))  # 403, logged by Django
    admin.get(reverse("patient-list"), {"q": patients[0].family_name})
    admin.get("/patients/00000000-0000-4000-8000-000000000000/")  # 404
    for name in ("api-alert-list", "report", "report-api", "report-cohort-csv", "readyz"):
        _get(admin, name)
        _get(analyst, name)
    admin.post(reverse("login"), {"username": patients[0].given_name, "password": "x"})

    phi = _phi_pattern()
    assert captured_logs.raw, "the flow produced no log records at all"
    raw_hits = sorted({m for line in captured_logs.raw for m in phi.findall(line)})
    emitted_hits = sorted({m for line in captured_logs.emitted for m in phi.findall(line)})
    assert not emitted_hits, f"PHI reached the log output: {emitted_hits}"
    assert not raw_hits, f"code logged PHI (the redaction filter hid it): {raw_hits}"


@pytest.mark.postgres
def test_every_patient_page_read_is_audited_without_phi_in_the_detail(db, role_user):
    call_command("demo_cohort", patients=8, stdout=io.StringIO())
    client = Client()
    user = role_user("clinician")
    client.force_login(user)
    patients = list(Patient.objects.all()[:4])
    for patient in patients:
        client.get(reverse("patient-detail", args=[patient.pk]))
    reads = AuditEvent.objects.filter(action=AuditAction.READ, actor=user)
    assert {e.patient_id for e in reads} == {p.pk for p in patients}
    phi = _phi_pattern()
    details = [json.dumps(e.detail) + e.object_id for e in AuditEvent.objects.all()]
    assert not [d for d in details if phi.search(d)]
