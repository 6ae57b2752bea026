"""Recompute the fractured levels of stored VBQ results by the current rule
(``scoring.fractured``), e.g. once after upgrading from the rule that excluded every active
vertebral fracture: ``manage.py vbq_refresh_fractured [--batch 500] [--dry-run]``.

``--dry-run`` runs every batch as usual and rolls it back: it reports how many results would
change and how many would cross the high-VBQ threshold (each result's, by its field strength:
``scoring.trust.threshold_of``; either way, on the value the 60-day rule reads:
``VBQ_ALERT_VALUE``), and writes nothing (no result, audit row, due date or follow-up message).
The count is per result; the follow-up counts only
a patient's current result. A result that counts for the follow-up and would cross is not
recomputed but held for a reviewer (``scoring.fractured.PENDING``): reported apart."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction

from registry.side_effects import Actor, deferred_side_effects
from scoring.fractured import pending_recompute, results_refresh_fractured
from scoring.models import VbqResult
from scoring.trust import rule_value, threshold_of


def _high(value: float | None, field_strength_t: float | None) -> bool:
    """The follow-up rule's "high" (``registry.followup``: VBQ ≥ the threshold for the
    result's field strength, ``scoring.trust.threshold_of``)."""
    return value is not None and value >= threshold_of(field_strength_t).value


def _stored(patient_ids: list[Any]) -> dict[int, tuple[Any, bool, Any]]:
    """Result id → (fractured levels, whether the value the follow-up rule reads is high, the
    levels of a held recompute or None) of these patients' results the refresh may change
    (not set by a reviewer)."""
    return {pk: (levels, _high(rule_value(all_levels, excluding), field),
                 (pending_recompute(flags) or {}).get("key"))
            for pk, levels, all_levels, excluding, field, flags in VbqResult.objects.filter(
                patient_id__in=patient_ids, fractured_levels_by_reviewer=False).values_list(
                "pk", "fractured_levels", "vbq_all_levels", "vbq_excluding_fractured",
                "field_strength_t", "qc_flags")}


class Command(BaseCommand):
    help = ("Recompute the fractured levels (and the VBQ excluding them) of every stored result "
            "not set by a reviewer, from the stored level medians; audited; follow-up "
            "re-evaluated. --dry-run: report what would change, write nothing.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--batch", type=int, default=500, help="patients per transaction")
        parser.add_argument("--dry-run", action="store_true",
                            help="report the results that would change and the ones that "
                                 "would cross the high-VBQ threshold; roll every batch back")

    def handle(self, *args: Any, **options: Any) -> None:
        dry_run = options["dry_run"]
        patients = list(VbqResult.objects.filter(fractured_levels_by_reviewer=False)
                        .values_list("patient_id", flat=True).distinct().order_by("patient_id"))
        batch = max(1, options["batch"])
        changed = crossing = held = 0
        for start in range(0, len(patients), batch):
            ids = patients[start:start + batch]
            with transaction.atomic():
                before = _stored(ids)
                # One due-date UPDATE and one follow-up message per batch, not per patient
                # (on PostgreSQL every patient of the batch is re-evaluated: the recompute
                # runs at the end of the block and does not return the changed ones).
                with deferred_side_effects():
                    results_refresh_fractured(ids, actor=Actor(via="command"),
                                              reason="fractured levels rule")
                after = _stored(ids)
                for pk, (levels, high, pending) in after.items():
                    old_levels, old_high, old_pending = before.get(pk, (levels, high, pending))
                    if old_levels != levels:  # what the recompute changes
                        changed += 1
                        crossing += old_high != high
                    elif pending is not None and pending != old_pending:
                        held += 1
                if dry_run:
                    transaction.set_rollback(True)  # no write, and no message after commit
        threshold = f"the VBQ threshold {settings.VBQ_HIGH_THRESHOLD:g}" + (
            " (or its field strength's)" if settings.VBQ_HIGH_THRESHOLD_1_5T is not None
            or settings.VBQ_HIGH_THRESHOLD_3T is not None else "")
        if dry_run:
            self.stdout.write(f"Dry run, nothing written: {changed} result(s) of "
                              f"{len(patients)} patient(s) would be recomputed; {crossing} "
                              f"would cross {threshold}; {held} counting result(s) would "
                              "cross it and be held for a reviewer instead.")
        else:
            self.stdout.write(f"{changed} result(s) of {len(patients)} patient(s) recomputed; "
                              f"{crossing} crossed {threshold}; {held} counting result(s) "
                              "held for a reviewer (they would cross it).")
