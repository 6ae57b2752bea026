"""Column limits of mapped FHIR values, read from the Django model fields (never a hand-kept
list): every string a mapper hands to a registry service is checked against its column's
``max_length``, every integer against its column's range, BEFORE anything is written, so that
an over-long identifier, code, display text, name, study UID or modality list is a 422
OperationOutcome naming the element (FHIR issue type ``too-long``), not a database error.

The service keyword arguments are named after the columns they fill (``code_display`` →
``Procedure.code_display``); an ``Identifier`` fills ``identifier_system`` /
``identifier_value`` (``PatientIdentifier.system`` / ``value`` / ``use`` / ``type_code`` for
a Patient's identifiers) and a ``SeriesInput`` the ``ImagingSeries`` columns of its
attributes. ``ELEMENTS`` only names the FHIR element each column comes from, for the error.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from django.apps import apps
from django.core.exceptions import FieldDoesNotExist
from django.db import connection, models

from integrations.fhir.errors import FhirError

MODELS = {"patient": "registry.Patient", "procedure": "registry.Procedure",
          "fracture": "registry.Fracture", "therapy": "registry.TherapyExposure",
          "imaging": "scoring.ImagingStudy"}

# column → the FHIR element its value comes from (for the error's expression only)
ELEMENTS = {
    "family_name": "name.family", "given_name": "name.given",
    "code_system": "code.coding.system", "code": "code.coding.code",
    "code_display": "code.coding.display", "identifier_system": "identifier.system",
    "identifier_value": "identifier.value", "system": "identifier.system",
    "value": "identifier.value", "use": "identifier.use", "type_code": "identifier.type",
    "study_instance_uid": "identifier.value", "modality": "modality",
    "description": "description", "endpoint_url": "contained.address",
    "rxnorm_code": "medication.coding.code", "atc_code": "medication.coding.code",
    "series_instance_uid": "series.uid", "number": "series.number",
    "instance_count": "series.numberOfInstances", "body_part": "series.bodySite",
    "vertebral_level": "bodySite",
}


@functools.cache
def _limits(model: type[models.Model], name: str) -> tuple[int | None, int | None, int | None]:
    """(max_length, lowest, highest) of ``model.name`` from its field (Nones: no limit or
    no such column); read once per column."""
    try:
        field = model._meta.get_field(name)
    except FieldDoesNotExist:
        return None, None, None
    if not isinstance(field, models.Field):
        return None, None, None
    low = high = None
    if isinstance(field, models.IntegerField):
        low, high = connection.ops.integer_field_range(field.get_internal_type())
    return field.max_length, low, high


def check_value(model: type[models.Model], column: str, value: Any, where: str) -> None:
    """422 when ``value`` does not fit ``model.column`` (string length, integer range)."""
    max_length, low, high = _limits(model, column)
    if max_length is not None and isinstance(value, str) and len(value) > max_length:
        raise FhirError.single(422, "too-long", f"{len(value)} characters: the registry keeps "
                               f"at most {max_length} here", where)
    if (low is not None or high is not None) and isinstance(value, int) and not isinstance(
            value, bool) and ((low is not None and value < low)
                              or (high is not None and value > high)):
        raise FhirError.single(422, "value", f"{value} is out of the registry's range "
                               f"({low} to {high})", where)


def _where(resource_type: str, column: str) -> str:
    return f"{resource_type}.{ELEMENTS.get(column, column)}"


def _check_object(model: type[models.Model], obj: Any, resource_type: str, *,
                  prefix: str = "", columns: dict[str, str] | None = None) -> None:
    """Check a dataclass's fields (``Identifier``, ``SeriesInput``) against ``model``'s
    columns of the same names (or renamed by ``columns``)."""
    for item in dataclasses.fields(obj):
        column = (columns or {}).get(item.name, item.name)
        value = getattr(obj, item.name)
        element = ELEMENTS.get(column, column)
        if prefix and not element.startswith(prefix):
            element = prefix + element
        check_value(model, column, value, f"{resource_type}.{element}")


def check_columns(kind: str, kwargs: dict[str, Any], resource_type: str) -> None:
    """Check the keyword arguments of one registry write of ``kind`` (patient, procedure,
    fracture, therapy, imaging) against the columns they fill. Raises ``FhirError`` (422)."""
    model = apps.get_model(MODELS[kind])
    for name, value in kwargs.items():
        if name == "identifier" and value is not None:
            _check_object(model, value, resource_type, columns={
                "system": "identifier_system", "value": "identifier_value"})
        elif name == "identifiers":
            identifier_model = apps.get_model("registry.PatientIdentifier")
            for ident in value:
                _check_object(identifier_model, ident, resource_type)
        elif name == "series":
            series_model = apps.get_model("scoring.ImagingSeries")
            for series in value:
                _check_object(series_model, series, resource_type, prefix="series.")
        elif isinstance(value, str | int):
            check_value(model, name, value, _where(resource_type, name))
