"""Worklist page for the care team: unresolved alerts, one-click actions (POST, then back).

Search by MRN is a POST so no identifier ever appears in a URL.
"""

from __future__ import annotations

import datetime as dt

from django.conf import settings
from django.contrib import messages
from django.contrib.auth import get_user_model
from django.contrib.auth.decorators import permission_required
from django.contrib.auth.models import Group, Permission
from django.contrib.contenttypes.models import ContentType
from django.core.paginator import Paginator
from django.db import connection
from django.db.models import (
    Case,
    Count,
    DateTimeField,
    DurationField,
    ExpressionWrapper,
    F,
    Min,
    OuterRef,
    Subquery,
    Value,
    When,
)
from django.db.models.functions import Cast, Coalesce
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.backends.utils import csrf_input
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone
from django.utils.html import conditional_escape, format_html, format_html_join
from django.utils.safestring import SafeString
from django.views.decorators.http import require_http_methods, require_POST

from followup import alerts as alert_services
from registry import codes
from registry.followup import (
    HIGH_VBQ,
    NOT_COUNTING,
    RESOLUTION_REASONS,
    VBQ_MISSING,
    Exposure,
    FollowupConfig,
    coverage_end,
)
from registry.labels import RULE_LABELS, agent_label, reason_label, rule_label
from registry.models import (
    OPEN_ALERT_STATUSES,
    Alert,
    AlertEvent,
    PatientIdentifier,
    Procedure,
    RecordStatus,
    TherapyExposure,
)
from registry.services import RegistryValidationError
from registry.side_effects import Actor
from registry.timeutil import clinic_today

SORTS = {
    "due": ("Alert date (most urgent first)", ("due_on", "-escalation_level", "pk")),
    "overdue": ("Most overdue first", ("rule_due_at", "-escalation_level", "pk")),
    "vbq": ("VBQ (highest first)", ("-vbq_value", "due_on", "pk")),
    "days": ("Days since procedure (longest first)", ("index_on", "due_on", "pk")),
    "patient": ("Patient name", ("patient__family_name", "patient__given_name", "pk")),
}
DEFAULT_SORT = "due"
DONE = {"acknowledge": "acknowledged", "resolve": "resolved (Undo resolve reopens it)",
        "reopen": "resolve undone, the alert is open again", "snooze": "snoozed",
        "assign-me": "assigned to you", "assign": "assigned", "note": "note added"}


@require_http_methods(["GET", "POST"])
@permission_required("registry.work_alerts", raise_exception=True)
def worklist(request: HttpRequest) -> HttpResponse:
    status = request.GET.get("status", "unresolved")
    rule = request.GET.get("rule", "")
    mine = request.GET.get("mine") == "1"
    mrn = request.POST.get("mrn", "").strip() if request.method == "POST" else ""
    # Two steps in one statement: the page's 25 alert ids are chosen from a narrow scan of the
    # alerts (only what the filter and the sort read), and only those 25 rows are joined to the
    # patient, assignee, MRN and index day. Sorting the fully joined rows of 10,000 open alerts
    # and cutting 25 took PostgreSQL ~8 ms; choosing the ids first ~2.5 ms (docs/benchmarks.md).
    keys = Alert.objects.filter(status__in=OPEN_ALERT_STATUSES) if status == "unresolved" else (
        Alert.objects.filter(status=status))
    if rule in RULE_LABELS:
        keys = keys.filter(rule_id=rule)
    if mine:
        keys = keys.filter(assignee=request.user)
    if mrn:
        keys = keys.filter(patient__identifiers__value=mrn)
    sort = request.GET.get("sort", DEFAULT_SORT)
    if sort not in SORTS:
        sort = DEFAULT_SORT
    if sort in ("overdue", "days"):
        keys = keys.alias(index_on=_index_day())
    if sort == "overdue":
        keys = keys.alias(rule_due_at=_rule_due())
    keys = keys.order_by(*SORTS[sort][1]).values_list("pk", flat=True)
    counts = _counts()
    paginator = Paginator(keys, 25)
    if not (rule or mine or mrn):
        # The per-status counts are needed anyway: reuse them instead of a second COUNT(*).
        paginator.__dict__["count"] = counts["unresolved"] if status == "unresolved" else (
            counts.get(status, 0))
    page = paginator.get_page(request.GET.get("page"))
    qs = _row_queryset(with_resolver=status == "resolved").filter(pk__in=page.object_list)
    if sort == "overdue":
        qs = qs.alias(rule_due_at=_rule_due())
    today = clinic_today()
    urls = _url_patterns()
    alerts = list(qs.order_by(*SORTS[sort][1]))
    therapies = _last_therapies({a.patient_id for a in alerts}, today)
    row_context = _row_context(today, request)
    actions = ActionCells(row_context, urls[0])
    rows = [_row(alert, today, urls, request.user.pk, therapies) for alert in alerts]
    for r in rows:
        r["actions"] = actions(r)
    return render(request, "worklist/list.html", {
        "rows": rows, "rows_html": SafeString("".join(row_html(r) for r in rows)),
        "page": page, "status": status, "rule": rule, "mine": mine, "mrn": mrn,
        "counts": counts, "rules": RULE_LABELS, **row_context,
        "sort": sort, "sorts": {k: label for k, (label, _) in SORTS.items()},
        "sort_label": SORTS[sort][0],
        "unresolved_count": counts["unresolved"],
    })


def _row_context(today: dt.date, request: HttpRequest) -> dict:
    """What every row template needs, built once per request (not once per row). The CSRF
    field too: the same token {% csrf_token %} would print, but rendered once instead of in
    each of the ~6 forms of 25 rows."""
    return {
        "csrf_input": csrf_input(request),
        "reason_options": format_html_join(
            "", '<option value="{}">{}</option>', RESOLUTION_REASONS.items()),
        "reopen_window_hours": settings.ALERT_REOPEN_WINDOW_SECONDS // 3600,
        "snooze_default": (today + dt.timedelta(days=14)).isoformat(),
        "assignee_options": format_html_join(
            "", '<option value="{}">{}</option>', _alert_worker_choices()),
    }


class ActionCells:
    """The action forms of worklist rows (``worklist/_row_actions.html``). An unresolved row's
    forms depend only on its status and whether it is assigned to the viewer, apart from its
    id: they are rendered once per such pair per request, with a placeholder id replaced per
    row (the forms are most of a row's template work). Resolved rows are rendered each."""

    def __init__(self, context: dict, action_pattern: str) -> None:
        self.context = context
        self.action_pattern = action_pattern
        self.rendered: dict[tuple[str, bool], str] = {}

    def __call__(self, row: dict) -> SafeString:
        if row["status"] == "resolved":
            return SafeString(render_to_string("worklist/_row_actions.html",
                                               {**self.context, "r": row}))
        key = (row["status"], bool(row["mine"]))
        if key not in self.rendered:
            template_row = {**row, "pk": _PK, "action_url": self.action_pattern}
            self.rendered[key] = render_to_string("worklist/_row_actions.html",
                                                  {**self.context, "r": template_row})
        return SafeString(self.rendered[key].replace(_PK, row["pk"]))


def _alert_worker_choices() -> list[tuple[int, str]]:
    """(pk, username) of the active users who may work alerts (superusers, or the permission
    through a group or directly): the assign menu on every worklist page, and the only people
    the assign action accepts.

    One hand-written statement: the same rule as an ORM query cost ~1.5 ms per page, almost
    all of it compiling the query (PostgreSQL runs it in ~0.1 ms). A test checks it against
    Django's own ``has_perm``."""
    user_model = get_user_model()
    q = connection.ops.quote_name
    sql = f"""
        SELECT u.id, u.username FROM {q(user_model._meta.db_table)} u
        WHERE u.is_active AND (u.is_superuser
            OR EXISTS (SELECT 1 FROM {q(user_model.groups.through._meta.db_table)} ug
                       JOIN {q(Group.permissions.through._meta.db_table)} gp
                         ON gp.group_id = ug.group_id
                       WHERE ug.user_id = u.id AND gp.permission_id IN (SELECT id FROM perm))
            OR EXISTS (SELECT 1 FROM {q(user_model.user_permissions.through._meta.db_table)} up
                       WHERE up.user_id = u.id AND up.permission_id IN (SELECT id FROM perm)))
        ORDER BY u.username"""  # noqa: S608 - names from model metadata, values bound
    perm = f"""
        WITH perm AS (SELECT p.id FROM {q(Permission._meta.db_table)} p
                      JOIN {q(ContentType._meta.db_table)} ct ON ct.id = p.content_type_id
                      WHERE p.codename = %s AND ct.app_label = %s)"""  # noqa: S608
    with connection.cursor() as cursor:
        cursor.execute(perm + sql, ["work_alerts", "registry"])
        return [(pk, username) for pk, username in cursor.fetchall()]


def _row_queryset(*, with_resolver: bool = False):  # type: ignore[no-untyped-def]
    """Alerts with exactly the columns a row shows (narrow rows keep the sort and join cheap
    on 10,000 open alerts), the patient's index-procedure day and MRN; ``with_resolver``:
    also who resolved it (``resolved_by``, for "Undo resolve"), only where resolved rows show:
    PostgreSQL may evaluate it for every unresolved alert before the sort."""
    return Alert.objects.select_related("patient", "assignee").only(
        "id", "patient_id", "rule_id", "status", "vbq_value", "vbq_threshold",
        "vbq_threshold_field",
        "escalation_level", "due_on", "resolution_reason", "resolved_at", "assignee_id",
        "patient__id", "patient__family_name", "patient__given_name", "patient__birth_date",
        "patient__is_synthetic", "assignee__id", "assignee__username",
    ).annotate(index_on=_index_day(), mrn=_mrn(),
               **({"resolved_by": _resolved_by()} if with_resolver else {}))


def _resolved_by() -> Subquery:
    """Who made the alert's latest resolve (``None``: a rule, or never resolved): only a
    person's resolve offers "Undo resolve"."""
    return Subquery(AlertEvent.objects.filter(alert=OuterRef("pk"), action="resolve")
                    .order_by("-at", "-pk").values("actor_id")[:1])


def _mrn() -> Subquery:
    """The patient's MRN (identifier type MR), the first one recorded."""
    return Subquery(PatientIdentifier.objects.filter(
        patient=OuterRef("patient"), type_code="MR").order_by("pk").values("value")[:1])


def _rule_days() -> dict[str, int]:
    """Days after the index procedure at which each index-based rule makes a patient due."""
    return {HIGH_VBQ: settings.FOLLOWUP_DAYS, VBQ_MISSING: settings.VBQ_MISSING_AFTER_DAYS}


def _rule_due() -> Coalesce:
    """When the patient became due for the alert's rule: the index procedure + the rule's days
    for the index-based rules, else the day the alert opened (``due_on``): the sort key of
    "most overdue first". Alerts opened by a sweep that caught up on old procedures all open
    on the same day; this puts day 718 ahead of day 75. It reads every unresolved alert's
    index day (no index serves it), so it is a sort to choose, not the default one."""
    as_time = DateTimeField()
    offset = Case(*[When(rule_id=rule, then=Value(dt.timedelta(days=days)))
                    for rule, days in _rule_days().items()], output_field=DurationField())
    return Coalesce(ExpressionWrapper(F("index_on") + offset, output_field=as_time),
                    Cast("due_on", as_time), output_field=as_time)


def _last_therapies(patient_ids: set, today: dt.date) -> dict:
    """patient id → (agent label, last covered day, lapsed) of the exposure that covers the
    patient latest (the follow-up rule's own coverage: dosing intervals of long-acting agents,
    open-ended active records), for the rows of one page: one query, whatever the page size.
    Declined, cancelled and entered-in-error records do not count."""
    if not patient_ids:
        return {}
    config = FollowupConfig(threshold=settings.VBQ_HIGH_THRESHOLD)
    best: dict = {}
    for pid, agent, route, start, end, status in TherapyExposure.objects.filter(
        patient_id__in=patient_ids, record_status=RecordStatus.ACTIVE,
    ).exclude(status__in=NOT_COUNTING).values_list(
            "patient_id", "agent", "route", "start_on", "end_on", "status"):
        interval = codes.dose_interval_days(agent, route) if agent in codes.AGENTS else 0
        covered = coverage_end(Exposure(agent, route, start, end, status, interval), config)
        key = covered or dt.date.max
        if pid not in best or key > best[pid][0]:
            best[pid] = (key, agent, covered)
    return {pid: {"agent": agent_label(agent),
                  "until": covered.isoformat() if covered else None,
                  "lapsed": covered is not None and covered < today}
            for pid, (_, agent, covered) in best.items()}


def _index_day() -> Subquery:
    return Subquery(Procedure.objects.filter(
        patient=OuterRef("patient"), record_status=RecordStatus.ACTIVE
    ).values("patient").annotate(first=Min("performed_on")).values("first"))


_PK = "999999999"
_UUID0 = "00000000-0000-0000-0000-000000000000"


def threshold_label(alert: Alert) -> str | None:
    """Which high-VBQ cut-off the alert applied, in words (field strength or the default)."""
    if alert.vbq_threshold is None:
        return None
    if alert.vbq_threshold_field:
        return f"high ≥ {alert.vbq_threshold:g} at {alert.vbq_threshold_field}"
    return f"high ≥ {alert.vbq_threshold:g} (field strength unknown)"


def _row(alert: Alert, today: dt.date, urls: tuple[str, str] | None = None,
         user_id: int | None = None, therapies: dict | None = None) -> dict:
    """One worklist row as plain values (dict lookups keep the template fast on a full page).
    ``urls``: (action URL, patient URL) patterns from ``_url_patterns``, reversed once per
    request rather than five times per row; ``therapies``: from ``_last_therapies`` (looked
    up for this one alert when not given)."""
    action_url, patient_url = urls or _url_patterns()
    if therapies is None:
        therapies = _last_therapies({alert.patient_id}, today)
    p = alert.patient
    vbq = alert.vbq_value
    due_day = _rule_due_day(alert)
    overdue_days = (today - due_day).days if due_day else None
    return {
        # strings, not ints: the template would localise every number it prints
        "pk": str(alert.pk),
        "status": alert.status,
        "status_label": alert.get_status_display(),
        "name": p.display_name,
        "synthetic": p.is_synthetic,
        "patient_url": patient_url.replace(_UUID0, str(alert.patient_id)),
        "action_url": action_url.replace(_PK, str(alert.pk)),
        "age": str((today - p.birth_date).days // 365) if p.birth_date else None,
        "vbq": f"{vbq:.2f}" if vbq is not None else None,
        "vbq_high": vbq is not None and alert.vbq_threshold is not None
        and vbq >= alert.vbq_threshold,
        "birth_date": p.birth_date.isoformat() if p.birth_date else None,
        "mrn": alert.mrn,
        "threshold": threshold_label(alert),
        "days_since": str((today - alert.index_on).days) if alert.index_on else None,
        "rule_label": rule_label(alert.rule_id),
        "escalated": bool(alert.escalation_level),
        "due": due_day.isoformat() if due_day else None,
        "overdue_days": str(overdue_days) if overdue_days and overdue_days > 0 else None,
        "overdue": overdue_days is not None and overdue_days > 0,
        "therapy": therapies.get(alert.patient_id),
        "assignee": alert.assignee.get_username() if alert.assignee_id else None,
        "mine": user_id is not None and alert.assignee_id == user_id,
        "resolution_reason": reason_label(alert.resolution_reason),
        "can_reopen": alert.status == "resolved" and _within_reopen_window(alert),
    }


_ROW_HTML = (
    '  <tr data-alert="{pk}" class="status-{status}{overdue_class}">\n'
    '    <td class="who" data-label="Patient"><a href="{patient_url}">{name}</a>{synthetic}</td>\n'
    '    <td class="nowrap" data-label="MRN">{mrn}</td>\n'
    '    <td class="nowrap" data-label="Born">{birth_date}{age}</td>\n'
    '    <td data-label="VBQ">{vbq}</td>\n'
    '    <td class="therapy" data-label="Last therapy">{therapy}</td>\n'
    '    <td class="num" data-label="Days since procedure">{days_since}</td>\n'
    '    <td data-label="Rule · status">{rule_label}{escalated}<br>'
    '<span class="state state-{status}">{status_label}</span> · '
    '<a class="small" href="{patient_url}#alert-{pk}">history</a></td>\n'
    '    <td class="nowrap" data-label="Due">{due}{overdue_days}</td>\n'
    '    <td data-label="Assignee">{assignee}</td>\n'
    '    <td class="row-actions" data-label="Actions">{actions}</td>\n'
    '  </tr>\n'
)
_NONE = "—"
_SYNTHETIC = SafeString(' <span class="badge tiny">synthetic</span>')
_ESCALATED = SafeString(' <span class="badge high">escalated</span>')


def row_html(r: dict) -> SafeString:
    """One worklist row (a ``_row`` dict with its ``actions``) as HTML: the worklist page and
    the row an action answers (static/js/worklist.js swaps it in). Built with ``format_html``
    rather than a row template: at 25 rows a page, the template engine's per-variable work
    was ~2.3 ms of a ~20 ms page (docs/benchmarks.md). Every value is escaped."""
    e = conditional_escape
    if r["vbq"]:
        vbq = format_html('<span class="badge {}">{}</span>{}{}',
                          "high" if r["vbq_high"] else "ok", r["vbq"],
                          SafeString(' <span class="muted small">high</span>')
                          if r["vbq_high"] else "",
                          format_html('<br><span class="muted small threshold">{}</span>',
                                      r["threshold"]) if r["threshold"] else "")
    else:
        vbq = _NONE
    therapy = r["therapy"]
    if not therapy:
        therapy_html = SafeString('<span class="muted">none recorded</span>')
    elif therapy["lapsed"]:
        therapy_html = format_html('{}<br><span class="badge high">lapsed {}</span>',
                                   therapy["agent"], therapy["until"])
    elif therapy["until"]:
        therapy_html = format_html('{}<br><span class="muted small">covered to {}</span>',
                                   therapy["agent"], therapy["until"])
    else:
        therapy_html = format_html('{}<br><span class="muted small">active</span>',
                                   therapy["agent"])
    return SafeString(_ROW_HTML.format(
        pk=e(r["pk"]), status=e(r["status"]), status_label=e(r["status_label"]),
        overdue_class=" overdue" if r["overdue"] else "",
        patient_url=e(r["patient_url"]), name=e(r["name"]),
        synthetic=_SYNTHETIC if r["synthetic"] else "",
        mrn=e(r["mrn"]) if r["mrn"] is not None else _NONE,
        birth_date=e(r["birth_date"]) if r["birth_date"] is not None else _NONE,
        age=format_html(' <span class="muted small">({} y)</span>', r["age"]) if r["age"]
        else "",
        vbq=vbq, therapy=therapy_html,
        days_since=e(r["days_since"]) if r["days_since"] is not None else _NONE,
        rule_label=e(r["rule_label"]), escalated=_ESCALATED if r["escalated"] else "",
        due=e(r["due"]) if r["due"] is not None else _NONE,
        overdue_days=format_html('<br><span class="badge high overdue-days">{} d overdue</span>',
                                 r["overdue_days"]) if r["overdue_days"] else "",
        assignee=e(r["assignee"]) if r["assignee"] is not None else _NONE,
        actions=conditional_escape(r["actions"])))


def _rule_due_day(alert: Alert) -> dt.date | None:
    """The clinic day the patient became due for the alert's rule (see ``_rule_due``)."""
    days = _rule_days().get(alert.rule_id)
    if days is not None and alert.index_on:
        return alert.index_on + dt.timedelta(days=days)
    return alert.due_on


def _within_reopen_window(alert: Alert) -> bool:
    """Whether the row offers "Undo resolve" (no query: ``resolved_by`` is annotated): a
    person resolved it, recently enough. ``alert_reopen`` checks again under the lock."""
    if alert.resolved_at is None or getattr(alert, "resolved_by", None) is None:
        return False
    age = timezone.now() - alert.resolved_at
    return age.total_seconds() <= settings.ALERT_REOPEN_WINDOW_SECONDS


def _url_patterns() -> tuple[str, str]:
    action = reverse("worklist-action", args=[_PK, "x"]).removesuffix("/x/")
    patient = reverse("patient-detail", args=[_UUID0])
    return action, patient


def _counts() -> dict[str, int]:
    # COUNT(*), not COUNT(id): PostgreSQL answers it from the (status, due_on) index alone.
    counts = dict(Alert.objects.values_list("status").annotate(n=Count("*")).order_by())
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
            if request.POST.get("confirmed") != "1":
                raise RegistryValidationError("confirm the resolution first", field="confirmed")
            reason = request.POST.get("reason", "")
            if not reason:
                raise RegistryValidationError("choose why the alert is resolved",
                                              field="reason")
            alert_services.alert_resolve(alert=alert, reason=reason, actor=actor, note=note)
        elif action == "reopen":
            alert_services.alert_reopen(alert=alert, actor=actor, note=note)
        elif action == "snooze":
            until = dt.date.fromisoformat(request.POST.get("until", ""))
            alert_services.alert_snooze(alert=alert, until=until, actor=actor, note=note)
        elif action == "assign-me":
            alert_services.alert_assign(alert=alert, actor=actor, assignee_id=request.user.pk)
        elif action == "assign":
            assignee_id = int(request.POST.get("assignee", ""))
            if assignee_id not in dict(_alert_worker_choices()):
                raise RegistryValidationError("choose a colleague who can work alerts",
                                              field="assignee")
            alert_services.alert_assign(alert=alert, actor=actor, assignee_id=assignee_id)
        elif action == "note":
            alert_services.alert_add_note(alert=alert, note=note, actor=actor)
        else:
            return HttpResponse("Unknown action", status=404)
        text = f"Alert {alert.pk}: {DONE.get(action, action.replace('-', ' ') + ' done')}."
    except RegistryValidationError as exc:
        ok, text = False, f"Alert {alert.pk}: {exc.messages[0]}"
    except ValueError:
        what = "colleague" if action == "assign" else "date"
        ok, text = False, f"Alert {alert.pk}: enter a valid {what}."
    if _wants_fragment(request):
        # Progressive enhancement (static/js/worklist.js): answer the re-rendered row.
        today = clinic_today()
        fresh = _row_queryset(with_resolver=True).get(pk=alert.pk)
        context = _row_context(today, request)
        row = _row(fresh, today, user_id=request.user.pk)
        row["actions"] = ActionCells(context, _url_patterns()[0])(row)
        html = row_html(row)
        return JsonResponse({"ok": ok, "message": text, "status": fresh.status, "html": html,
                             "counts": _counts()}, status=200 if ok else 400)
    (messages.success if ok else messages.error)(request, text)
    back = request.POST.get("next", "")
    return redirect(back if back.startswith("/worklist/") else "worklist")



