"""Recompute the fractured levels of stored VBQ results by the current rule
(``scoring.fractured``), e.g. once after upgrading from the rule that excluded every active
vertebral fracture: ``manage.py vbq_refresh_fractured [--batch 500]``."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction

from registry.services import Actor
from scoring.fractured import results_refresh_fractured
from scoring.models import VbqResult


class Command(BaseCommand):
    help = ("Recompute the fractured levels (and the VBQ excluding them) of every stored result "
            "not set by a reviewer, from the stored level medians; audited; follow-up "
            "re-evaluated.")

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--batch", type=int, default=500, help="patients per transaction")

    def handle(self, *args, **options) -> None:
        patients = list(VbqResult.objects.filter(fractured_levels_by_reviewer=False)
                        .values_list("patient_id", flat=True).distinct().order_by("patient_id"))
        batch = max(1, options["batch"])
        changed = 0
        for start in range(0, len(patients), batch):
            with transaction.atomic():
                changed += len(results_refresh_fractured(
                    patients[start:start + batch], actor=Actor(via="command"),
                    reason="fractured levels rule"))
        self.stdout.write(f"{changed} result(s) of {len(patients)} patient(s) recomputed.")
