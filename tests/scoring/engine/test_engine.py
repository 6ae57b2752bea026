"""The VBQ engine on SYNTHETIC phantoms: typed errors, protocol QC, the manual-ROI path."""

import json

import numpy as np
import pytest

from scoring.engine import (
    EmptySeriesError,
    EngineError,
    NotAnImageError,
    Roi,
    TooFewSlicesError,
    UnreadableDicomError,
    VbqMeasurement,
    WrongModalityError,
    compute_vbq,
)
from scoring.engine.__main__ import main as cli
from scoring.engine.phantom import make_phantom


def truth_rois(phantom, shrink=0.25):
    """ROIs a careful reviewer would draw: centred on each body / the L3 canal."""
    t = phantom.truth
    spacing = t["spacing_mm"]
    rois = {}
    for level in ("L1", "L2", "L3", "L4"):
        s, r, c = t["centres_px"][level]
        rois[level] = Roi(s, r, c - 1.5 / spacing, 6 / spacing, 8 / spacing)
    s, r, c = t["centres_px"]["L3"]
    body_w_px = 34 / spacing
    rois["csf"] = Roi(s, r, c + body_w_px / 2 + (2 + 6.5) / spacing + 2, 8 / spacing,
                      2.0 / spacing, "box")
    return rois


def test_manual_rois_reproduce_the_phantom_vbq():
    phantom = make_phantom(11, fractured=())
    result = compute_vbq(phantom.datasets, manual_rois=truth_rois(phantom))
    assert result.status == "succeeded"
    assert result.vbq_all_levels == pytest.approx(phantom.truth["vbq_all_levels"], rel=0.08)


def test_fractured_levels_are_excluded_from_the_second_value():
    phantom = make_phantom(12, fractured=("L2",))
    result = compute_vbq(phantom.datasets, manual_rois=truth_rois(phantom),
                         fractured_levels=["l2"])
    assert result.fractured_levels == ["L2"]
    assert result.levels["L2"].fractured
    assert result.vbq_excluding_fractured != result.vbq_all_levels


def test_without_rois_the_engine_localises_the_levels_and_measures_vbq():
    phantom = make_phantom(13, fractured=())
    result = compute_vbq(phantom.datasets)
    assert result.source == "auto"
    assert result.status == "succeeded", [f.code for f in result.qc_flags]
    assert result.vbq_all_levels == pytest.approx(phantom.truth["vbq_all_levels"], rel=0.03)
    for level in ("L1", "L2", "L3", "L4", "L5", "S1"):
        _, row, _ = phantom.truth["centres_px"][level]
        assert abs(result.levels[level].centroid_pixel[1] - row) * phantom.truth[
            "spacing_mm"] < 8, level


def test_an_image_without_a_spine_asks_for_review_instead_of_guessing():
    datasets = make_phantom(13).datasets
    for ds in datasets:
        flat = np.full((ds.Rows, ds.Columns), 500, np.uint16)
        ds.PixelData = flat.tobytes()
    result = compute_vbq(datasets)
    assert result.status == "needs_review"
    assert result.vbq_all_levels is None
    assert "localisation-failed" in {f.code for f in result.qc_flags}


@pytest.mark.parametrize(
    ("variant", "code"),
    [({"contrast": "t2"}, "t2-like"), ({"fat_suppressed": True}, "fat-suppressed"),
     ({"plane": "axial"}, "not-sagittal"), ({"gadolinium": True}, "contrast")],
)
def test_wrong_protocols_are_refused_with_the_reason(variant, code):
    result = compute_vbq(make_phantom(14, **variant).datasets)
    assert result.status == "failed"
    assert code in {f.code for f in result.qc_flags if f.severity == "refusal"}


def test_a_single_slice_raises_a_typed_error_a_clinician_can_read():
    with pytest.raises(TooFewSlicesError, match="at least 3 slices") as err:
        compute_vbq(make_phantom(15, slices=1).datasets)
    assert err.value.code == "too-few-slices"


def test_a_dicom_without_pixels_raises_a_typed_error():
    datasets = make_phantom(15, slices=3).datasets
    for ds in datasets:
        del ds.PixelData
    with pytest.raises(NotAnImageError, match="no image pixels"):
        compute_vbq(datasets)


def test_a_truncated_file_on_disk_raises_a_typed_error(tmp_path):
    paths = make_phantom(16, slices=4).write(tmp_path)
    paths[1].write_bytes(paths[1].read_bytes()[:300])
    with pytest.raises(EngineError) as err:
        compute_vbq(tmp_path)
    assert err.value.code in ("unreadable-dicom", "inconsistent-series", "not-an-image")
    assert str(err.value)


def test_corrupt_and_non_dicom_files_raise_a_typed_error(tmp_path):
    (tmp_path / "a.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(UnreadableDicomError, match="not a readable DICOM"):
        compute_vbq(tmp_path)


def test_truncated_pixel_data_raises_a_typed_error():
    datasets = make_phantom(16).datasets
    datasets[3].PixelData = datasets[3].PixelData[:100]
    with pytest.raises(EngineError) as err:
        compute_vbq(datasets)
    assert err.value.code == "unreadable-dicom"


def test_an_empty_folder_raises_a_typed_error(tmp_path):
    with pytest.raises(EmptySeriesError):
        compute_vbq(tmp_path)


def test_a_ct_series_is_refused_as_wrong_modality():
    datasets = make_phantom(17).datasets
    for ds in datasets:
        ds.Modality = "CT"
    with pytest.raises(WrongModalityError, match="MR series"):
        compute_vbq(datasets)


def test_a_tiny_roi_is_refused_with_a_clear_message():
    phantom = make_phantom(18)
    rois = truth_rois(phantom)
    rois["L1"] = Roi(rois["L1"].slice_index, 100, 100, 1, 1)
    with pytest.raises(EngineError, match="draw it larger"):
        compute_vbq(phantom.datasets, manual_rois=rois)


def test_the_json_contract_round_trips_and_carries_patient_coordinates():
    phantom = make_phantom(19, fractured=())
    result = compute_vbq(phantom.datasets, manual_rois=truth_rois(phantom))
    data = json.loads(json.dumps(result.to_dict(), default=str))
    again = VbqMeasurement.from_dict(data)
    assert again.vbq_all_levels == pytest.approx(result.vbq_all_levels)
    assert len(data["levels"]["L3"]["centroid_lps_mm"]) == 3
    assert data["acquisition"]["field_strength_t"] in (1.5, 3.0)


def test_cli_prints_the_json_contract(tmp_path, capsys):
    phantom = make_phantom(20, fractured=())
    phantom.write(tmp_path / "series")
    rois = {k: v.__dict__ for k, v in truth_rois(phantom).items()}
    (tmp_path / "rois.json").write_text(json.dumps(rois))
    assert cli([str(tmp_path / "series"), "--rois", str(tmp_path / "rois.json"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "succeeded"
    assert out["algorithm_version"]


def test_phantoms_are_labelled_synthetic():
    ds = make_phantom(21).datasets[0]
    assert "SYNTHETIC" in str(ds.PatientName)
    assert str(ds.PatientID).startswith("SYN-")
    assert np.isfinite(make_phantom(21).truth["vbq_all_levels"])


def test_cli_writes_the_overlay_png_and_the_json_of_an_automatic_measurement(tmp_path, capsys):
    from PIL import Image

    phantom = make_phantom(22, fractured=())
    phantom.write(tmp_path / "series")
    png = tmp_path / "vbq.png"
    assert cli([str(tmp_path / "series"), "--png", str(png), "--json", "--fractured", "L2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"] == "auto"
    assert out["fractured_levels"] == ["L2"]
    for key in ("status", "qc_flags", "confidence", "algorithm_version", "series_instance_uid",
                "vbq_all_levels", "vbq_excluding_fractured"):
        assert key in out
    for level in ("L1", "L2", "L3", "L4", "L5", "S1"):
        assert set(out["levels"][level]) >= {"median_si", "pixel_count", "centroid_pixel",
                                              "centroid_lps_mm"}
    assert len(out["csf"]["centroid_lps_mm"]) == 3
    with Image.open(png) as image:
        assert image.format == "PNG"
        assert image.size[1] >= 512


def test_cli_reports_an_unreadable_input_as_an_error_code(tmp_path, capsys):
    (tmp_path / "x.dcm").write_bytes(b"garbage")
    assert cli([str(tmp_path)]) == 2
    assert "unreadable-dicom" in capsys.readouterr().err


def test_a_signal_void_in_a_body_sends_the_result_to_review():
    """SYNTHETIC stand-in for cement: a near-zero block over the middle of L2."""
    phantom = make_phantom(23, fractured=())
    mid = phantom.truth["mid_slice"]
    _, row, col = phantom.truth["centres_px"]["L2"]
    half = int(8 / phantom.truth["spacing_mm"])
    for index in (mid - 1, mid, mid + 1):
        arr = phantom.datasets[index].pixel_array.copy()
        arr[int(row) - half: int(row) + half, int(col) - 2 * half: int(col) + 2 * half] = 5
        phantom.datasets[index].PixelData = arr.tobytes()
    result = compute_vbq(phantom.datasets)
    assert result.status == "needs_review"
    void = [f for f in result.qc_flags if f.code == "signal-void"]
    assert void
    assert "L2" in void[0].message


@pytest.mark.parametrize(("allocated", "stored", "signed"), [
    (16, 16, 0), (16, 12, 0), (16, 16, 1), (16, 12, 1), (8, 8, 0), (8, 6, 0), (32, 32, 1)])
@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
def test_the_engine_reads_the_pixel_values_pydicom_decodes(allocated, stored, signed, syntax):
    """The fast path for uncompressed little-endian images (or pydicom's handlers when it does
    not apply) gives exactly ``pixel_array``'s values, unused high bits included."""
    from pydicom.dataset import Dataset, FileMetaDataset

    from scoring.engine.dicom_io import _native_pixels

    rng = np.random.default_rng(allocated + stored + signed)
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    info = np.iinfo(dtype)
    values = rng.integers(info.min, info.max, size=(6, 5), dtype=dtype, endpoint=True)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, stored, stored - 1
    ds.PixelRepresentation = signed
    ds.PixelData = values.tobytes() + (b"\0" if values.nbytes % 2 else b"")
    fast = _native_pixels(ds)
    if fast is None:  # not a case for the fast path: pydicom decodes it
        assert signed
        assert stored < allocated
        return
    assert fast.dtype == ds.pixel_array.dtype
    assert np.array_equal(fast, ds.pixel_array)


def test_the_pixel_stack_converts_slices_when_used_with_the_rescale():
    """Series.pixels converts a slice to float32 (rescale applied) when it is first used; the
    whole volume, single slices and sampled points all give the same values."""
    from scoring.engine.dicom_io import read_series

    datasets = make_phantom(12, fractured=()).datasets
    for i, ds in enumerate(datasets):
        ds.RescaleSlope, ds.RescaleIntercept = 2.0, -10.0 + i
    pixels = read_series(datasets).pixels
    raw = np.stack([ds.pixel_array for ds in datasets]).astype(np.float32)
    expected = raw * 2.0 + (np.arange(len(datasets), dtype=np.float32) - 10.0)[:, None, None]
    index = np.array([0, 7, pixels.shape[1] * pixels.shape[2] - 1])
    stored, slope, intercept = pixels.stored(4)  # not converted yet: decoded values + rescale
    assert np.array_equal(stored * np.float32(slope) + np.float32(intercept), expected[4])
    assert np.array_equal(pixels.take(3, index), expected[3].reshape(-1)[index])
    assert np.array_equal(pixels[-1], expected[-1])
    assert np.array_equal(pixels[2], expected[2])
    assert np.array_equal(pixels.take(2, index), expected[2].reshape(-1)[index])
    assert np.array_equal(np.asarray(pixels), expected)
    assert np.array_equal(pixels[1:3], expected[1:3])
    assert pixels.shape == expected.shape
    with pytest.raises(IndexError):
        pixels[len(datasets)]


def test_the_json_contract_is_what_dataclasses_asdict_gives():
    """``to_dict`` skips ``asdict``'s deep copy (worker CPU per stored result); the data, and
    the container types (tuples stay tuples), must be exactly ``asdict``'s."""
    import dataclasses

    def typed(value):  # the value with the type of every container and leaf spelled out
        if isinstance(value, dict):
            return ("dict", {k: typed(v) for k, v in value.items()})
        if isinstance(value, list | tuple):
            return (type(value).__name__, [typed(v) for v in value])
        return (type(value).__name__, value)

    phantom = make_phantom(20, fractured=("L2",))
    measured = [compute_vbq(phantom.datasets),
                compute_vbq(phantom.datasets, manual_rois=truth_rois(phantom),
                            fractured_levels=["L2"])]
    assert measured[0].levels
    assert measured[0].csf is not None
    assert measured[1].fractured_levels
    for result in measured:
        assert typed(result.to_dict()) == typed(dataclasses.asdict(result))
