"""Follow-up rules. PURE: no Django, no ORM — plain dataclasses in, decisions out.

Given what the registry knows about one patient (index procedure, current VBQ, therapy
exposures, fractures, death, unresolved alerts) and a clinic-local date, ``evaluate`` decides for
each rule: nothing, open an alert, escalate one, or resolve one — always with a reason. It also
returns ``next_check_on``: the next date on which the decision could change *without a new
event*, so the daily sweep only visits patients that are due (events re-evaluate at once).

Rules (stable ids; bump the version when the logic changes):
- ``high-vbq-untreated-60d`` v1: VBQ ≥ threshold, day ≥ ``followup_days`` after the index
  procedure, not on therapy, alive → open. Therapy arriving later → resolve "therapy-started".
  VBQ revised below the threshold → resolve "not-appropriate".
  v2 (2026-11-25): the VBQ the alert rested on no longer counts (its study was corrected to
  another patient or entered in error, or the result was rejected in review) → resolve
  "not-appropriate" too: the alert's premise is gone, and ``vbq-missing`` asks for a VBQ.
- ``secondary-fracture`` v1: a secondary fracture (after the index date, not the index fracture)
  while untreated → escalate the open high-VBQ alert, or open its own alert if none is open,
  whatever the VBQ.
- ``vbq-missing`` v1: no usable VBQ ``vbq_missing_after_days`` after the procedure → a work item
  to obtain the MRI or enter a manual score; resolved "vbq-obtained" once a VBQ exists.
- Any unresolved alert not acknowledged ``escalate_after_days`` after opening → escalate once.
- Death → every unresolved alert resolves "deceased"; nothing new opens.

On therapy at a date: an exposure (order, dispense, administration or statement) that is not
declined, cancelled or entered in error, started on or before the date, and either has an end
date on or after it, or — without an end date — is a long-acting agent within its dosing
interval (zoledronic acid 365 d, denosumab 183 d, ibandronate IV 91 d), or a continuous agent
whose record is still active. A completed/stopped continuous-agent record without an end date
covers ``default_supply_days`` (90, a usual fill).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

HIGH_VBQ = "high-vbq-untreated-60d"
SECONDARY_FRACTURE = "secondary-fracture"
VBQ_MISSING = "vbq-missing"
RULE_VERSIONS = {HIGH_VBQ: 2, SECONDARY_FRACTURE: 1, VBQ_MISSING: 1}

# Coded resolution reasons, chosen by staff; the rules also resolve with "therapy-started",
# "deceased", "not-appropriate" and "vbq-obtained" (the last one only automatic).
RESOLUTION_REASONS = {
    "therapy-started": "Therapy started",
    "therapy-declined": "Therapy declined by the patient",
    "contraindicated": "Therapy contraindicated",
    "treated-elsewhere": "Treated elsewhere",
    "deceased": "Patient deceased",
    "transferred": "Care transferred",
    "not-appropriate": "Alert not appropriate",
    "vbq-obtained": "VBQ score now available",
}
NOT_COUNTING = {"declined", "cancelled", "entered-in-error"}

OPEN = "open"
ESCALATE = "escalate"
RESOLVE = "resolve"


@dataclass(frozen=True)
class Exposure:
    agent: str
    route: str
    start_on: dt.date
    end_on: dt.date | None = None
    status: str = "active"
    interval_days: int = 0  # one dose's coverage when there is no end date; 0 = continuous


@dataclass(frozen=True)
class FractureFact:
    diagnosed_on: dt.date
    site: str
    level: str = ""


@dataclass(frozen=True)
class OpenAlert:
    """An unresolved alert (open, acknowledged or snoozed)."""

    rule_id: str
    status: str
    opened_on: dt.date
    escalation_level: int = 0
    escalated_for_fracture: bool = False
    snoozed_until: dt.date | None = None


@dataclass(frozen=True)
class PatientFacts:
    index_date: dt.date | None
    index_levels: frozenset[str] = frozenset()
    vbq_all_levels: float | None = None
    vbq_excluding_fractured: float | None = None
    vbq_field_strength_t: float | None = None  # of the result the rules use (acquisition)
    exposures: Sequence[Exposure] = ()
    fractures: Sequence[FractureFact] = ()
    deceased_on: dt.date | None = None
    open_alerts: Sequence[OpenAlert] = ()
    care_team: str = ""


@dataclass(frozen=True)
class FollowupConfig:
    threshold: float = 3.0  # the default: unknown field strength, or no per-field value
    threshold_1_5t: float | None = None
    threshold_3t: float | None = None
    followup_days: int = 60
    vbq_value: str = "excluding_fractured"
    vbq_missing_after_days: int = 14
    escalate_after_days: int = 7
    default_supply_days: int = 90
    # Rules open nothing for index procedures older than this (a registry back-loaded with
    # years of history must not flood the worklist); unresolved alerts still follow the rules.
    lookback_days: int = 730


@dataclass(frozen=True)
class Decision:
    rule_id: str
    action: str  # open | escalate | resolve
    reason: str
    resolution_reason: str = ""
    vbq_value: float | None = None
    due_on: dt.date | None = None
    for_fracture: bool = False
    threshold: float | None = None  # the high-VBQ cut-off applied (stored on the alert)
    threshold_field: str = ""  # whose cut-off: "1.5 T", "3 T", "" (default, field unknown)

    @property
    def rule_version(self) -> int:
        return RULE_VERSIONS[self.rule_id]


@dataclass(frozen=True)
class Evaluation:
    decisions: list[Decision] = field(default_factory=list)
    next_check_on: dt.date | None = None


@dataclass(frozen=True)
class Threshold:
    """The high-VBQ cut-off that applies to a result, and in words why."""

    value: float
    field: str  # "1.5 T" | "3 T" | "" (unknown field strength: the default)

    @property
    def basis(self) -> str:
        return (f"{self.field} threshold" if self.field
                else "default threshold, field strength unknown")

    @property
    def label(self) -> str:
        return f"≥ {self.value:g} ({self.basis})"


def threshold_for(field_strength_t: float | None, config: FollowupConfig) -> Threshold:
    """The cut-off for a result acquired at ``field_strength_t`` tesla: 1.0–2.0 T uses
    ``threshold_1_5t``, 2.5–3.5 T ``threshold_3t`` (each falling back to ``threshold`` when
    unset); anything else, or unknown, uses ``threshold`` and says so (``field`` empty)."""
    if field_strength_t is not None and 1.0 <= field_strength_t <= 2.0:
        return Threshold(config.threshold if config.threshold_1_5t is None
                         else config.threshold_1_5t, "1.5 T")
    if field_strength_t is not None and 2.5 <= field_strength_t <= 3.5:
        return Threshold(config.threshold if config.threshold_3t is None
                         else config.threshold_3t, "3 T")
    return Threshold(config.threshold, "")


def chosen_vbq(facts: PatientFacts, config: FollowupConfig) -> float | None:
    """The VBQ value the rule uses (``config.vbq_value``), falling back to all levels when the
    excluding-fractured value is missing (no fractured level among L1–L4)."""
    if config.vbq_value == "all_levels":
        return facts.vbq_all_levels
    if facts.vbq_excluding_fractured is not None:
        return facts.vbq_excluding_fractured
    return facts.vbq_all_levels


def coverage_end(exposure: Exposure, config: FollowupConfig) -> dt.date | None:
    """Last day the exposure keeps the patient on therapy; ``None`` = open-ended."""
    if exposure.status in NOT_COUNTING:
        return exposure.start_on - dt.timedelta(days=1)
    if exposure.end_on is not None:
        return max(exposure.end_on, exposure.start_on + dt.timedelta(
            days=max(exposure.interval_days - 1, 0)))
    if exposure.interval_days > 0:
        return exposure.start_on + dt.timedelta(days=exposure.interval_days - 1)
    if exposure.status in {"active", "unknown"}:
        return None
    return exposure.start_on + dt.timedelta(days=config.default_supply_days - 1)


def on_therapy(exposures: Iterable[Exposure], day: dt.date, config: FollowupConfig) -> bool:
    for e in exposures:
        if e.status in NOT_COUNTING or e.start_on > day:
            continue
        end = coverage_end(e, config)
        if end is None or end >= day:
            return True
    return False


def secondary_fractures(facts: PatientFacts, day: dt.date) -> list[FractureFact]:
    if facts.index_date is None:
        return []
    return [
        f for f in facts.fractures
        if facts.index_date < f.diagnosed_on <= day
        and not (f.site == "vertebral" and f.level and f.level in facts.index_levels)
    ]


def evaluate(facts: PatientFacts, today: dt.date, config: FollowupConfig) -> Evaluation:
    """Decide what to do for one patient on ``today`` (a clinic-local date)."""
    decisions: list[Decision] = []
    unresolved = {a.rule_id: a for a in facts.open_alerts}
    candidates: list[dt.date] = []

    if facts.deceased_on is not None and facts.deceased_on <= today:
        for alert in unresolved.values():
            decisions.append(Decision(alert.rule_id, RESOLVE, "patient deceased", "deceased"))
        return Evaluation(decisions, None)
    if facts.index_date is None:
        return Evaluation(decisions, None)

    day_number = (today - facts.index_date).days
    if day_number > config.lookback_days and not unresolved:
        return Evaluation(decisions, None)
    treated = on_therapy(facts.exposures, today, config)
    vbq = chosen_vbq(facts, config)
    cut = threshold_for(facts.vbq_field_strength_t, config)
    due_date = facts.index_date + dt.timedelta(days=config.followup_days)

    # high-vbq-untreated-60d
    high_alert = unresolved.get(HIGH_VBQ)
    if high_alert is not None:
        if treated:
            decisions.append(Decision(HIGH_VBQ, RESOLVE, "anti-osteoporosis therapy recorded",
                                      "therapy-started"))
            high_alert = None
        elif vbq is not None and vbq < cut.value:
            decisions.append(Decision(HIGH_VBQ, RESOLVE, f"VBQ revised to {vbq:.2f} "
                                      f"(below {cut.value:g}: {cut.basis})", "not-appropriate",
                                      threshold=cut.value, threshold_field=cut.field))
            high_alert = None
        elif vbq is None:
            decisions.append(Decision(
                HIGH_VBQ, RESOLVE, "the VBQ this alert rested on no longer counts (study "
                "corrected or entered in error, or result rejected in review)",
                "not-appropriate"))
            high_alert = None
    elif vbq is not None and vbq >= cut.value and not treated:
        if day_number >= config.followup_days:
            decisions.append(Decision(
                HIGH_VBQ, OPEN,
                f"VBQ {vbq:.2f} {cut.label}, no anti-osteoporosis therapy on day "
                f"{day_number} after the procedure",
                vbq_value=vbq, due_on=today, threshold=cut.value, threshold_field=cut.field,
            ))
            high_alert = OpenAlert(HIGH_VBQ, "open", today)
        else:
            candidates.append(due_date)
    elif vbq is not None and vbq >= cut.value and treated:
        # Re-check when the current coverage ends.
        ends = [coverage_end(e, config) for e in facts.exposures
                if e.status not in NOT_COUNTING and e.start_on <= today]
        if ends and all(end is not None for end in ends):
            candidates.append(max(max(e for e in ends if e is not None) + dt.timedelta(days=1),
                                  due_date))

    # secondary-fracture
    fractures = secondary_fractures(facts, today)
    fracture_alert = unresolved.get(SECONDARY_FRACTURE)
    if fracture_alert is not None and treated:
        decisions.append(Decision(SECONDARY_FRACTURE, RESOLVE,
                                  "anti-osteoporosis therapy recorded", "therapy-started"))
    elif fractures and not treated:
        latest = max(f.diagnosed_on for f in fractures)
        if high_alert is not None and high_alert.status != "resolved":
            if not high_alert.escalated_for_fracture:
                decisions.append(Decision(
                    HIGH_VBQ, ESCALATE, f"secondary fracture on {latest.isoformat()} while "
                    "untreated", for_fracture=True))
        elif fracture_alert is None:
            decisions.append(Decision(
                SECONDARY_FRACTURE, OPEN,
                f"secondary fracture on {latest.isoformat()} without anti-osteoporosis therapy",
                vbq_value=vbq, due_on=today, for_fracture=True, threshold=cut.value,
                threshold_field=cut.field,
            ))

    # vbq-missing
    missing_alert = unresolved.get(VBQ_MISSING)
    if vbq is not None and missing_alert is not None:
        decisions.append(Decision(VBQ_MISSING, RESOLVE, "VBQ now available", "vbq-obtained"))
    elif vbq is None and missing_alert is None:
        missing_due = facts.index_date + dt.timedelta(days=config.vbq_missing_after_days)
        if today >= missing_due:
            decisions.append(Decision(
                VBQ_MISSING, OPEN, "no scorable pre-procedure MRI: obtain one or enter a manual "
                "VBQ", due_on=today))
        else:
            candidates.append(missing_due)

    # An alert opened now escalates if still unacknowledged after ``escalate_after_days``: the
    # sweep must come back then (without this the patient would never be due again).
    if any(d.action == OPEN for d in decisions):
        candidates.append(today + dt.timedelta(days=config.escalate_after_days))

    # Unacknowledged escalation (once), for alerts not resolved by a decision above.
    resolved_now = {d.rule_id for d in decisions if d.action == RESOLVE}
    escalating = {d.rule_id for d in decisions if d.action == ESCALATE}
    for alert in facts.open_alerts:
        if alert.rule_id in resolved_now or alert.rule_id in escalating:
            continue
        if alert.status == "open" and alert.escalation_level == 0:
            escalate_on = alert.opened_on + dt.timedelta(days=config.escalate_after_days)
            if today >= escalate_on:
                decisions.append(Decision(alert.rule_id, ESCALATE,
                                          f"not acknowledged within {config.escalate_after_days}"
                                          " days"))
            else:
                candidates.append(escalate_on)
        if alert.status == "snoozed" and alert.snoozed_until is not None:
            candidates.append(max(alert.snoozed_until, today + dt.timedelta(days=1)))

    future = [c for c in candidates if c > today]
    return Evaluation(decisions, min(future) if future else None)


def evaluate_many(
    facts_by_patient: dict[str, PatientFacts],
    today: dt.date,
    config: FollowupConfig,
    on_error: Callable[[str, Exception], None] | None = None,
) -> dict[str, Evaluation]:
    """``evaluate`` for a batch; a patient whose facts break a rule is reported, not fatal."""
    out: dict[str, Evaluation] = {}
    for key, facts in facts_by_patient.items():
        try:
            out[key] = evaluate(facts, today, config)
        except (ValueError, TypeError) as exc:
            if on_error is None:
                raise
            on_error(key, exc)
    return out
