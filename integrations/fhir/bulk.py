"""FHIR Bulk Data NDJSON import: one resource per line, any file size, streamed.

Files are read line by line and applied in batches of ``batch_size`` resources (one savepoint
per resource, one transaction per batch), Patients first so references resolve (Bulk Data
exports write one file per type; ``Patient.ndjson`` is imported before the others). Same mappers
and idempotency as the REST endpoint; every line goes through the same validation layer
(``integrations.fhir.guard``: UTF-8 or UTF-16 by its byte order mark, depth, JSON, strings,
feed namespace) and a line that fails anything, or crashes, is counted with its reason and
skipped: the other lines go on. One InboundMessage per file records its sha256 and outcome.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from django.db import IntegrityError, OperationalError, transaction

from integrations.fhir import guard
from integrations.fhir.context import Context
from integrations.fhir.errors import FhirError, rule_violation
from integrations.fhir.ingest import apply_resource
from integrations.models import InboundMessage

logger = logging.getLogger(__name__)


@dataclass
class ImportSummary:
    files: int = 0
    lines: int = 0
    by_status: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(self.by_status.items()))
        return f"{self.files} file(s), {self.lines} resource(s) — {statuses}"


def ndjson_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.ndjson")) if path.is_dir() else [path]
    return sorted(files, key=lambda p: (not p.name.startswith("Patient"), p.name))


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, line


def import_ndjson(path: Path, ctx: Context, allowed: Callable[[str], bool], *,
                  batch_size: int = 500, progress: Callable[[int], None] | None = None
                  ) -> ImportSummary:
    summary = ImportSummary()
    for file in ndjson_files(path):
        summary.files += 1
        digest = hashlib.sha256()
        message = InboundMessage.objects.create(
            feed_id=ctx.actor.feed_id, channel="fhir-bulk", content_type="application/fhir+ndjson",
            sha256="", size_bytes=file.stat().st_size, body=f"(NDJSON file {file.name}, "
            "stored on disk by the sender)".encode())
        batch: list[tuple[int, bytes]] = []
        for item in _lines(file):
            digest.update(item[1])
            batch.append(item)
            if len(batch) >= batch_size:
                _apply_batch(file, batch, ctx, allowed, summary, progress)
                batch = []
        if batch:
            _apply_batch(file, batch, ctx, allowed, summary, progress)
        InboundMessage.objects.filter(pk=message.pk).update(
            sha256=digest.hexdigest(), outcome="accepted" if not summary.errors else "partial",
            status_code=200, summary={"lines": summary.lines,
                                      "by_status": dict(summary.by_status)})
    return summary


def _count_error(summary: ImportSummary, file: Path, number: int, status: int,
                 exc: Exception) -> None:
    summary.by_status[status] += 1
    if len(summary.errors) < 100:
        summary.errors.append(f"{file.name}:{number}: {exc}"[:300])


def _apply_batch(file: Path, batch: list[tuple[int, bytes]], ctx: Context,
                 allowed: Callable[[str], bool], summary: ImportSummary,
                 progress: Callable[[int], None] | None) -> None:
    with transaction.atomic():
        for number, line in batch:
            summary.lines += 1
            where = f"{file.name}:{number}"
            try:
                document = guard.loads(guard.decode_text(line.rstrip(b"\r\n"), None))
                guard.check_document(document, feed_name=ctx.feed_name)
                with transaction.atomic():
                    outcome = apply_resource(document.data, ctx, allowed=allowed,
                                             expression_prefix=where)
                summary.by_status[outcome.status] += 1
            except IntegrityError as exc:  # this line's savepoint is rolled back; go on
                error = rule_violation(exc) or FhirError.single(
                    409, "conflict", "concurrent update; import the line again")
                _count_error(summary, file, number, error.status, error)
            except (ValueError, FhirError) as exc:
                _count_error(summary, file, number,
                             exc.status if isinstance(exc, FhirError) else 400, exc)
            except OperationalError:
                raise  # the database is gone: the import stops
            except Exception as exc:  # this line only (its savepoint rolled back): go on
                logger.exception("%s could not be imported", where)
                _count_error(summary, file, number, 422, exc)
    if progress:
        progress(len(batch))
