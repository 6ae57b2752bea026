"""The review page's "Place ROIs from one click": run the engine's assisted path on a result's
series and save what it places as a NEW result (source ``assisted``, next revision), which
then takes the usual review (accept, correct, reject).

The engine (``compute_vbq(seed=...)``) places L1–L4 and the L3 CSF from one click inside a
named body; its result is always ``needs_review`` and is saved ``pending``: no alert moves on
it until a reviewer accepts it. The clicked result, if still pending, is marked superseded
(rejected, with the new result's id), as a corrected manual result does, so the queue holds
the new one only. A click from which no value can be measured saves nothing and answers the
engine's reasons. The images are read and measured before the transaction opens;
the writes are one transaction, audited.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from django.db import transaction
from django.utils import timezone

from registry.side_effects import Actor, audit_record, followup_changed
from scoring.engine import EngineError, VbqMeasurement, compute_vbq
from scoring.engine.assisted import SEED_LEVELS, Seed
from scoring.models import ImagingSeries, VbqLevel, VbqResult
from scoring.review import ReviewError, load_series, next_revision

STORED_LEVELS = ("L1", "L2", "L3", "L4", "L5", "S1")  # what VbqLevel accepts besides "csf"


def parse_seed(data: Any, *, n_slices: int, shape: tuple[int, int]) -> Seed:
    """A ``Seed`` from a request body ({level, slice_index, row, col}); ``ReviewError`` names
    the first bad field."""
    if not isinstance(data, Mapping):
        raise ReviewError("send the click as an object: level, slice_index, row, col",
                          code="seed")
    level = str(data.get("level") or "L3").strip().upper()
    if level not in SEED_LEVELS:
        raise ReviewError(f"the clicked body must be one of {', '.join(SEED_LEVELS)}",
                          code="seed")
    try:
        slice_index = int(data["slice_index"])
        row, col = float(data["row"]), float(data["col"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ReviewError("the click needs numeric slice_index, row and col",
                          code="seed") from exc
    if not (math.isfinite(row) and math.isfinite(col)):
        raise ReviewError("the click has a non-finite coordinate", code="seed")
    if not 0 <= slice_index < n_slices:
        raise ReviewError(f"slice {slice_index} is outside the series", code="seed")
    if not (0 <= row < shape[0] and 0 <= col < shape[1]):
        raise ReviewError("the click is outside the image", code="seed")
    return Seed(level, slice_index, row, col)


def assisted_measure(*, result: VbqResult, seed_data: Any) -> tuple[VbqMeasurement, Seed]:
    """The engine's assisted placement on ``result``'s series and the parsed click (nothing
    saved)."""
    series = load_series(result)
    n, rows, cols = series.pixels.shape
    seed = parse_seed(seed_data, n_slices=n, shape=(rows, cols))
    try:
        measurement = compute_vbq(series.datasets, seed=seed,
                                  fractured_levels=list(result.fractured_levels or []))
    except EngineError as exc:
        raise ReviewError(str(exc), code=getattr(exc, "code", "engine-error")) from exc
    return measurement, seed


def review_assist(*, result: VbqResult, seed_data: Any, actor: Actor) -> VbqResult:
    """Place the ROIs from one click and save them as a new pending ``assisted`` result.

    Raises ``ReviewError`` (nothing saved) for a bad click or when no VBQ could be measured
    from it (the message gives the engine's reasons)."""
    measurement, seed = assisted_measure(result=result, seed_data=seed_data)
    if measurement.vbq_all_levels is None or measurement.csf is None:
        reasons = "; ".join(f.message for f in measurement.qc_flags
                            if f.code != "assisted-placement") or "no VBQ"
        raise ReviewError(f"no ROIs could be placed from this click: {reasons}",
                          code="no-vbq")
    with transaction.atomic():
        return _save(result=result, measurement=measurement, actor=actor, seed=seed)


def _save(*, result: VbqResult, measurement: VbqMeasurement, actor: Actor, seed: Seed
          ) -> VbqResult:
    # one assisted revision at a time per series (the unique constraint's scope)
    ImagingSeries.objects.select_for_update().filter(pk=result.series_id).exists()
    revision = next_revision(result.series_id, measurement.algorithm_version,
                             VbqResult.Source.ASSISTED)
    now = timezone.now()
    new = VbqResult.objects.create(
        series_id=result.series_id, patient_id=result.patient_id,
        algorithm_version=measurement.algorithm_version, source=VbqResult.Source.ASSISTED,
        revision=revision, status=measurement.status,
        review_status=VbqResult.Review.PENDING,
        vbq_all_levels=measurement.vbq_all_levels,
        vbq_excluding_fractured=measurement.vbq_excluding_fractured,
        csf_median_si=measurement.csf.median_si if measurement.csf else None,
        confidence=measurement.confidence,
        qc_flags=[f.__dict__ for f in measurement.qc_flags],
        fractured_levels=measurement.fractured_levels,
        fractured_levels_by_reviewer=result.fractured_levels_by_reviewer,
        field_strength_t=measurement.acquisition.field_strength_t,
        measurement=measurement.to_dict(), started_at=now, finished_at=now,
        review_note=f"placed from one click in {seed.level} on result {result.pk}"[:500],
    )
    rows = [m for lv, m in measurement.levels.items() if lv in STORED_LEVELS]
    if measurement.csf:
        rows.append(measurement.csf)
    VbqLevel.objects.bulk_create([
        VbqLevel(result=new, level=m.level, median_si=m.median_si, pixel_count=m.pixel_count,
                 centroid={"pixel": m.centroid_pixel, "lps_mm": m.centroid_lps_mm},
                 roi=m.roi.__dict__, fractured=m.fractured)
        for m in rows
    ])
    original = VbqResult.objects.select_for_update().get(pk=result.pk)
    if original.review_status == VbqResult.Review.PENDING:
        # the clicked result leaves the queue: the new one takes its place there
        original.review_status = VbqResult.Review.REJECTED
        original.reviewer_id = actor.user_id
        original.reviewed_at = now
        original.review_note = f"superseded by assisted result {new.pk}"
        original.save(update_fields=["review_status", "reviewer", "reviewed_at", "review_note"])
    audit_record(actor=actor, action="create", object_type="VbqResult", object_id=str(new.pk),
                 patient_id=new.patient_id,
                 detail={"review": "assisted", "from_result": result.pk, "revision": revision,
                         "seed": {"level": seed.level, "slice_index": seed.slice_index,
                                  "row": round(seed.row, 1), "col": round(seed.col, 1)}})
    followup_changed(new.patient_id)  # a superseded succeeded result no longer counts
    return new
