"""Server-rendered clinic pages and operational endpoints of the registry."""

from __future__ import annotations

import logging
import time

from django.conf import settings
from django.contrib.auth.decorators import login_not_required, permission_required
from django.core.paginator import Paginator
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from registry import selectors
from registry.models import AuditAction, Patient, WorkerProbe
from registry.services import Actor, audit_record
from registry.tasks import worker_probe

logger = logging.getLogger(__name__)


@login_not_required
@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness: the process answers. Touches nothing else."""
    return JsonResponse({"status": "ok"})


def _check_database() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return "ok"


def _check_broker() -> str:
    # A fresh connection (not the app's pool) so the probe reflects the broker right now.
    from kombu import Connection

    with Connection(
        settings.CELERY_BROKER_URL,
        transport_options=settings.CELERY_BROKER_TRANSPORT_OPTIONS,
        connect_timeout=settings.CELERY_BROKER_CONNECTION_TIMEOUT,
    ) as conn:
        conn.ensure_connection(max_retries=1, timeout=settings.CELERY_BROKER_CONNECTION_TIMEOUT)
    return "ok"


@login_not_required
@never_cache
@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    """Readiness: database and broker reachable. 200 when all ok, else 503 with reasons."""
    checks: dict[str, str] = {}
    for name, check in (("database", _check_database), ("broker", _check_broker)):
        started = time.monotonic()
        try:
            checks[name] = check()
        except Exception as exc:  # report any failure as a reason, never crash the probe
            logger.warning("readyz %s failed: %s", name, type(exc).__name__)
            checks[name] = f"error: {type(exc).__name__}"
        checks[f"{name}_ms"] = f"{(time.monotonic() - started) * 1000:.0f}"
    ok = all(checks[k] == "ok" for k in ("database", "broker"))
    if checks["database"] == "ok":
        # Reported, not required: PACS reachability, age of the oldest queued VBQ job.
        from config.readiness import extra_checks

        checks.update(extra_checks())
    body = {"status": "ok" if ok else "unavailable", **checks}
    return JsonResponse(body, status=200 if ok else 503)


@require_GET
def home(request: HttpRequest) -> HttpResponse:
    return render(request, "home.html")


@require_GET
@permission_required("registry.view_identified_data", raise_exception=True)
def patient_list(request: HttpRequest) -> HttpResponse:
    search = request.GET.get("q", "")
    page = Paginator(selectors.patient_list(search=search), 25).get_page(request.GET.get("page"))
    return render(request, "patients/list.html", {"page": page, "q": search})


@require_GET
@permission_required("registry.view_identified_data", raise_exception=True)
def patient_detail(request: HttpRequest, patient_id: str) -> HttpResponse:
    patient = get_object_or_404(Patient.objects.prefetch_related("identifiers"), pk=patient_id)
    audit_record(
        actor=Actor(user_id=request.user.pk, via="ui"),
        action=AuditAction.READ,
        object_type="Patient",
        object_id=str(patient.pk),
        patient_id=patient.pk,
    )
    context = {
        "patient": patient,
        "index": selectors.index_procedure(patient=patient),
        "timeline": selectors.patient_timeline(patient=patient),
        "secondary": selectors.secondary_fractures(patient=patient),
        "vbq": selectors.current_vbq(patient=patient),
        "vbq_results": patient.vbq_results.select_related("reviewer").order_by(
            "-queued_at", "-pk")[:10],
    }
    context.update(selectors.vbq_rule_context(context["vbq"], context["vbq_results"]))
    return render(request, "patients/detail.html", context)


@require_POST
@permission_required("registry.view_audit", raise_exception=True)
def ops_worker_probe(request: HttpRequest) -> JsonResponse:
    """Queue a round trip through the broker to the worker; poll ``GET`` for the outcome."""
    probe = WorkerProbe.objects.create()
    worker_probe.delay(probe.pk)
    return JsonResponse({"probe_id": probe.pk}, status=202)


@require_GET
@permission_required("registry.view_audit", raise_exception=True)
def ops_worker_probe_status(request: HttpRequest, probe_id: int) -> JsonResponse:
    probe = get_object_or_404(WorkerProbe, pk=probe_id)
    return JsonResponse({"probe_id": probe.pk, "done": probe.done_at is not None})
