"""Queue VBQ re-scoring of a cohort after an algorithm change, keeping old results."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from scoring.engine import ALGORITHM_VERSION
from scoring.models import ImagingSeries, VbqResult
from scoring.tasks import enqueue_vbq_compute


class Command(BaseCommand):
    help = "Create queued automatic VBQ jobs for ALGORITHM_VERSION on already scored series."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--algorithm-version", default=ALGORITHM_VERSION,
                            help="must equal the installed engine's version")
        parser.add_argument("--limit", type=int, default=None)

    def handle(self, *args, **options) -> None:
        version = options["algorithm_version"]
        if version != ALGORITHM_VERSION:
            raise CommandError(f"the installed engine is {ALGORITHM_VERSION}, not {version}")
        series = ImagingSeries.objects.filter(
            vbq_results__source=VbqResult.Source.AUTO, study__patient__isnull=False
        ).exclude(vbq_results__algorithm_version=version).distinct()
        if options["limit"]:
            series = series[: options["limit"]]
        created = []
        with transaction.atomic():
            for s in series.select_related("study"):
                result, new = VbqResult.objects.get_or_create(
                    series=s, algorithm_version=version, source=VbqResult.Source.AUTO,
                    revision=0, defaults={"patient_id": s.study.patient_id})
                if new:
                    created.append(result.pk)
            for pk in created:
                transaction.on_commit(lambda pk=pk: enqueue_vbq_compute(pk))
        self.stdout.write(f"Queued {len(created)} re-scoring job(s) with engine {version}; "
                          "earlier results are kept.")
