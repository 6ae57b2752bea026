"""The fractured levels of a VBQ result and the VBQ excluding them.

Rule (docs/engine.md, "Fractured levels"): the fractured levels of a patient's result are the
L1–L4 levels among the index procedure's treated levels (``Procedure.levels``) and the levels
of the patient's active vertebral fractures that are NOT secondary (diagnosed on or before the
index procedure's ``performed_on``, or at a treated level; ``registry.selectors.
secondary_fractures`` is the complement). A patient without an index procedure: every active
vertebral L1–L4 fracture. A reviewer's choice (``scoring.review.review_mark_fractured``, a
corrected manual result) wins: such a result has ``fractured_levels_by_reviewer`` set and is
never recomputed here.

Written twice, on purpose, and tested to agree: as SQL (``fractured_levels_sql``: the worker's
claim statement and ``results_refresh_fractured``'s statement on PostgreSQL, one statement
per batch of patients) and in Python (``fractured_levels_of``, ``apply_fractured_levels``:
other databases, and the reviewer's single-result write).

``results_refresh_fractured`` recomputes, without re-running the engine, the stored results of
the given patients from their per-level medians (``VbqLevel``) when what decides their
fractured levels changed: results moved to another patient, a fracture or a procedure
recorded, corrected or voided, patients merged.

The recompute obeys the trust rule (``scoring.trust``, issue 18): a result that counts for
the follow-up (accepted, or automatic and clear) whose value the follow-up reads would cross
its high-VBQ threshold is NOT changed by the recompute. It keeps its levels and value (so the
alerts stay as they are) and gets an ``info`` flag ``fractured-levels-pending`` with the
proposed levels and value and why; it then waits in the needs-review queue
(``scoring.review.review_queue``) until a reviewer marks the fractured levels on it
(``review_mark_fractured``, which drops the flag). Results that do not count yet are
recomputed as before (a reviewer sees them anyway). The same rule in SQL and in Python.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from django.conf import settings
from django.db import connection

from db.pg import pg_pipeline
from registry.models import AuditEvent, Fracture, Patient, Procedure, RecordStatus
from registry.side_effects import SYSTEM_ACTOR, audit_record, defer_after, followup_changed
from scoring.models import VbqLevel, VbqResult
from scoring.trust import (
    category_change,
    result_is_trusted,
    rule_value,
    threshold_of,
    trusted_sql,
)

VBQ_LEVELS = ("L1", "L2", "L3", "L4")
REFRESH_REASON = "fractured levels recomputed"
# The flag of a counting result whose recompute would cross the high-VBQ threshold (held).
PENDING = "fractured-levels-pending"


def pending_message(levels: list[str], old: float, new: float) -> str:
    """The held recompute in words (the SQL statement writes the same text)."""
    return (f"the registry's fractures now give fractured levels {', '.join(levels) or 'none'}: "
            f"VBQ {old:.2f} → {new:.2f} crosses the high-VBQ threshold; the follow-up keeps "
            f"{old:.2f} until a reviewer marks the fractured levels on this result")


def pending_recompute(flags: Any) -> dict | None:
    """The ``fractured-levels-pending`` flag among ``flags``, or None."""
    for flag in flags if isinstance(flags, list) else ():
        if isinstance(flag, dict) and flag.get("code") == PENDING:
            return flag
    return None


def _without_pending(flags: Any) -> Any:
    if not isinstance(flags, list):
        return flags
    return [f for f in flags if not (isinstance(f, dict) and f.get("code") == PENDING)]


def _held_by_threshold(result: VbqResult, new_excluding: float | None
                       ) -> tuple[float, float] | None:
    """(old, new) values the follow-up reads when recomputing ``result`` to ``new_excluding``
    would move a counting result across its high-VBQ threshold; else None."""
    if not result_is_trusted(result):
        return None
    old = rule_value(result.vbq_all_levels, result.vbq_excluding_fractured)
    new = rule_value(result.vbq_all_levels, new_excluding)
    if old is None or new is None:
        return None
    crossing = category_change(value=new, field_strength_t=result.field_strength_t,
                               references=[("before the recompute", old)])
    return (old, new) if crossing else None


def fractured_levels_sql(patient: str) -> str:
    """PostgreSQL: an expression giving the sorted ``text[]`` of fractured L1–L4 levels of the
    patient whose id is the SQL expression ``patient`` (a column of the enclosing query). The
    index procedure is ``registry.selectors.index_procedure_query``'s (first active by
    ``performed_at``, then id)."""
    fracture = connection.ops.quote_name(Fracture._meta.db_table)
    procedure = connection.ops.quote_name(Procedure._meta.db_table)
    # Table names from the models' metadata; no values in the text.
    return (
        "ARRAY(SELECT DISTINCT x.lv FROM (VALUES (1)) AS one(k) "  # noqa: S608
        f"LEFT JOIN LATERAL (SELECT p.performed_on, p.levels FROM {procedure} AS p "
        f"WHERE p.patient_id = {patient} AND p.record_status = 'active' "
        "ORDER BY p.performed_at, p.id LIMIT 1) AS ip ON true "
        "CROSS JOIN LATERAL (SELECT jsonb_array_elements_text(ip.levels) AS lv "
        f"UNION ALL SELECT f.vertebral_level FROM {fracture} AS f "
        f"WHERE f.patient_id = {patient} AND f.site = 'vertebral' "
        "AND f.record_status = 'active' AND (ip.performed_on IS NULL "
        "OR f.diagnosed_on <= ip.performed_on OR ip.levels ? f.vertebral_level)) AS x "
        "WHERE x.lv IN ('L1', 'L2', 'L3', 'L4') ORDER BY x.lv)"
    )


def fractured_levels_of(patient_ids: Iterable[Any]) -> dict[str, list[str]]:
    """The rule in Python (two queries for any number of patients): patient id (``str``) →
    sorted fractured L1–L4 levels (every given patient is a key)."""
    ids = [str(p) for p in dict.fromkeys(patient_ids)]
    index: dict[str, tuple[Any, list[str]]] = {}
    for pid, performed_on, levels in (
            Procedure.objects.filter(patient_id__in=ids, record_status=RecordStatus.ACTIVE)
            .order_by("patient_id", "performed_at", "pk")
            .values_list("patient_id", "performed_on", "levels")):
        index.setdefault(str(pid), (performed_on, list(levels or [])))
    out: dict[str, set[str]] = {pid: set(index.get(pid, (None, []))[1]) for pid in ids}
    for pid, level, diagnosed_on in Fracture.objects.filter(
            patient_id__in=ids, site="vertebral", record_status=RecordStatus.ACTIVE,
            vertebral_level__in=VBQ_LEVELS).values_list(
            "patient_id", "vertebral_level", "diagnosed_on"):
        found = index.get(str(pid))
        if found is None or diagnosed_on <= found[0] or level in found[1]:
            out[str(pid)].add(level)
    return {pid: sorted(lv for lv in levels if lv in VBQ_LEVELS) for pid, levels in out.items()}


def vbq_excluding(medians: Mapping[str, float], csf_median_si: float,
                  fractured: Iterable[str]) -> float | None:
    """The engine's definition: median of the L1–L4 medians not fractured ÷ the CSF median;
    None when every measured level is fractured. (The PostgreSQL statement of
    ``results_refresh_fractured`` computes the same median as the mean of its lower and upper
    middle values, which is what numpy does: equal to the last bit.)"""
    excluded = set(fractured)
    kept = [medians[lv] for lv in VBQ_LEVELS if lv in medians and lv not in excluded]
    return float(np.median(kept)) / csf_median_si if kept else None


def apply_fractured_levels(result: VbqResult, fractured: list[str], *,
                           by_reviewer: bool) -> None:
    """Set ``fractured`` (sorted L1–L4 levels) on a LOCKED ``result`` from its stored level
    rows: the levels' ``fractured`` flags, ``fractured_levels``, the VBQ excluding fractured
    levels and the engine's ``all-levels-fractured`` QC flag (both unchanged when the result
    has no VBQ or no usable CSF level), and the same keys of its ``measurement`` JSON; saved.
    ``by_reviewer``: a reviewer chose them (never recomputed afterwards). A held recompute's
    ``fractured-levels-pending`` flag is dropped (the levels are decided now)."""
    stored = {lv.level: lv for lv in result.levels.all()}
    for level in stored.values():
        flag = level.level in fractured
        if level.fractured != flag:
            level.fractured = flag
            level.save(update_fields=["fractured"])
    csf = stored.get("csf")
    recomputed = False
    if csf is not None and csf.median_si > 0 and result.vbq_all_levels is not None:
        recomputed = True
        result.vbq_excluding_fractured = vbq_excluding(
            {k: v.median_si for k, v in stored.items()}, csf.median_si, fractured)
        result.qc_flags = _flags_with(result.qc_flags, result.vbq_excluding_fractured)
    result.qc_flags = _without_pending(result.qc_flags)  # decided: no recompute waits
    result.fractured_levels = fractured
    result.fractured_levels_by_reviewer = by_reviewer or result.fractured_levels_by_reviewer
    result.measurement = _measurement_with(result.measurement, fractured,
                                           result.vbq_excluding_fractured, recomputed)
    result.save(update_fields=["fractured_levels", "vbq_excluding_fractured", "qc_flags",
                               "fractured_levels_by_reviewer", "measurement"])


def _flags_with(flags: Any, value: float | None) -> Any:
    """QC flags with the engine's ``all-levels-fractured`` flag iff there is no value (as
    ``_FLAGS_SQL``)."""
    if not isinstance(flags, list):
        return flags
    kept = [f for f in flags if not (isinstance(f, dict) and f.get("code") == ALL_FRACTURED)]
    return kept + ([dict(ALL_FRACTURED_FLAG)] if value is None else [])


def _measurement_with(measurement: Any, fractured: list[str], value: float | None,
                      recomputed: bool) -> Any:
    """The engine JSON with the new fractured levels (as ``_MEASUREMENT_SQL`` does)."""
    if not isinstance(measurement, dict) or "fractured_levels" not in measurement:
        return measurement
    out = {**measurement, "fractured_levels": list(fractured), "vbq_excluding_fractured": value}
    if isinstance(measurement.get("levels"), dict):
        out["levels"] = {k: ({**v, "fractured": k in fractured} if isinstance(v, dict) else v)
                         for k, v in measurement["levels"].items()}
    if recomputed and "qc_flags" in measurement:
        out["qc_flags"] = _flags_with(measurement["qc_flags"], value)
    return out


# The engine's flag (scoring.engine.vbq._finish) when every measured level is fractured.
ALL_FRACTURED = "all-levels-fractured"
ALL_FRACTURED_FLAG = {"code": ALL_FRACTURED, "message": "every measured level is fractured",
                      "severity": "warning"}


def _flags_sql(flags: str) -> str:
    """The JSON array ``flags`` with the ``all-levels-fractured`` flag iff ``c.excl`` is null
    (``_flags_with``)."""
    return (  # constants only, no values in the text
        f"CASE WHEN jsonb_typeof({flags}) = 'array' THEN (SELECT coalesce(jsonb_agg(q.f "  # noqa: S608
        f"ORDER BY q.n), '[]'::jsonb) FROM jsonb_array_elements({flags}) WITH ORDINALITY "
        f"AS q(f, n) WHERE q.f->>'code' IS DISTINCT FROM '{ALL_FRACTURED}') || CASE WHEN "
        "c.excl IS NULL THEN jsonb_build_array(jsonb_build_object('code', "
        f"'{ALL_FRACTURED}', 'message', '{ALL_FRACTURED_FLAG['message']}', 'severity', "
        f"'{ALL_FRACTURED_FLAG['severity']}')) ELSE '[]'::jsonb END ELSE {flags} END")


# The engine JSON of ``r`` with the target's levels (t.levels), value (c.excl) and QC flags
# (constants only, no values in the text).
_MEASUREMENT_FLAGS = "(r.measurement->'qc_flags')"
_MEASUREMENT_SQL = (
    "CASE WHEN jsonb_typeof(r.measurement) = 'object' AND r.measurement ? 'fractured_levels' "  # noqa: S608
    "THEN r.measurement || jsonb_build_object('fractured_levels', to_jsonb(t.levels), "
    "'vbq_excluding_fractured', c.excl) || CASE WHEN jsonb_typeof(r.measurement->'levels') = "
    "'object' THEN jsonb_build_object('levels', (SELECT coalesce(jsonb_object_agg(e.key, "
    "CASE WHEN jsonb_typeof(e.value) = 'object' THEN e.value || jsonb_build_object("
    "'fractured', e.key = ANY(t.levels)) ELSE e.value END), '{}'::jsonb) "
    "FROM jsonb_each(r.measurement->'levels') AS e)) ELSE '{}'::jsonb END "
    "|| CASE WHEN c.recomputed AND r.measurement ? 'qc_flags' THEN jsonb_build_object("
    f"'qc_flags', {_flags_sql(_MEASUREMENT_FLAGS)}) ELSE '{{}}'::jsonb END "
    "ELSE r.measurement END")


def results_refresh_fractured(patient_ids: Iterable[Any], *, actor: Any = None,
                              reason: str = "") -> list[int]:
    """Recompute the fractured levels of these patients' results that have level rows and
    whose levels were not set by a reviewer, where the rule now gives other levels (inside
    the caller's transaction; the rows are locked). Each changed result gets an audit row
    (ids and levels only) and its patient's follow-up is re-evaluated
    (``registry.side_effects.followup_changed``). Returns the changed result ids.

    PostgreSQL: the patients' rows are locked first (``PATIENT_LOCK_SQL``, in id order), then
    ONE statement for all of them (the rule, the level flags, the values, the JSON and the
    audit rows), both in one round trip. The lock serialises the writers of a patient's
    fractures and procedures: the statement after it starts with a fresh snapshot, so it
    sees what the lock waited for (in one statement it would not: two bundles adding
    fractures at the same time lost one's level). The worker storing a result does not take
    it (study moves and merges lock results before patients); it re-reads the levels in its
    store statement and retries a deadlock (``scoring.tasks``). Other databases: a few ORM
    statements and a loop (their writers are serialised by the database)."""

    actor = actor or SYSTEM_ACTOR
    ids = [str(p) for p in dict.fromkeys(patient_ids) if p is not None]
    if not ids:
        return []
    detail_reason = reason or REFRESH_REASON
    if connection.vendor == "postgresql":

        sql, params = _refresh_pg_statement(ids, actor, detail_reason)
        lock = (PATIENT_LOCK_SQL, [sorted(ids)], True)
        if defer_after(*lock[:2], prepare=True) and defer_after(sql, params, prepare=True):
            # Inside ``deferred_side_effects`` (a FHIR bundle): run after the block's final
            # statement, in its round trip; the patients' follow-up is queued after commit
            # (which of their results change is not known yet: all of them are re-evaluated).
            for patient_id in ids:
                followup_changed(patient_id)
            return []
        rows = [(int(rid), pid) for rid, pid in pg_pipeline([lock, (sql, params, True)])]
    else:
        rows = _refresh_orm(ids, actor, detail_reason)
    for patient_id in sorted({str(pid) for _, pid in rows}):
        followup_changed(patient_id)
    return sorted(rid for rid, _ in rows)


# The patients' rows locked in one order (PostgreSQL) before their results are recomputed
# (patient, then results by id).
PATIENT_LOCK_SQL = (f"SELECT 1 FROM {Patient._meta.db_table} "  # noqa: S608
                    "WHERE id = ANY(%s::uuid[]) ORDER BY id FOR UPDATE")


def _without_pending_sql(flags: str, hold: str, recomputed_flags: str) -> str:
    """The new ``qc_flags`` of the refresh: held (``hold``), the flags without an older
    ``fractured-levels-pending`` flag plus the new one (``pending_message``'s text, from
    ``t``, ``h``); else ``recomputed_flags`` where the value was recomputed (``c``), without
    that flag."""
    def strip(expr: str) -> str:
        return (f"(SELECT coalesce(jsonb_agg(q.f ORDER BY q.n), '[]'::jsonb) FROM "  # noqa: S608
                f"jsonb_array_elements({expr}) WITH ORDINALITY AS q(f, n) "
                f"WHERE q.f->>'code' IS DISTINCT FROM '{PENDING}')")
    message = (
        "'the registry''s fractures now give fractured levels ' || coalesce(nullif("
        "array_to_string(t.levels, ', '), ''), 'none') || ': VBQ ' || "
        "to_char(h.old, 'FM999990.00') || ' → ' || to_char(h.new, 'FM999990.00') || "
        "' crosses the high-VBQ threshold; the follow-up keeps ' || "
        "to_char(h.old, 'FM999990.00') || ' until a reviewer marks the fractured levels on "
        "this result'")
    flag = (f"jsonb_build_object('code', '{PENDING}', 'severity', 'info', 'key', "
            "array_to_string(t.levels, ','), 'levels', to_jsonb(t.levels), 'value', c.excl, "
            f"'message', {message})")
    return (f"CASE WHEN jsonb_typeof({flags}) <> 'array' THEN {flags} "
            f"WHEN {hold} THEN {strip(flags)} || jsonb_build_array({flag}) "
            f"WHEN c.recomputed THEN {strip(recomputed_flags)} ELSE {strip(flags)} END")


def _refresh_pg_statement(ids: list[str], actor: Any, reason: str
                          ) -> tuple[str, dict[str, Any]]:
    qn = connection.ops.quote_name
    result = qn(VbqResult._meta.db_table)
    level = qn(VbqLevel._meta.db_table)
    audit = qn(AuditEvent._meta.db_table)
    # Names from the models' metadata; values are parameters. The median of the kept levels
    # is (lower middle + upper middle) / 2, numpy's (``vbq_excluding``).
    trusted, trust_params = trusted_sql("r")
    pending = f"jsonb_build_array(jsonb_build_object('code', '{PENDING}'))"
    pending_key = (f"jsonb_build_array(jsonb_build_object('code', '{PENDING}', "
                   "'key', array_to_string(pt.levels, ',')))")
    sql = (
        f"WITH pt AS (SELECT pid, {fractured_levels_sql('pid')} AS levels "  # noqa: S608
        "FROM unnest(%(ids)s::uuid[]) AS pid), "
        f"t AS (SELECT r.id, r.patient_id, pt.levels, r.vbq_all_levels, "
        "r.vbq_excluding_fractured, r.fractured_levels = to_jsonb(pt.levels) AS same, "
        f"{trusted} AS trusted, CASE WHEN r.field_strength_t BETWEEN 1.0 AND 2.0 THEN "
        "%(cut_1_5t)s WHEN r.field_strength_t BETWEEN 2.5 AND 3.5 THEN %(cut_3t)s "
        f"ELSE %(cut)s END AS cut FROM {result} AS r JOIN pt ON r.patient_id = pt.pid "
        "WHERE NOT r.fractured_levels_by_reviewer "
        "AND (r.fractured_levels IS DISTINCT FROM to_jsonb(pt.levels) "
        f"OR coalesce(r.qc_flags @> {pending}, false)) "
        f"AND NOT coalesce(r.qc_flags @> {pending_key}, false) "
        f"AND EXISTS (SELECT 1 FROM {level} AS l WHERE l.result_id = r.id) "
        "ORDER BY r.id FOR UPDATE OF r), "  # one lock order for concurrent recomputes
        "c AS (SELECT t.id, coalesce(csf.median_si > 0 AND t.vbq_all_levels IS NOT NULL, "
        "false) AS recomputed, CASE WHEN csf.median_si > 0 AND t.vbq_all_levels IS NOT NULL "
        "THEN (SELECT (percentile_disc(0.5) WITHIN GROUP (ORDER BY k.median_si) "
        "+ percentile_disc(0.5) WITHIN GROUP (ORDER BY k.median_si DESC)) / 2 "
        f"FROM {level} AS k WHERE k.result_id = t.id "
        "AND k.level IN ('L1', 'L2', 'L3', 'L4') AND NOT k.level = ANY(t.levels)) "
        "/ csf.median_si ELSE t.vbq_excluding_fractured END AS excl "
        f"FROM t LEFT JOIN {level} AS csf ON csf.result_id = t.id AND csf.level = 'csf'), "
        # the values the follow-up reads before and after (``scoring.trust.rule_value``)
        "v AS (SELECT t.id, CASE WHEN %(by_excluding)s THEN coalesce("
        "t.vbq_excluding_fractured, t.vbq_all_levels) ELSE t.vbq_all_levels END AS old, "
        "CASE WHEN %(by_excluding)s THEN coalesce(c.excl, t.vbq_all_levels) "
        "ELSE t.vbq_all_levels END AS new, t.cut FROM t JOIN c ON c.id = t.id), "
        "h AS (SELECT t.id, coalesce(NOT t.same AND t.trusted AND (v.old >= v.cut) <> "
        "(v.new >= v.cut), false) AS hold, v.old, v.new FROM t JOIN v ON v.id = t.id), "
        f"flags AS (UPDATE {level} AS l SET fractured = (l.level = ANY(t.levels)) FROM t "
        "JOIN h ON h.id = t.id WHERE l.result_id = t.id AND NOT h.hold "
        "AND l.fractured <> (l.level = ANY(t.levels))), "
        f"u AS (UPDATE {result} AS r SET fractured_levels = CASE WHEN h.hold THEN "
        "r.fractured_levels ELSE to_jsonb(t.levels) END, "
        "vbq_excluding_fractured = CASE WHEN h.hold THEN r.vbq_excluding_fractured "
        "ELSE c.excl END, "
        f"measurement = CASE WHEN h.hold THEN r.measurement ELSE {_MEASUREMENT_SQL} END, "
        f"qc_flags = {_without_pending_sql('r.qc_flags', 'h.hold', _flags_sql('r.qc_flags'))} "
        "FROM t JOIN c ON c.id = t.id JOIN h ON h.id = t.id WHERE r.id = t.id "
        "RETURNING r.id, r.patient_id, to_jsonb(t.levels) AS levels, h.hold) "
        f"INSERT INTO {audit} (at, actor_id, feed_id, action, patient_id, object_type, "
        "object_id, via, detail) SELECT now(), %(actor)s::bigint, %(feed)s::bigint, 'update', "
        "u.patient_id, "
        "'VbqResult', u.id::text, %(via)s::text, jsonb_build_object('fractured_levels', "
        "u.levels, 'reason', %(reason)s::text, 'held', u.hold) FROM u "
        "RETURNING object_id, patient_id")
    # Fixed text (the patients travel as one array): prepared once per connection. Planning
    # was most of its cost (docs/benchmarks.md).
    cut = threshold_of(None).value
    return sql, {"ids": ids, "actor": actor.user_id, "feed": actor.feed_id, "via": actor.via,
                 "reason": reason, **trust_params, "cut": cut,
                 "cut_1_5t": threshold_of(1.5).value, "cut_3t": threshold_of(3.0).value,
                 "by_excluding": settings.VBQ_ALERT_VALUE != "all_levels"}


def _refresh_orm(ids: list[str], actor: Any, reason: str) -> list[tuple[int, Any]]:
    wanted = fractured_levels_of(ids)
    changed = []
    for result in (VbqResult.objects.select_for_update()
                   .filter(patient_id__in=ids, fractured_levels_by_reviewer=False,
                           pk__in=VbqLevel.objects.values("result_id"))
                   .prefetch_related("levels").order_by("pk")):
        levels = wanted[str(result.patient_id)]
        pending = pending_recompute(result.qc_flags)
        if result.fractured_levels == levels and pending is None:
            continue
        if pending is not None and pending.get("key") == ",".join(levels):
            continue  # already held for exactly these levels
        stored = {lv.level: lv.median_si for lv in result.levels.all()}
        new = result.vbq_excluding_fractured
        if stored.get("csf", 0) > 0 and result.vbq_all_levels is not None:
            new = vbq_excluding(stored, stored["csf"], levels)
        held = None if result.fractured_levels == levels else _held_by_threshold(result, new)
        if held is not None:
            result.qc_flags = [*_without_pending(result.qc_flags), {
                "code": PENDING, "severity": "info", "key": ",".join(levels),
                "levels": levels, "value": new,
                "message": pending_message(levels, *held)}]
            result.save(update_fields=["qc_flags"])
        else:
            apply_fractured_levels(result, levels, by_reviewer=False)
        audit_record(actor=actor, action="update", object_type="VbqResult",
                     object_id=str(result.pk), patient_id=result.patient_id,
                     detail={"fractured_levels": levels, "reason": reason,
                             "held": held is not None})
        changed.append((result.pk, result.patient_id))
    return changed
