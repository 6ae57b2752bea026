"""Parse and validate FHIR JSON with fhir.resources (R4B models; R4 payloads of the supported
types validate against them too). Validation errors become OperationOutcome issues with a
FHIRPath-like location."""

from __future__ import annotations

import datetime as dt
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from integrations.fhir.errors import FhirError, Issue

SUPPORTED_TYPES = (
    "Patient", "Procedure", "Condition", "Encounter", "MedicationRequest", "MedicationDispense",
    "MedicationAdministration", "MedicationStatement", "ImagingStudy",
)


def _location(resource_type: str, loc: tuple[Any, ...]) -> str:
    path = resource_type
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif str(part) not in {"function-after", "function-before", "function-wrap"}:
            path += f".{part}"
    return path


def parse_resource(data: Any, *, expression_prefix: str = "") -> Any:
    """Validate one resource dict; return the fhir.resources model. Raises ``FhirError``."""
    where = expression_prefix or "resource"
    if not isinstance(data, dict):
        raise FhirError.single(400, "structure", "a resource must be a JSON object", where)
    resource_type = data.get("resourceType")
    if not isinstance(resource_type, str) or not resource_type:
        raise FhirError.single(400, "required", "resourceType is missing",
                               f"{where}.resourceType" if expression_prefix else "resourceType")
    try:
        model = get_fhir_model_class(resource_type)
    except (KeyError, ValueError) as exc:
        raise FhirError.single(400, "not-supported", f"unknown resourceType {resource_type!r}",
                               "resourceType") from exc
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        issues = []
        for err in exc.errors()[:20]:
            code = "required" if err.get("type") == "missing" else "value"
            issues.append(Issue("error", code, f"{err.get('msg')}",
                                [_location(resource_type, tuple(err.get("loc", ())))]))
        raise FhirError(400, issues) from exc
    except (TypeError, ValueError, AttributeError, KeyError, RecursionError,
            OverflowError) as exc:  # (a shape the models do not handle)
        raise FhirError.single(400, "invalid", f"{type(exc).__name__}: {exc}"[:300],
                               where if expression_prefix else resource_type) from exc


# Dates the registry accepts: anything outside is a data error (and, at the extremes, a
# date whose conversion to UTC or to the clinic's day would overflow Python's datetime).
EARLIEST_YEAR = 1800
LATEST_YEAR = 2200


def fhir_datetime(value: Any, where: str = "") -> dt.datetime | dt.date | None:
    """fhir.resources gives datetime/date objects (or strings for partial dates). A date or
    time outside the years ``EARLIEST_YEAR``–``LATEST_YEAR`` (checked before any time zone
    conversion, so an offset of -12:00 on 9999-12-31 cannot overflow) or a partial date that
    is not a date is a 422 naming ``where``."""
    if value is None:
        return None
    if isinstance(value, dt.datetime | dt.date):
        parsed = value
    else:
        text = str(value)
        try:
            if len(text) == 4:
                parsed = dt.date(int(text), 1, 1)
            elif len(text) == 7:
                parsed = dt.date(int(text[:4]), int(text[5:7]), 1)
            else:
                parsed = dt.date.fromisoformat(text[:10])
        except ValueError as exc:
            raise FhirError.single(400, "value", f"{text[:40]!r} is not a date",
                                   where) from exc
    if not EARLIEST_YEAR <= parsed.year <= LATEST_YEAR:
        raise FhirError.single(422, "value", f"the year {parsed.year} is outside the "
                               f"registry's range ({EARLIEST_YEAR}–{LATEST_YEAR})", where)
    return parsed
