"""A VBQ result as DICOM objects for the PACS: an SR Measurement Report and a Secondary Capture.

Pure (no Django): it takes a ``VbqReport`` (the result as plain values, stored as JSON on the
export outbox row so that every send of a row builds the same objects) and the engine's
``Series`` of the source images, and returns pydicom datasets built with highdicom:

- ``build_sr``: a Comprehensive 3D SR whose content is TID 1500 (Imaging Measurement Report).
  One planar ROI group (TID 1410) per measured level: the ROI as an SCOORD ``ELLIPSE`` (or a
  closed ``POLYLINE`` for a box) in the pixel coordinates of the source slice it was measured
  on (referenced by SOP Instance UID), the level's median signal intensity, and whether the
  level is excluded as fractured; the CSF ROI likewise. One measurement group (TID 1501) for
  the score: VBQ all levels, VBQ excluding fractured levels, the engine's confidence, the
  result source, the review status and one evaluation per QC flag. Every measurement names
  the algorithm and its version; the device observer is the registry's engine, and the person
  observer (and verifying observer) is the reviewer who accepted the result, if any. A
  re-scored result's SR lists the SRs it replaces in the Predecessor Documents Sequence.
- ``build_sc``: a Secondary Capture of the overlay PNG (``scoring.engine.render``) in a new
  series of the source study.

Both copy the patient and study identity from the source images (highdicom's
``copy_patient_and_study_information``), never a placeholder. Their UIDs are derived from the
source series, the result id and a digest of the reported content (``export_uids``): sending
the same report again stores the same instances (the PACS keeps one copy), and a changed
report is a new SR that names the previous one.

Codes: DCM and SCT where a code exists (the level bodies, CSF, median, MR signal intensity,
verification); the rest come from the private coding scheme ``99VBQ`` (``VBQ_CODES``),
declared in the SR's Coding Scheme Identification Sequence and documented in docs/engine.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage, generate_uid
from pydicom.valuerep import DA, DT, TM

from scoring.engine.dicom_io import Series
from scoring.engine.model import Acquisition, LevelMeasurement, Roi, VbqMeasurement
from scoring.engine.render import render_png

PRIVATE_SCHEME = "99VBQ"
PRIVATE_SCHEME_NAME = "VBQ Registry codes"
PRIVATE_SCHEME_ORGANIZATION = "VBQ Registry (open source), see docs/engine.md"
ALGORITHM_NAME = "VBQ Registry engine"
MANUFACTURER = "VBQ Registry"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
SR_SERIES_DESCRIPTION = "VBQ measurement report"
SC_SERIES_DESCRIPTION = "VBQ overlay"


def _private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


# The private codes (docs/engine.md, "DICOM SR and overlay in the PACS").
VBQ_CODES: dict[str, Code] = {
    "vbq-all-levels": _private("vbq-all", "VBQ score, L1-L4"),
    "vbq-excluding-fractured": _private("vbq-excl-fract", "VBQ score excluding fractured levels"),
    "confidence": _private("vbq-confidence", "VBQ engine confidence"),
    "result-source": _private("vbq-source", "VBQ result source"),
    "review-status": _private("vbq-review", "VBQ review status"),
    "fractured-excluded": _private("vbq-fractured", "Level excluded as fractured"),
    "qc-flag": _private("vbq-qc-flag", "VBQ quality control flag"),
    "auto": _private("auto", "Automatic localisation"),
    "assisted": _private("assisted", "Assisted localisation (one click per body)"),
    "manual": _private("manual", "Manual ROIs by a reviewer"),
    "external-seg": _private("external-seg", "External segmentation"),
    "imported": _private("imported", "Imported value"),
    "accepted": _private("accepted", "Accepted by a reviewer"),
    "not-reviewed": _private("not-reviewed", "Automatic, not reviewed"),
}
LEVEL_SITES: dict[str, Code] = {
    "L1": codes.SCT.L1Vertebra, "L2": codes.SCT.L2Vertebra, "L3": codes.SCT.L3Vertebra,
    "L4": codes.SCT.L4Vertebra, "L5": codes.SCT.L5Vertebra, "S1": codes.SCT.Sacrum,
}
MR_PROCEDURE = Code("113091000", "SCT", "Magnetic resonance imaging")
YES, NO = codes.SCT.Yes, codes.SCT.No


class ReportError(ValueError):
    """The report cannot be built from these values (message names what is wrong)."""


@dataclass(frozen=True)
class ReportLevel:
    """One measured ROI: a vertebral level (``L1`` … ``S1``) or ``csf``; pixel coordinates of
    the engine's sorted series (``slice_index``), pixel centres at whole numbers."""

    level: str
    median_si: float
    pixel_count: int
    slice_index: int
    row: float
    col: float
    half_height: float
    half_width: float
    shape: str = "ellipse"
    angle_deg: float = 0.0
    fractured: bool = False


@dataclass(frozen=True)
class Predecessor:
    """An SR this report replaces (Predecessor Documents Sequence)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class VbqReport:
    """A VBQ result as plain values: what the SR and the overlay say."""

    result_id: int
    algorithm_version: str
    source: str
    review_status: str  # accepted | pending
    reviewer_name: str
    vbq_all_levels: float | None
    vbq_excluding_fractured: float | None
    confidence: float | None
    status: str
    content_datetime: str  # ISO 8601 with offset: when the result was stored or accepted
    levels: tuple[ReportLevel, ...]
    qc_flags: tuple[tuple[str, str], ...] = ()  # (code, message)
    fractured_levels: tuple[str, ...] = ()
    predecessors: tuple[Predecessor, ...] = field(default=(), compare=False)
    instance_number: int = field(default=1, compare=False)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VbqReport:
        values = dict(data)
        values["levels"] = tuple(ReportLevel(**lv) for lv in values.get("levels", ()))
        values["qc_flags"] = tuple(tuple(f) for f in values.get("qc_flags", ()))
        values["fractured_levels"] = tuple(values.get("fractured_levels", ()))
        values["predecessors"] = tuple(Predecessor(**p) for p in values.get("predecessors", ()))
        return cls(**values)

    def digest(self) -> str:
        """SHA-256 of what the report states (not its predecessors or instance number):
        equal for equal content, so an unchanged result is never exported twice."""
        content = {k: v for k, v in self.to_json().items()
                   if k not in ("predecessors", "instance_number")}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def as_measurement(self, series_instance_uid: str, series_description: str = ""
                       ) -> VbqMeasurement:
        """The report as the engine's ``VbqMeasurement`` (what ``render_png`` draws)."""

        def level(lv: ReportLevel) -> LevelMeasurement:
            roi = Roi(slice_index=lv.slice_index, row=lv.row, col=lv.col,
                      half_height=lv.half_height, half_width=lv.half_width, shape=lv.shape,
                      angle_deg=lv.angle_deg)
            return LevelMeasurement(level=lv.level, median_si=lv.median_si,
                                    pixel_count=lv.pixel_count, roi=roi,
                                    centroid_pixel=(lv.slice_index, lv.row, lv.col),
                                    centroid_lps_mm=(0.0, 0.0, 0.0), fractured=lv.fractured)

        bodies = {lv.level: level(lv) for lv in self.levels if lv.level != "csf"}
        csf = next((level(lv) for lv in self.levels if lv.level == "csf"), None)
        return VbqMeasurement(
            status=self.status, source=self.source, series_instance_uid=series_instance_uid,
            vbq_all_levels=self.vbq_all_levels,
            vbq_excluding_fractured=self.vbq_excluding_fractured,
            confidence=self.confidence if self.confidence is not None else 0.0,
            levels=bodies, csf=csf, fractured_levels=list(self.fractured_levels),
            acquisition=Acquisition(series_description=series_description),
            algorithm_version=self.algorithm_version)


@dataclass(frozen=True)
class ExportUids:
    sr_series: str
    sr_instance: str
    sc_series: str
    sc_instance: str
    tracking_prefix: str  # entropy for the tracking UIDs of the ROI groups


def export_uids(report: VbqReport, source_series_uid: str) -> ExportUids:
    """UIDs derived from the source series, the result and the report's content digest
    (pydicom ``generate_uid`` with entropy: the same inputs give the same UID, anywhere).
    The SR and SC series are one per source series, so every VBQ report of a series lands in
    the same two series of the study; the instances are one per (result, content)."""
    digest = report.digest()

    def uid(*parts: object) -> str:
        return str(generate_uid(entropy_srcs=["vbq-registry", source_series_uid,
                                              *map(str, parts)]))

    return ExportUids(
        sr_series=uid("sr-series"), sr_instance=uid("sr", report.result_id, digest),
        sc_series=uid("sc-series"), sc_instance=uid("sc", report.result_id, digest),
        tracking_prefix=f"{report.result_id}:{digest}")


def _scoord(lv: ReportLevel) -> tuple[str, np.ndarray]:
    """The ROI as SCOORD graphic data (column, row) with DICOM's pixel origin (the top left
    corner of the top left pixel, so a pixel centre is at +0.5)."""
    a = math.radians(lv.angle_deg)
    centre = np.array([lv.row + 0.5, lv.col + 0.5])
    axis = np.array([math.cos(a), math.sin(a)])  # (row, col) direction of the height axis
    normal = np.array([-math.sin(a), math.cos(a)])
    if lv.shape == "box":
        corners = [centre + u * lv.half_height * axis + v * lv.half_width * normal
                   for u, v in ((1, 1), (1, -1), (-1, -1), (-1, 1), (1, 1))]
        return "POLYLINE", np.array([[p[1], p[0]] for p in corners], dtype=float)
    major, minor = (axis * lv.half_height, normal * lv.half_width)
    if lv.half_width > lv.half_height:
        major, minor = minor, major
    points = [centre + major, centre - major, centre + minor, centre - minor]
    return "ELLIPSE", np.array([[p[1], p[0]] for p in points], dtype=float)


def _source_dataset(series: Series, slice_index: int, level: str) -> Dataset:
    if not 0 <= slice_index < len(series.datasets):
        raise ReportError(f"the {level} ROI is on slice {slice_index}, outside the series")
    return series.datasets[slice_index]


def _device_context(report: VbqReport) -> hd.sr.ObserverContext:
    uid = str(generate_uid(entropy_srcs=["vbq-registry", "device", report.algorithm_version]))
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uid, name=ALGORITHM_NAME, manufacturer_name=MANUFACTURER,
            model_name=f"{ALGORITHM_NAME} {report.algorithm_version}"))


def _person_context(report: VbqReport) -> hd.sr.ObserverContext | None:
    if not report.reviewer_name:
        return None
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
            name=report.reviewer_name))


def _level_group(report: VbqReport, lv: ReportLevel, series: Series, uids: ExportUids,
                 algorithm: hd.sr.AlgorithmIdentification
                 ) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    source = _source_dataset(series, lv.slice_index, lv.level)
    graphic_type, graphic_data = _scoord(lv)
    region = hd.sr.ImageRegion(
        graphic_type=graphic_type, graphic_data=graphic_data,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=str(source.SOPClassUID),
            referenced_sop_instance_uid=str(source.SOPInstanceUID)))
    if lv.level == "csf":
        finding_type, sites, name = codes.SCT.CerebrospinalFluid, [], "CSF ROI at L3"
        qualitative = []
    else:
        if lv.level not in LEVEL_SITES:
            raise ReportError(f"unknown level {lv.level[:8]!r}")
        finding_type, name = LEVEL_SITES[lv.level], f"{lv.level} vertebral body ROI"
        sites = [hd.sr.FindingSite(anatomic_location=LEVEL_SITES[lv.level])]
        qualitative = [hd.sr.QualitativeEvaluation(
            name=VBQ_CODES["fractured-excluded"], value=YES if lv.fractured else NO)]
    tracking = hd.sr.TrackingIdentifier(
        identifier=name, uid=str(generate_uid(entropy_srcs=[uids.tracking_prefix, lv.level])))
    median = hd.sr.Measurement(
        name=codes.DCM.T1WeightedMRSignalIntensity, value=float(lv.median_si),
        unit=codes.UCUM.ArbitraryUnit, derivation=codes.SCT.Median, algorithm_id=algorithm,
        finding_sites=sites or None)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, referenced_region=region, finding_type=finding_type,
        finding_sites=sites or None, measurements=[median],
        qualitative_evaluations=qualitative or None, algorithm_id=algorithm)


def _score_group(report: VbqReport, series: Series, uids: ExportUids,
                 algorithm: hd.sr.AlgorithmIdentification
                 ) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    measurements = []
    for key, value, unit in (("vbq-all-levels", report.vbq_all_levels, codes.UCUM.Ratio),
                             ("vbq-excluding-fractured", report.vbq_excluding_fractured,
                              codes.UCUM.Ratio),
                             ("confidence", report.confidence, codes.UCUM.NoUnits)):
        if value is not None:
            measurements.append(hd.sr.Measurement(
                name=VBQ_CODES[key], value=round(float(value), 4), unit=unit,
                algorithm_id=algorithm, finding_sites=[
                    hd.sr.FindingSite(anatomic_location=codes.SCT.LumbarSpine)]))
    if report.source not in VBQ_CODES:
        raise ReportError(f"unknown result source {report.source[:20]!r}")
    qualitative = [
        hd.sr.QualitativeEvaluation(name=VBQ_CODES["result-source"],
                                    value=VBQ_CODES[report.source]),
        hd.sr.QualitativeEvaluation(
            name=VBQ_CODES["review-status"],
            value=VBQ_CODES["accepted" if report.review_status == "accepted"
                            else "not-reviewed"]),
        *[hd.sr.QualitativeEvaluation(name=VBQ_CODES["qc-flag"],
                                      value=_private(code[:64], (message or code)[:64]))
          for code, message in report.qc_flags],
    ]
    slices = sorted({lv.slice_index for lv in report.levels})
    sources = [_source_dataset(series, s, "VBQ") for s in slices]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            identifier="VBQ score",
            uid=str(generate_uid(entropy_srcs=[uids.tracking_prefix, "score"]))),
        finding_type=VBQ_CODES["vbq-all-levels"], algorithm_id=algorithm,
        measurements=measurements or None, qualitative_evaluations=qualitative,
        source_images=[hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=str(ds.SOPClassUID),
            referenced_sop_instance_uid=str(ds.SOPInstanceUID)) for ds in sources])


def _content_date_time(report: VbqReport) -> tuple[DA, TM]:
    """When the result was stored or accepted, in the zone it is written with (the clinic's:
    DICOM dates and times are local, as the copied study date and time are)."""
    import datetime as dt

    when = dt.datetime.fromisoformat(report.content_datetime)
    return DA(when.strftime("%Y%m%d")), TM(when.strftime("%H%M%S"))


def build_sr(report: VbqReport, series: Series, uids: ExportUids) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 Measurement Report of ``report`` over ``series`` (its source images).
    Raises ``ReportError`` for a report that does not fit the series."""
    if not report.levels:
        raise ReportError("the result has no measured level")
    algorithm = hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME,
                                              version=report.algorithm_version)
    context = hd.sr.ObservationContext(
        observer_person_context=_person_context(report),
        observer_device_context=_device_context(report))
    groups: list[Any] = [_level_group(report, lv, series, uids, algorithm)
                         for lv in report.levels]
    groups.append(_score_group(report, series, uids, algorithm))
    slices = sorted({lv.slice_index for lv in report.levels})
    evidence = [series.datasets[s] for s in slices]
    content = hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=MR_PROCEDURE,
        imaging_measurements=groups, title=codes.DCM.ImagingMeasurementReport)
    accepted = report.review_status == "accepted" and bool(report.reviewer_name)
    previous = [_predecessor_dataset(p) for p in report.predecessors]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=content, series_instance_uid=uids.sr_series,
        series_number=SR_SERIES_NUMBER, sop_instance_uid=uids.sr_instance,
        instance_number=report.instance_number, manufacturer=MANUFACTURER,
        is_complete=True, is_final=accepted, is_verified=accepted,
        verifying_observer_name=report.reviewer_name if accepted else None,
        verifying_organization=MANUFACTURER if accepted else None,
        previous_versions=previous or None)
    sr.SeriesDescription = SR_SERIES_DESCRIPTION
    sr.ContentDate, sr.ContentTime = _content_date_time(report)
    if accepted:  # when it was accepted, not when it was built: every send is the same
        date, time = _content_date_time(report)
        sr.VerifyingObserverSequence[0].VerificationDateTime = DT(f"{date}{time}")
    scheme = Dataset()
    scheme.CodingSchemeDesignator = PRIVATE_SCHEME
    scheme.CodingSchemeName = PRIVATE_SCHEME_NAME
    scheme.CodingSchemeResponsibleOrganization = PRIVATE_SCHEME_ORGANIZATION
    sr.CodingSchemeIdentificationSequence = [scheme]
    return sr


def _predecessor_dataset(p: Predecessor) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = Comprehensive3DSRStorage
    ds.SOPInstanceUID = p.sop_instance_uid
    ds.StudyInstanceUID = p.study_instance_uid
    ds.SeriesInstanceUID = p.series_instance_uid
    return ds


def _orientation_letter(vector: np.ndarray) -> str:
    axis = int(np.argmax(np.abs(vector)))
    positive, negative = (("L", "R"), ("P", "A"), ("H", "F"))[axis]
    return positive if vector[axis] > 0 else negative


def overlay_rgb(report: VbqReport, series: Series) -> np.ndarray:
    """The overlay PNG (``scoring.engine.render.render_png``) as an RGB array."""
    from PIL import Image

    measurement = report.as_measurement(str(series.series_instance_uid),
                                        series.acquisition.series_description)
    with tempfile.TemporaryDirectory(prefix="vbq-overlay-") as folder:
        path = render_png(series, measurement, Path(folder) / "overlay.png")
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB")).copy()


def build_sc(report: VbqReport, series: Series, uids: ExportUids,
             pixels: np.ndarray | None = None) -> hd.sc.SCImage:
    """A Secondary Capture of the overlay in a new series of the source study: patient and
    study copied from the source slice the ROIs are on; refers to that slice."""
    rgb = overlay_rgb(report, series) if pixels is None else pixels
    slice_index = report.levels[0].slice_index if report.levels else 0
    ref = _source_dataset(series, slice_index, "overlay")
    row_dir, col_dir = np.asarray(series.orientation[:3]), np.asarray(series.orientation[3:])
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=uids.sc_series,
        series_number=SC_SERIES_NUMBER, sop_instance_uid=uids.sc_instance,
        instance_number=report.instance_number, manufacturer=MANUFACTURER,
        patient_orientation=(_orientation_letter(row_dir), _orientation_letter(col_dir)))
    sc.SeriesDescription = SC_SERIES_DESCRIPTION
    sc.ImageComments = (f"VBQ overlay, result {report.result_id}, {ALGORITHM_NAME} "
                        f"{report.algorithm_version}, derived image, not for diagnosis")[:10240]
    sc.ContentDate, sc.ContentTime = _content_date_time(report)
    source_item = Dataset()
    source_item.ReferencedSOPClassUID = ref.SOPClassUID
    source_item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    sc.SourceImageSequence = [source_item]
    return sc


def build_instances(report: VbqReport, series: Series) -> tuple[Sequence[Dataset], ExportUids]:
    """The SR and the SC of ``report`` (in that order) and their UIDs."""
    uids = export_uids(report, str(series.series_instance_uid))
    return [build_sr(report, series, uids), build_sc(report, series, uids)], uids
