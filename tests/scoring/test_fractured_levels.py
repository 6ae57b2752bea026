"""The fractured levels a VBQ result drops are its patient's INDEX fractures (the index
procedure's treated levels and the vertebral fractures that are not secondary), and they follow
changes: a study moved to another patient, a fracture or procedure recorded, corrected or
voided after the result. A reviewer's choice is never overwritten. SYNTHETIC patients and
medians; PostgreSQL (one statement) and the ORM path (SQLite) alike.

Medians (CSF 100): L1 320, L2 305, L3 285, L4 150 → VBQ all levels (285 + 305) / 2 / 100 =
2.95 (below the 3.0 threshold); excluding L4 (a dark, fractured body) 305 / 100 = 3.05 (high).

A recompute that moves a counting result across the threshold is held for a reviewer (issue
18); the tests of the recompute's mechanics therefore run with the threshold out of reach
(``_threshold_out_of_reach``), and the tests of the hold set it back to 3.0.
"""

import datetime as dt
import os
import random

import pytest
from django.db import connection

from followup.sweep import followup_evaluate
from registry import codes
from registry.followup import HIGH_VBQ
from registry.models import Alert, AuditEvent, Fracture, Patient
from registry.services import Identifier, fracture_record, patient_merge, procedure_record
from registry.services_bulk import fracture_record_many, sourced_record_many
from registry.side_effects import SYSTEM_ACTOR
from registry.timeutil import clinic_today, start_of_clinic_day
from scoring.engine.model import ALGORITHM_VERSION
from scoring.fractured import fractured_levels_of, fractured_levels_sql, vbq_excluding
from scoring.models import VbqLevel, VbqResult
from scoring.review import review_mark_fractured
from scoring.services import SeriesInput, imaging_study_upsert
from scoring.tasks import _claim
from tests.factories import FractureFactory, PatientFactory, ProcedureFactory

pytestmark = pytest.mark.django_db
MEDIANS = {"L1": 320.0, "L2": 305.0, "L3": 285.0, "L4": 150.0, "L5": 260.0, "csf": 100.0}
ALL_LEVELS = 2.95
WITHOUT_L4 = 3.05
CONDITION = "https://ehr.example.org/condition"


@pytest.fixture(autouse=True)
def _threshold_out_of_reach(settings):
    settings.VBQ_HIGH_THRESHOLD = 10.0
    settings.VBQ_HIGH_THRESHOLD_1_5T = settings.VBQ_HIGH_THRESHOLD_3T = None


def _day(days_ago):
    return clinic_today() - dt.timedelta(days=days_ago)


def _at(days_ago):
    return start_of_clinic_day(_day(days_ago)) + dt.timedelta(hours=10)


def _patient(*, treated=("T12",), days_since_procedure=70):
    """A patient whose index procedure (at ``treated``) was ``days_since_procedure`` days ago;
    ``treated=None``: no procedure."""
    patient = PatientFactory()
    if treated is not None:
        ProcedureFactory(patient=patient, performed_at=_at(days_since_procedure),
                         levels=list(treated))
    return patient


def _study(patient, uid):
    study, _ = imaging_study_upsert(
        study_instance_uid=uid, patient=patient, source="dicom",
        started_at=_at(90), modality="MR", description="L-SPINE",
        endpoint_url="http://127.0.0.1:9/dicom-web",
        series=[SeriesInput(uid + ".1", "MR", "SAG T1")])
    return study


def _job(patient, uid):
    """The study's queued job (created here when the study is not linked: no procedure)."""
    study = _study(patient, uid)
    result, _ = VbqResult.objects.get_or_create(
        series=study.series.get(), algorithm_version=ALGORITHM_VERSION, source="auto",
        revision=0, defaults={"patient": patient})
    return result


def _scored(patient, *, uid="2.25.7200000000000000000001", fractured=(), medians=None):
    """The study's job as a worker would have stored it, with ``fractured`` excluded."""
    result = _job(patient, uid)
    fractured = sorted(fractured)
    medians = medians or MEDIANS
    levels = {k: v for k, v in medians.items() if k != "csf"}
    excl = vbq_excluding(levels, medians["csf"], fractured)
    VbqResult.objects.filter(pk=result.pk).update(
        status="succeeded", vbq_all_levels=vbq_excluding(levels, medians["csf"], ()),
        vbq_excluding_fractured=excl, fractured_levels=fractured, qc_flags=[], qc_clear=True,
        confidence=1.0, measurement={"status": "succeeded", "vbq_excluding_fractured": excl,
                     "fractured_levels": fractured, "qc_flags": [],
                     "levels": {k: {"median_si": v, "fractured": k in fractured}
                                for k, v in levels.items()},
                     "csf": {"median_si": medians["csf"], "fractured": False}})
    VbqLevel.objects.bulk_create([
        VbqLevel(result=result, level=k, median_si=v, pixel_count=100, fractured=k in fractured)
        for k, v in medians.items()])
    result.refresh_from_db()
    return result


def _assert_levels(result, fractured, value):
    result.refresh_from_db()
    assert result.fractured_levels == fractured
    assert result.vbq_excluding_fractured == pytest.approx(value, abs=1e-12)
    assert result.measurement["fractured_levels"] == fractured
    assert result.measurement["vbq_excluding_fractured"] == result.vbq_excluding_fractured
    assert {k for k, v in result.measurement["levels"].items() if v["fractured"]} == set(fractured)
    assert set(result.levels.filter(fractured=True).values_list("level", flat=True)) == set(
        fractured)


def _high_alert(patient):
    Patient.objects.filter(pk=patient.pk).update(followup_next_check_on=None)
    followup_evaluate([patient.pk])
    return Alert.objects.filter(patient=patient, rule_id=HIGH_VBQ, status="open").exists()


def _vertebral(patient, level, *, days_ago, value, status="active"):
    return fracture_record(
        patient=patient, site="vertebral", vertebral_level=level, diagnosed_at=_at(days_ago),
        identifier=Identifier(CONDITION, value), record_status=status)


def test_a_result_moved_to_another_patient_drops_that_patients_fractured_levels():
    a, b = _patient(), _patient()
    FractureFactory(patient=a, site="vertebral", vertebral_level="L4",
                    diagnosed_at=_at(75), diagnosed_on=_day(75))  # A's index fracture
    result = _scored(a, fractured=["L4"])
    assert result.vbq_excluding_fractured == pytest.approx(WITHOUT_L4)

    _study(b, "2.25.7200000000000000000001")  # the EHR corrects the study to B

    result.refresh_from_db()
    assert result.patient_id == b.pk
    _assert_levels(result, [], ALL_LEVELS)
    assert result.vbq_excluding_fractured == vbq_excluding(MEDIANS, MEDIANS["csf"], ())
    audit = AuditEvent.objects.get(object_type="VbqResult", object_id=str(result.pk),
                                   detail__fractured_levels=[])
    assert audit.patient_id == b.pk
    assert Patient.objects.get(pk=b.pk).followup_next_check_on == clinic_today()


@pytest.mark.parametrize("bulk", [False, True], ids=["single", "bulk"])
def test_an_index_fracture_recorded_after_the_result_changes_its_value_and_the_alert(
        bulk, settings):
    """2.95 → 3.05 stays on one side of a 2.9 threshold: applied at once, the alert (and its
    value, on the next evaluation) follows."""
    settings.VBQ_HIGH_THRESHOLD = 2.9
    patient = _patient()
    result = _scored(patient)
    assert _high_alert(patient)  # 2.95 ≥ 2.9

    item = {"patient": patient, "site": "vertebral", "vertebral_level": "L4",
            "diagnosed_at": _at(72), "identifier": Identifier(CONDITION, "FX-L4")}
    if bulk:
        fracture_record_many(items=[item])
    else:
        fracture_record(**item)

    _assert_levels(result, ["L4"], WITHOUT_L4)
    assert result.vbq_excluding_fractured == vbq_excluding(MEDIANS, MEDIANS["csf"], ["L4"])
    assert Patient.objects.get(pk=patient.pk).followup_next_check_on == clinic_today()
    assert _high_alert(patient)  # 3.05
    assert AuditEvent.objects.filter(object_type="VbqResult", object_id=str(result.pk),
                                     detail__fractured_levels=["L4"]).count() == 1


def _hold_flag(result):
    result.refresh_from_db()
    return [f for f in result.qc_flags if f.get("code") == "fractured-levels-pending"]


@pytest.mark.parametrize("path", ["service", "sql", "orm"])
def test_a_recompute_that_crosses_the_threshold_waits_for_a_reviewer_and_opens_no_alert(
        path, settings, role_user):
    """Issue 18: only a reviewed result, or a clear automatic one, may move an alert, and a
    change of category goes to the needs-review queue and says so. An index fracture at L4
    recorded after a counting automatic result (2.95, under 3.0) would make it 3.05: the
    result keeps 2.95 and its levels, says why in an info flag, waits in the queue; no alert
    opens until a reviewer marks L4 on it. ``service``: ``fracture_record``; ``sql`` /
    ``orm``: the PostgreSQL statement and the ORM loop on the same data."""
    from registry.services import SYSTEM_ACTOR, Actor, followup_changed
    from scoring.fractured import _refresh_orm, results_refresh_fractured
    from scoring.review import review_queue

    settings.VBQ_HIGH_THRESHOLD = 3.0
    patient = _patient()
    result = _scored(patient)
    assert not _high_alert(patient)  # 2.95
    if path == "service":
        _vertebral(patient, "L4", days_ago=72, value="FX-HOLD")
    else:
        FractureFactory(patient=patient, site="vertebral", vertebral_level="L4",
                        diagnosed_at=_at(72), diagnosed_on=_day(72))
        if path == "sql":
            results_refresh_fractured([patient.pk])
        else:
            _refresh_orm([str(patient.pk)], SYSTEM_ACTOR, "SYNTHETIC test")
            followup_changed(patient.pk)

    _assert_levels(result, [], ALL_LEVELS)  # unchanged
    [flag] = _hold_flag(result)
    assert (flag["levels"], flag["severity"]) == (["L4"], "info")
    assert flag["value"] == pytest.approx(WITHOUT_L4)
    assert "2.95 → 3.05 crosses the high-VBQ threshold" in flag["message"]
    assert result in review_queue()
    assert not _high_alert(patient)
    assert AuditEvent.objects.get(object_type="VbqResult", object_id=str(result.pk),
                                  detail__held=True).detail["fractured_levels"] == ["L4"]
    # the same fractures again: nothing new (no second flag, no second audit row)
    results_refresh_fractured([patient.pk])
    _refresh_orm([str(patient.pk)], SYSTEM_ACTOR, "SYNTHETIC test")
    assert len(_hold_flag(result)) == 1
    assert AuditEvent.objects.filter(object_type="VbqResult", object_id=str(result.pk),
                                     detail__held=True).count() == 1

    review_mark_fractured(result=result, levels=["L4"],
                          actor=Actor(user_id=role_user("clinician").pk, via="ui"))

    _assert_levels(result, ["L4"], WITHOUT_L4)
    assert _hold_flag(result) == []
    assert result not in review_queue()
    assert _high_alert(patient)  # 3.05, now that a reviewer chose L4


def test_voiding_the_fracture_of_a_counting_result_does_not_close_its_alert_unreviewed(
        settings):
    """The other direction: 3.05 with an open alert (L4 treated, so fractured); then
    the index procedure's treated level is corrected from L4 to T12, so the recompute would
    give 2.95 and resolve the alert: held, the alert stays open."""
    settings.VBQ_HIGH_THRESHOLD = 3.0
    patient = _patient(treated=("L4",))
    result = _scored(patient, fractured=["L4"])
    assert _high_alert(patient)
    from registry.models import Procedure
    from scoring.fractured import results_refresh_fractured

    Procedure.objects.filter(patient=patient).update(levels=["T12"])  # corrected at source
    results_refresh_fractured([patient.pk])

    _assert_levels(result, ["L4"], WITHOUT_L4)
    [flag] = _hold_flag(result)
    assert flag["levels"] == []
    assert _high_alert(patient)


def test_a_recompute_of_a_result_that_does_not_count_yet_is_applied_at_once(settings):
    """A result that moves no alert (here: a QC warning, waiting for review anyway) is
    recomputed across the threshold as before: the reviewer sees the new value."""
    settings.VBQ_HIGH_THRESHOLD = 3.0
    patient = _patient()
    result = _scored(patient)
    VbqResult.objects.filter(pk=result.pk).update(
        qc_clear=False, qc_flags=[{"code": "low-contrast", "severity": "warning",
                                   "message": "SYNTHETIC"}])
    _vertebral(patient, "L4", days_ago=72, value="FX-UNTRUSTED")
    _assert_levels(result, ["L4"], WITHOUT_L4)
    assert _hold_flag(result) == []


def test_voiding_the_fracture_restores_the_value():
    patient = _patient()
    result = _scored(patient)
    _vertebral(patient, "L4", days_ago=72, value="FX-VOID")
    _assert_levels(result, ["L4"], WITHOUT_L4)

    _vertebral(patient, "L4", days_ago=72, value="FX-VOID", status="entered-in-error")

    _assert_levels(result, [], ALL_LEVELS)


def test_a_secondary_fracture_is_not_excluded():
    """After the index procedure, at a level it did not treat: a new fracture, not the one
    the VBQ was measured around (e.g. a re-score months later)."""
    patient = _patient(treated=("L2",))
    result = _scored(patient, fractured=["L2"])
    _vertebral(patient, "L4", days_ago=10, value="FX-SECONDARY")

    result.refresh_from_db()
    assert result.fractured_levels == ["L2"]

    VbqResult.objects.filter(pk=result.pk).update(status="queued")  # re-scored now
    job = _claim(result.pk)
    assert job.fractured_levels == ["L2"]  # the treated level, not the secondary L4


def test_the_claim_takes_the_treated_levels_and_the_fractures_before_the_index():
    patient = _patient(treated=("L1", "T12"))
    FractureFactory(patient=patient, site="vertebral", vertebral_level="L3",
                    diagnosed_at=_at(80), diagnosed_on=_day(80))  # before the index: kept
    FractureFactory(patient=patient, site="vertebral", vertebral_level="L1",
                    diagnosed_at=_at(5), diagnosed_on=_day(5))  # treated level: kept
    FractureFactory(patient=patient, site="vertebral", vertebral_level="L4",
                    diagnosed_at=_at(5), diagnosed_on=_day(5))  # secondary: not kept
    job = _claim(_job(patient, "2.25.7200000000000000000002").pk)
    assert job.fractured_levels == ["L1", "L3"]


def test_without_an_index_procedure_every_active_vertebral_fracture_counts():
    patient = _patient(treated=None)
    FractureFactory(patient=patient, site="vertebral", vertebral_level="L4",
                    diagnosed_at=_at(5), diagnosed_on=_day(5))
    FractureFactory(patient=patient, site="vertebral", vertebral_level="L2",
                    diagnosed_at=_at(5), diagnosed_on=_day(5), record_status="entered-in-error")
    assert _claim(_job(patient, "2.25.7200000000000000000003").pk).fractured_levels == ["L4"]


def test_an_index_procedure_recorded_later_makes_a_later_fracture_secondary():
    patient = _patient(treated=None)
    _vertebral(patient, "L4", days_ago=30, value="FX-LATER")
    result = _scored(patient, fractured=["L4"])

    procedure_record(patient=patient, code_system=codes.CPT,
                     code="22511", performed_at=_at(70), levels=["L1"])

    _assert_levels(result, ["L1"], vbq_excluding(MEDIANS, MEDIANS["csf"], ["L1"]))


def test_a_reviewers_choice_survives_a_later_fracture():
    patient = _patient()
    reviewed = _scored(patient)
    other = _scored(patient, uid="2.25.7200000000000000000004")
    review_mark_fractured(result=reviewed, levels=["L1"], actor=SYSTEM_ACTOR)
    _assert_levels(reviewed, ["L1"], vbq_excluding(MEDIANS, MEDIANS["csf"], ["L1"]))
    assert reviewed.fractured_levels_by_reviewer

    _vertebral(patient, "L4", days_ago=72, value="FX-REVIEWED")

    _assert_levels(reviewed, ["L1"], vbq_excluding(MEDIANS, MEDIANS["csf"], ["L1"]))
    _assert_levels(other, ["L4"], WITHOUT_L4)  # the result no one reviewed follows


def test_the_sql_rule_and_the_python_rule_agree():
    if connection.vendor != "postgresql":
        pytest.skip("the SQL rule is PostgreSQL's")
    patients = [_patient(treated=None), _patient(treated=("L2",)), _patient(treated=("T12",))]
    for patient in patients:
        for level, days_ago in (("L1", 80), ("L3", 5), ("L2", 5)):
            FractureFactory(patient=patient, site="vertebral", vertebral_level=level,
                            diagnosed_at=_at(days_ago), diagnosed_on=_day(days_ago))
    assert Fracture.objects.count() == 9
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT pid::text, {fractured_levels_sql('pid')} "  # noqa: S608
                       "FROM unnest(%s::uuid[]) AS pid", [[str(p.pk) for p in patients]])
        from_sql = {pid: list(levels) for pid, levels in cursor.fetchall()}
    assert from_sql == fractured_levels_of([p.pk for p in patients])
    assert from_sql[str(patients[0].pk)] == ["L1", "L2", "L3"]
    assert from_sql[str(patients[1].pk)] == ["L1", "L2"]
    assert from_sql[str(patients[2].pk)] == ["L1"]


def test_every_level_fractured_leaves_no_value_and_the_engines_flag():
    patient = _patient(treated=("L1", "L2", "L3"))
    result = _scored(patient, fractured=["L1", "L2", "L3"])
    flag = {"code": "all-levels-fractured", "message": "every measured level is fractured",
            "severity": "warning"}

    _vertebral(patient, "L4", days_ago=72, value="FX-ALL")

    result.refresh_from_db()
    assert result.fractured_levels == ["L1", "L2", "L3", "L4"]
    assert result.vbq_excluding_fractured is None
    assert result.qc_flags == [flag]
    assert result.measurement["qc_flags"] == [flag]

    _vertebral(patient, "L4", days_ago=72, value="FX-ALL", status="entered-in-error")

    _assert_levels(result, ["L1", "L2", "L3"], 1.5)
    assert result.qc_flags == []
    assert result.measurement["qc_flags"] == []


def test_merging_patients_gives_the_results_the_targets_fractured_levels():
    source, target = _patient(treated=None), _patient()
    FractureFactory(patient=target, site="vertebral", vertebral_level="L4",
                    diagnosed_at=_at(75), diagnosed_on=_day(75))
    result = _scored(source)

    patient_merge(source=source, target=target)

    result.refresh_from_db()
    assert result.patient_id == target.pk
    _assert_levels(result, ["L4"], WITHOUT_L4)


def test_one_bulk_write_recomputes_many_patients_with_the_engines_median_to_the_bit():
    rng = random.Random(20261125)
    patients, results = [], []
    for n in range(12):  # odd n: the index treated L3 too (two levels kept: an even median)
        patient = _patient(treated=("L3",) if n % 2 else ("T12",))
        medians = {lv: round(rng.uniform(80, 400), 3) for lv in ("L1", "L2", "L3", "L4")}
        medians["csf"] = round(rng.uniform(60, 140), 3)
        patients.append(patient)
        results.append((_scored(patient, uid=f"2.25.73000000000000000{n:05d}", medians=medians),
                        medians))
    fracture_record_many(items=[
        {"patient": patient, "site": "vertebral", "vertebral_level": ("L1", "L2", "L4")[n % 3],
         "diagnosed_at": _at(72), "identifier": Identifier(CONDITION, f"FX-MANY-{n}")}
        for n, patient in enumerate(patients)])
    for n, (result, medians) in enumerate(results):
        levels = sorted({("L1", "L2", "L4")[n % 3], *(["L3"] if n % 2 else [])})
        result.refresh_from_db()
        assert result.fractured_levels == levels
        assert result.vbq_excluding_fractured == vbq_excluding(medians, medians["csf"], levels)


def test_the_refresh_command_applies_the_rule_to_results_stored_before_it():
    from django.core.management import call_command

    patient = _patient(treated=("L2",))
    FractureFactory(patient=patient, site="vertebral", vertebral_level="L4",
                    diagnosed_at=_at(5), diagnosed_on=_day(5))  # secondary
    result = _scored(patient, fractured=["L4"])  # as the old claim stored it

    call_command("vbq_refresh_fractured", batch=1)

    _assert_levels(result, ["L2"], vbq_excluding(MEDIANS, MEDIANS["csf"], ["L2"]))


def test_a_bundle_with_the_index_procedure_and_fractures_recomputes_once_with_both():
    """As a FHIR transaction bundle writes them (``sourced_record_many``: one statement for
    both kinds on PostgreSQL): the new index procedure makes the later L3 fracture secondary
    and its treated level L1 fractured; the earlier L4 fracture stays."""
    patient = _patient(treated=None)
    result = _scored(patient, fractured=[])

    sourced_record_many(groups={
        "procedure": [{"patient": patient, "code_system": codes.CPT, "code": "22511",
                       "performed_at": _at(70), "levels": ["L1"]}],
        "fracture": [{"patient": patient, "site": "vertebral", "vertebral_level": level,
                      "diagnosed_at": _at(days_ago),
                      "identifier": Identifier(CONDITION, f"FX-BUNDLE-{level}")}
                     for level, days_ago in (("L4", 75), ("L3", 20))]})

    _assert_levels(result, ["L1", "L4"], vbq_excluding(MEDIANS, MEDIANS["csf"], ["L1", "L4"]))
    assert AuditEvent.objects.filter(object_type="VbqResult", object_id=str(result.pk)).count() == 1


def test_the_migration_marks_the_existing_reviewer_choices():
    import importlib

    from django.apps import apps

    migration = importlib.import_module(
        "scoring.migrations.0002_vbqresult_fractured_levels_by_reviewer")
    patient = _patient()
    marked = _scored(patient, uid="2.25.7200000000000000000005")
    manual = _scored(patient, uid="2.25.7200000000000000000006")
    untouched = _scored(patient, uid="2.25.7200000000000000000007")
    VbqResult.objects.filter(pk=manual.pk).update(source="manual")
    AuditEvent.objects.create(action="update", object_type="VbqResult", object_id=str(marked.pk),
                              via="ui", detail={"review": "fractured-levels", "levels": []})
    VbqResult.objects.update(fractured_levels_by_reviewer=False)

    migration.mark_reviewer_choices(apps, None)

    assert set(VbqResult.objects.filter(fractured_levels_by_reviewer=True).values_list(
        "pk", flat=True)) == {marked.pk, manual.pk}
    assert not VbqResult.objects.get(pk=untouched.pk).fractured_levels_by_reviewer


def test_a_fracture_recorded_while_the_job_runs_is_applied_when_the_result_is_stored(
        tmp_path, monkeypatch):
    """The race: the claim read the levels (none), an index fracture arrives while the engine
    runs (its own recompute skips the result: no level rows yet), then the worker stores.
    The store reads the levels again and the value follows them."""
    import scoring.engine
    import scoring.tasks
    from scoring.engine.phantom import make_phantom
    from scoring.models import ImagingSeries
    from scoring.tasks import vbq_compute

    patient = _patient(treated=("T12",), days_since_procedure=70)
    result = _job(patient, "2.25.7200000000000000000099")
    make_phantom(4242, rows=256, cols=256, slices=11).write(tmp_path / "series")
    ImagingSeries.objects.filter(pk=result.series_id).update(local_path=str(tmp_path / "series"))
    real = scoring.engine.compute_vbq

    def engine_while_a_fracture_arrives(source, **kwargs):
        assert kwargs["fractured_levels"] == []  # what the claim read
        _vertebral(patient, "L4", days_ago=75, value="fx-during-job")  # before the index
        return real(source, **kwargs)

    monkeypatch.setattr(scoring.tasks, "compute_vbq", engine_while_a_fracture_arrives)
    vbq_compute(result.pk)

    result.refresh_from_db()
    medians = dict(result.levels.values_list("level", "median_si"))
    assert {"L1", "L2", "L3", "L4", "csf"} <= set(medians)
    assert result.fractured_levels == ["L4"]
    assert result.vbq_excluding_fractured == pytest.approx(
        vbq_excluding(medians, medians["csf"], ["L4"]), abs=1e-12)
    assert result.vbq_excluding_fractured != pytest.approx(result.vbq_all_levels)
    assert set(result.levels.filter(fractured=True).values_list("level", flat=True)) == {"L4"}


# Seed of the random comparison below (VBQ_RULES_SEED explores other cohorts); a disagreement
# is reported with the seed, the patient's rows and both answers. Seeds 1–30 agreed too
# (2026-11-25).
RULES_SEED = int(os.environ.get("VBQ_RULES_SEED", "20261125"))
LEVELS = ("T12", "L1", "L2", "L3", "L4", "L5")


def _random_patient(rng):
    """0–2 procedures (active or entered-in-error, some at the same moment: the id decides)
    and 0–4 fractures: vertebral T12–L5 (some without a level) or elsewhere, active or
    entered-in-error, most dated on, the day before or the day after a procedure."""
    patient = PatientFactory()
    days = []
    for _ in range(rng.randint(0, 2)):
        days_ago = days[0] if days and rng.random() < 0.3 else rng.randint(20, 120)
        days.append(days_ago)
        ProcedureFactory(patient=patient, performed_at=_at(days_ago),
                         levels=rng.sample(LEVELS, rng.randint(0, 2)),
                         record_status=rng.choice(["active", "active", "entered-in-error"]))
    for _ in range(rng.randint(0, 4)):
        days_ago = (rng.choice(days) + rng.choice([-1, 0, 0, 1]) if days and rng.random() < 0.8
                    else rng.randint(1, 150))
        site = rng.choice(["vertebral", "vertebral", "vertebral", "hip", "wrist"])
        level = rng.choice((*LEVELS, "")) if site == "vertebral" else ""
        FractureFactory(patient=patient, site=site, vertebral_level=level,
                        diagnosed_at=_at(days_ago), diagnosed_on=_day(days_ago),
                        record_status=rng.choice(["active", "active", "entered-in-error"]))
    return patient


def test_the_sql_rule_and_the_python_rule_agree_on_a_random_cohort():
    """40 random patients (seed ``RULES_SEED``): ``fractured_levels_sql`` and
    ``fractured_levels_of`` give the same levels for every one."""
    if connection.vendor != "postgresql":
        pytest.skip("the SQL rule is PostgreSQL's")
    from registry.models import Procedure

    rng = random.Random(RULES_SEED)
    patients = [_random_patient(rng) for _ in range(40)]
    ids = [str(p.pk) for p in patients]
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT pid::text, {fractured_levels_sql('pid')} "  # noqa: S608
                       "FROM unnest(%s::uuid[]) AS pid", [ids])
        from_sql = {pid: list(levels) for pid, levels in cursor.fetchall()}
    from_python = fractured_levels_of(ids)

    disagree = {pid: (from_sql[pid], from_python[pid]) for pid in ids
                if from_sql[pid] != from_python[pid]}
    detail = {pid: (list(Procedure.objects.filter(patient_id=pid).order_by("performed_at", "pk")
                         .values_list("performed_on", "performed_at", "levels",
                                      "record_status")),
                    list(Fracture.objects.filter(patient_id=pid).values_list(
                        "site", "vertebral_level", "diagnosed_on", "record_status")))
              for pid in disagree}
    assert not disagree, f"seed {RULES_SEED}: (sql, python) {disagree}; rows {detail}"
    # the cohort covers what the rule distinguishes
    assert sum(bool(levels) for levels in from_sql.values()) >= 10
    assert sum(not levels for levels in from_sql.values()) >= 5
    on_the_day = Fracture.objects.filter(
        patient_id__in=ids, site="vertebral", record_status="active",
        diagnosed_on__in=Procedure.objects.filter(patient_id__in=ids).values("performed_on"))
    assert on_the_day.exists()
