"""DICOM C-STORE receiver (pynetdicom): a modality or PACS pushes studies to the registry.

Instances are stored under ``DICOM_STORAGE_ROOT/<StudyUID>/<SeriesUID>/<SOPUID>.dcm``. A study
with no new instance for ``DICOM_STUDY_COMPLETE_SECONDS`` is complete: it is registered as an
ImagingStudy (source ``dicom``, series pointing at their folders) for the patient whose
identifier (system ``DICOM_PATIENT_ID_SYSTEM``) equals the DICOM PatientID and whose family name
and birth date match the files' (``scoring.identity``), which links it and queues scoring; a
study whose name or birth date disagrees is held unassigned (audited, with the reason), never
scored for that patient. Files received for a study already known (a FHIR ImagingStudy) must
be its patient's, else they are not recorded as its source. Logs carry UIDs hashes only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

from pynetdicom import AE, StoragePresentationContexts, evt

logger = logging.getLogger(__name__)


def _short(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:10]


def _safe(uid: str) -> str:
    return "".join(ch for ch in uid if ch.isdigit() or ch == ".")[:64] or "unknown"


class Receiver:
    def __init__(self, root: Path, complete_after_s: float) -> None:
        self.root = root
        self.complete_after_s = complete_after_s
        self.last_seen: dict[str, float] = {}
        self.lock = threading.Lock()

    def handle_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        study, series, sop = (_safe(str(ds.get(k, ""))) for k in (
            "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
        folder = self.root / study / series
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(str(folder / f"{sop}.dcm"), enforce_file_format=True)
        with self.lock:
            self.last_seen[study] = time.monotonic()
        return 0x0000

    def due_studies(self) -> list[str]:
        now = time.monotonic()
        with self.lock:
            due = [s for s, t in self.last_seen.items() if now - t >= self.complete_after_s]
            for s in due:
                del self.last_seen[s]
        return due


def register_study(root: Path, study_uid: str, patient: Any = None, actor: Any = None,
                   source: str = "dicom") -> Any:
    """Register a complete received study (Django must be set up): the study and its series,
    where the files are, then its link and VBQ jobs, in one transaction. ``patient``: the
    patient the study is FOR (a staff upload for that patient), whatever PatientID the files
    carry; otherwise the patient whose DICOM PatientID identifier matches, if any. ``source``:
    ``dicom`` (C-STORE) or ``upload``."""
    import pydicom
    from django.conf import settings

    from registry.models import PatientIdentifier
    from registry.services import Actor
    from registry.timeutil import start_of_clinic_day
    from scoring.services import SeriesInput, imaging_study_upsert

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
    from django.db import transaction

    from scoring.identity import HELD_PREFIX, patient_mismatches
    from scoring.models import ImagingSeries, ImagingStudy
    from scoring.services import link_or_defer

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
            from registry.services import audit_record

            audit_record(actor=actor or Actor(via="dicom"), action="update",
                         object_type="ImagingStudy", object_id=str(study.pk),
                         patient_id=study.patient_id,
                         detail={"held": "patient-mismatch", "identity": held})
            ImagingStudy.objects.filter(pk=study.pk, linked_procedure__isnull=True).update(
                link_reason=f"{HELD_PREFIX} DICOM patient does not match the registry patient "
                            f"({', '.join(held)}); the received files are not used")
    logger.info("dicom study registered study=%s series=%s patient_known=%s held=%s",
                _short(study_uid), len(series_inputs), patient is not None, ",".join(held))
    return study


def serve(*, root: Path, ae_title: str, port: int, complete_after_s: float,
          bind: str = "127.0.0.1", stop: threading.Event | None = None) -> None:
    """Run the receiver until ``stop`` is set (or forever)."""
    root.mkdir(parents=True, exist_ok=True)
    receiver = Receiver(root, complete_after_s)
    ae = AE(ae_title=ae_title)
    ae.supported_contexts = StoragePresentationContexts
    server = ae.start_server((bind, port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, receiver.handle_store)])
    logger.info("dicom receiver listening port=%s ae=%s", port, ae_title)
    stop = stop or threading.Event()
    try:
        while not stop.is_set():
            for study_uid in receiver.due_studies():
                try:
                    register_study(root, study_uid)
                except Exception:
                    logger.exception("registering study %s failed", _short(study_uid))
            stop.wait(0.5)
    finally:
        server.shutdown()
