"""Register a received DICOM study (a C-STORE push, ``integrations.dicom.scp``, or a staff
upload, ``scoring.uploads``): the study and its series, where the files are, then its link and
VBQ jobs, in one transaction. A study whose files' name or birth date disagree with the
registry patient is held unassigned (audited, with the reason), never scored for that
patient. Logs carry UID hashes only."""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from pathlib import Path
from typing import Any

import pydicom
from django.conf import settings
from django.db import transaction

from registry.models import PatientIdentifier
from registry.side_effects import Actor, audit_record
from registry.timeutil import start_of_clinic_day
from scoring.identity import HELD_PREFIX, patient_mismatches
from scoring.models import ImagingSeries, ImagingStudy
from scoring.services import SeriesInput, imaging_study_upsert, link_or_defer

logger = logging.getLogger(__name__)


def short_uid(uid: str) -> str:
    """A UID as logs carry it: a hash prefix."""
    return hashlib.sha256(uid.encode()).hexdigest()[:10]


def safe_uid(uid: str) -> str:
    """A UID as a folder name: digits and dots only."""
    return "".join(ch for ch in uid if ch.isdigit() or ch == ".")[:64] or "unknown"


def register_study(root: Path, study_uid: str, patient: Any = None, actor: Any = None,
                   source: str = "dicom") -> Any:
    """Register a complete received study (Django must be set up): the study and its series,
    where the files are, then its link and VBQ jobs, in one transaction. ``patient``: the
    patient the study is FOR (a staff upload for that patient), whatever PatientID the files
    carry; otherwise the patient whose DICOM PatientID identifier matches, if any. ``source``:
    ``dicom`` (C-STORE) or ``upload``."""
    study_dir = root / study_uid
    series_inputs, first = [], None
    headers: list[Any] = []
    local_paths: dict[str, str] = {}
    for series_dir in sorted(p for p in study_dir.iterdir() if p.is_dir()):
        files = sorted(series_dir.glob("*.dcm"))
        if not files:
            continue
        ds = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
        headers.append(ds)
        first = first or ds
        uid = str(ds.SeriesInstanceUID)
        local_paths[uid] = str(series_dir)
        series_inputs.append(SeriesInput(uid, str(ds.get("Modality", "")),
                                         str(ds.get("SeriesDescription", "")),
                                         int(ds.get("SeriesNumber", 0) or 0), "",
                                         len(files)))
    if first is None:
        return None
    explicit = patient is not None  # a staff upload FOR this patient (checked by the caller)
    if patient is None:
        ident = PatientIdentifier.objects.filter(system=settings.DICOM_PATIENT_ID_SYSTEM,
                                                 value=str(first.get("PatientID", ""))).first()
        patient = ident.patient if ident else None
    started = None
    if first.get("StudyDate"):
        text = str(first.StudyDate)
        day = dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
        started = start_of_clinic_day(day) + dt.timedelta(hours=12)
    # One transaction: the study, where its files are, then its link and jobs (a job created
    # before the local paths are recorded would fetch from the PACS or find no source).
    held: list[str] = []
    with transaction.atomic():
        if patient is not None and not explicit:
            # The files' name and birth date must be the patient's too (scoring.identity),
            # else the study is held: not assigned, its files not used, never scored.
            held = [m.code for m in patient_mismatches(headers, patient)]
            if held:
                patient = None
        study, _ = imaging_study_upsert(
            study_instance_uid=study_uid, patient=patient,
            source=source, started_at=started,
            modality=str(first.get("Modality", "")),
            description=str(first.get("StudyDescription", "")), series=series_inputs,
            actor=actor or Actor(via="dicom"), link=False)
        if study.patient_id is not None and not explicit and not held and (
                patient is None or study.patient_id != patient.pk):
            # a study already known (e.g. from a FHIR ImagingStudy) keeps its patient: the
            # received files must be that patient's
            held = [m.code for m in patient_mismatches(headers, study.patient)]
        if not held:
            for uid, path in local_paths.items():
                ImagingSeries.objects.filter(series_instance_uid=uid).update(local_path=path)
            link_or_defer(study)
        else:
            audit_record(actor=actor or Actor(via="dicom"), action="update",
                         object_type="ImagingStudy", object_id=str(study.pk),
                         patient_id=study.patient_id,
                         detail={"held": "patient-mismatch", "identity": held})
            ImagingStudy.objects.filter(pk=study.pk, linked_procedure__isnull=True).update(
                link_reason=f"{HELD_PREFIX} DICOM patient does not match the registry patient "
                            f"({', '.join(held)}); the received files are not used")
    logger.info("dicom study registered study=%s series=%s patient_known=%s held=%s",
                short_uid(study_uid), len(series_inputs), patient is not None, ",".join(held))
    return study
