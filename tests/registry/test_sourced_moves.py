"""A fracture or procedure RE-SENT under the same source identifier for ANOTHER patient (an
EHR misfile correction) concerns both patients: the former one's VBQ results drop the level
that is no longer theirs, their follow-up is re-evaluated and (a procedure) their studies are
linked again; the single and bulk writers alike. And a hip or wrist fracture costs no
fractured-levels recompute. SYNTHETIC patients and medians (tests/scoring/test_fractured_levels).
"""

import datetime as dt

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from registry import codes
from registry.models import AuditEvent, Patient, Procedure
from registry.services import Identifier, fracture_record, procedure_record
from registry.services_bulk import (
    fracture_record_many,
    procedure_record_many,
    sourced_record_many,
)
from registry.timeutil import clinic_today
from scoring.fractured import vbq_excluding
from scoring.models import ImagingStudy
from scoring.services import RELINK_PENDING
from tests.scoring.test_fractured_levels import (  # noqa: F401 (the autouse fixture)
    ALL_LEVELS,
    MEDIANS,
    WITHOUT_L4,
    _assert_levels,
    _at,
    _patient,
    _scored,
    _threshold_out_of_reach,
)

pytestmark = pytest.mark.django_db
CONDITION = "https://ehr.example.org/condition"
PROCEDURE = "https://ehr.example.org/procedure"
WRITERS = ["single", "bulk", "bundle"]


def _not_due(*patients):
    Patient.objects.filter(pk__in=[p.pk for p in patients]).update(
        followup_next_check_on=clinic_today() + dt.timedelta(days=30))


def _due(patient):
    return Patient.objects.get(pk=patient.pk).followup_next_check_on == clinic_today()


def _fracture(writer, patient, *, value="FX-MISFILED", site="vertebral", level="L4"):
    item = {"patient": patient, "site": site, "vertebral_level": level,
            "diagnosed_at": _at(75), "identifier": Identifier(CONDITION, value)}
    if writer == "single":
        fracture_record(**item)
    elif writer == "bulk":
        fracture_record_many(items=[item])
    else:  # a bundle: both kinds in one statement
        sourced_record_many(groups={"fracture": [item], "procedure": [
            {"patient": _patient(treated=None), "code_system": codes.CPT, "code": "22511",
             "performed_at": _at(70), "levels": ["T12"]}]})


def _procedure(writer, patient, *, levels=("L1",)):
    item = {"patient": patient, "code_system": codes.CPT, "code": "22511",
            "performed_at": _at(70), "levels": list(levels),
            "identifier": Identifier(PROCEDURE, "PROC-MISFILED")}
    if writer == "single":
        procedure_record(**item)
    elif writer == "bulk":
        procedure_record_many(items=[item])
    else:
        sourced_record_many(groups={"procedure": [item], "fracture": [
            {"patient": patient, "site": "hip", "diagnosed_at": _at(80),
             "identifier": Identifier(CONDITION, "FX-HIP-BUNDLE")}]})


@pytest.mark.parametrize("writer", WRITERS)
def test_a_fracture_resent_for_another_patient_leaves_the_former_patients_levels(writer):
    former, other = _patient(), _patient()
    _fracture(writer, former)
    former_result = _scored(former, fractured=["L4"])  # as the worker stored it
    other_result = _scored(other, uid="2.25.7400000000000000000001")
    _assert_levels(former_result, ["L4"], WITHOUT_L4)
    _not_due(former, other)

    _fracture(writer, other)  # the EHR corrects the patient

    _assert_levels(former_result, [], ALL_LEVELS)
    _assert_levels(other_result, ["L4"], WITHOUT_L4)
    assert _due(former)
    assert _due(other)


@pytest.mark.parametrize("writer", WRITERS)
def test_a_procedure_resent_for_another_patient_leaves_the_former_patients_index(writer):
    former, other = _patient(treated=None), _patient(treated=None)
    _procedure(writer, former)
    former_result = _scored(former, fractured=["L1"])
    _assert_levels(former_result, ["L1"], vbq_excluding(MEDIANS, MEDIANS["csf"], ["L1"]))
    ImagingStudy.objects.filter(patient=former).update(link_reason="", linked_procedure=None)
    _not_due(former, other)

    _procedure(writer, other)

    assert Procedure.objects.get(identifier_value="PROC-MISFILED").patient_id == other.pk
    _assert_levels(former_result, [], ALL_LEVELS)
    assert _due(former)
    assert _due(other)
    # their studies are linked again (the procedure they were linked around left)
    assert set(ImagingStudy.objects.filter(patient=former).values_list(
        "link_reason", flat=True)) == {RELINK_PENDING}


@pytest.mark.parametrize("writer", ["single", "bulk"])
def test_the_move_is_audited_with_the_former_patient(writer):
    former, other = _patient(), _patient()
    _fracture(writer, former, value="FX-AUDIT")
    _fracture(writer, other, value="FX-AUDIT")
    audit = AuditEvent.objects.filter(object_type="Fracture").order_by("pk").last()
    assert audit.patient_id == other.pk
    assert audit.detail == {"moved_from_patient": str(former.pk)}


def _statements(write):
    """Django's queries plus the psycopg pipelines (``pg_pipeline`` bypasses Django's
    cursor: the fractured-levels recompute on PostgreSQL) of ``write()``."""
    import db.pg
    import registry.side_effects
    import scoring.fractured

    pipelines = []
    real = db.pg.pg_pipeline
    users = (registry.side_effects, scoring.fractured)  # the modules that send pipelines

    def counted(statements):
        pipelines.append(statements)
        return real(statements)

    for module in users:
        module.pg_pipeline = counted
    try:
        with CaptureQueriesContext(connection) as queries:
            write()
    finally:
        for module in users:
            module.pg_pipeline = real
    return [q["sql"] for q in queries.captured_queries], pipelines


def test_a_hip_fracture_costs_no_fractured_levels_recompute():
    patient = _patient()
    _scored(patient)
    hip, hip_pipelines = _statements(lambda: _fracture("single", patient, value="FX-HIP",
                                                       site="hip", level=""))
    spine, spine_pipelines = _statements(lambda: _fracture("single", patient, value="FX-SPINE"))

    assert not hip_pipelines
    assert not any("scoring_vbqresult" in sql for sql in hip)
    if connection.vendor == "postgresql":  # the recompute: one pipeline (lock + statement)
        assert len(spine_pipelines) == 1
    else:  # the ORM recompute reads the results
        assert any("scoring_vbqresult" in sql for sql in spine)


def test_a_vertebral_fracture_corrected_to_a_hip_one_is_recomputed():
    patient = _patient()
    result = _scored(patient)
    _fracture("single", patient, value="FX-SITE")
    _assert_levels(result, ["L4"], WITHOUT_L4)

    _fracture("single", patient, value="FX-SITE", site="hip", level="")

    _assert_levels(result, [], ALL_LEVELS)


@pytest.mark.postgres
def test_bulk_results_match_their_items_whatever_the_plan():
    """The bulk writer matches (pk, created, former patient) to the items by position: the
    rows must come back in the statement's order even when the table is large enough for a
    hash join (review finding: 39 of 60 items got another record's pk with a LEFT JOIN)."""
    from registry.models import Fracture
    from tests.factories import FractureFactory, PatientFactory

    a, b = PatientFactory(), PatientFactory()
    for n in range(300):
        FractureFactory(patient=a, site="hip", identifier_system=CONDITION,
                        identifier_value=f"bulk-{n}")
    items = [{"patient": a if n % 2 else b, "site": "hip", "diagnosed_at": _at(10 + n % 5),
              "identifier": Identifier(CONDITION, f"ord-{n}")} for n in range(40)]
    fracture_record_many(items=items)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE registry_fracture")
    again = [items[n] for n in range(39, -1, -2)] + [
        {"patient": b, "site": "hip", "diagnosed_at": _at(3),
         "identifier": Identifier(CONDITION, f"new-{n}")} for n in range(20)]
    import random
    random.Random(5).shuffle(again)
    before = AuditEvent.objects.order_by("-pk").values_list("pk", flat=True).first()
    results = fracture_record_many(items=again)
    got = [(Fracture.objects.get(pk=pk).identifier_value, created) for pk, created in results]
    assert got == [(item["identifier"].value, item["identifier"].value.startswith("new-"))
                   for item in again]
    assert not AuditEvent.objects.filter(pk__gt=before,
                                         detail__has_key="moved_from_patient").exists()


@pytest.mark.parametrize("bulk", [False, True])
def test_a_procedure_moved_to_another_patient_unlinks_the_former_patients_study(bulk):
    """The former patient's MRI must not stay linked to a procedure that is now another
    patient's: it is unlinked and waits to be linked again to its own patient's index."""
    import datetime as _dt

    from registry.timeutil import start_of_clinic_day
    from tests.factories import PatientFactory
    from tests.scoring.test_linking_jobs import _patient_with_index, _study

    a, index_day = _patient_with_index()
    study = _study(a, index_day, "2.25.7701", days_before=10, link=True)
    study.refresh_from_db()
    assert study.linked_procedure_id is not None
    b = PatientFactory()
    resend = dict(patient=b, code_system="http://www.ama-assn.org/go/cpt", code="22511",
                  performed_at=start_of_clinic_day(index_day) + _dt.timedelta(hours=10),
                  identifier=Identifier("urn:t", str(a.pk)))  # the identifier A's index had
    if bulk:
        procedure_record_many(items=[resend])
    else:
        procedure_record(**resend)
    study.refresh_from_db()
    assert study.linked_procedure_id is None
    assert study.link_reason == RELINK_PENDING
