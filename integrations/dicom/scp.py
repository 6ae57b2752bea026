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

import logging
import threading
import time
from pathlib import Path
from typing import Any

from pynetdicom import AE, StoragePresentationContexts, evt

from scoring.receive import register_study, safe_uid, short_uid

logger = logging.getLogger(__name__)


class Receiver:
    def __init__(self, root: Path, complete_after_s: float) -> None:
        self.root = root
        self.complete_after_s = complete_after_s
        self.last_seen: dict[str, float] = {}
        self.lock = threading.Lock()

    def handle_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        study, series, sop = (safe_uid(str(ds.get(k, ""))) for k in (
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
                    logger.exception("registering study %s failed", short_uid(study_uid))
            stop.wait(0.5)
    finally:
        server.shutdown()
