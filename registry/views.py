"""Server-rendered clinic pages and operational endpoints of the registry."""

from __future__ import annotations

import logging
import secrets
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import login_not_required, permission_required
from django.core.paginator import Paginator
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from config.readiness import extra_checks
from followup import selectors as followup_selectors
from registry import labels, selectors
from registry.models import AuditAction, Patient, WorkerProbe
from registry.side_effects import Actor, audit_record
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

        checks.update(extra_checks())
    body = {"status": "ok" if ok else "unavailable", **checks}
    return JsonResponse(body, status=200 if ok else 503)


@require_GET
def home(request: HttpRequest) -> HttpResponse:
    return render(request, "home.html")


SEARCHES_KEY = "patient_searches"
MAX_KEPT_SEARCHES = 20


@require_http_methods(["GET", "POST"])
@permission_required("registry.view_identified_data", raise_exception=True)
def patient_list(request: HttpRequest) -> HttpResponse:
    """Patients, newest first. A search (MRN or family name) is POSTed; the term is kept in the
    user's session under a random token and the browser is redirected to ``?search=<token>``,
    so no MRN or name ever appears in a URL (browser history, proxy and server logs). A token
    from another session, or an expired one, finds nothing and says so."""
    if request.method == "POST":
        term = request.POST.get("q", "").strip()[:100]
        if not term:
            return redirect("patient-list")
        searches = dict(request.session.get(SEARCHES_KEY, {}))
        token = secrets.token_urlsafe(9)
        searches[token] = term
        request.session[SEARCHES_KEY] = dict(list(searches.items())[-MAX_KEPT_SEARCHES:])
        return redirect(f"{reverse('patient-list')}?search={token}")
    token = request.GET.get("search", "")
    term = request.session.get(SEARCHES_KEY, {}).get(token, "") if token else ""
    page = Paginator(selectors.patient_list(search=term), 25).get_page(request.GET.get("page"))
    return render(request, "patients/list.html", {
        "page": page, "q": term, "search_token": token if term else "",
        "search_lost": bool(token) and not term})


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
    vbq = followup_selectors.current_vbq(patient=patient)
    context = {
        "patient": patient,
        "identifiers": [(labels.identifier_system_label(i.system, i.type_code), i.value)
                        for i in patient.identifiers.all()],
        "vbq_image": _image_state(vbq) if vbq else "",
        "index": selectors.index_procedure(patient=patient),
        "timeline": followup_selectors.patient_timeline(patient=patient),
        "secondary": selectors.secondary_fractures(patient=patient),
        "vbq": vbq,
        "vbq_results": patient.vbq_results.select_related("reviewer").order_by(
            "-queued_at", "-pk")[:10],
    }
    context.update(followup_selectors.vbq_rule_context(context["vbq"], context["vbq_results"]))
    return render(request, "patients/detail.html", context)


def _image_state(result: Any) -> str:
    """"image" when the review image view can render the result's slice (its series is stored
    here, or a PACS is configured to fetch it from), else why not: "imported" (a VBQ imported
    without images) or "not-stored". Decided without reading any pixel, so the page never
    links an image that would answer 404."""
    series = result.series
    if series is None:
        return "imported"
    if series.local_path and Path(series.local_path).is_dir():
        return "image"
    if series.study.endpoint_url or settings.PACS_DICOMWEB_URL:
        return "image"
    return "not-stored"


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
