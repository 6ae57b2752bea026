"""Bounded property-based fuzzing of the two untrusted inputs: FHIR bundles and DICOM files.

- ``POST /fhir`` with mutated transaction bundles: never a 5xx, and a rejected transaction
  writes nothing (row counts unchanged).
- ``scoring.engine.compute_vbq`` on mutated synthetic MRI series: it returns a measurement
  or raises the typed ``EngineError``; nothing else escapes.

Each target is skipped (with the reason) until its module is in the tree. Bounded by
``FUZZ_MAX_EXAMPLES`` (default 60 per target).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import shutil
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "60"))
FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False), st.text(max_size=300),
    st.sampled_from(["", "2026-13-45", "not-a-ref", "Patient/", "urn:uuid:x", "\u0000",
                     "SYNTHETIC", "x" * 5000]),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


def _valid_bundle() -> dict:
    key = uuid.uuid4().hex[:10].upper()
    return {
        "resourceType": "Bundle", "type": "transaction",
        "entry": [
            {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": {
                "resourceType": "Patient",
                "identifier": [{"system": "https://vbq-registry.example.org/fhir/sid/"
                                "synthetic-mrn", "value": f"SYN-Z{key}"}],
                "name": [{"family": "SYNTHETIC", "given": [f"Fuzz{key}"]}],
                "gender": "female", "birthDate": "1950-01-01"},
             "request": {"method": "POST", "url": "Patient"}},
            {"fullUrl": f"urn:uuid:{uuid.uuid4()}", "resource": {
                "resourceType": "Procedure", "status": "completed",
                "identifier": [{"system": "https://ehr.example.org/procedure",
                                "value": f"FUZZ-{key}"}],
                "code": {"coding": [{"system": "http://www.ama-assn.org/go/cpt",
                                     "code": "22511"}]},
                "subject": {"reference": "urn:uuid:placeholder"},
                "performedDateTime": "2026-06-01T10:00:00-04:00"},
             "request": {"method": "POST", "url": "Procedure"}},
        ],
    }


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated_bundles(draw):
    bundle = _valid_bundle()
    bundle["entry"][1]["resource"]["subject"]["reference"] = bundle["entry"][0]["fullUrl"]
    paths = [p for p in _paths(bundle) if p]
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        path = draw(st.sampled_from(paths))
        parent = bundle
        try:
            for step in path[:-1]:
                parent = parent[step]
            action = draw(st.sampled_from(["replace", "delete", "duplicate"]))
            if action == "replace":
                parent[path[-1]] = draw(JSON_VALUES)
            elif action == "delete" and isinstance(parent, dict):
                parent.pop(path[-1], None)
            elif isinstance(parent, list):
                parent.append(copy.deepcopy(parent[path[-1]]))
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed this path
    return bundle


def _fhir_mounted() -> bool:
    from django.urls import Resolver404, resolve

    try:
        resolve("/fhir")
    except Resolver404:
        return False
    return True


@pytest.mark.postgres
@pytest.mark.slow
def test_mutated_fhir_bundles_never_cause_a_server_error_or_a_partial_write(db):
    examples: list[int] = []
    if not _fhir_mounted():
        pytest.skip("the FHIR endpoint /fhir is not mounted yet")
    from django.test import Client

    from registry.feeds import feed_create
    from registry.models import Fracture, Patient, PatientIdentifier, Procedure, TherapyExposure

    _, token = feed_create(name="fuzz-feed")
    client = Client(raise_request_exception=False, HTTP_AUTHORIZATION=f"Bearer {token}")
    models = (Patient, PatientIdentifier, Procedure, Fracture, TherapyExposure)

    @FUZZ
    @given(bundle=mutated_bundles())
    def post(bundle):
        examples.append(1)
        before = [m.objects.count() for m in models]
        response = client.post("/fhir", data=bundle, content_type="application/fhir+json")
        assert response.status_code < 500, response.content[:500]
        if response.status_code >= 400 and bundle.get("type") == "transaction":
            assert [m.objects.count() for m in models] == before, "partial write"

    post()
    assert len(examples) >= MAX_EXAMPLES, "the fuzz stopped early"


@pytest.fixture(autouse=True)
def _quiet_pydicom():
    """pydicom warns (and logs) about every garbled value the fuzz feeds it."""
    import logging
    import warnings

    logger = logging.getLogger("pydicom")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield
    logger.setLevel(level)


def _engine():
    engine = pytest.importorskip("scoring.engine")
    if not hasattr(engine, "compute_vbq") or not hasattr(engine, "EngineError"):
        pytest.skip("scoring.engine.compute_vbq / EngineError not in the tree yet")
    phantom = pytest.importorskip("scoring.engine.phantom").make_phantom(7)
    return engine, phantom


def _rois(engine, phantom) -> dict:
    """Manual ROIs on the phantom's known anatomy, so the pixel path runs, not just QC."""
    truth = phantom.truth
    spacing = truth["spacing_mm"]
    rois = {}
    for level in ("L1", "L2", "L3", "L4"):
        s, r, c = truth["centres_px"][level]
        rois[level] = engine.Roi(s, r, c - 1.5 / spacing, 6 / spacing, 8 / spacing)
    s, r, c = truth["centres_px"]["L3"]
    rois["csf"] = engine.Roi(s, r, c + 17 / spacing + 8.5 / spacing + 2, 8 / spacing,
                             2.0 / spacing, "box")
    return rois


DICOM_TAGS = ["PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient", "Rows",
              "Columns", "SliceThickness", "RepetitionTime", "EchoTime", "SeriesInstanceUID",
              "BitsAllocated", "PixelRepresentation", "RescaleSlope", "InstanceNumber",
              "Modality", "SamplesPerPixel", "MagneticFieldStrength"]
ROI_NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                        st.integers(min_value=-10**6, max_value=10**6))


@pytest.mark.slow
def test_mutated_dicom_series_give_a_measurement_or_a_typed_engine_error():
    examples: list[int] = []
    engine, phantom = _engine()
    datasets, rois = phantom.datasets, _rois(engine, phantom)
    baseline = engine.compute_vbq(copy.deepcopy(datasets), manual_rois=rois)
    assert baseline.vbq_all_levels is not None, "the fuzz must start from a working series"

    @FUZZ
    @given(
        drop=st.lists(st.sampled_from(DICOM_TAGS), max_size=3),
        garble=st.lists(st.tuples(st.sampled_from(DICOM_TAGS), JSON_SCALARS), max_size=2),
        truncate_pixels=st.one_of(st.none(), st.integers(min_value=0, max_value=4096)),
        keep=st.integers(min_value=0, max_value=len(datasets)),
        which=st.integers(min_value=0, max_value=len(datasets) - 1),
        roi_level=st.sampled_from(["L1", "L2", "L3", "L4", "csf", None]),
        roi_field=st.sampled_from(["slice_index", "row", "col", "half_height", "half_width"]),
        roi_value=ROI_NUMBERS,
        with_rois=st.booleans(),
    )
    def run(drop, garble, truncate_pixels, keep, which, roi_level, roi_field, roi_value,
            with_rois):
        examples.append(1)
        series = copy.deepcopy(datasets)[:keep]
        if series:
            target = series[which % len(series)]
            for tag in drop:
                if tag in target:
                    delattr(target, tag)
            for tag, value in garble:
                # pydicom may refuse the value itself: that is not the engine's input.
                with contextlib.suppress(TypeError, ValueError, OverflowError):
                    setattr(target, tag, value)
            if truncate_pixels is not None and "PixelData" in target:
                target.PixelData = target.PixelData[:truncate_pixels]
        manual = dict(rois) if with_rois else None
        if manual and roi_level:
            manual[roi_level] = dataclasses.replace(manual[roi_level], **{roi_field: roi_value})
        with contextlib.suppress(engine.EngineError):
            engine.compute_vbq(series, manual_rois=manual)

    run()
    assert len(examples) >= MAX_EXAMPLES, "the fuzz stopped early"


@pytest.mark.slow
def test_corrupted_dicom_files_give_a_measurement_or_a_typed_engine_error(tmp_path):
    examples: list[int] = []
    engine, phantom = _engine()
    rois = _rois(engine, phantom)
    clean = [p.read_bytes() for p in phantom.write(tmp_path / "clean")]

    @FUZZ
    @given(
        which=st.integers(min_value=0, max_value=len(clean) - 1),
        cut=st.one_of(st.none(), st.integers(min_value=0, max_value=4000)),
        flips=st.lists(st.tuples(st.integers(min_value=0, max_value=4000),
                                 st.integers(min_value=0, max_value=255)), max_size=8),
        junk=st.one_of(st.none(), st.binary(max_size=512)),
    )
    def run(which, cut, flips, junk):
        examples.append(1)
        folder = tmp_path / "case"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for i, data in enumerate(clean):
            if i == which:
                raw = bytearray(data if cut is None else data[:cut])
                for offset, value in flips:
                    if offset < len(raw):
                        raw[offset] = value
                data = bytes(raw)
            (folder / f"IM{i:04d}.dcm").write_bytes(data)
        if junk is not None:
            (folder / "junk.dcm").write_bytes(junk)
        with contextlib.suppress(engine.EngineError):
            engine.compute_vbq(folder, manual_rois=rois)

    run()
    assert len(examples) >= MAX_EXAMPLES, "the fuzz stopped early"
