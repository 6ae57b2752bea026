"""Table-driven tests of the pure follow-up rules (registry/followup.py)."""

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from registry.followup import (
    HIGH_VBQ,
    SECONDARY_FRACTURE,
    VBQ_MISSING,
    Exposure,
    FollowupConfig,
    FractureFact,
    OpenAlert,
    PatientFacts,
    evaluate,
    on_therapy,
)

CFG = FollowupConfig(threshold=3.0, followup_days=60, vbq_missing_after_days=14,
                     escalate_after_days=7)
INDEX = dt.date(2025, 1, 8)  # day 60 = 2025-03-09, the US spring-forward DST day
ZOLEDRONIC = dict(agent="zoledronic_acid", route="iv", interval_days=365)


def day(n: int) -> dt.date:
    return INDEX + dt.timedelta(days=n)


def facts(**kw) -> PatientFacts:
    base = dict(index_date=INDEX, vbq_all_levels=3.4, vbq_excluding_fractured=3.4)
    base.update(kw)
    return PatientFacts(**base)


def actions(evaluation, rule=None):
    return [(d.rule_id, d.action, d.resolution_reason) for d in evaluation.decisions
            if rule is None or d.rule_id == rule]


@pytest.mark.parametrize(
    ("case", "patient", "today", "expected"),
    [
        ("day 59: not yet", facts(), day(59), []),
        ("day 60: open", facts(), day(60), [(HIGH_VBQ, "open", "")]),
        ("day 61: open", facts(), day(61), [(HIGH_VBQ, "open", "")]),
        ("VBQ exactly 3.0 is high", facts(vbq_all_levels=3.0, vbq_excluding_fractured=3.0),
         day(60), [(HIGH_VBQ, "open", "")]),
        ("VBQ 2.99 is normal", facts(vbq_all_levels=2.99, vbq_excluding_fractured=2.99),
         day(60), []),
        ("therapy ended before the procedure does not count",
         facts(exposures=[Exposure("alendronate", "oral", day(-400), day(-30), "completed")]),
         day(60), [(HIGH_VBQ, "open", "")]),
        ("zoledronic acid 11 months earlier still covers",
         facts(exposures=[Exposure(start_on=day(60) - dt.timedelta(days=335), **ZOLEDRONIC)]),
         day(60), []),
        ("zoledronic acid 13 months earlier has run out",
         facts(exposures=[Exposure(start_on=day(60) - dt.timedelta(days=396), **ZOLEDRONIC)]),
         day(60), [(HIGH_VBQ, "open", "")]),
        ("therapy started on day 61 auto-resolves the open alert",
         facts(exposures=[Exposure("alendronate", "oral", day(61))],
               open_alerts=[OpenAlert(HIGH_VBQ, "open", day(60))]),
         day(61), [(HIGH_VBQ, "resolve", "therapy-started")]),
        ("declined therapy does not count",
         facts(exposures=[Exposure("denosumab", "sc", day(10), status="declined",
                                   interval_days=183)]),
         day(60), [(HIGH_VBQ, "open", "")]),
        ("death: nothing opens", facts(deceased_on=day(50)), day(60), []),
        ("death resolves open alerts",
         facts(deceased_on=day(70), open_alerts=[OpenAlert(HIGH_VBQ, "acknowledged", day(60))]),
         day(70), [(HIGH_VBQ, "resolve", "deceased")]),
        ("missing VBQ: no high-VBQ alert but a work item",
         facts(vbq_all_levels=None, vbq_excluding_fractured=None), day(60),
         [(VBQ_MISSING, "open", "")]),
        ("missing VBQ before the work-item delay: nothing",
         facts(vbq_all_levels=None, vbq_excluding_fractured=None), day(13), []),
        ("a withdrawn VBQ resolves the open high-VBQ alert and asks for a VBQ",
         facts(vbq_all_levels=None, vbq_excluding_fractured=None,
               open_alerts=[OpenAlert(HIGH_VBQ, "acknowledged", day(60))]), day(70),
         [(HIGH_VBQ, "resolve", "not-appropriate"), (VBQ_MISSING, "open", "")]),
        ("a withdrawn VBQ with a secondary fracture: the fracture alert opens instead",
         facts(vbq_all_levels=None, vbq_excluding_fractured=None,
               fractures=[FractureFact(day(65), "hip")],
               open_alerts=[OpenAlert(HIGH_VBQ, "open", day(60))]), day(70),
         [(HIGH_VBQ, "resolve", "not-appropriate"), (SECONDARY_FRACTURE, "open", ""),
          (VBQ_MISSING, "open", "")]),
        ("VBQ arriving resolves the work item",
         facts(open_alerts=[OpenAlert(VBQ_MISSING, "open", day(14))]), day(20),
         [(VBQ_MISSING, "resolve", "vbq-obtained")]),
        ("fractured-level exclusion drops VBQ below the threshold",
         facts(vbq_all_levels=3.1, vbq_excluding_fractured=2.9), day(60), []),
        ("fractured-level exclusion lifts VBQ above the threshold",
         facts(vbq_all_levels=2.95, vbq_excluding_fractured=3.05), day(60),
         [(HIGH_VBQ, "open", "")]),
        ("secondary fracture while untreated, normal VBQ: its own alert",
         facts(vbq_all_levels=2.5, vbq_excluding_fractured=2.5,
               fractures=[FractureFact(day(30), "hip")]), day(31),
         [(SECONDARY_FRACTURE, "open", "")]),
        ("secondary fracture escalates the open high-VBQ alert",
         facts(fractures=[FractureFact(day(90), "wrist")],
               open_alerts=[OpenAlert(HIGH_VBQ, "acknowledged", day(60))]), day(91),
         [(HIGH_VBQ, "escalate", "")]),
        ("the index fracture at a treated level is not secondary",
         facts(vbq_all_levels=2.5, vbq_excluding_fractured=2.5, index_levels=frozenset({"L1"}),
               fractures=[FractureFact(day(20), "vertebral", "L1")]), day(30), []),
        ("secondary fracture while on therapy: nothing",
         facts(vbq_all_levels=2.5, vbq_excluding_fractured=2.5,
               exposures=[Exposure("alendronate", "oral", day(5))],
               fractures=[FractureFact(day(30), "hip")]), day(31), []),
        ("unacknowledged for 7 days escalates once",
         facts(open_alerts=[OpenAlert(HIGH_VBQ, "open", day(60))]), day(67),
         [(HIGH_VBQ, "escalate", "")]),
        ("already escalated: no second escalation",
         facts(open_alerts=[OpenAlert(HIGH_VBQ, "open", day(60), escalation_level=1)]),
         day(80), []),
    ],
)
def test_rule_decisions(case, patient, today, expected):
    assert actions(evaluate(patient, today, CFG)) == expected, case


def test_all_levels_setting_uses_the_value_with_fractured_levels():
    cfg = FollowupConfig(vbq_value="all_levels")
    patient = facts(vbq_all_levels=3.1, vbq_excluding_fractured=2.9)
    assert actions(evaluate(patient, day(60), cfg)) == [(HIGH_VBQ, "open", "")]


def test_day_counts_use_the_clinic_date_across_the_dst_change():
    """A procedure at 23:30 New York time on 8 Jan is 04:30 UTC on 9 Jan: day 60 is 9 March
    (the spring-forward day) in clinic time, not 10 March."""
    from registry.timeutil import clinic_date  # noqa: F401 - documents where dates come from

    ny = ZoneInfo("America/New_York")
    performed = dt.datetime(2025, 1, 8, 23, 30, tzinfo=ny)
    index_date = performed.astimezone(ny).date()
    assert performed.astimezone(dt.UTC).date() == dt.date(2025, 1, 9)
    sweep_moment = dt.datetime(2025, 3, 9, 3, 30, tzinfo=ny)  # after the 02:00 jump
    today = sweep_moment.astimezone(ny).date()
    evaluation = evaluate(facts(index_date=index_date), today, CFG)
    assert actions(evaluation) == [(HIGH_VBQ, "open", "")]
    before = evaluate(facts(index_date=index_date), today - dt.timedelta(days=1), CFG)
    assert actions(before) == []


def test_next_check_is_the_follow_up_day_for_a_high_vbq_patient():
    assert evaluate(facts(), day(10), CFG).next_check_on == day(60)


def test_next_check_is_when_long_acting_cover_runs_out():
    patient = facts(exposures=[Exposure(start_on=day(-30), **ZOLEDRONIC)])
    assert evaluate(patient, day(60), CFG).next_check_on == day(-30) + dt.timedelta(days=365)


@pytest.mark.parametrize(
    ("case", "patient", "today"),
    [
        ("high-VBQ alert opened on day 60", facts(), day(60)),
        ("vbq-missing work item opened on day 14",
         facts(vbq_all_levels=None, vbq_excluding_fractured=None), day(14)),
        ("secondary-fracture alert opened",
         facts(vbq_all_levels=2.5, vbq_excluding_fractured=2.5,
               fractures=[FractureFact(day(30), "hip")]), day(31)),
    ],
)
def test_an_alert_opened_today_is_checked_again_on_its_escalation_day(case, patient, today):
    evaluation = evaluate(patient, today, CFG)
    assert [d.action for d in evaluation.decisions] == ["open"], case
    assert evaluation.next_check_on == today + dt.timedelta(days=7), case


def test_nothing_left_to_check_for_a_normal_vbq_patient():
    patient = facts(vbq_all_levels=2.2, vbq_excluding_fractured=2.2)
    assert evaluate(patient, day(60), CFG).next_check_on is None


@pytest.mark.parametrize(
    ("exposure", "on_day", "covered"),
    [
        (Exposure("denosumab", "sc", day(0), interval_days=183), day(182), True),
        (Exposure("denosumab", "sc", day(0), interval_days=183), day(183), False),
        (Exposure("ibandronate", "iv", day(0), interval_days=91), day(90), True),
        (Exposure("ibandronate", "iv", day(0), interval_days=91), day(91), False),
        (Exposure("alendronate", "oral", day(0)), day(700), True),
        (Exposure("alendronate", "oral", day(0), status="completed"), day(100), False),
        (Exposure("alendronate", "oral", day(0), day(30), "stopped"), day(31), False),
        (Exposure("alendronate", "oral", day(5)), day(4), False),
    ],
)
def test_on_therapy_counts_dosing_intervals(exposure, on_day, covered):
    assert on_therapy([exposure], on_day, CFG) is covered


def test_procedures_older_than_the_lookback_open_nothing():
    cfg = FollowupConfig(lookback_days=730)
    assert actions(evaluate(facts(), day(731), cfg)) == []
    assert evaluate(facts(), day(731), cfg).next_check_on is None


def test_an_unresolved_alert_is_still_followed_after_the_lookback():
    cfg = FollowupConfig(lookback_days=730)
    patient = facts(exposures=[Exposure("alendronate", "oral", day(800))],
                    open_alerts=[OpenAlert(HIGH_VBQ, "acknowledged", day(60))])
    assert actions(evaluate(patient, day(801), cfg)) == [(HIGH_VBQ, "resolve",
                                                          "therapy-started")]
