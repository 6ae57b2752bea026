"""Build the report cohort from the registry: a handful of flat queries, no per-patient queries.

The cost is one pass over each table restricted to the filtered patients (values_list streams
tuples; no model instances), then pure Python joins. Rules (docs/reports.md states each in
words, with its reference):
- as-of: a report is computed as of its cut-off date C using only facts DATED on or before C
  and, by default (``as_recorded``), RECORDED in the registry by the end of C in the clinic's
  time zone (``created_at`` of procedures, fractures and therapy; ``opened_at`` /
  ``acknowledged_at`` / ``resolved_at`` of alerts; ``finished_at`` or ``queued_at`` of VBQ
  results, whose review counts only if ``reviewed_at`` is before the end of C). A fact
  recorded later did not exist at C;
- index procedure = first active vertebroplasty/kyphoplasty known at C;
- current VBQ = latest usable result (succeeded or accepted, never rejected/failed/needs_review);
- last contact = the later of the patient's recorded last contact and the latest fracture
  diagnosis (a fracture encounter is a contact), both on or before C;
- event = first active fracture diagnosed after the index date that is not the index fracture
  (a vertebral fracture at a treated level; a fracture with no single known level is never
  taken for the index fracture), on or before the censoring date;
- censoring = earliest of death, last contact and C (C when no contact is recorded);
- observation end (``followup_days``) = the censoring date ignoring fractures: the KPI
  denominators and follow-up use it, so a patient stays in them after a fracture;
- therapy start = first active, not declined/cancelled exposure started on or after the index
  date and on or before C, or an exposure started before the index that was still running on
  the index date (day 0).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from django.conf import settings
from django.db import connection
from django.db.models import Q, QuerySet, TextField
from django.db.models.functions import Cast

from followup.facts import COUNTED_STUDY
from registry.models import (
    Alert,
    ExposureStatus,
    Fracture,
    Patient,
    Procedure,
    RecordStatus,
    TherapyExposure,
)
from registry.reports.cohort import AlertRow, CohortRow
from registry.timeutil import clinic_today, start_of_clinic_day
from scoring.models import VbqResult
from scoring.trust import AUTOMATIC_SOURCES, trusted_q


@dataclass(frozen=True)
class CohortFilters:
    index_from: dt.date | None = None
    index_to: dt.date | None = None
    care_team: str = ""
    sex: str = ""
    age_min: int | None = None
    age_max: int | None = None
    cutoff: dt.date | None = None
    # Only facts recorded in the registry by the end of the cut-off day (what was known then).
    # False: facts dated by the cut-off, whenever they were recorded (late data included).
    as_recorded: bool = True


def _text_id(field: str = "patient_id") -> Cast:
    """Patient ids as text: string keys hash far faster than UUID objects in the joins below."""
    return Cast(field, output_field=TextField())


def _fetch(qs: QuerySet) -> list[tuple]:
    """Rows of a ``values_list`` queryset. On PostgreSQL the ORM-built SQL is run on a plain
    cursor: psycopg already returns dates, UUIDs and JSON as Python objects, and skipping the
    ORM's per-row converters halves extraction time on 100,000-patient cohorts."""
    if connection.vendor != "postgresql":
        return list(qs)
    sql, params = qs.query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


@dataclass
class Cohort:
    rows: list[CohortRow]
    alerts: list[AlertRow]
    synthetic: bool
    cutoff: dt.date


def build_cohort(filters: CohortFilters | None = None) -> Cohort:
    """Return the cohort table for ``filters`` (see module docstring for the rules)."""

    f = filters or CohortFilters()
    cutoff = f.cutoff or clinic_today()
    # A fact is known at the cut-off when it is dated by then and (as_recorded) was written
    # before the next clinic day began.
    known_before = start_of_clinic_day(cutoff + dt.timedelta(days=1))
    recorded = Q(created_at__lt=known_before) if f.as_recorded else Q()
    proc_qs = Procedure.objects.filter(
        recorded, record_status=RecordStatus.ACTIVE, patient__merged_into__isnull=True,
        performed_on__lte=cutoff,
    )
    if f.care_team:
        proc_qs = proc_qs.filter(patient__care_team=f.care_team)
    if f.sex:
        proc_qs = proc_qs.filter(patient__sex=f.sex)
    index: dict = {}
    for patient_id, performed_on, levels in _fetch(proc_qs.order_by(
        "patient_id", "performed_at", "pk"
    ).annotate(pid=_text_id()).values_list("pid", "performed_on", "levels")):
        if patient_id not in index:
            index[patient_id] = (performed_on, set(levels or []))
    # The index procedure is the first one; date filters apply to it, not to later ones.
    index = {
        pid: v for pid, v in index.items()
        if (f.index_from is None or v[0] >= f.index_from)
        and (f.index_to is None or v[0] <= f.index_to)
    }
    ids = list(index)
    # Each table is read once with the same patient-level filters applied through a join (no
    # giant IN lists); rows of patients outside the cohort are skipped in Python.
    patient_q = Q(patient__merged_into__isnull=True)
    if f.care_team:
        patient_q &= Q(patient__care_team=f.care_team)
    if f.sex:
        patient_q &= Q(patient__sex=f.sex)
    person_q = Q(merged_into__isnull=True)
    if f.care_team:
        person_q &= Q(care_team=f.care_team)
    if f.sex:
        person_q &= Q(sex=f.sex)
    patients: dict = {}
    synthetic = True
    for row in _fetch(Patient.objects.filter(person_q).annotate(pid=_text_id("id")).values_list(
        "pid", "birth_date", "sex", "bmi_kg_m2", "deceased_on", "last_contact_on",
        "care_team", "is_synthetic",
    )):
        if row[0] in index:
            patients[row[0]] = row
            synthetic = synthetic and row[7]
    vbq: dict = {}
    fractures: dict = {}
    last_fracture: dict = {}
    therapy: dict = {}
    alerts: list[AlertRow] = []
    if f.as_recorded:
        # Finished by the cut-off, and trusted as it stood then (scoring.trust's rule at the
        # cut-off): accepted before it, or an automatic result the rule lets through that was
        # not yet reviewed at it (a review after the cut-off had not happened).
        reviewed_after = Q(reviewed_at__gte=known_before)
        trusted_automatic = Q(status=VbqResult.Status.SUCCEEDED, source__in=AUTOMATIC_SOURCES,
                              qc_clear=True,
                              confidence__gte=settings.VBQ_TRUST_MIN_CONFIDENCE)
        vbq_usable = (
            Q(finished_at__lt=known_before)
            | Q(finished_at__isnull=True, queued_at__lt=known_before)
        ) & (
            (Q(review_status=VbqResult.Review.ACCEPTED) & ~reviewed_after)
            | (trusted_automatic
               & (Q(review_status=VbqResult.Review.PENDING) | reviewed_after))
        )
    else:
        vbq_usable = trusted_q()  # scoring.trust: the results the alerts count
    for pid, all_levels, excluding, field in _fetch(
        VbqResult.objects.filter(patient_q, vbq_usable)
        .filter(COUNTED_STUDY)  # as the alerts count them: not a voided or misfiled study's
        .order_by("patient_id", "queued_at", "pk")
        .annotate(pid=_text_id())
        .values_list("pid", "vbq_all_levels", "vbq_excluding_fractured",
                     "field_strength_t")

    ):
        vbq[pid] = (all_levels, excluding, field)  # later rows win: latest result
    for pid, day, site, level in _fetch(
        Fracture.objects.filter(patient_q, recorded, record_status=RecordStatus.ACTIVE,
                                diagnosed_on__lte=cutoff)
        .order_by("patient_id", "diagnosed_on", "pk")
        .annotate(pid=_text_id())
        .values_list("pid", "diagnosed_on", "site", "vertebral_level")

    ):
        if pid not in index:
            continue
        last_fracture[pid] = day  # rows are in date order: the last one is the latest contact
        if pid in fractures:
            continue
        index_day, treated = index[pid]
        if day <= index_day or (site == "vertebral" and level and level in treated):
            continue
        fractures[pid] = (day, site, level)
    for pid, start, end in _fetch(
        TherapyExposure.objects.filter(patient_q, recorded, record_status=RecordStatus.ACTIVE,
                                       start_on__lte=cutoff)
        .exclude(status__in=[ExposureStatus.DECLINED, ExposureStatus.CANCELLED])
        .order_by("patient_id", "start_on", "pk")
        .annotate(pid=_text_id())
        .values_list("pid", "start_on", "end_on")

    ):
        if pid in therapy or pid not in index:
            continue
        index_day = index[pid][0]
        if start >= index_day:
            therapy[pid] = (start - index_day).days
        elif end is None or end >= index_day:
            therapy[pid] = 0
    alert_qs = Alert.objects.filter(patient_q, opened_at__lt=known_before).annotate(
        pid=_text_id())
    for pid, rule_id, opened, acked, resolved, reason in _fetch(alert_qs.values_list(
        "pid", "rule_id", "opened_at", "acknowledged_at", "resolved_at", "resolution_reason"
    )):
        if pid not in index:
            continue
        # What happened to the alert after the cut-off had not happened yet.
        acked = acked if acked is not None and acked < known_before else None
        if resolved is None or resolved >= known_before:
            resolved, reason = None, ""
        alerts.append(
            AlertRow(
                rule_id=rule_id,
                hours_to_acknowledge=(acked - opened).total_seconds() / 3600 if acked else None,
                hours_to_resolve=(resolved - opened).total_seconds() / 3600 if resolved else None,
                resolution_reason=reason,
            )
        )
    rows: list[CohortRow] = []
    for pid in ids:
        p = patients.get(pid)
        if p is None:
            continue
        _, birth, sex, bmi, deceased, last_contact, team, _syn = p
        index_day = index[pid][0]
        age = (index_day - birth).days / 365.25 if birth else None
        if f.age_min is not None and (age is None or age < f.age_min):
            continue
        if f.age_max is not None and (age is None or age >= f.age_max):
            continue
        # A fracture encounter is a contact: it extends a recorded last contact.
        seen = last_fracture.get(pid)
        if last_contact and seen and seen > last_contact:
            last_contact = seen
        censor_day, reason = cutoff, "cutoff"
        if last_contact and last_contact < censor_day:
            censor_day, reason = last_contact, "last_contact"
        if deceased and deceased <= censor_day:
            censor_day, reason = deceased, "death"
        censor_day = max(censor_day, index_day)
        fx = fractures.get(pid)
        event = fx is not None and fx[0] <= censor_day
        end_day = fx[0] if event and fx else censor_day
        v = vbq.get(pid, (None, None, None))
        rows.append(
            CohortRow(
                patient_key=str(pid),
                index_date=index_day,
                age_years=age,
                sex=sex,
                bmi=float(bmi) if bmi is not None else None,
                vbq_all_levels=v[0],
                vbq_excluding_fractured=v[1],
                field_strength_t=v[2],
                event=event,
                time_days=float((end_day - index_day).days),
                followup_days=float((censor_day - index_day).days),
                censor_reason="fracture" if event else reason,
                fracture_site=fx[1] if event and fx else None,
                therapy_start_days=therapy.get(pid),
                care_team=team,
            )
        )
    return Cohort(rows=rows, alerts=alerts, synthetic=bool(rows) and synthetic, cutoff=cutoff)
