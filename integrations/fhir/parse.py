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
    except (TypeError, ValueError) as exc:
        raise FhirError.single(400, "invalid", str(exc)[:300], resource_type) from exc


def fhir_datetime(value: Any) -> dt.datetime | dt.date | None:
    """fhir.resources gives datetime/date objects (or strings for partial dates)."""
    if value is None:
        return None
    if isinstance(value, dt.datetime | dt.date):
        return value
    text = str(value)
    if len(text) == 4:
        return dt.date(int(text), 1, 1)
    if len(text) == 7:
        return dt.date(int(text[:4]), int(text[5:7]), 1)
    return dt.date.fromisoformat(text[:10])
