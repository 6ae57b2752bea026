"""Extra ``/readyz`` probes: PACS reachability and the age of the oldest queued VBQ job.

These are *reported*, not required: a PACS outage or a slow queue must not take the web
process out of the load balancer (clinicians can still work the worklist). Monitoring alerts
on ``pacs`` != ``ok`` or ``oldest_queued_vbq_seconds`` above a threshold instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from django.conf import settings
from django.utils import timezone

from scoring.models import VbqResult

logger = logging.getLogger(__name__)


def check_pacs() -> str:
    """``ok`` when the DICOMweb base URL answers (any HTTP status below 500)."""
    import requests

    auth = (
        (settings.PACS_DICOMWEB_USERNAME, settings.PACS_DICOMWEB_PASSWORD)
        if settings.PACS_DICOMWEB_USERNAME
        else None
    )
    response = requests.get(
        settings.PACS_DICOMWEB_URL.rstrip("/") + "/studies",
        params={"limit": "1"},
        headers={"Accept": "application/dicom+json"},
        auth=auth,
        timeout=settings.READYZ_PACS_TIMEOUT_SECONDS,
    )
    return "ok" if response.status_code < 500 else f"error: HTTP {response.status_code}"


def oldest_queued_vbq_seconds() -> str:
    """Seconds since the oldest still-queued VbqResult was queued (``0`` when none)."""

    oldest = (
        VbqResult.objects.filter(status=VbqResult.Status.QUEUED)
        .order_by("queued_at")
        .values_list("queued_at", flat=True)
        .first()
    )
    return "0" if oldest is None else f"{(timezone.now() - oldest).total_seconds():.0f}"


def extra_checks() -> dict[str, str]:
    """Run the optional probes; each failure becomes ``error: <ExceptionType>``."""
    probes: list[tuple[str, Callable[[], str]]] = [
        ("oldest_queued_vbq_seconds", oldest_queued_vbq_seconds)
    ]
    if settings.PACS_DICOMWEB_URL:
        probes.append(("pacs", check_pacs))
    results: dict[str, str] = {}
    for name, probe in probes:
        started = time.monotonic()
        try:
            results[name] = probe()
        except Exception as exc:  # a probe never crashes readyz
            logger.warning("readyz %s failed: %s", name, type(exc).__name__)
            results[name] = f"error: {type(exc).__name__}"
        results[f"{name}_ms"] = f"{(time.monotonic() - started) * 1000:.0f}"
    return results
