"""Imaging API: VBQ job status (list/detail) and DICOM upload for a patient.

Permissions: job status for anyone who may see identified data; upload for clinicians and
coordinators (``registry.view_identified_data``) — the file is checked (size, zip, DICOM).
"""

from __future__ import annotations

from typing import Any

from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import serializers, status
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.parsers import MultiPartParser
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from registry.models import Patient
from registry.side_effects import Actor
from scoring.models import VbqResult
from scoring.uploads import UploadRefused, dicom_zip_upload

MAX_UPLOAD_BYTES = 500 * 1024 * 1024


class CanSeePatients(BasePermission):
    def has_permission(self, request: Request, view: Any) -> bool:
        return bool(request.user and request.user.has_perm("registry.view_identified_data"))


class JobOutputSerializer(serializers.ModelSerializer):
    patient_id = serializers.UUIDField(read_only=True)
    series_instance_uid = serializers.CharField(source="series.series_instance_uid",
                                                default=None)

    class Meta:
        model = VbqResult
        fields = ["id", "patient_id", "series_instance_uid", "algorithm_version", "source",
                  "revision", "status", "review_status", "vbq_all_levels",
                  "vbq_excluding_fractured", "confidence", "qc_flags", "error_code",
                  "error_message", "attempts", "queued_at", "started_at", "finished_at"]


class JobListApi(APIView):
    """VBQ jobs, newest first; ``?status=`` filters."""

    permission_classes = [CanSeePatients]

    @extend_schema(operation_id="vbq_jobs_list", responses=JobOutputSerializer(many=True))
    def get(self, request: Request) -> Response:
        qs = VbqResult.objects.select_related("series").order_by("-queued_at", "-pk")
        wanted = request.query_params.get("status")
        if wanted:
            if wanted not in VbqResult.Status.values:
                return Response({"detail": f"unknown status {wanted!r}"}, status=400)
            qs = qs.filter(status=wanted)
        paginator = LimitOffsetPagination()
        page = paginator.paginate_queryset(qs, request, view=self)
        return paginator.get_paginated_response(JobOutputSerializer(page, many=True).data)


class JobDetailApi(APIView):
    permission_classes = [CanSeePatients]

    @extend_schema(operation_id="vbq_job_retrieve", responses=JobOutputSerializer)
    def get(self, request: Request, result_id: int) -> Response:
        return Response(JobOutputSerializer(get_object_or_404(VbqResult, pk=result_id)).data)


class DicomUploadInputSerializer(serializers.Serializer):
    file = serializers.FileField(help_text="a zip of one study's DICOM files (at most 500 MB)")


class DicomUploadOutputSerializer(serializers.Serializer):
    stored = serializers.IntegerField(help_text="DICOM files stored")
    rejected = serializers.IntegerField(help_text="files in the zip that are not DICOM")
    studies = serializers.ListField(child=serializers.IntegerField(),
                                    help_text="ids of the imaging studies registered")


class UploadErrorSerializer(serializers.Serializer):
    detail = serializers.CharField()


@extend_schema_view(post=extend_schema(
    operation_id="dicom_upload", request={"multipart/form-data": DicomUploadInputSerializer},
    responses={201: DicomUploadOutputSerializer, 400: UploadErrorSerializer,
               413: UploadErrorSerializer, 415: UploadErrorSerializer}))
class DicomUploadApi(APIView):
    """POST a zip of one study's DICOM files (``file``) for ``patient``: stored like a C-STORE
    push, registered, linked and scored, only if the files' DICOM patient is this patient
    (``scoring.uploads.dicom_zip_upload``): otherwise 409 with the reasons and nothing
    stored. A coordinator may store it anyway with ``override_reason`` (one of
    ``IDENTITY_OVERRIDE_REASONS``), audited. The answer says what happened to each study:
    linked or not (and why), how many scoring jobs were made."""

    permission_classes = [CanSeePatients]
    parser_classes = [MultiPartParser]

    def post(self, request: Request, patient_id: str) -> Response:
        patient = get_object_or_404(Patient, pk=patient_id)
        upload = request.FILES.get("file")
        if upload is None:
            return Response({"detail": "send the DICOM files as a zip in 'file'"}, status=400)
        if upload.size > MAX_UPLOAD_BYTES:
            return Response({"detail": "the upload is larger than 500 MB"}, status=413)
        try:
            outcome = dicom_zip_upload(
                patient=patient, data=upload.read(), user=request.user,
                actor=Actor(user_id=request.user.pk, via="upload"),
                override_reason=str(request.data.get("override_reason", "") or ""))
        except UploadRefused as exc:
            return Response(exc.payload, status=exc.status)
        return Response(outcome, status=status.HTTP_201_CREATED)
