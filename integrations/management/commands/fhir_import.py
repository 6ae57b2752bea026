"""Import FHIR Bulk Data NDJSON files (a file, or a folder of ``<Type>.ndjson`` files)."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from integrations.fhir.bulk import import_ndjson, ndjson_files
from integrations.fhir.context import Context
from registry.feeds import feed_create
from registry.models import Feed
from registry.side_effects import Actor


class Command(BaseCommand):
    help = "Import FHIR NDJSON (Bulk Data export) files through the same mappers as /fhir."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("path", type=Path)
        parser.add_argument("--feed", default="bulk-import",
                            help="Feed name the data is attributed to (created if missing)")
        parser.add_argument("--batch-size", type=int, default=500)

    def handle(self, *args, **options) -> None:
        path: Path = options["path"]
        if not path.exists():
            raise CommandError(f"{path} does not exist")
        files = ndjson_files(path)
        if not files:
            raise CommandError(f"no .ndjson files in {path}")
        feed = Feed.objects.filter(name=options["feed"]).first() or feed_create(
            name=options["feed"])[0]
        ctx = Context(feed_name=feed.name, actor=Actor(feed_id=feed.pk, via="fhir-bulk"))
        total = sum(1 for f in files for line in f.open(encoding="utf-8") if line.strip())
        with tqdm(total=total, unit="res", disable=options["verbosity"] == 0) as bar:
            summary = import_ndjson(path, ctx, feed.allows, batch_size=options["batch_size"],
                                    progress=bar.update)
        self.stdout.write(f"Imported {summary}")
        for error in summary.errors[:20]:
            self.stderr.write(f"  {error}")
        refused = sum(n for status, n in summary.by_status.items() if status >= 400)
        if refused:  # the other lines are imported; a scheduled import must not look clean
            raise CommandError(f"{refused} line(s) refused (listed above); fix and re-run "
                               "them: lines already imported are not duplicated")
