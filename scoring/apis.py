"""Imaging API: VBQ job status (list/detail) and DICOM upload for a patient.

Permissions: job status for anyone who may see identified data; upload for clinicians and
coordinators (``registry.view_identified_data``) — the file is checked (size, zip, DICOM).
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.parsers import MultiPartParser
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from registry.models import Patient
from registry.services import Actor
from scoring.models import VbqResult

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


# Coded reasons a coordinator gives to store a series whose DICOM patient does not match
# (``scoring.identity``); audited by code (no free text: audit details carry no names).
IDENTITY_OVERRIDE_REASONS = {
    "name-changed": "The patient's name changed (e.g. marriage); same person verified",
    "outside-id": "Outside hospital's PatientID; same person verified on the images' source",
    "merged-record": "Old or merged record number of this patient",
    "verified-other": "Identity verified another way (documented in the clinical record)",
}
OVERRIDE_ROLES = ("coordinator", "admin")


def may_override_identity(user: Any) -> bool:
    """Coordinators (and admins) may store a mismatched series for a patient, with a reason."""
    return bool(user.is_superuser or user.groups.filter(name__in=OVERRIDE_ROLES).exists())


class DicomUploadApi(APIView):
    """POST a zip of one study's DICOM files (``file``) for ``patient``: stored like a C-STORE
    push, registered, linked and scored, only if the files' DICOM patient is this patient
    (``scoring.identity``): otherwise 409 with the reasons and nothing stored. A coordinator
    may store it anyway with ``override_reason`` (one of ``IDENTITY_OVERRIDE_REASONS``),
    audited. The answer says what happened to each study: linked or not (and why), how many
    scoring jobs were made."""

    permission_classes = [CanSeePatients]
    parser_classes = [MultiPartParser]

    def post(self, request: Request, patient_id: str) -> Response:
        import pydicom

        from integrations.dicom.scp import _safe, register_study
        from registry.services import audit_record
        from scoring.identity import describe, patient_mismatches

        patient = get_object_or_404(Patient, pk=patient_id)
        upload = request.FILES.get("file")
        if upload is None:
            return Response({"detail": "send the DICOM files as a zip in 'file'"}, status=400)
        if upload.size > MAX_UPLOAD_BYTES:
            return Response({"detail": "the upload is larger than 500 MB"}, status=413)
        override = str(request.data.get("override_reason", "") or "")
        if override and override not in IDENTITY_OVERRIDE_REASONS:
            return Response({"detail": f"unknown override reason {override[:30]!r}"},
                            status=400)
        if override and not may_override_identity(request.user):
            return Response({"detail": "only a coordinator may store images whose DICOM "
                                       "patient does not match"}, status=403)
        try:
            archive = zipfile.ZipFile(io.BytesIO(upload.read()))
        except zipfile.BadZipFile:
            return Response({"detail": "the file is not a zip archive"}, status=415)
        root = Path(settings.DICOM_STORAGE_ROOT)
        files = []
        rejected = 0
        for info in archive.infolist()[:5000]:
            if info.is_dir() or info.file_size > 50 * 1024 * 1024:
                continue
            try:
                ds = pydicom.dcmread(io.BytesIO(archive.read(info)))
                uids = tuple(_safe(str(ds.get(k, ""))) for k in (
                    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
            except Exception:  # not DICOM: skipped and counted
                rejected += 1
                continue
            files.append((uids, ds))
        if not files:
            return Response({"detail": "no DICOM file in the archive", "rejected": rejected},
                            status=400)
        # The right patient before anything is written (a series is never stored, linked or
        # scored for a patient it does not belong to).
        mismatch = patient_mismatches([ds for _, ds in files], patient)
        actor = Actor(user_id=request.user.pk, via="upload")
        if mismatch and not override:
            audit_record(actor=actor, action="create", object_type="ImagingStudy",
                         object_id="", patient_id=patient.pk,
                         detail={"upload": "refused", "identity": [m.code for m in mismatch]})
            return Response({
                "detail": "these images are not this patient's: " + describe(mismatch)
                          + ". Nothing was stored.",
                "code": "patient-mismatch", "mismatches": [m.code for m in mismatch],
                "can_override": may_override_identity(request.user),
                "override_reasons": IDENTITY_OVERRIDE_REASONS}, status=409)
        studies: set[str] = set()
        for (study, series, sop), ds in files:
            folder = root / study / series
            folder.mkdir(parents=True, exist_ok=True)
            ds.save_as(str(folder / f"{sop}.dcm"))
            studies.add(study)
        registered = []
        with transaction.atomic():
            for study_uid in studies:
                # Written FOR this patient (its DICOM patient matches, or a coordinator said
                # why it may), before it is linked and its jobs are created.
                study = register_study(root, study_uid, patient=patient, actor=actor,
                                       source="upload")
                if study is not None:
                    registered.append(study)
                    if mismatch:
                        audit_record(actor=actor, action="update", object_type="ImagingStudy",
                                     object_id=str(study.pk), patient_id=patient.pk,
                                     detail={"identity_override": override,
                                             "identity": [m.code for m in mismatch]})
        return Response({"stored": len(files), "rejected": rejected,
                         "studies": [s.pk for s in registered],
                         "outcome": [_study_outcome(s) for s in registered],
                         **({"identity_override": override} if mismatch else {})},
                        status=status.HTTP_201_CREATED)


def _study_outcome(study: Any) -> dict[str, Any]:
    """What registering ``study`` did: linked to the index procedure or not (the linker's
    reason) and how many scoring jobs wait for it."""
    study.refresh_from_db(fields=["linked_procedure", "link_reason"])
    jobs = VbqResult.objects.filter(series__study=study,
                                    status__in=[VbqResult.Status.QUEUED,
                                                VbqResult.Status.RUNNING]).count()
    return {"id": study.pk, "linked": study.linked_procedure_id is not None,
            "link_reason": study.link_reason, "jobs": jobs}
