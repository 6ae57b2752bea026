"""Write paths of the registry core: patients, procedures, fractures, therapy, merges.
Keyword-only, typed, one transaction each. Their shared side effects (actor, audit rows,
follow-up marks, deferral) are ``registry.side_effects``; feeds are ``registry.feeds``.

Every service validates its input and raises ``RegistryValidationError`` (a Django
``ValidationError`` naming the field) before touching the database; the database constraints
and triggers are the second line of defence.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from registry import codes, events
from registry.lookup import patients_by_identifier
from registry.models import (
    VERTEBRAL_LEVELS,
    Alert,
    AuditAction,
    ExposureKind,
    ExposureStatus,
    Fracture,
    FractureSite,
    Patient,
    PatientIdentifier,
    Procedure,
    ProcedureKind,
    RecordStatus,
    Sex,
    TherapyExposure,
)
from registry.side_effects import (
    SYSTEM_ACTOR,
    Actor,
    audit_record,
    followup_changed,
)
from registry.timeutil import clinic_date, clinic_today

logger = logging.getLogger(__name__)


class ConcurrentWriteError(IntegrityError):
    """Another transaction wrote the same identifier first; retrying the whole unit succeeds."""


class RegistryValidationError(ValidationError):
    """Invalid clinical input. ``field`` names the offending element."""

    def __init__(self, message: str, *, field: str = "", code: str = "invalid") -> None:
        super().__init__(message, code=code)
        self.field = field


@dataclass(frozen=True)
class Identifier:
    system: str
    value: str
    use: str = ""
    type_code: str = ""


_SEXES = frozenset(Sex.values)
_FRACTURE_SITES = frozenset(FractureSite.values)
_EXPOSURE_KINDS = frozenset(ExposureKind.values)
_EXPOSURE_STATUSES = frozenset(ExposureStatus.values)


def _check_not_future(day: dt.date | None, field: str) -> None:
    if day is not None and day > clinic_today():
        raise RegistryValidationError(f"{field} is in the future", field=field, code="future")


def _check_after_birth(patient: Patient, day: dt.date, field: str) -> None:
    if patient.birth_date and day < patient.birth_date:
        raise RegistryValidationError(
            f"{field} is before the patient's birth date", field=field, code="before-birth"
        )


def _aware(moment: dt.datetime, field: str) -> dt.datetime:
    if timezone.is_naive(moment):
        raise RegistryValidationError(f"{field} needs a time zone", field=field, code="naive")
    return moment


def patient_check(
    *,
    identifiers: Sequence[Identifier],
    sex: str,
    birth_date: dt.date | None,
    deceased_on: dt.date | None,
) -> None:
    """Validate a patient's identifiers, sex and dates (single and bulk write paths)."""
    if not identifiers:
        raise RegistryValidationError("at least one identifier is required", field="identifier")
    for ident in identifiers:
        if not ident.system or not ident.value:
            raise RegistryValidationError(
                "identifier needs both system and value", field="identifier"
            )
    if sex not in _SEXES:
        raise RegistryValidationError(f"unknown sex {sex!r}", field="gender")
    _check_not_future(birth_date, "birthDate")
    _check_not_future(deceased_on, "deceasedDateTime")
    if birth_date and deceased_on and deceased_on < birth_date:
        raise RegistryValidationError(
            "deceased date is before birth date", field="deceasedDateTime", code="before-birth"
        )


# Patient fields that a feed's Patient (FHIR) does not carry: an update that does not give
# them (None) keeps them.
KEPT_UNLESS_GIVEN = ("last_contact_on", "bmi_kg_m2", "care_team", "is_synthetic")
_NEW_PATIENT_DEFAULTS = {"last_contact_on": None, "bmi_kg_m2": None, "care_team": "",
                         "is_synthetic": False}


def kept_unless_given(values: dict[str, Any], patient: Patient | None) -> dict[str, Any]:
    """``values`` with each ``KEPT_UNLESS_GIVEN`` field left at None replaced by the
    patient's current value (by the default for a new patient: ``patient`` None)."""
    out = dict(values)
    for name in KEPT_UNLESS_GIVEN:
        if out.get(name) is None:
            out[name] = (getattr(patient, name) if patient is not None
                         else _NEW_PATIENT_DEFAULTS[name])
    return out


@transaction.atomic
def patient_upsert(
    *,
    identifiers: Sequence[Identifier],
    family_name: str = "",
    given_name: str = "",
    birth_date: dt.date | None = None,
    sex: str = Sex.UNKNOWN,
    deceased_on: dt.date | None = None,
    last_contact_on: dt.date | None = None,
    bmi_kg_m2: Decimal | float | None = None,
    care_team: str | None = None,
    is_synthetic: bool | None = None,
    actor: Actor = SYSTEM_ACTOR,
) -> tuple[Patient, bool]:
    """Create or update the patient that holds any of ``identifiers``.

    Returns ``(patient, created)``. Identifiers not yet known are attached. Raises
    ``RegistryValidationError`` when identifiers are missing, belong to two different
    patients, or dates are impossible. ``KEPT_UNLESS_GIVEN`` fields (care team, last contact,
    BMI, SYNTHETIC flag: registry data that a FHIR Patient does not carry) left at ``None``
    keep the patient's value on an update (a new patient gets the model default).
    """
    patient_check(identifiers=identifiers, sex=sex, birth_date=birth_date,
                  deceased_on=deceased_on)
    # the known identifiers and their patient, both locked (one index lookup per identifier)
    known = patients_by_identifier({(i.system, i.value) for i in identifiers}, lock=True)
    owners = {p.pk for p in known.values()}
    if len(owners) > 1:
        raise RegistryValidationError(
            "identifiers belong to different registry patients (merge them first)",
            field="identifier",
            code="conflict",
        )
    fields = {
        "family_name": family_name,
        "given_name": given_name,
        "birth_date": birth_date,
        "sex": sex,
        "deceased_on": deceased_on,
        "last_contact_on": last_contact_on,
        "bmi_kg_m2": Decimal(str(bmi_kg_m2)) if bmi_kg_m2 is not None else None,
        "care_team": care_team,
        "is_synthetic": is_synthetic,
    }
    created = not owners
    if created:
        patient = Patient.objects.create(**kept_unless_given(fields, None))
    else:
        patient = next(iter(known.values()))  # locked by the lookup
        fields = kept_unless_given(fields, patient)
        if birth_date and earliest_event_date(patient) and birth_date > earliest_event_date(
            patient
        ):
            raise RegistryValidationError(
                "birth date is after recorded procedures or fractures",
                field="birthDate",
                code="before-birth",
            )
        for name, value in fields.items():
            setattr(patient, name, value)
        patient.save()
    for ident in identifiers:
        if (ident.system, ident.value) not in known:
            try:
                with transaction.atomic():
                    PatientIdentifier.objects.create(
                        patient=patient,
                        system=ident.system,
                        value=ident.value,
                        use=ident.use,
                        type_code=ident.type_code,
                    )
            except IntegrityError as exc:  # a concurrent writer attached it first
                raise ConcurrentWriteError(
                    "identifier was claimed concurrently; retry the transaction"
                ) from exc
    audit_record(
        actor=actor,
        action=AuditAction.CREATE if created else AuditAction.UPDATE,
        object_type="Patient",
        object_id=str(patient.pk),
        patient_id=patient.pk,
    )
    if deceased_on is not None and not created:
        followup_changed(patient.pk)
    logger.debug("patient_upsert patient=%s created=%s", patient.pk, created)
    return patient, created


def earliest_event_date(patient: Patient) -> dt.date | None:
    dates = [
        d
        for d in (
            patient.procedures.order_by("performed_on").values_list("performed_on", flat=True)
            .first(),
            patient.fractures.order_by("diagnosed_on").values_list("diagnosed_on", flat=True)
            .first(),
        )
        if d is not None
    ]
    return min(dates) if dates else None


def _validate_levels(levels: Iterable[str], field: str) -> list[str]:
    out = []
    for level in levels:
        level = level.strip().upper()
        if level not in VERTEBRAL_LEVELS:
            raise RegistryValidationError(f"unknown vertebral level {level!r}", field=field)
        out.append(level)
    return sorted(set(out), key=VERTEBRAL_LEVELS.index)


def _upsert_sourced(model: type, identifier: Identifier | None, values: dict[str, Any]) -> tuple[
    Any, bool
]:
    """Update-or-create on the business identifier (or create when there is none)."""
    obj, created, _ = _upsert_sourced_previous(model, identifier, values)
    return obj, created


def _upsert_sourced_previous(model: type, identifier: Identifier | None,
                             values: dict[str, Any]) -> tuple[Any, bool, Any]:
    """``_upsert_sourced`` that also returns the row as it was before the update (an unsaved
    copy; None when created): a re-send may move the record to another patient (an EHR misfile
    correction), whose side effects then concern both. The same statements as
    ``update_or_create`` (its locked read is the "before")."""
    if identifier is None or not identifier.value:
        return model.objects.create(**values), True, None
    with transaction.atomic():
        obj, created = model.objects.select_for_update().get_or_create(
            values, identifier_system=identifier.system, identifier_value=identifier.value)
        if created:
            return obj, True, None
        previous = copy.copy(obj)
        for name, value in values.items():
            setattr(obj, name, value)
        obj.save(update_fields=[*values, *(f.name for f in model._meta.concrete_fields
                                           if getattr(f, "auto_now", False)
                                           and f.name not in values)])
    return obj, False, previous


def _moved_from(previous: Any, patient: Patient) -> list[Any]:
    """The patient a re-sent record belonged to before this write, if another one (as a
    list: ``[]`` or ``[id]``)."""
    if previous is None or previous.patient_id == patient.pk:
        return []
    return [previous.patient_id]


def procedure_values(
    *,
    patient: Patient,
    code_system: str,
    code: str,
    performed_at: dt.datetime,
    code_display: str = "",
    levels: Iterable[str] = (),
    record_status: str = RecordStatus.ACTIVE,
) -> dict[str, Any]:
    """Validate a vertebroplasty/kyphoplasty and return the Procedure's field values.
    Raises for a non-qualifying code or bad dates. Shared by the single and bulk write paths."""
    kind = codes.procedure_kind(code_system, code)
    if kind is None:
        raise RegistryValidationError(
            f"{code_system}|{code} is not a vertebroplasty/kyphoplasty code",
            field="code",
            code="code-invalid",
        )
    performed_at = _aware(performed_at, "performedDateTime")
    performed_on = clinic_date(performed_at)
    _check_not_future(performed_on, "performedDateTime")
    _check_after_birth(patient, performed_on, "performedDateTime")
    return {
        "patient": patient,
        "kind": ProcedureKind(kind),
        "code_system": code_system,
        "code": code,
        "code_display": code_display,
        "performed_at": performed_at,
        "performed_on": performed_on,
        "levels": _validate_levels(levels, "bodySite"),
        "record_status": record_status,
    }


@transaction.atomic
def procedure_record(
    *,
    patient: Patient,
    code_system: str,
    code: str,
    performed_at: dt.datetime,
    code_display: str = "",
    levels: Iterable[str] = (),
    identifier: Identifier | None = None,
    record_status: str = RecordStatus.ACTIVE,
    actor: Actor = SYSTEM_ACTOR,
) -> tuple[Procedure, bool]:
    """Record a vertebroplasty/kyphoplasty. Raises for a non-qualifying code or bad dates."""
    values = procedure_values(
        patient=patient, code_system=code_system, code=code, performed_at=performed_at,
        code_display=code_display, levels=levels, record_status=record_status,
    )
    proc, created, previous = _upsert_sourced_previous(Procedure, identifier, values)
    moved_from = _moved_from(previous, patient)
    audit_record(
        actor=actor,
        action=AuditAction.CREATE if created else AuditAction.UPDATE,
        object_type="Procedure",
        object_id=str(proc.pk),
        patient_id=patient.pk,
        detail={"moved_from_patient": str(moved_from[0])} if moved_from else None,
    )
    # A re-send under the same identifier for another patient (misfile correction): the
    # former patient lost it (their index procedure, studies and levels may change too).
    for pid in [patient.pk, *moved_from]:
        followup_changed(pid)
    procedures_recorded([patient.pk, *moved_from])
    fractured_levels_changed([patient.pk, *moved_from], actor)
    return proc, created


def fractured_levels_changed(patient_ids: Iterable[Any], actor: Actor) -> None:
    """A fracture or procedure was written for these patients: their VBQ results' fractured
    levels are recomputed from the stored level medians (``events.fractured_levels_changed``:
    scoring does it, in this transaction)."""
    events.fractured_levels_changed.send(sender=Patient, patient_ids=list(patient_ids),
                                         actor=actor)


def procedures_recorded(patient_ids: Iterable[Any]) -> None:
    """A procedure may be (or change) the index procedure: the patients' studies not linked
    yet are linked again (``events.procedures_recorded``: scoring does it)."""
    events.procedures_recorded.send(sender=Patient, patient_ids=list(patient_ids))


def fracture_values(
    *,
    patient: Patient,
    site: str,
    diagnosed_at: dt.datetime,
    vertebral_level: str = "",
    code_system: str = "",
    code: str = "",
    code_display: str = "",
    record_status: str = RecordStatus.ACTIVE,
) -> dict[str, Any]:
    """Validate a fragility fracture diagnosis and return the Fracture's field values."""
    if site not in _FRACTURE_SITES:
        raise RegistryValidationError(f"unknown fracture site {site!r}", field="bodySite")
    level = ""
    if vertebral_level:
        if site != FractureSite.VERTEBRAL:
            raise RegistryValidationError(
                "a vertebral level is only valid for a vertebral fracture", field="bodySite"
            )
        level = _validate_levels([vertebral_level], "bodySite")[0]
    diagnosed_at = _aware(diagnosed_at, "onsetDateTime")
    diagnosed_on = clinic_date(diagnosed_at)
    _check_not_future(diagnosed_on, "onsetDateTime")
    _check_after_birth(patient, diagnosed_on, "onsetDateTime")
    return {
        "patient": patient,
        "site": site,
        "vertebral_level": level,
        "code_system": code_system,
        "code": code,
        "code_display": code_display,
        "diagnosed_at": diagnosed_at,
        "diagnosed_on": diagnosed_on,
        "record_status": record_status,
    }


@transaction.atomic
def fracture_record(
    *,
    patient: Patient,
    site: str,
    diagnosed_at: dt.datetime,
    vertebral_level: str = "",
    code_system: str = "",
    code: str = "",
    code_display: str = "",
    identifier: Identifier | None = None,
    record_status: str = RecordStatus.ACTIVE,
    actor: Actor = SYSTEM_ACTOR,
) -> tuple[Fracture, bool]:
    """Record a fragility fracture diagnosis."""
    values = fracture_values(
        patient=patient, site=site, diagnosed_at=diagnosed_at, vertebral_level=vertebral_level,
        code_system=code_system, code=code, code_display=code_display,
        record_status=record_status,
    )
    fracture, created, previous = _upsert_sourced_previous(Fracture, identifier, values)
    moved_from = _moved_from(previous, patient)
    audit_record(
        actor=actor,
        action=AuditAction.CREATE if created else AuditAction.UPDATE,
        object_type="Fracture",
        object_id=str(fracture.pk),
        patient_id=patient.pk,
        detail={"moved_from_patient": str(moved_from[0])} if moved_from else None,
    )
    for pid in [patient.pk, *moved_from]:  # a re-send for another patient: both
        followup_changed(pid)
    # Only a vertebral fracture (before or after this write) can change fractured levels: a
    # hip or wrist one costs no recompute statement.
    if site == FractureSite.VERTEBRAL or (
            previous is not None and previous.site == FractureSite.VERTEBRAL):
        fractured_levels_changed([patient.pk, *moved_from], actor)
    return fracture, created


def therapy_values(
    *,
    patient: Patient,
    agent: str,
    kind: str,
    start_on: dt.date,
    end_on: dt.date | None = None,
    status: str = ExposureStatus.ACTIVE,
    route: str = "",
    rxnorm_code: str = "",
    atc_code: str = "",
    record_status: str = RecordStatus.ACTIVE,
) -> dict[str, Any]:
    """Validate an anti-osteoporosis medication exposure and return its field values."""
    if agent not in codes.AGENTS:
        raise RegistryValidationError(
            f"{agent!r} is not an anti-osteoporosis agent", field="medication"
        )
    if kind not in _EXPOSURE_KINDS:
        raise RegistryValidationError(f"unknown exposure kind {kind!r}", field="resourceType")
    if status not in _EXPOSURE_STATUSES:
        raise RegistryValidationError(f"unknown status {status!r}", field="status")
    _check_not_future(start_on, "effective")
    _check_after_birth(patient, start_on, "effective")
    if end_on is not None and end_on < start_on:
        raise RegistryValidationError("end is before start", field="effective.end")
    return {
        "patient": patient,
        "agent": agent,
        "kind": kind,
        "status": status,
        "route": route,
        "rxnorm_code": rxnorm_code,
        "atc_code": atc_code,
        "start_on": start_on,
        "end_on": end_on,
        "record_status": record_status,
    }


@transaction.atomic
def therapy_record(
    *,
    patient: Patient,
    agent: str,
    kind: str,
    start_on: dt.date,
    end_on: dt.date | None = None,
    status: str = ExposureStatus.ACTIVE,
    route: str = "",
    rxnorm_code: str = "",
    atc_code: str = "",
    identifier: Identifier | None = None,
    record_status: str = RecordStatus.ACTIVE,
    actor: Actor = SYSTEM_ACTOR,
) -> tuple[TherapyExposure, bool]:
    """Record an anti-osteoporosis medication exposure (order, dispense, administration...)."""
    values = therapy_values(
        patient=patient, agent=agent, kind=kind, start_on=start_on, end_on=end_on,
        status=status, route=route, rxnorm_code=rxnorm_code, atc_code=atc_code,
        record_status=record_status,
    )
    exposure, created = _upsert_sourced(TherapyExposure, identifier, values)
    audit_record(
        actor=actor,
        action=AuditAction.CREATE if created else AuditAction.UPDATE,
        object_type="TherapyExposure",
        object_id=str(exposure.pk),
        patient_id=patient.pk,
    )
    followup_changed(patient.pk)
    return exposure, created


@transaction.atomic
def patient_merge(*, source: Patient, target: Patient, actor: Actor = SYSTEM_ACTOR) -> Patient:
    """Merge ``source`` into ``target`` (e.g. a FHIR Patient.link ``replaced-by``): every record
    and identifier moves to the target; the source stays as a tombstone (``merged_into``)."""
    if source.pk == target.pk:
        return target
    if target.merged_into_id is not None:
        raise RegistryValidationError("the merge target is itself merged away", field="link")
    for model in (Procedure, Fracture, TherapyExposure):
        model.objects.filter(patient=source).update(patient=target)
    # scoring moves the source's imaging studies and VBQ results (events.patient_merged)
    events.patient_merged.send(sender=Patient, source=source, target=target)
    # Unresolved alerts of the source are closed: the target's own rules decide afresh.
    Alert.objects.filter(patient=source, status__in=["open", "acknowledged", "snoozed"]).update(
        status="resolved", resolved_at=timezone.now(), resolution_reason="not-appropriate")
    PatientIdentifier.objects.filter(patient=source).update(patient=target)
    Patient.objects.filter(pk=source.pk).update(merged_into=target)
    audit_record(actor=actor, action=AuditAction.UPDATE, object_type="Patient",
                 object_id=str(target.pk), patient_id=target.pk,
                 detail={"merged_from": str(source.pk)})
    followup_changed(target.pk)
    fractured_levels_changed([target.pk], actor)  # the target's fractures and index decide
    return target
