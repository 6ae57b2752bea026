"""Is this series the registry patient's? The DICOM patient (PatientID, name, birth date) of
an uploaded, received (C-STORE) or fetched (DICOMweb) series is compared with the registry
patient before it is stored for, linked to or scored for that patient.

A series matches when

- its PatientID is one of the patient's identifier values (any system: MRN, PACS id…),
- its family name, when both sides have one, is the patient's (case, spaces, accents and
  punctuation ignored),
- its birth date, when both sides have one, is the patient's.

Given names are not compared: they differ between systems too often (middle names, initials,
transliteration) to refuse on. Every file of an upload must carry the same, matching patient.
The reasons name the fields that differ; they are shown to staff and written to the audit
detail by code only (``codes``), never to logs.
"""

from __future__ import annotations

import datetime as dt
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# ``ImagingStudy.link_reason`` of a received study held unassigned because its DICOM patient
# does not match (listed in the needs-review queue).
HELD_PREFIX = "held:"


@dataclass(frozen=True)
class DicomPatient:
    patient_id: str
    family_name: str
    birth_date: dt.date | None

    @classmethod
    def of(cls, ds: Any) -> DicomPatient:
        name = ds.get("PatientName", "")
        family = str(getattr(name, "family_name", "") or str(name or "").split("^")[0])
        text = str(ds.get("PatientBirthDate", "") or "").strip()
        born = None
        if len(text) == 8 and text.isdigit():
            try:
                born = dt.date(int(text[:4]), int(text[4:6]), int(text[6:8]))
            except ValueError:
                born = None
        return cls(str(ds.get("PatientID", "") or "").strip(), family.strip(), born)


@dataclass(frozen=True)
class Mismatch:
    code: str  # patient-id | family-name | birth-date | several-patients
    message: str


def _norm(text: str) -> str:
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return "".join(ch for ch in plain.casefold() if ch.isalnum())


def mismatches(found: DicomPatient, *, identifier_values: Iterable[str], family_name: str,
               birth_date: dt.date | None) -> list[Mismatch]:
    """Why ``found`` is not the registry patient described by the keyword arguments (empty:
    it is)."""
    out: list[Mismatch] = []
    values = {v.strip() for v in identifier_values if v}
    if not found.patient_id:
        out.append(Mismatch("patient-id", "the DICOM files carry no PatientID"))
    elif found.patient_id not in values:
        out.append(Mismatch("patient-id", f"DICOM PatientID {found.patient_id!r} is not one of "
                            "this patient's identifiers"))
    if found.family_name and family_name and _norm(found.family_name) != _norm(family_name):
        out.append(Mismatch("family-name", f"DICOM family name {found.family_name!r} is not "
                            "the patient's"))
    if found.birth_date and birth_date and found.birth_date != birth_date:
        out.append(Mismatch("birth-date", f"DICOM birth date {found.birth_date.isoformat()} is "
                            "not the patient's"))
    return out


def patient_mismatches(datasets: Iterable[Any], patient: Any) -> list[Mismatch]:
    """Check every dataset's patient against the registry ``patient`` (a ``Patient``); one
    query for its identifiers."""
    found = {DicomPatient.of(ds) for ds in datasets}
    if not found:
        return []
    if len({f.patient_id for f in found}) > 1:
        return [Mismatch("several-patients", "the files belong to more than one DICOM patient "
                         f"({len({f.patient_id for f in found})} PatientIDs)")]
    values = list(patient.identifiers.values_list("value", flat=True))
    out: list[Mismatch] = []
    for item in sorted(found, key=lambda f: (f.family_name, str(f.birth_date))):
        for m in mismatches(item, identifier_values=values, family_name=patient.family_name,
                            birth_date=patient.birth_date):
            if m not in out:
                out.append(m)
    return out


def describe(found: list[Mismatch]) -> str:
    return "; ".join(m.message for m in found)
