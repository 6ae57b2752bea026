"""Report page, JSON API, plots, cohort CSV and printable summary.

Everyone with ``registry.view_reports`` sees aggregates. Only holders of
``registry.export_identified_cohort`` (clinicians, coordinators, admins) get identified cohort
rows; everyone else (qi_analyst) gets de-identified rows and small-cell-suppressed aggregates.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth.decorators import permission_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.http import require_GET
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from registry.models import AuditAction, Sex
from registry.reports import deid, plots
from registry.reports.cohort import ReportParams
from registry.reports.queries import CohortFilters, build_cohort
from registry.reports.survival import build_report
from registry.side_effects import Actor, audit_record
from registry.timeutil import clinic_today


class FiltersSerializer(serializers.Serializer):
    index_from = serializers.DateField(required=False, allow_null=True)
    index_to = serializers.DateField(required=False, allow_null=True)
    care_team = serializers.CharField(required=False, allow_blank=True, max_length=100)
    sex = serializers.ChoiceField(choices=[("", "any"), *Sex.choices], required=False)
    age_min = serializers.IntegerField(required=False, allow_null=True, min_value=0,
                                       max_value=120)
    age_max = serializers.IntegerField(required=False, allow_null=True, min_value=0,
                                       max_value=130)
    cutoff = serializers.DateField(required=False, allow_null=True)
    # "recorded" (default): facts dated AND recorded by the cut-off; "dated": dated by it.
    as_of = serializers.ChoiceField(choices=["recorded", "dated"], required=False)
    vbq_value = serializers.ChoiceField(
        choices=["excluding_fractured", "all_levels"], required=False
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("index_from") and attrs.get("index_to") and (
            attrs["index_from"] > attrs["index_to"]
        ):
            raise serializers.ValidationError("index_from is after index_to")
        if attrs.get("age_min") is not None and attrs.get("age_max") is not None and (
            attrs["age_min"] >= attrs["age_max"]
        ):
            raise serializers.ValidationError("age_min must be below age_max")
        return attrs


def _parse(query: Any) -> tuple[CohortFilters, ReportParams, dict[str, Any]]:
    """Validate filters; raises ``serializers.ValidationError`` on bad input."""
    data = {k: v for k, v in query.items() if v not in ("", None)}
    ser = FiltersSerializer(data=data)
    ser.is_valid(raise_exception=True)
    v = ser.validated_data
    filters = CohortFilters(
        index_from=v.get("index_from"), index_to=v.get("index_to"),
        care_team=v.get("care_team", ""), sex=v.get("sex", ""),
        age_min=v.get("age_min"), age_max=v.get("age_max"), cutoff=v.get("cutoff"),
        as_recorded=v.get("as_of", "recorded") == "recorded",
    )
    params = ReportParams(
        threshold=settings.VBQ_HIGH_THRESHOLD,
        vbq_value=v.get("vbq_value", settings.VBQ_ALERT_VALUE),
        followup_days=settings.FOLLOWUP_DAYS,
        small_cell_min=settings.SMALL_CELL_MIN,
    )
    return filters, params, v


def _identified(user: Any) -> bool:
    return bool(user.has_perm("registry.export_identified_cohort"))


def report_payload(user: Any, query: Any) -> dict[str, Any]:
    filters, params, _ = _parse(query)
    cohort = build_cohort(filters)
    report = build_report(cohort.rows, cohort.alerts, params).to_dict()
    payload: dict[str, Any] = {
        "synthetic": cohort.synthetic,
        "cutoff": cohort.cutoff.isoformat(),
        "as_of": "recorded" if filters.as_recorded else "dated",
        "deidentified": not _identified(user),
        "report": report,
    }
    if payload["deidentified"]:
        payload["report"], payload["suppressed"] = deid.suppress_small_cells(
            report, params.small_cell_min
        )
        if 0 < report["n_patients"] < params.small_cell_min:
            payload["report"]["n_patients"] = None
    return payload


class CanViewReports(BasePermission):
    def has_permission(self, request: Request, view: Any) -> bool:
        return bool(request.user and request.user.has_perm("registry.view_reports"))


class ReportOutputSerializer(serializers.Serializer):
    """The report as ``report_payload`` builds it (figures as nested objects)."""

    synthetic = serializers.BooleanField(help_text="every patient of the cohort is SYNTHETIC")
    cutoff = serializers.DateField(help_text="follow-up cut-off date of the cohort")
    deidentified = serializers.BooleanField(
        help_text="small cells suppressed, no identified rows (qi_analyst)")
    report = serializers.DictField(
        help_text="Table 1, incidence, Kaplan-Meier, log-rank, Cox, ROC, KPIs (docs/reports.md)")
    suppressed = serializers.ListField(
        child=serializers.CharField(), required=False,
        help_text="paths of the figures suppressed as small cells (de-identified only)")


class ReportApi(APIView):
    """GET the full QI report as JSON (filters as query parameters)."""

    permission_classes = [CanViewReports]

    @extend_schema(operation_id="report_retrieve", parameters=[FiltersSerializer],
                   responses=ReportOutputSerializer)
    def get(self, request: Request) -> Response:
        return Response(report_payload(request.user, request.query_params))


@require_GET
@permission_required("registry.view_reports", raise_exception=True)
def report_page(request: HttpRequest) -> HttpResponse:
    try:
        payload = report_payload(request.user, request.GET)
        errors = None
    except serializers.ValidationError as exc:
        payload, errors = None, exc.detail
    return render(
        request,
        "reports/report.html",
        {
            "payload": payload,
            "errors": errors,
            "query": request.GET.urlencode(),
            "filters": request.GET,
            "sexes": Sex.choices,
            "threshold": settings.VBQ_HIGH_THRESHOLD,
            "followup_days": settings.FOLLOWUP_DAYS,
        },
        status=400 if errors else 200,
    )


@require_GET
@permission_required("registry.view_reports", raise_exception=True)
def report_summary(request: HttpRequest) -> HttpResponse:
    """One-page printable summary (use the browser's Print → PDF)."""
    try:
        payload = report_payload(request.user, request.GET)
    except serializers.ValidationError as exc:
        return HttpResponse(f"Invalid filters: {exc.detail}", status=400)
    return render(request, "reports/summary.html", {"payload": payload,
                                                     "query": request.GET.urlencode()})


@require_GET
@permission_required("registry.view_reports", raise_exception=True)
def report_plot(request: HttpRequest, name: str, fmt: str) -> HttpResponse:
    if name not in plots.PLOTS or fmt not in {"svg", "png"}:
        return HttpResponse("Unknown plot", status=404)
    try:
        filters, params, _ = _parse(request.GET)
    except serializers.ValidationError as exc:
        return HttpResponse(f"Invalid filters: {exc.detail}", status=400)
    cohort = build_cohort(filters)
    report = build_report(cohort.rows, cohort.alerts, params)
    section_name, draw = plots.PLOTS[name]
    section = report.sections[section_name]
    identified = _identified(request.user)
    if not identified and 0 < len(cohort.rows) < params.small_cell_min:
        section = type(section)(False, "Suppressed: fewer patients than the small-cell limit.")
    body = draw(section, fmt=fmt, synthetic=cohort.synthetic, deidentified=not identified,
                small_cell_min=params.small_cell_min)
    return HttpResponse(body, content_type="image/svg+xml" if fmt == "svg" else "image/png")


@require_GET
@permission_required("registry.view_reports", raise_exception=True)
def cohort_csv(request: HttpRequest) -> HttpResponse:
    try:
        filters, params, _ = _parse(request.GET)
    except serializers.ValidationError as exc:
        return HttpResponse(f"Invalid filters: {exc.detail}", status=400)
    cohort = build_cohort(filters)
    identified = _identified(request.user)
    text = deid.cohort_csv(cohort.rows, params, deidentified=not identified)
    audit_record(
        actor=Actor(user_id=request.user.pk, via="ui"),
        action=AuditAction.EXPORT,
        object_type="CohortCsv",
        detail={"rows": len(cohort.rows), "identified": identified},
    )
    stamp = clinic_today().isoformat()
    kind = "identified" if identified else "deidentified"
    response = HttpResponse(text, content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="vbq-cohort-{kind}-{stamp}.csv"'
    return response
