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


def _misfit(model: type[models.Model], column: str, value: Any) -> FhirError | None:
    """Why ``value`` does not fit ``model.column`` (string length, integer range), as a 422
    without its expression; ``None`` when it fits."""
    max_length, low, high = _limits(model, column)
    if max_length is not None:
        if isinstance(value, str) and len(value) > max_length:
            return FhirError.single(422, "too-long", f"{len(value)} characters: the registry "
                                    f"keeps at most {max_length} here")
    elif (low is not None or high is not None) and isinstance(value, int) and not isinstance(
            value, bool) and ((low is not None and value < low)
                              or (high is not None and value > high)):
        return FhirError.single(422, "value", f"{value} is out of the registry's range "
                                f"({low} to {high})")
    return None


def _refuse(error: FhirError, where: str) -> FhirError:
    error.issues[0].expression = [where]
    return error


def check_value(model: type[models.Model], column: str, value: Any, where: str) -> None:
    """422 naming ``where`` when ``value`` does not fit ``model.column``."""
    error = _misfit(model, column, value)
    if error is not None:
        raise _refuse(error, where)


@functools.cache
def _model(label: str) -> type[models.Model]:
    return apps.get_model(label)


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


def _check_object(model: type[models.Model], obj: Any, resource_type: str, *,
                  prefix: str = "", columns: dict[str, str] | None = None) -> None:
    """Check a dataclass's fields (``Identifier``, ``SeriesInput``) against ``model``'s
    columns of the same names (or renamed by ``columns``)."""
    for name in _field_names(type(obj)):
        column = columns.get(name, name) if columns else name
        error = _misfit(model, column, getattr(obj, name))
        if error is not None:
            element = ELEMENTS.get(column, column)
            if prefix and not element.startswith(prefix):
                element = prefix + element
            raise _refuse(error, f"{resource_type}.{element}")


IDENTIFIER_COLUMNS = {"system": "identifier_system", "value": "identifier_value"}


def check_columns(kind: str, kwargs: dict[str, Any], resource_type: str) -> None:
    """Check the keyword arguments of one registry write of ``kind`` (patient, procedure,
    fracture, therapy, imaging) against the columns they fill. Raises ``FhirError`` (422)."""
    model = _model(MODELS[kind])
    for name, value in kwargs.items():
        if name == "identifier" and value is not None:
            _check_object(model, value, resource_type, columns=IDENTIFIER_COLUMNS)
        elif name == "identifiers":
            identifier_model = _model("registry.PatientIdentifier")
            for ident in value:
                _check_object(identifier_model, ident, resource_type)
        elif name == "series":
            series_model = _model("scoring.ImagingSeries")
            for series in value:
                _check_object(series_model, series, resource_type, prefix="series.")
        elif isinstance(value, str | int):
            error = _misfit(model, name, value)
            if error is not None:
                raise _refuse(error, f"{resource_type}.{ELEMENTS.get(name, name)}")
