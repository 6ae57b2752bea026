"""Worklist page for the care team: unresolved alerts, one-click actions (POST, then back).

Search by MRN is a POST so no identifier ever appears in a URL.
"""

from __future__ import annotations

import datetime as dt

from django.contrib import messages
from django.contrib.auth.decorators import permission_required
from django.core.paginator import Paginator
from django.db.models import Count, Min, OuterRef, Subquery
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.views.decorators.http import require_http_methods, require_POST

from registry import alerts as alert_services
from registry.followup import RESOLUTION_REASONS
from registry.models import OPEN_ALERT_STATUSES, Alert, Procedure, RecordStatus
from registry.services import Actor, RegistryValidationError
from registry.timeutil import clinic_today

RULE_LABELS = {
    "high-vbq-untreated-60d": "High VBQ, untreated at day 60",
    "secondary-fracture": "Secondary fracture, untreated",
    "vbq-missing": "VBQ missing",
}


@require_http_methods(["GET", "POST"])
@permission_required("registry.work_alerts", raise_exception=True)
def worklist(request: HttpRequest) -> HttpResponse:
    status = request.GET.get("status", "unresolved")
    rule = request.GET.get("rule", "")
    mine = request.GET.get("mine") == "1"
    mrn = request.POST.get("mrn", "").strip() if request.method == "POST" else ""
    qs = Alert.objects.select_related("patient", "assignee").annotate(index_on=_index_day())
    qs = qs.filter(status__in=OPEN_ALERT_STATUSES) if status == "unresolved" else qs.filter(
        status=status)
    if rule in RULE_LABELS:
        qs = qs.filter(rule_id=rule)
    if mine:
        qs = qs.filter(assignee=request.user)
    if mrn:
        qs = qs.filter(patient__identifiers__value=mrn)
    qs = qs.order_by("due_on", "-escalation_level", "pk")
    page = Paginator(qs, 25).get_page(request.GET.get("page"))
    today = clinic_today()
    rows = [_row(alert, today) for alert in page]
    counts = _counts()
    return render(request, "worklist/list.html", {
        "rows": rows, "page": page, "status": status, "rule": rule, "mine": mine, "mrn": mrn,
        "counts": counts, "rules": RULE_LABELS, "reasons": RESOLUTION_REASONS,
        "snooze_default": (today + dt.timedelta(days=14)).isoformat(),
        "unresolved_count": counts["unresolved"],
    })


def _index_day() -> Subquery:
    return Subquery(Procedure.objects.filter(
        patient=OuterRef("patient"), record_status=RecordStatus.ACTIVE
    ).values("patient").annotate(first=Min("performed_on")).values("first"))


def _row(alert: Alert, today: dt.date) -> dict:
    p = alert.patient
    return {
        "alert": alert,
        "age": (today - p.birth_date).days // 365 if p.birth_date else None,
        "days_since": (today - alert.index_on).days if alert.index_on else None,
        "overdue": alert.due_on is not None and alert.due_on < today,
        "rule_label": RULE_LABELS.get(alert.rule_id, alert.rule_id),
    }


def _counts() -> dict[str, int]:
    counts = dict(Alert.objects.values_list("status").annotate(n=Count("pk")).order_by())
    counts["unresolved"] = sum(counts.get(s, 0) for s in OPEN_ALERT_STATUSES)
    return counts


def _wants_fragment(request: HttpRequest) -> bool:
    return request.headers.get("X-Requested-With") == "fetch"


@require_POST
@permission_required("registry.work_alerts", raise_exception=True)
def worklist_action(request: HttpRequest, alert_id: int, action: str) -> HttpResponse:
    alert = get_object_or_404(Alert, pk=alert_id)
    actor = Actor(user_id=request.user.pk, via="ui")
    note = request.POST.get("note", "")
    ok, text = True, ""
    try:
        if action == "acknowledge":
            alert_services.alert_acknowledge(alert=alert, actor=actor, note=note)
        elif action == "resolve":
            alert_services.alert_resolve(alert=alert, reason=request.POST.get("reason", ""),
                                         actor=actor, note=note)
        elif action == "snooze":
            until = dt.date.fromisoformat(request.POST.get("until", ""))
            alert_services.alert_snooze(alert=alert, until=until, actor=actor, note=note)
        elif action == "assign-me":
            alert_services.alert_assign(alert=alert, actor=actor, assignee_id=request.user.pk)
        else:
            return HttpResponse("Unknown action", status=404)
        text = f"Alert {alert.pk}: {action.replace('-', ' ')} done."
    except RegistryValidationError as exc:
        ok, text = False, f"Alert {alert.pk}: {exc.messages[0]}"
    except ValueError:
        ok, text = False, f"Alert {alert.pk}: enter a valid date."
    if _wants_fragment(request):
        # Progressive enhancement (static/js/worklist.js): answer the re-rendered row.
        today = clinic_today()
        fresh = Alert.objects.select_related("patient", "assignee").annotate(
            index_on=_index_day()).get(pk=alert.pk)
        html = render_to_string("worklist/_row.html", {
            "r": _row(fresh, today), "reasons": RESOLUTION_REASONS,
            "snooze_default": (today + dt.timedelta(days=14)).isoformat(),
        }, request=request)
        return JsonResponse({"ok": ok, "message": text, "status": fresh.status, "html": html,
                             "counts": _counts()}, status=200 if ok else 400)
    (messages.success if ok else messages.error)(request, text)
    back = request.POST.get("next", "")
    return redirect(back if back.startswith("/worklist/") else "worklist")



