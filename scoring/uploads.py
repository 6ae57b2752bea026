"""A staff upload of one study's DICOM files (a zip) for a patient: checked, stored like a
C-STORE push, registered, linked and scored (``scoring.receive.register_study``).

Nothing is written unless the files' DICOM patient is the registry patient
(``scoring.identity``); a coordinator (or admin) may store mismatched files anyway with one of
``IDENTITY_OVERRIDE_REASONS`` (coded: audit details carry no names), audited. The outcome says
what happened to each study: linked or not (the linker's reason) and how many scoring jobs
wait for it, so the page never claims "scoring is queued" when no job was made.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import transaction

from registry.side_effects import Actor, audit_record
from scoring.identity import describe, patient_mismatches
from scoring.models import VbqResult
from scoring.receive import register_study, safe_uid

IDENTITY_OVERRIDE_REASONS = {
    "name-changed": "The patient's name changed (e.g. marriage); same person verified",
    "outside-id": "Outside hospital's PatientID; same person verified on the images' source",
    "merged-record": "Old or merged record number of this patient",
    "verified-other": "Identity verified another way (documented in the clinical record)",
}
OVERRIDE_ROLES = ("coordinator", "admin")
MAX_FILES = 5000
MAX_FILE_BYTES = 50 * 1024 * 1024


class UploadRefused(Exception):
    """The upload is refused: ``status`` (HTTP) and ``payload`` (JSON) say why."""

    def __init__(self, status: int, payload: dict[str, Any]) -> None:
        super().__init__(payload.get("detail", ""))
        self.status = status
        self.payload = payload


def may_override_identity(user: Any) -> bool:
    """Coordinators (and admins) may store a mismatched series for a patient, with a reason."""
    return bool(user.is_superuser or user.groups.filter(name__in=OVERRIDE_ROLES).exists())


def dicom_zip_upload(*, patient: Any, data: bytes, user: Any, actor: Actor,
                     override_reason: str = "") -> dict[str, Any]:
    """Check, store and register the zip ``data`` for ``patient``; returns the outcome
    (``stored``, ``rejected`` non-DICOM entries, ``studies``, per-study ``outcome``). Raises
    ``UploadRefused`` (nothing written but the refusal's audit row)."""
    import pydicom

    if override_reason and override_reason not in IDENTITY_OVERRIDE_REASONS:
        raise UploadRefused(400, {"detail": f"unknown override reason {override_reason[:30]!r}"})
    if override_reason and not may_override_identity(user):
        raise UploadRefused(403, {"detail": "only a coordinator may store images whose DICOM "
                                            "patient does not match"})
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as exc:
        raise UploadRefused(415, {"detail": "the file is not a zip archive"}) from exc
    files = []
    rejected = 0
    for info in archive.infolist()[:MAX_FILES]:
        if info.is_dir() or info.file_size > MAX_FILE_BYTES:
            continue
        try:
            ds = pydicom.dcmread(io.BytesIO(archive.read(info)))
            uids = tuple(safe_uid(str(ds.get(k, ""))) for k in (
                "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
        except Exception:  # not DICOM: skipped and counted
            rejected += 1
            continue
        files.append((uids, ds))
    if not files:
        raise UploadRefused(400, {"detail": "no DICOM file in the archive", "rejected": rejected})
    # The right patient before anything is written (a series is never stored, linked or
    # scored for a patient it does not belong to).
    mismatch = patient_mismatches([ds for _, ds in files], patient)
    if mismatch and not override_reason:
        audit_record(actor=actor, action="create", object_type="ImagingStudy",
                     patient_id=patient.pk,
                     detail={"upload": "refused", "identity": [m.code for m in mismatch]})
        raise UploadRefused(409, {
            "detail": "these images are not this patient's: " + describe(mismatch)
                      + ". Nothing was stored.",
            "code": "patient-mismatch", "mismatches": [m.code for m in mismatch],
            "can_override": may_override_identity(user),
            "override_reasons": IDENTITY_OVERRIDE_REASONS})
    root = Path(settings.DICOM_STORAGE_ROOT)
    studies: set[str] = set()
    for (study, series, sop), ds in files:
        folder = root / study / series
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(str(folder / f"{sop}.dcm"))
        studies.add(study)
    registered = []
    with transaction.atomic():
        for study_uid in sorted(studies):
            # Written FOR this patient (its DICOM patient matches, or a coordinator said why
            # it may), before it is linked and its jobs are created.
            study = register_study(root, study_uid, patient=patient, actor=actor,
                                   source="upload")
            if study is None:
                continue
            registered.append(study)
            if mismatch:
                audit_record(actor=actor, action="update", object_type="ImagingStudy",
                             object_id=str(study.pk), patient_id=patient.pk,
                             detail={"identity_override": override_reason,
                                     "identity": [m.code for m in mismatch]})
    return {"stored": len(files), "rejected": rejected, "studies": [s.pk for s in registered],
            "outcome": [study_outcome(s) for s in registered],
            **({"identity_override": override_reason} if mismatch else {})}


def study_outcome(study: Any) -> dict[str, Any]:
    """What registering ``study`` did: linked to the index procedure or not (the linker's
    reason), how many scoring jobs wait for it and how many results it already has (a study
uploaded again is not scored again)."""
    study.refresh_from_db(fields=["linked_procedure", "link_reason"])
    statuses = list(VbqResult.objects.filter(series__study=study).values_list("status",
                                                                             flat=True))
    jobs = sum(st in (VbqResult.Status.QUEUED, VbqResult.Status.RUNNING) for st in statuses)
    return {"id": study.pk, "linked": study.linked_procedure_id is not None,
            "link_reason": study.link_reason, "jobs": jobs, "scored": len(statuses) - jobs}
