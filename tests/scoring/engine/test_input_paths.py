"""The three input paths (automatic, external segmentation, manual ROIs) give the same VBQ.

The external segmentations are written in the test from the SYNTHETIC phantom's true body
masks: a NIfTI label map (TotalSegmentator ``vertebrae_mr`` ids, and SPINEPS ids) and a DICOM
SEG built with highdicom.
"""

import math

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
from pydicom.sr.codedict import codes

from scoring.engine import EngineError, Roi, compute_vbq
from scoring.engine.dicom_io import read_series
from scoring.engine.phantom import make_phantom
from scoring.engine.segimport import TABLES, SegmentationError

LEVELS = ("T12", "L1", "L2", "L3", "L4", "L5", "S1")


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(31, fractured=())


def manual_rois(phantom):
    """What a reviewer draws: a box in the middle of each body and in the L3 CSF."""
    t = phantom.truth
    sp = t["spacing_mm"]
    rois = {}
    for level in ("L1", "L2", "L3", "L4"):
        s, r, c = t["centres_px"][level]
        rois[level] = Roi(s, r, c, 5 / sp, 7 / sp, "box", t["theta_deg"][level])
    s, r, c = t["csf_px"]
    half_width_mm = max(1.5, (t["canal_width_mm"] - 7.2) / 2 - 0.3)  # inside walls and roots
    rois["csf"] = Roi(s, r, c, 8 / sp, half_width_mm / sp, "box", t["theta_deg"]["L3"])
    return rois


def nifti_from_truth(phantom, path, table):
    t = phantom.truth
    series = read_series(phantom.datasets)
    ids = {level: i for i, level in table.items()}
    label = np.zeros((t["rows"], t["cols"]), np.int16)
    for level in LEVELS:
        label[t["body_masks"][level]] = ids[level]
    volume = np.stack([label] * series.pixels.shape[0])  # (slice, row, col), sorted
    sp = series.pixel_spacing_mm
    affine = np.eye(4)
    affine[:3, 0] = series.orientation[:3] * sp[1]
    affine[:3, 1] = series.orientation[3:] * sp[0]
    affine[:3, 2] = series.positions[1] - series.positions[0]
    affine[:3, 3] = series.positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine  # LPS → RAS
    nib.save(nib.Nifti1Image(np.transpose(volume, (2, 1, 0)), affine), str(path))
    return path


def seg_from_truth(phantom, path):
    t = phantom.truth
    levels = ("L1", "L2", "L3", "L4", "L5", "S1")
    label = np.zeros((t["rows"], t["cols"]), np.uint8)
    for i, level in enumerate(levels, 1):
        label[t["body_masks"][level]] = i
    descriptions = [hd.seg.SegmentDescription(
        segment_number=i, segment_label=f"vertebrae_{level}",
        segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Bone,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for i, level in enumerate(levels, 1)]
    seg = hd.seg.Segmentation(
        source_images=phantom.datasets, pixel_array=np.stack([label] * len(phantom.datasets)),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=100,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="SYNTHETIC",
        manufacturer_model_name="test", software_versions="0", device_serial_number="0")
    seg.save_as(str(path))
    return path


@pytest.fixture(scope="module")
def results(phantom, tmp_path_factory):
    folder = tmp_path_factory.mktemp("seg")
    return {
        "auto": compute_vbq(phantom.datasets),
        "manual": compute_vbq(phantom.datasets, manual_rois=manual_rois(phantom)),
        "nifti": compute_vbq(phantom.datasets, segmentation=nifti_from_truth(
            phantom, folder / "ts.nii.gz", TABLES["totalsegmentator"])),
        "spineps": compute_vbq(phantom.datasets, segmentation=nifti_from_truth(
            phantom, folder / "sp.nii.gz", TABLES["spineps"]), segmentation_labels="spineps"),
        "seg": compute_vbq(phantom.datasets, segmentation=seg_from_truth(
            phantom, folder / "seg.dcm")),
    }


def test_every_path_succeeds_with_its_source(results):
    sources = {name: (r.status, r.source) for name, r in results.items()}
    assert sources == {"auto": ("succeeded", "auto"), "manual": ("succeeded", "manual"),
                       "nifti": ("succeeded", "external-seg"),
                       "spineps": ("succeeded", "external-seg"),
                       "seg": ("succeeded", "external-seg")}


@pytest.mark.parametrize("other", ["auto", "nifti", "spineps", "seg"])
def test_auto_external_seg_and_manual_rois_agree_within_1_percent(results, other):
    reference = results["manual"].vbq_all_levels
    assert math.isclose(results[other].vbq_all_levels, reference, rel_tol=0.01)


def test_the_external_seg_path_measures_the_levels_of_its_label_table(results, phantom):
    levels = results["nifti"].levels
    assert {"L1", "L2", "L3", "L4", "L5", "S1"} <= set(levels)
    sp = phantom.truth["spacing_mm"]
    for level in ("L1", "L2", "L3", "L4"):
        _, row, col = phantom.truth["centres_px"][level]
        got = levels[level].centroid_pixel
        assert math.hypot(got[1] - row, got[2] - col) * sp < 10, level


def test_an_unreadable_segmentation_raises_a_typed_error(phantom, tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(SegmentationError) as err:
        compute_vbq(phantom.datasets, segmentation=bad)
    assert isinstance(err.value, EngineError)
    assert "not a readable NIfTI" in str(err.value)


def test_a_label_table_without_the_segmentations_ids_is_refused(phantom, tmp_path):
    path = nifti_from_truth(phantom, tmp_path / "ts.nii.gz", TABLES["totalsegmentator"])
    with pytest.raises(SegmentationError, match="no vertebra of the label table"):
        compute_vbq(phantom.datasets, segmentation=path, segmentation_labels={900: "L3"})
