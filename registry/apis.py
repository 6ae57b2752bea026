"""Worklist API (DRF): one APIView per operation, nested Input/Output serializers.

Permission: ``registry.work_alerts`` (clinicians, coordinators, admins). Every operation goes
through ``followup.alerts`` services, so history and audit are written the same way as the UI.
"""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema, extend_schema_serializer, extend_schema_view
from rest_framework import serializers, status
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from followup import alerts as alert_services
from registry.followup import RESOLUTION_REASONS, RULE_VERSIONS
from registry.models import OPEN_ALERT_STATUSES, Alert, AlertStatus
from registry.services import RegistryValidationError
from registry.side_effects import Actor


class CanWorkAlerts(BasePermission):
    def has_permission(self, request: Request, view: Any) -> bool:
        return bool(request.user and request.user.has_perm("registry.work_alerts"))


def _actor(request: Request) -> Actor:
    return Actor(user_id=request.user.pk, via="api")


def _invalid(exc: RegistryValidationError) -> Response:
    return Response({"detail": exc.messages[0], "field": exc.field, "code": exc.code},
                    status=status.HTTP_409_CONFLICT if exc.code == "invalid-transition"
                    else status.HTTP_400_BAD_REQUEST)


class AlertOutputSerializer(serializers.ModelSerializer):
    patient_id = serializers.UUIDField(read_only=True)

    class Meta:
        model = Alert
        fields = [
            "id", "patient_id", "rule_id", "rule_version", "status", "reason", "vbq_value",
            "vbq_threshold", "escalation_level", "care_team", "assignee", "opened_at", "due_on",
            "acknowledged_at", "snoozed_until", "resolved_at", "resolution_reason",
        ]


class AlertListApi(APIView):
    """List alerts. Filters: status (default: unresolved), rule, care_team, due_before,
    assignee ("me" or a user id). Ordered by due date, then escalation."""

    permission_classes = [CanWorkAlerts]

    class FilterSerializer(serializers.Serializer):
        status = serializers.ChoiceField(choices=[*AlertStatus.values, "unresolved"],
                                         required=False, default="unresolved")
        rule = serializers.ChoiceField(choices=list(RULE_VERSIONS), required=False)
        care_team = serializers.CharField(required=False, max_length=100)
        due_before = serializers.DateField(required=False)
        assignee = serializers.CharField(required=False, max_length=20)

    @extend_schema(operation_id="alerts_list", parameters=[FilterSerializer],
                   responses=AlertOutputSerializer(many=True))
    def get(self, request: Request) -> Response:
        filters = self.FilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        f = filters.validated_data
        qs: QuerySet[Alert] = Alert.objects.all()
        if f["status"] == "unresolved":
            qs = qs.filter(status__in=OPEN_ALERT_STATUSES)
        else:
            qs = qs.filter(status=f["status"])
        if f.get("rule"):
            qs = qs.filter(rule_id=f["rule"])
        if f.get("care_team"):
            qs = qs.filter(care_team=f["care_team"])
        if f.get("due_before"):
            qs = qs.filter(due_on__lte=f["due_before"])
        if f.get("assignee") == "me":
            qs = qs.filter(assignee=request.user)
        elif f.get("assignee", "").isdigit():
            qs = qs.filter(assignee_id=int(f["assignee"]))
        qs = qs.order_by("due_on", "-escalation_level", "pk")
        paginator = LimitOffsetPagination()
        page = paginator.paginate_queryset(qs, request, view=self)
        return paginator.get_paginated_response(AlertOutputSerializer(page, many=True).data)


class AlertErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()
    field = serializers.CharField(required=False)
    code = serializers.CharField(required=False)


class _AlertOperationApi(APIView):
    """Base for one alert operation: validate ``InputSerializer``, call ``perform``, answer the
    alert (400 for invalid input, 409 for an impossible transition, 404 for an unknown id).
    ``get_serializer_class`` names the input serializer for the OpenAPI schema
    (drf-spectacular); ``_describe`` gives each subclass its operation id and responses."""

    permission_classes = [CanWorkAlerts]
    success_status = status.HTTP_200_OK

    def get_serializer_class(self) -> type[serializers.Serializer]:
        return self.InputSerializer

    class InputSerializer(serializers.Serializer):
        note = serializers.CharField(required=False, allow_blank=True, max_length=4000)

    def perform(self, alert: Alert, data: dict[str, Any], actor: Actor) -> Alert:
        raise NotImplementedError

    def post(self, request: Request, alert_id: int) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        alert = get_object_or_404(Alert, pk=alert_id)
        try:
            alert = self.perform(alert, data.validated_data, _actor(request))
        except RegistryValidationError as exc:
            return _invalid(exc)
        return Response(AlertOutputSerializer(alert).data, status=self.success_status)


def _describe(operation: str) -> Any:
    """``extend_schema_view`` for an alert operation: request = its ``InputSerializer``,
    responses = the alert (or 400/404/409 with a reason)."""

    def decorate(cls: type[_AlertOperationApi]) -> type[_AlertOperationApi]:
        # Each nested InputSerializer is called "Input": name its schema component apart.
        extend_schema_serializer(component_name=f"Alert{operation.title()}Input")(
            cls.InputSerializer)
        return extend_schema_view(post=extend_schema(
            operation_id=f"alert_{operation}", request=cls.InputSerializer,
            responses={cls.success_status: AlertOutputSerializer,
                       400: AlertErrorSerializer, 404: AlertErrorSerializer,
                       409: AlertErrorSerializer}))(cls)

    return decorate


@_describe("acknowledge")
class AlertAcknowledgeApi(_AlertOperationApi):
    def perform(self, alert: Alert, data: dict[str, Any], actor: Actor) -> Alert:
        return alert_services.alert_acknowledge(alert=alert, actor=actor,
                                                note=data.get("note", ""))


@_describe("resolve")
class AlertResolveApi(_AlertOperationApi):
    class InputSerializer(serializers.Serializer):
        reason = serializers.ChoiceField(choices=list(RESOLUTION_REASONS))
        note = serializers.CharField(required=False, allow_blank=True, max_length=4000)

    def perform(self, alert: Alert, data: dict[str, Any], actor: Actor) -> Alert:
        return alert_services.alert_resolve(alert=alert, reason=data["reason"], actor=actor,
                                            note=data.get("note", ""))


@_describe("snooze")
class AlertSnoozeApi(_AlertOperationApi):
    class InputSerializer(serializers.Serializer):
        until = serializers.DateField()
        note = serializers.CharField(required=False, allow_blank=True, max_length=4000)

    def perform(self, alert: Alert, data: dict[str, Any], actor: Actor) -> Alert:
        return alert_services.alert_snooze(alert=alert, until=data["until"], actor=actor,
                                           note=data.get("note", ""))


@_describe("assign")
class AlertAssignApi(_AlertOperationApi):
    class InputSerializer(serializers.Serializer):
        assignee = serializers.IntegerField(required=False, allow_null=True)
        care_team = serializers.CharField(required=False, max_length=100)

    def perform(self, alert: Alert, data: dict[str, Any], actor: Actor) -> Alert:
        return alert_services.alert_assign(alert=alert, actor=actor,
                                           assignee_id=data.get("assignee"),
                                           care_team=data.get("care_team"))


@_describe("note")
class AlertNoteApi(_AlertOperationApi):
    success_status = status.HTTP_201_CREATED

    class InputSerializer(serializers.Serializer):
        note = serializers.CharField(max_length=4000)

    def perform(self, alert: Alert, data: dict[str, Any], actor: Actor) -> Alert:
        alert_services.alert_add_note(alert=alert, note=data["note"], actor=actor)
        return alert


@_describe("reopen")
class AlertReopenApi(_AlertOperationApi):
    """Undo a person's resolve within ``ALERT_REOPEN_WINDOW_SECONDS`` (409 outside it, or for a
    rule's own resolution)."""

    class InputSerializer(serializers.Serializer):
        note = serializers.CharField(required=False, allow_blank=True, max_length=4000)

    def perform(self, alert: Alert, data: dict[str, Any], actor: Actor) -> Alert:
        return alert_services.alert_reopen(alert=alert, actor=actor, note=data.get("note", ""))
