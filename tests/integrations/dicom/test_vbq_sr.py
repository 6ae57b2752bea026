"""The VBQ SR Measurement Report and overlay Secondary Capture (integrations/dicom/vbq_sr.py),
built from a SYNTHETIC phantom's engine result and read back with highdicom and dcmtk."""

from __future__ import annotations

import dataclasses
import io
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from integrations.dicom.vbq_sr import (
    PRIVATE_SCHEME,
    Predecessor,
    ReportError,
    ReportLevel,
    VbqReport,
    build_instances,
    export_uids,
)
from scoring.engine import compute_vbq
from scoring.engine.dicom_io import read_series
from scoring.engine.phantom import make_phantom

SEED = 222  # a phantom the engine scores with no QC flag


@pytest.fixture(scope="module")
def scored():
    phantom = make_phantom(SEED, slices=9)
    series = read_series(phantom.datasets)
    measurement = compute_vbq(phantom.datasets)
    assert measurement.status == "succeeded"
    return phantom, series, measurement


def _report(measurement, **changes) -> VbqReport:
    levels = tuple(
        ReportLevel(level=m.level, median_si=m.median_si, pixel_count=m.pixel_count,
                    fractured=m.level == "L2", **m.roi.__dict__)
        for m in [*(measurement.levels[lv] for lv in ("L1", "L2", "L3", "L4")), measurement.csf])
    report = VbqReport(
        result_id=41, algorithm_version=measurement.algorithm_version, source="manual",
        review_status="accepted", reviewer_name="Reviewer^SYNTHETIC",
        vbq_all_levels=measurement.vbq_all_levels, vbq_excluding_fractured=2.5,
        confidence=measurement.confidence, status="succeeded",
        content_datetime="2026-12-07T09:30:00-05:00", levels=levels,
        # a code longer than 16 characters travels as a Long Code Value
        qc_flags=(("sacrum-not-identified", "The CSF ROI is small (SYNTHETIC test flag)"),),
        fractured_levels=("L2",))
    return dataclasses.replace(report, **changes)


def _file(ds, folder: Path, name: str) -> Path:
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


def test_the_sr_reads_back_as_a_tid_1500_measurement_report_with_every_level(scored, tmp_path):
    _phantom, series, measurement = scored
    report = _report(measurement)
    (sr, _), _ = build_instances(report, series)
    back = hd.sr.srread(_file(sr, tmp_path, "sr.dcm"))
    assert isinstance(back, hd.sr.Comprehensive3DSR)
    parsed = hd.sr.MeasurementReport.from_sequence([back])
    groups = {g.tracking_identifier: g for g in parsed.get_planar_roi_measurement_groups()}
    assert set(groups) == {"L1 vertebral body ROI", "L2 vertebral body ROI",
                           "L3 vertebral body ROI", "L4 vertebral body ROI", "CSF ROI at L3"}
    for level in ("L1", "L2", "L3", "L4"):
        group = groups[f"{level} vertebral body ROI"]
        [median] = group.get_measurements()
        assert median.value == pytest.approx(measurement.levels[level].median_si)
        assert median.derivation.meaning == "Median"
        assert group.finding_type.meaning == f"{level} vertebra"
        assert group.finding_type.scheme_designator == "SCT"
        [fractured] = group.get_qualitative_evaluations()
        assert fractured.value.meaning == ("Yes" if level == "L2" else "No")
    [score] = parsed.get_image_measurement_groups()
    values = {m.name.meaning: m.value for m in score.get_measurements()}
    assert values["VBQ score, L1-L4"] == pytest.approx(round(measurement.vbq_all_levels, 4))
    assert values["VBQ score excluding fractured levels"] == 2.5
    evaluations = {(q.name.meaning, q.value.meaning) for q in score.get_qualitative_evaluations()}
    assert ("VBQ result source", "Manual ROIs by a reviewer") in evaluations
    assert ("VBQ review status", "Accepted by a reviewer") in evaluations
    assert ("VBQ quality control flag", "The CSF ROI is small (SYNTHETIC test flag)") in evaluations
    [flag] = [q.value for q in score.get_qualitative_evaluations()
              if q.name.meaning == "VBQ quality control flag"]
    assert flag.value == "sacrum-not-identified"
    assert back.VerificationFlag == "VERIFIED"
    assert back.VerifyingObserverSequence[0].VerifyingObserverName == "Reviewer^SYNTHETIC"
    assert back.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == PRIVATE_SCHEME


def test_each_roi_is_a_region_on_the_source_slice_at_the_measured_pixel(scored, tmp_path):
    _phantom, series, measurement = scored
    (sr, _), _ = build_instances(_report(measurement), series)
    parsed = hd.sr.MeasurementReport.from_sequence([hd.sr.srread(_file(sr, tmp_path, "sr.dcm"))])
    l3 = next(g for g in parsed.get_planar_roi_measurement_groups()
              if g.tracking_identifier == "L3 vertebral body ROI")
    roi = measurement.levels["L3"].roi
    [source] = l3.roi.ContentSequence
    assert source.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == str(
        series.datasets[roi.slice_index].SOPInstanceUID)
    points = np.asarray(l3.roi.value)
    # the region's centre is the ROI centre, in (column, row) with DICOM's pixel origin
    assert points[:4].mean(axis=0) == pytest.approx([roi.col + 0.5, roi.row + 0.5], abs=1e-3)


def test_the_sc_copies_patient_and_study_from_the_source_into_a_new_series(scored):
    phantom, series, measurement = scored
    (sr, sc), uids = build_instances(_report(measurement), series)
    source = phantom.datasets[0]
    for ds in (sr, sc):
        assert ds.PatientID == source.PatientID == f"SYN-{SEED:06d}"
        assert ds.PatientName == source.PatientName
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
    assert sc.SeriesInstanceUID == uids.sc_series != uids.sr_series
    assert sc.PhotometricInterpretation == "RGB"
    assert sc.Rows >= 512
    assert sc.pixel_array.shape == (sc.Rows, sc.Columns, 3)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in {
        str(d.SOPInstanceUID) for d in phantom.datasets}


def test_the_same_report_gives_the_same_uids_and_a_changed_one_new_instances(scored):
    _, series, measurement = scored
    report = _report(measurement)
    first = export_uids(report, str(series.series_instance_uid))
    # when it is sent, its place in the series, or what it replaces do not change its identity
    again = export_uids(dataclasses.replace(report, instance_number=3, predecessors=(
        Predecessor("1.2.3", "1.2.3.4", "1.2.3.4.5"),)), str(series.series_instance_uid))
    assert again == first
    changed = export_uids(dataclasses.replace(report, fractured_levels=("L2", "L3")),
                          str(series.series_instance_uid))
    assert (changed.sr_instance, changed.sc_instance) != (first.sr_instance, first.sc_instance)
    assert (changed.sr_series, changed.sc_series) == (first.sr_series, first.sc_series)
    (sr_a, sc_a), _ = build_instances(report, series)
    (sr_b, sc_b), _ = build_instances(report, series)
    assert (sr_a.SOPInstanceUID, sc_a.SOPInstanceUID) == (sr_b.SOPInstanceUID,
                                                          sc_b.SOPInstanceUID)


def test_a_report_with_a_predecessor_lists_it_in_the_predecessor_documents(scored):
    _, series, measurement = scored
    earlier = Predecessor(str(series.datasets[0].StudyInstanceUID), "1.2.826.0.1.99.1",
                          "1.2.826.0.1.99.1.1")
    (sr, _), _ = build_instances(_report(measurement, predecessors=(earlier,)), series)
    [study] = sr.PredecessorDocumentsSequence
    [ref_series] = study.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == "1.2.826.0.1.99.1"
    assert ref_series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == "1.2.826.0.1.99.1.1"


def test_an_unreviewed_automatic_report_is_neither_verified_nor_final(scored):
    _, series, measurement = scored
    (sr, _), _ = build_instances(_report(measurement, source="auto", review_status="pending",
                                         reviewer_name=""), series)
    assert (sr.VerificationFlag, sr.PreliminaryFlag) == ("UNVERIFIED", "PRELIMINARY")
    assert "VerifyingObserverSequence" not in sr


def test_an_roi_outside_the_series_or_an_unknown_source_is_a_clear_error(scored):
    _, series, measurement = scored
    report = _report(measurement)
    bad_level = dataclasses.replace(report.levels[0], slice_index=99)
    with pytest.raises(ReportError, match="slice 99, outside the series"):
        build_instances(dataclasses.replace(report, levels=(bad_level,)), series)
    with pytest.raises(ReportError, match="unknown result source"):
        build_instances(dataclasses.replace(report, source="guess"), series)


def test_the_report_survives_its_json_snapshot_unchanged(scored):
    _, _, measurement = scored
    report = _report(measurement, predecessors=(Predecessor("1.2", "1.2.3", "1.2.3.4"),))
    again = VbqReport.from_json(report.to_json())
    assert again == report
    assert again.predecessors == report.predecessors
    assert again.digest() == report.digest()


@pytest.mark.dcmtk
def test_dsrdump_prints_the_vbq_values_and_the_level_names(scored, tmp_path):
    if not shutil.which("dsrdump"):
        pytest.skip("dcmtk dsrdump is not installed")
    _, series, measurement = scored
    (sr, _), _ = build_instances(_report(measurement), series)
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    path = tmp_path / "sr.dcm"
    path.write_bytes(buffer.getvalue())
    out = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, check=True,
                         timeout=30).stdout
    assert f'"VBQ score, L1-L4")="{round(measurement.vbq_all_levels, 4)}"' in out
    assert '"VBQ score excluding fractured levels")="2.5"' in out
    for level in ("L1", "L2", "L3", "L4"):
        assert f'(,,"Tracking Identifier")="{level} vertebral body ROI"' in out
        assert f'SCT,"{level} vertebra")' in out
    assert '"CSF ROI at L3"' in out
    assert '(sacrum-not-identified,99VBQ,"The CSF ROI is small (SYNTHETIC test flag)")' in out
    assert dcmread(path).Modality == "SR"
