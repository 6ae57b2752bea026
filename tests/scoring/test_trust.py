"""The trust rule (scoring/trust.py): which results may move an alert. The ORM filter, the
sweep's SQL predicate and the Python test agree on every combination; the patient identity
check (scoring/identity.py) and the QC of placed ROIs (scoring/engine/roi_qc.py). SYNTHETIC
values only."""

import datetime as dt
import itertools

import pytest
from django.db import connection

from scoring.engine import Roi, compute_vbq
from scoring.engine.phantom import make_phantom
from scoring.identity import DicomPatient, mismatches
from scoring.models import VbqResult
from scoring.trust import qc_clear, result_is_trusted, trusted_q, trusted_sql, untrusted_reason
from tests.factories import PatientFactory
from tests.ui.data import phantom_rois

WARNING = {"code": "canal-uncertain", "message": "SYNTHETIC", "severity": "warning"}
INFO = {"code": "suggested-fracture", "message": "SYNTHETIC", "severity": "info"}


def test_info_flags_and_the_registry_driven_all_fractured_flag_do_not_block():
    assert qc_clear([])
    assert qc_clear([INFO, {"code": "all-levels-fractured", "severity": "warning"}])
    assert not qc_clear([INFO, WARNING])
    assert not qc_clear([{"code": "no-severity"}])  # unknown severity counts as a warning


@pytest.mark.django_db
def test_the_orm_the_sql_and_python_agree_on_every_combination(settings):
    settings.VBQ_TRUST_MIN_CONFIDENCE = 0.8
    patient = PatientFactory()
    grid = list(itertools.product(
        ["auto", "external-seg", "manual", "imported"],
        ["succeeded", "needs_review", "failed"],
        ["pending", "accepted", "rejected"],
        [True, False],  # qc_clear
        [None, 0.79, 0.8, 1.0]))
    VbqResult.objects.bulk_create([
        VbqResult(patient=patient, algorithm_version=f"t{i}", source=source, status=status,
                  review_status=review, qc_clear=clear, confidence=confidence)
        for i, (source, status, review, clear, confidence) in enumerate(grid)])
    rows = list(VbqResult.objects.filter(patient=patient))
    python = {r.pk for r in rows if result_is_trusted(r)}
    orm = set(VbqResult.objects.filter(patient=patient).filter(trusted_q())
              .values_list("pk", flat=True))
    assert python == orm
    assert len(python) == 4 * 3 * 2 * 4 + 2 * 2  # every accepted one; clean confident automatic
    if connection.vendor == "postgresql":
        predicate, params = trusted_sql("r")
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT r.id FROM {VbqResult._meta.db_table} r "  # noqa: S608
                           f"WHERE r.patient_id = %(p)s AND {predicate}",
                           {**params, "p": patient.pk})
            assert {pk for (pk,) in cursor.fetchall()} == python
    for r in rows:
        assert bool(untrusted_reason(r)) == (r.pk not in python)


@pytest.mark.parametrize(("found", "codes"), [
    (DicomPatient("SYN-1", "Synthetic", dt.date(1950, 3, 14)), []),
    (DicomPatient("SYN-1", "SYNTHÉTIC", None), []),  # accents and case ignored
    (DicomPatient("SYN-1", "", None), []),  # nothing to compare is not a mismatch
    (DicomPatient("SYN-2", "SYNTHETIC", None), ["patient-id"]),
    (DicomPatient("", "SYNTHETIC", None), ["patient-id"]),
    (DicomPatient("SYN-1", "OTHER", dt.date(1950, 3, 15)), ["family-name", "birth-date"]),
])
def test_the_dicom_patient_must_be_the_registry_patient(found, codes):
    got = mismatches(found, identifier_values=["SYN-1", "PACS-9"], family_name="SYNTHETIC",
                     birth_date=dt.date(1950, 3, 14))
    assert [m.code for m in got] == codes


def test_placed_rois_get_the_automatic_paths_checks():
    phantom = make_phantom(7, fractured=())
    rois = phantom_rois(phantom.truth)
    clean = compute_vbq(phantom.datasets, manual_rois=rois)
    assert (clean.status, clean.confidence, clean.qc_flags) == ("succeeded", 1.0, [])

    spacing = phantom.truth["spacing_mm"]
    csf = rois["csf"]
    small = Roi(**{**csf.__dict__, "half_height": 6 / spacing, "half_width": 2.6 / spacing})
    off_canal = Roi(**{**csf.__dict__, "col": csf.col + 6 / spacing})
    in_front = Roi(**{**csf.__dict__, "col": rois["L3"].col - 2 / spacing})
    swapped = {**rois, "L1": rois["L4"], "L4": rois["L1"]}
    cases = {
        "small-csf-roi": {**rois, "csf": small},
        "csf-roi-not-uniform": {**rois, "csf": off_canal},
        "csf-not-behind-l3": {**rois, "csf": in_front},
        "levels-out-of-order": swapped,
    }
    for code, placed in cases.items():
        m = compute_vbq(phantom.datasets, manual_rois=placed)
        assert code in {f.code for f in m.qc_flags}, (code, m.qc_flags)
        assert m.confidence < 1.0
