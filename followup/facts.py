"""The facts the follow-up rules need, read from the registry: for a few patients (an event)
or for a claimed batch of due ones (the sweep), in a fixed number of queries."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import F, Q

from registry import codes
from registry.followup import (
    Exposure,
    FollowupConfig,
    FractureFact,
    OpenAlert,
    PatientFacts,
)
from registry.models import (
    OPEN_ALERT_STATUSES,
    Alert,
    Fracture,
    Patient,
    Procedure,
    RecordStatus,
    TherapyExposure,
)
from scoring.models import ImagingSeries, ImagingStudy, VbqResult
from scoring.trust import trusted_q, trusted_sql


def config_from_settings() -> FollowupConfig:
    return FollowupConfig(
        threshold=settings.VBQ_HIGH_THRESHOLD,
        threshold_1_5t=settings.VBQ_HIGH_THRESHOLD_1_5T,
        threshold_3t=settings.VBQ_HIGH_THRESHOLD_3T,
        followup_days=settings.FOLLOWUP_DAYS,
        vbq_value=settings.VBQ_ALERT_VALUE,
        vbq_missing_after_days=settings.VBQ_MISSING_AFTER_DAYS,
        escalate_after_days=settings.ALERT_ESCALATE_AFTER_DAYS,
        lookback_days=settings.FOLLOWUP_LOOKBACK_DAYS,
    )


# A VBQ result counts only if its study is active and is its own patient's (``_facts_sql``
# says the same in SQL): a study entered in error, or moved to another patient whose results
# did not follow it (``scoring.services_bulk`` moves them; this is the second line), must not
# raise or suppress an alert on images that are not this patient's. A result with no series
# (an imported value, e.g. the demo cohort's) has no study to check and counts.
COUNTED_STUDY = Q(series__isnull=True) | Q(series__study__record_status=RecordStatus.ACTIVE,
                                            series__study__patient_id=F("patient_id"))


def load_facts(patient_ids: Iterable[Any]) -> dict[Any, PatientFacts]:
    """Facts for many patients in a fixed number of queries (no per-patient queries)."""

    ids = list(patient_ids)
    people = {pid: (deceased_on, team) for pid, deceased_on, team in Patient.objects.filter(
        pk__in=ids).values_list("id", "deceased_on", "care_team")}
    index: dict[Any, tuple[dt.date, frozenset[str]]] = {}
    for pid, day, levels in (
        Procedure.objects.filter(patient_id__in=ids, record_status=RecordStatus.ACTIVE)
        .order_by("patient_id", "performed_at", "pk")
        .values_list("patient_id", "performed_on", "levels")
    ):
        index.setdefault(pid, (day, frozenset(levels or [])))
    vbq: dict[Any, tuple[float | None, float | None, float | None]] = {}
    for pid, all_levels, excluding, field in (
        VbqResult.objects.filter(patient_id__in=ids)
        .filter(trusted_q())  # scoring.trust: only a result that may move an alert
        .filter(COUNTED_STUDY)
        .order_by("patient_id", "queued_at", "pk")
        .values_list("patient_id", "vbq_all_levels", "vbq_excluding_fractured",
                     "field_strength_t")
    ):
        vbq[pid] = (all_levels, excluding, field)
    exposures: dict[Any, list[Exposure]] = defaultdict(list)
    for pid, agent, route, start, end, status in TherapyExposure.objects.filter(
        patient_id__in=ids, record_status=RecordStatus.ACTIVE
    ).values_list("patient_id", "agent", "route", "start_on", "end_on", "status"):
        interval = codes.dose_interval_days(agent, route) if agent in codes.AGENTS else 0
        exposures[pid].append(Exposure(agent, route, start, end, status, interval))
    fractures: dict[Any, list[FractureFact]] = defaultdict(list)
    for pid, day, site, level in Fracture.objects.filter(
        patient_id__in=ids, record_status=RecordStatus.ACTIVE
    ).values_list("patient_id", "diagnosed_on", "site", "vertebral_level"):
        fractures[pid].append(FractureFact(day, site, level))
    alerts: dict[Any, list[OpenAlert]] = defaultdict(list)
    for pid, rule, status, opened, level, for_fx, snoozed in Alert.objects.filter(
        patient_id__in=ids, status__in=OPEN_ALERT_STATUSES
    ).values_list("patient_id", "rule_id", "status", "due_on", "escalation_level",
                  "escalated_for_fracture", "snoozed_until"):
        alerts[pid].append(OpenAlert(rule, status, opened, level, for_fx, snoozed))
    out = {}
    for pid in ids:
        idx = index.get(pid)
        all_levels, excluding, field = vbq.get(pid, (None, None, None))
        out[pid] = PatientFacts(
            index_date=idx[0] if idx else None,
            index_levels=idx[1] if idx else frozenset(),
            vbq_all_levels=all_levels,
            vbq_excluding_fractured=excluding,
            vbq_field_strength_t=field,
            exposures=tuple(exposures.get(pid, ())),
            fractures=tuple(fractures.get(pid, ())),
            deceased_on=people.get(pid, (None, ""))[0],
            care_team=people.get(pid, (None, ""))[1],
            open_alerts=tuple(alerts.get(pid, ())),
        )
    return out



def claim_due(today: dt.date, limit: int) -> dict[Any, PatientFacts]:
    """Lock up to ``limit`` due patients (skipping ones a concurrent sweep holds) and return
    their facts. Must run inside a transaction; the locks last until it ends."""
    if connection.vendor == "postgresql":
        sql, params = due_facts_sql(today, limit)
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return {row[0]: facts_from_row(row) for row in cursor.fetchall()}
    ids = list(
        Patient.objects.select_for_update(skip_locked=True)
        .filter(followup_next_check_on__lte=today)
        .order_by("followup_next_check_on")
        .values_list("id", flat=True)[:limit]
    )
    return load_facts(ids) if ids else {}


def due_facts_sql(today: dt.date, limit: int) -> tuple[str, dict[str, Any]]:
    """The sweep's single read per batch (PostgreSQL): claim due patients through
    ``patient_followup_due_idx`` and gather each one's facts with per-patient index lookups
    (procedure, VBQ, therapy, fractures, unresolved alerts). Exposed so the bench can EXPLAIN
    exactly what the sweep runs."""
    sql, params = _facts_sql("""WHERE p.followup_next_check_on <= %(today)s
    ORDER BY p.followup_next_check_on
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED""")
    return sql, {**params, "today": today, "limit": limit}


def patient_facts_sql(patient_id: uuid.UUID) -> tuple[str, dict[str, Any]]:
    """The event path's read (PostgreSQL): lock ONE patient (waiting for a concurrent writer)
    and gather the same facts as the sweep, in one statement."""
    sql, params = _facts_sql("WHERE p.id = %(patient)s FOR UPDATE")
    return sql, {**params, "patient": patient_id}


def _facts_sql(selection: str) -> tuple[str, dict[str, Any]]:
    """The facts statement. The VBQ lookup reads the patient's results by ``patient_id`` (its
    index) and each candidate's series and study by primary key (``COUNTED_STUDY``)."""

    trusted, trusted_params = trusted_sql("r")  # scoring.trust: the results that count
    sql = f"""
WITH due AS MATERIALIZED (
    SELECT p.id, p.deceased_on, p.care_team, p.followup_next_check_on
    FROM {Patient._meta.db_table} p
    {selection}
)
SELECT d.id, d.deceased_on, d.care_team, ix.performed_on, ix.levels::text,
    v.vbq_all_levels, v.vbq_excluding_fractured, v.field_strength_t,
    (SELECT json_agg(json_build_array(t.agent, t.route, t.start_on, t.end_on, t.status))::text
     FROM {TherapyExposure._meta.db_table} t
     WHERE t.patient_id = d.id AND t.record_status = %(active)s),
    (SELECT json_agg(json_build_array(f.diagnosed_on, f.site, f.vertebral_level))::text
     FROM {Fracture._meta.db_table} f
     WHERE f.patient_id = d.id AND f.record_status = %(active)s),
    (SELECT json_agg(json_build_array(a.rule_id, a.status, a.due_on, a.escalation_level,
                                      a.escalated_for_fracture, a.snoozed_until))::text
     FROM {Alert._meta.db_table} a
     WHERE a.patient_id = d.id AND a.status = ANY(%(unresolved)s)),
    d.followup_next_check_on
FROM due d
LEFT JOIN LATERAL (
    SELECT pr.performed_on, pr.levels FROM {Procedure._meta.db_table} pr
    WHERE pr.patient_id = d.id AND pr.record_status = %(active)s
    ORDER BY pr.performed_at, pr.id LIMIT 1
) ix ON true
LEFT JOIN LATERAL (
    SELECT r.vbq_all_levels, r.vbq_excluding_fractured, r.field_strength_t
    FROM {VbqResult._meta.db_table} r
    LEFT JOIN {ImagingSeries._meta.db_table} se ON se.id = r.series_id
    LEFT JOIN {ImagingStudy._meta.db_table} st ON st.id = se.study_id
    WHERE r.patient_id = d.id AND {trusted}
      AND (r.series_id IS NULL
           OR (st.record_status = %(active)s AND st.patient_id = r.patient_id))
    ORDER BY r.queued_at DESC, r.id DESC LIMIT 1
) v ON true
"""  # noqa: S608 - table names come from model metadata; every value is a bound parameter
    return sql, {
        "active": RecordStatus.ACTIVE.value,
        "unresolved": [str(s) for s in OPEN_ALERT_STATUSES],
        **trusted_params,
    }


def _day(value: str | None) -> dt.date | None:
    return dt.date.fromisoformat(value) if value else None


def facts_from_row(row: tuple[Any, ...]) -> PatientFacts:
    (_pid, deceased_on, care_team, index_date, levels, all_levels, excluding, field, therapy,
     fractures, alerts, _next_check_on) = row
    exposures = []
    for agent, route, start, end, status in json.loads(therapy) if therapy else ():
        interval = codes.dose_interval_days(agent, route) if agent in codes.AGENTS else 0
        exposures.append(Exposure(agent, route, _day(start), _day(end), status, interval))
    return PatientFacts(
        index_date=index_date,
        index_levels=frozenset(json.loads(levels) or []) if levels else frozenset(),
        vbq_all_levels=all_levels,
        vbq_excluding_fractured=excluding,
        vbq_field_strength_t=field,
        exposures=tuple(exposures),
        fractures=tuple(FractureFact(_day(day), site, level)
                        for day, site, level in (json.loads(fractures) if fractures else ())),
        deceased_on=deceased_on,
        care_team=care_team,
        open_alerts=tuple(
            OpenAlert(rule, status, _day(opened), level, for_fx, _day(snoozed))
            for rule, status, opened, level, for_fx, snoozed
            in (json.loads(alerts) if alerts else ())),
    )
