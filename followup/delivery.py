"""Alert delivery from the outbox (``AlertDelivery`` rows written with the alert).

Each row is claimed with a conditional update (pending → sending), sent, then marked sent; a
failure puts it back to pending with exponential backoff (1, 2, 4 … minutes, capped at an hour)
until ``MAX_ATTEMPTS``, then ``failed``. A row is never sent again once marked sent, so a retry
of the *task* cannot send twice. Email goes as one digest per care team (one SMTP message for
all due rows of the team). FHIR Communication is POSTed with a stable identifier and
``If-None-Exist`` so an EHR that saw a first attempt does not create a duplicate.
Messages carry registry ids and links, never names, MRNs or birth dates.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from typing import Any

import requests
from celery import shared_task
from django.conf import settings
from django.core.mail import EmailMessage, get_connection
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from registry.labels import rule_label
from registry.models import AlertDelivery

logger = logging.getLogger(__name__)
MAX_ATTEMPTS = 8
STALE_CLAIM = dt.timedelta(minutes=10)
Channel = AlertDelivery.Channel
Status = AlertDelivery.Status


def _backoff(attempts: int) -> dt.timedelta:
    return dt.timedelta(seconds=min(3600, 60 * 2 ** max(attempts - 1, 0)))


def _claim(ids: list[int]) -> list[AlertDelivery]:
    now = timezone.now()
    claimed = []
    for pk in ids:
        if AlertDelivery.objects.filter(pk=pk, status=Status.PENDING).update(
            status=Status.SENDING, claimed_at=now, attempts=F("attempts") + 1
        ):
            claimed.append(pk)
    return list(AlertDelivery.objects.filter(pk__in=claimed).select_related("alert"))


def _mark_sent(rows: list[AlertDelivery]) -> None:
    AlertDelivery.objects.filter(pk__in=[r.pk for r in rows], status=Status.SENDING).update(
        status=Status.SENT, sent_at=timezone.now(), last_error=""
    )


def _mark_failed(rows: list[AlertDelivery], error: str) -> None:
    now = timezone.now()
    for row in rows:
        attempts = row.attempts
        status = Status.FAILED if attempts >= MAX_ATTEMPTS else Status.PENDING
        AlertDelivery.objects.filter(pk=row.pk, status=Status.SENDING).update(
            status=status, next_attempt_at=now + _backoff(attempts), last_error=error[:500]
        )
    logger.warning("delivery failed rows=%s error=%s", [r.pk for r in rows], error[:200])


def _digest_body(rows: list[AlertDelivery]) -> str:
    lines = [
        "VBQ Registry: alerts for your care team.",
        "Open the worklist to act on them. Patient details are in the registry only.",
        "",
    ]
    for row in rows:
        alert = row.alert
        lines.append(
            f"- Alert {alert.pk} ({rule_label(alert.rule_id)}, {row.event}, escalation "
            f"{alert.escalation_level}): {settings.SITE_URL.rstrip('/')}/worklist/?alert={alert.pk}"
        )
    return "\n".join(lines)


def send_email_digests(rows: list[AlertDelivery]) -> int:
    by_team: dict[str, list[AlertDelivery]] = defaultdict(list)
    for row in rows:
        by_team[row.alert.care_team or settings.DEFAULT_CARE_TEAM].append(row)
    sent = 0
    for team, team_rows in by_team.items():
        recipients = settings.CARE_TEAM_EMAILS.get(team) or settings.CARE_TEAM_EMAILS.get("*")
        if not recipients:
            _mark_failed(team_rows, f"no email address configured for care team {team!r}")
            continue
        keys = ",".join(str(r.pk) for r in team_rows)
        message = EmailMessage(
            subject=f"[VBQ Registry] {len(team_rows)} alert update(s) for {team}",
            body=_digest_body(team_rows),
            to=recipients,
            headers={"X-VBQ-Deliveries": keys},
        )
        try:
            with get_connection(fail_silently=False) as connection:
                connection.send_messages([message])
        except Exception as exc:  # SMTP errors, refused connections, timeouts
            _mark_failed(team_rows, f"{type(exc).__name__}: {exc}")
            continue
        _mark_sent(team_rows)
        sent += len(team_rows)
    return sent


def communication_resource(row: AlertDelivery) -> dict[str, Any]:
    alert = row.alert
    return {
        "resourceType": "Communication",
        "identifier": [{"system": "https://vbq-registry.example.org/fhir/sid/alert-delivery",
                        "value": row.idempotency_key}],
        "status": "completed",
        "category": [{"text": "VBQ follow-up alert"}],
        "priority": "urgent" if alert.escalation_level else "routine",
        "sent": timezone.now().isoformat(),
        "payload": [{"contentString": f"VBQ Registry alert {alert.pk}: "
                                      f"{rule_label(alert.rule_id)} "
                                      f"({row.event}). {alert.reason}"}],
    }


def send_fhir(rows: list[AlertDelivery]) -> int:
    base = settings.EHR_OUTBOUND_FHIR_URL.rstrip("/")
    sent = 0
    for row in rows:
        if not base:
            _mark_failed([row], "EHR_OUTBOUND_FHIR_URL is not configured")
            continue
        headers = {
            "Content-Type": "application/fhir+json",
            "If-None-Exist": "identifier=https://vbq-registry.example.org/fhir/sid/"
            f"alert-delivery|{row.idempotency_key}",
        }
        if settings.EHR_OUTBOUND_FHIR_TOKEN:
            headers["Authorization"] = f"Bearer {settings.EHR_OUTBOUND_FHIR_TOKEN}"
        try:
            response = requests.post(f"{base}/Communication", json=communication_resource(row),
                                     headers=headers, timeout=10)
        except requests.RequestException as exc:
            _mark_failed([row], f"{type(exc).__name__}")
            continue
        if response.status_code in (200, 201):
            _mark_sent([row])
            sent += 1
        else:
            _mark_failed([row], f"HTTP {response.status_code}")
    return sent


def send_due_deliveries(now: dt.datetime | None = None) -> dict[str, int]:
    """Send every due outbox row. Safe to run concurrently (rows are claimed one by one)."""
    now = now or timezone.now()
    # A worker killed between claim and mark leaves 'sending' rows: give them back.
    AlertDelivery.objects.filter(status=Status.SENDING, claimed_at__lt=now - STALE_CLAIM).update(
        status=Status.PENDING
    )
    due = list(
        AlertDelivery.objects.filter(status=Status.PENDING, next_attempt_at__lte=now)
        .order_by("next_attempt_at")
        .values_list("pk", "channel")[:500]
    )
    result = {"in-app": 0, "email": 0, "fhir": 0}
    for channel in (Channel.IN_APP, Channel.EMAIL, Channel.FHIR):
        with transaction.atomic():
            rows = _claim([pk for pk, ch in due if ch == channel])
        if not rows:
            continue
        if channel == Channel.IN_APP:
            _mark_sent(rows)  # the worklist reads alerts directly; nothing to transmit
            result["in-app"] += len(rows)
        elif channel == Channel.EMAIL:
            result["email"] += send_email_digests(rows)
        else:
            result["fhir"] += send_fhir(rows)
    return result


def delivery_channels() -> list[str]:
    """The channels every alert event is delivered on (FHIR only with an EHR endpoint)."""
    channels = [AlertDelivery.Channel.IN_APP, AlertDelivery.Channel.EMAIL]
    if settings.EHR_OUTBOUND_FHIR_URL:
        channels.append(AlertDelivery.Channel.FHIR)
    return channels


def safe_delay(task: Any) -> Any:
    """Queue ``task`` after commit; a broker outage must not fail the clinical write (the
    periodic delivery task picks the outbox rows up later)."""

    def send() -> None:
        try:
            task.delay()
        except Exception as exc:  # broker down: the outbox row stays pending
            logger.warning("queueing %s failed: %s", task.name, type(exc).__name__)

    return send


def enqueue_deliveries(alert: Any, event: str) -> None:
    """Write the outbox rows of one alert event (one per channel; idempotent on the alert,
    the event, its escalation level and the channel) and queue the delivery task after
    commit. Call inside the transaction that changes the alert."""
    now = timezone.now()
    for channel in delivery_channels():
        AlertDelivery.objects.get_or_create(
            idempotency_key=f"alert-{alert.pk}-{event}-{alert.escalation_level}-{channel}",
            defaults={"alert": alert, "channel": channel, "event": event,
                      "next_attempt_at": now},
        )
    transaction.on_commit(safe_delay(deliveries_send))


@shared_task(name="registry.deliveries_send")
def deliveries_send() -> dict:
    """Send due outbox rows (in-app, email digest per care team, FHIR Communication)."""
    return send_due_deliveries()
