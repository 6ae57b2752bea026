"""The audit report: who read or changed which patient's data (registry.view_audit only)."""

from __future__ import annotations

import datetime as dt
import uuid

from django.contrib.auth.decorators import permission_required
from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.http import urlencode
from django.views.decorators.http import require_GET

from registry.models import AuditAction, AuditEvent
from registry.timeutil import start_of_clinic_day

PAGE_SIZE = 50


def _parse_date(value: str) -> dt.date | None:
    try:
        return dt.date.fromisoformat(value) if value else None
    except ValueError:
        return None


def audit_event_filter(*, params: dict[str, str]) -> tuple[QuerySet[AuditEvent], dict[str, str]]:
    """AuditEvents matching the filters in ``params`` (newest first) and the filters applied.

    Filters: ``action``, ``via``, ``object_type``, ``actor`` (username), ``patient`` (uuid),
    ``from`` / ``to`` (clinic-local ISO dates, inclusive). Invalid values are ignored.
    """
    events = AuditEvent.objects.select_related("actor", "feed").order_by("-at", "-pk")
    applied: dict[str, str] = {}
    action = params.get("action", "")
    if action in AuditAction.values:
        events = events.filter(action=action)
        applied["action"] = action
    for field in ("via", "object_type"):
        value = params.get(field, "").strip()[:50]
        if value:
            events = events.filter(**{field: value})
            applied[field] = value
    actor = params.get("actor", "").strip()[:150]
    if actor:
        events = events.filter(actor__username=actor)
        applied["actor"] = actor
    patient = params.get("patient", "").strip()
    try:
        events = events.filter(patient_id=uuid.UUID(patient)) if patient else events
        if patient:
            applied["patient"] = patient
    except ValueError:
        pass
    start, end = _parse_date(params.get("from", "")), _parse_date(params.get("to", ""))
    if start:
        events = events.filter(at__gte=start_of_clinic_day(start))
        applied["from"] = start.isoformat()
    if end:
        events = events.filter(at__lt=start_of_clinic_day(end + dt.timedelta(days=1)))
        applied["to"] = end.isoformat()
    return events, applied


@require_GET
@permission_required("registry.view_audit", raise_exception=True)
def audit_event_list(request: HttpRequest) -> HttpResponse:
    events, applied = audit_event_filter(params=request.GET.dict())
    page = Paginator(events, PAGE_SIZE).get_page(request.GET.get("page"))
    context = {
        "page": page,
        "filters": applied,
        "actions": AuditAction.choices,
        "query": urlencode(applied),
    }
    return render(request, "audit/list.html", context)
