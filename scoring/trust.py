"""Which VBQ results may move an alert (the trust rule), and which one the follow-up uses.

A result counts for the follow-up rules (open, escalate or resolve an alert; the patient's
"current VBQ" on the pages, the CDS card and the QI cohort) when it is

- accepted by a reviewer (``review_status = accepted``), or
- automatic (``auto`` or ``external-seg``), ``succeeded``, not yet reviewed, with no QC flag of
  severity ``warning`` or ``refusal`` (``qc_clear``) and a confidence of at least
  ``settings.VBQ_TRUST_MIN_CONFIDENCE``.

Anything else (a pending manual or assisted result, a flagged or low-confidence automatic
result, a rejected one) waits in the needs-review queue and moves nothing. Among the results
that count, the latest (``queued_at``, then id) is the one the rules use. This module is the
only place that says so: the ORM (``trusted_q``), the sweep's SQL (``trusted_sql``) and Python
(``result_is_trusted``) are written from the same definition and tested to agree.

``info`` flags (``suggested-fracture``) tell, they do not warn, and the engine's
``all-levels-fractured`` flag follows from the registry's fractures rather than from the image,
so neither blocks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.db.models import Q

from registry.followup import FollowupConfig, threshold_for
from scoring.models import VbqResult

AUTOMATIC_SOURCES = ("auto", "external-seg")
NOT_BLOCKING_CODES = frozenset({"all-levels-fractured"})
CATEGORY_CHANGE = "category-change"


def qc_clear(flags: Iterable[Any] | None) -> bool:
    """No QC flag that asks for a human: none of severity ``warning`` or ``refusal`` (a flag
    without a severity counts as a warning)."""
    for flag in flags or ():
        if isinstance(flag, dict):
            severity, code = flag.get("severity", "warning"), flag.get("code", "")
        else:
            severity, code = getattr(flag, "severity", "warning"), getattr(flag, "code", "")
        if severity != "info" and code not in NOT_BLOCKING_CODES:
            return False
    return True


def trusted_q(prefix: str = "") -> Q:
    """The rule as a filter on ``VbqResult`` (``prefix``: a relation path ending in ``__``)."""
    p = prefix
    return Q(**{f"{p}review_status": "accepted"}) | Q(**{
        f"{p}review_status": "pending", f"{p}status": "succeeded",
        f"{p}source__in": AUTOMATIC_SOURCES, f"{p}qc_clear": True,
        f"{p}confidence__gte": settings.VBQ_TRUST_MIN_CONFIDENCE})


def trusted_sql(alias: str) -> tuple[str, dict[str, Any]]:
    """The rule as an SQL predicate on the ``VbqResult`` row ``alias``, with its named
    parameters (``%(trust_…)s``)."""
    sql = (f"({alias}.review_status = %(trust_accepted)s OR ({alias}.review_status = "
           f"%(trust_pending)s AND {alias}.status = %(trust_succeeded)s AND {alias}.source = "
           f"ANY(%(trust_sources)s) AND {alias}.qc_clear AND {alias}.confidence >= "
           "%(trust_min_confidence)s))")
    return sql, {"trust_accepted": "accepted", "trust_pending": "pending",
                 "trust_succeeded": "succeeded", "trust_sources": list(AUTOMATIC_SOURCES),
                 "trust_min_confidence": settings.VBQ_TRUST_MIN_CONFIDENCE}


def result_is_trusted(result: Any) -> bool:
    """The rule for one ``VbqResult`` in memory."""
    if result.review_status == "accepted":
        return True
    return (result.review_status == "pending" and result.status == "succeeded"
            and result.source in AUTOMATIC_SOURCES and bool(result.qc_clear)
            and result.confidence is not None
            and result.confidence >= settings.VBQ_TRUST_MIN_CONFIDENCE)


def untrusted_reason(result: Any) -> str:
    """Why ``result`` does not move alerts ("" when it does), for the pages and the queue."""
    if result_is_trusted(result):
        return ""
    if result.review_status == "rejected":
        return "rejected in review"
    if result.status in ("queued", "running"):
        return "not computed yet"
    if result.status == "failed" and result.error_code == "patient-mismatch":
        return "held: the DICOM patient does not match this patient"
    if result.status == "failed":
        return f"failed: {result.error_code or 'no VBQ'}"
    if any(isinstance(f, dict) and f.get("code") == CATEGORY_CHANGE
           for f in result.qc_flags or ()):
        return "changes the VBQ category: waits for a reviewer"
    if not qc_clear(result.qc_flags):
        codes = [f.get("code", "") for f in result.qc_flags or ()
                 if isinstance(f, dict) and f.get("severity", "warning") != "info"
                 and f.get("code") not in NOT_BLOCKING_CODES]
        return "QC warning" + (f": {', '.join(codes)}" if codes else "")
    if result.source not in AUTOMATIC_SOURCES:
        return f"{result.get_source_display().lower()} result not yet accepted"
    if result.confidence is None or result.confidence < settings.VBQ_TRUST_MIN_CONFIDENCE:
        return (f"confidence {result.confidence if result.confidence is not None else 0:.2f} "
                f"below {settings.VBQ_TRUST_MIN_CONFIDENCE:g}")
    return "not yet reviewed"


def rule_result(patient_id: Any, *, excluding: Any = None) -> Any:
    """The result the follow-up rules use for this patient (latest that counts), or None;
    ``excluding``: a result id to leave out (the one being stored). Results on a voided
    study, or on a study now another patient's, never count (``followup.facts.
    COUNTED_STUDY``)."""
    from django.db.models import F

    counted = Q(series__isnull=True) | Q(series__study__record_status="active",
                                         series__study__patient_id=F("patient_id"))
    results = VbqResult.objects.filter(patient_id=patient_id).filter(trusted_q()).filter(counted)
    if excluding is not None:
        results = results.exclude(pk=excluding)
    return results.select_related("reviewer", "series").order_by("-queued_at", "-pk").first()


def hold_category_change(result_id: Any, patient_id: Any) -> bool:
    """An automatic result that would count by itself but falls on the other side of the
    high-VBQ threshold from the value the rules use now is held: ``needs_review`` with a
    ``category-change`` flag, so a human confirms the change before it moves an alert. Inside
    the caller's transaction (the worker's store); returns whether it was held."""

    row = VbqResult.objects.filter(pk=result_id).first()
    if row is None or not result_is_trusted(row) or row.review_status != "pending":
        return False
    current = rule_result(patient_id, excluding=result_id)
    if current is None or current.queued_at > row.queued_at:
        return False
    crossing = category_change(
        value=rule_value(row.vbq_all_levels, row.vbq_excluding_fractured),
        field_strength_t=row.field_strength_t,
        references=[(f"the VBQ the follow-up uses now, result {current.pk}",
                     rule_value(current.vbq_all_levels, current.vbq_excluding_fractured))])
    if not crossing:
        return False
    VbqResult.objects.filter(pk=result_id).update(
        status="needs_review", qc_clear=False,
        qc_flags=[*(row.qc_flags or []), {"code": CATEGORY_CHANGE, "message": crossing,
                                          "severity": "warning"}])
    return True


def threshold_of(field_strength_t: float | None) -> Any:
    """The high-VBQ cut-off (``registry.followup.Threshold``) for a result acquired at
    ``field_strength_t`` tesla, from the settings."""

    return threshold_for(field_strength_t, FollowupConfig(
        threshold=settings.VBQ_HIGH_THRESHOLD, threshold_1_5t=settings.VBQ_HIGH_THRESHOLD_1_5T,
        threshold_3t=settings.VBQ_HIGH_THRESHOLD_3T))


def rule_value(all_levels: float | None, excluding: float | None) -> float | None:
    """The value the 60-day rule reads (``registry.followup.chosen_vbq``): per
    ``VBQ_ALERT_VALUE``, the excluding-fractured value falling back to all levels."""
    if settings.VBQ_ALERT_VALUE == "all_levels" or excluding is None:
        return all_levels
    return excluding


def category_change(*, value: float | None, field_strength_t: float | None,
                    references: Iterable[tuple[str, float | None]]) -> str:
    """A sentence when ``value`` falls on the other side of its high-VBQ threshold from any
    reference value (``(what, value)``, e.g. the VBQ the rules use now), else ""."""
    if value is None:
        return ""
    cut = threshold_of(field_strength_t)
    high = value >= cut.value
    for what, ref in references:
        if ref is not None and (ref >= cut.value) != high:
            return (f"VBQ {ref:.2f} ({what}) → {value:.2f} crosses the high-VBQ threshold "
                    f"{cut.label}: a second look is needed before it counts")
    return ""
