"""``manage.py vbq_refresh_fractured``: ``--dry-run`` reports what the rule would change and
writes nothing; a real run re-evaluates follow-up once per batch. SYNTHETIC patients and
medians (tests/scoring/test_fractured_levels): each result was stored under the old rule with a
secondary L4 fracture excluded (3.05, high); the rule keeps the treated L2 instead (2.85).
Those results count for the follow-up (automatic, clear, confident): across a 3.0 threshold
the recompute holds them for a reviewer instead (``scoring.fractured.PENDING``)."""

import datetime as dt
from io import StringIO

import pytest
from django.core.management import call_command

import registry.side_effects
from registry.models import AuditEvent, Patient
from registry.timeutil import clinic_today
from scoring.fractured import vbq_excluding
from tests.factories import FractureFactory
from tests.scoring.test_fractured_levels import (
    MEDIANS,
    WITHOUT_L4,
    _assert_levels,
    _at,
    _day,
    _patient,
    _scored,
)

pytestmark = pytest.mark.django_db
WITH_L2 = vbq_excluding(MEDIANS, MEDIANS["csf"], ["L2"])  # 2.85


def _stored_under_the_old_rule(n):
    results = []
    for k in range(n):
        patient = _patient(treated=("L2",))
        FractureFactory(patient=patient, site="vertebral", vertebral_level="L4",
                        diagnosed_at=_at(5), diagnosed_on=_day(5))  # secondary
        results.append(_scored(patient, uid=f"2.25.75000000000000000{k:05d}",
                               fractured=["L4"]))
    Patient.objects.update(followup_next_check_on=clinic_today() + dt.timedelta(days=30))
    return results


def _run(**options):
    out = StringIO()
    call_command("vbq_refresh_fractured", stdout=out, **options)
    return out.getvalue()


def test_a_dry_run_reports_the_changes_and_threshold_crossings_and_writes_nothing(
        settings, django_capture_on_commit_callbacks):
    settings.VBQ_HIGH_THRESHOLD = 3.0
    results = _stored_under_the_old_rule(3)
    audits = AuditEvent.objects.count()

    with django_capture_on_commit_callbacks() as callbacks:
        output = _run(batch=2, dry_run=True)

    assert ("0 result(s) of 3 patient(s) would be recomputed; 0 would cross the VBQ threshold "
            "3; 3 counting result(s) would cross it and be held for a reviewer") in output
    assert "nothing written" in output
    for result in results:
        _assert_levels(result, ["L4"], WITHOUT_L4)
    assert AuditEvent.objects.count() == audits
    assert not Patient.objects.filter(followup_next_check_on=clinic_today()).exists()
    assert callbacks == []  # no follow-up message


def test_a_dry_run_counts_no_crossing_when_the_threshold_is_not_between(settings):
    settings.VBQ_HIGH_THRESHOLD = 2.5  # 3.05 and 2.85 are both high
    _stored_under_the_old_rule(2)

    assert "2 result(s) of 2 patient(s) would be recomputed; 0 would cross" in _run(dry_run=True)


def test_a_run_re_evaluates_follow_up_once_per_batch(settings, monkeypatch):
    settings.VBQ_HIGH_THRESHOLD = 2.5  # no crossing: applied
    results = _stored_under_the_old_rule(3)
    queued = []
    monkeypatch.setattr(registry.side_effects, "_queue_followup",
                        lambda ids: queued.append(sorted(str(i) for i in ids)))

    output = _run(batch=2)

    assert "3 result(s) of 3 patient(s) recomputed; 0 crossed" in output
    for result in results:
        _assert_levels(result, ["L2"], WITH_L2)
    assert [len(ids) for ids in queued] == [2, 1]  # one message per batch of patients
    assert Patient.objects.filter(followup_next_check_on=clinic_today()).count() == 3


def test_a_dry_run_counts_crossings_on_the_value_the_alert_rule_reads(settings):
    """With VBQ_ALERT_VALUE=all_levels the recompute cannot move the rule's value: no
    crossing, though the excluding value crosses the threshold (review finding)."""
    _stored_under_the_old_rule(2)
    settings.VBQ_HIGH_THRESHOLD = 3.0  # 3.05 -> 2.85 crosses it; all levels (2.95) does not
    settings.VBQ_ALERT_VALUE = "all_levels"
    assert "2 result(s) of 2 patient(s) would be recomputed; 0 would cross" in _run(dry_run=True)
    settings.VBQ_ALERT_VALUE = "excluding_fractured"
    assert ("0 result(s) of 2 patient(s) would be recomputed; 0 would cross the VBQ threshold "
            "3; 2 counting result(s) would cross it and be held") in _run(dry_run=True)


def test_a_run_holds_the_counting_results_that_would_cross_for_a_reviewer(settings):
    settings.VBQ_HIGH_THRESHOLD = 3.0
    results = _stored_under_the_old_rule(2)

    output = _run()

    assert "0 result(s) of 2 patient(s) recomputed; 0 crossed" in output
    assert "2 counting result(s) held for a reviewer" in output
    for result in results:
        _assert_levels(result, ["L4"], WITHOUT_L4)  # unchanged until a reviewer decides
        assert [f["levels"] for f in result.qc_flags
                if f["code"] == "fractured-levels-pending"] == [["L2"]]
    assert "0 result(s) of 2 patient(s) recomputed" in _run()  # nothing new the second time
