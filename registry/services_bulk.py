"""Bulk variants of the registry write paths, for feeds that send many records at once (a FHIR
transaction bundle, a Bulk Data import batch).

Same validation as the single-record services (``patient_check``, ``procedure_values``, ...) and
the same rows, audit events and follow-up re-evaluations, but a constant number of queries per
call instead of several per record:

- patients: one locked SELECT of the known identifiers, one upsert of the new and changed
  patients (unchanged ones are not rewritten), one INSERT of the new identifiers;
- procedures, fractures, therapy: ONE statement on PostgreSQL, each model's ``INSERT ...
  SELECT FROM json_populate_recordset(...) ON CONFLICT (identifier) DO UPDATE ... RETURNING``
  a data-modifying CTE (a concurrent sender's row is updated, not duplicated), the final
  SELECT also reading the patient an updated record had before it (a re-send for another
  patient concerns both); other databases read those patients in one query, then fall back to
  the single-record upsert per row;
- audit rows and follow-up re-evaluation (once per patient) through ``deferred_side_effects``.

Items are dicts of the single service's keyword arguments (without ``actor``). An item that fails
validation raises ``RegistryValidationError`` with ``index`` set to its position in ``items``,
before anything is written. Call inside the caller's transaction.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from django.db import IntegrityError, connection, models

from db.pg import (
    StatementPart,
    dedupe_rows,
    expand_results,
    insert_rows,
    json_param,
    pg_execute,
    pg_insert_sql,
    upsert_returning,
)
from registry.lookup import patients_by_identifier
from registry.models import (
    AuditAction,
    Fracture,
    Patient,
    PatientIdentifier,
    Procedure,
    TherapyExposure,
)
from registry.services import (
    ConcurrentWriteError,
    RegistryValidationError,
    earliest_event_date,
    fracture_values,
    fractured_levels_changed,
    kept_unless_given,
    patient_check,
    procedure_values,
    procedures_recorded,
    therapy_values,
)
from registry.side_effects import (
    SYSTEM_ACTOR,
    Actor,
    audit_record,
    deferred_side_effects,
    followup_changed,
)

# The partial unique index of SourcedRecord identifiers (``condition=~Q(identifier_value="")``).
SOURCED_CONFLICT = ["identifier_system", "identifier_value"]
SOURCED_CONFLICT_WHERE = "NOT (\"identifier_value\" = '')"


def _indexed(exc: RegistryValidationError, index: int) -> RegistryValidationError:
    exc.index = index  # type: ignore[attr-defined]
    return exc



PATIENT_FIELDS = ("family_name", "given_name", "birth_date", "sex", "deceased_on",
                  "last_contact_on", "bmi_kg_m2", "care_team", "is_synthetic")


def patient_upsert_many(*, items: Sequence[dict[str, Any]], actor: Actor = SYSTEM_ACTOR,
                        known: dict[tuple[str, str], Patient] | None = None,
                        deferred: list[StatementPart] | None = None
                        ) -> list[tuple[Patient, bool]]:
    """``patient_upsert`` for many patients: ``(patient, created)`` per item, in order. Two
    items sharing an identifier are the same patient (the later values win). ``known``: the
    caller's ``lookup_patients(<every identifier of the items>, lock=True)`` of this
    transaction (else it is looked up here).

    ``deferred`` (PostgreSQL): when every written patient is NEW, their INSERT (with their
    identifiers) is appended there as a ``StatementPart`` instead of being run: the caller
    runs it with its next bulk statement (``sourced_record_many(extra=...)``), one round trip
    fewer, and must run it before anything reads these patients from the database. Their
    rows are then inserted by the same statement as their clinical records: the records'
    foreign keys are checked at commit, their dates against the patient in Python
    (``procedure_values``...) and by the birth-date triggers at the end of the statement
    (``registry/0004``), and no other transaction can see a new patient before commit.
    Updated patients are always written at once."""
    for n, item in enumerate(items):
        try:
            patient_check(identifiers=item["identifiers"], sex=item.get("sex", "unknown"),
                          birth_date=item.get("birth_date"), deceased_on=item.get("deceased_on"))
        except RegistryValidationError as exc:
            raise _indexed(exc, n) from exc
    keys = {(i.system, i.value) for item in items for i in item["identifiers"]}
    owner_of = dict(known) if known is not None else patients_by_identifier(keys, lock=True)
    new: dict[Any, Patient] = {}
    changed: dict[Any, Patient] = {}
    new_identifiers: list[dict[str, Any]] = []
    results: list[tuple[Patient, bool]] = []
    for n, item in enumerate(items):
        item_keys = [(i.system, i.value) for i in item["identifiers"]]
        owners = {owner_of[k].pk: owner_of[k] for k in item_keys if k in owner_of}
        if len(owners) > 1:
            raise _indexed(RegistryValidationError(
                "identifiers belong to different registry patients (merge them first)",
                field="identifier", code="conflict"), n)
        values = {name: item.get(name) for name in PATIENT_FIELDS}
        values.update(sex=item.get("sex") or "unknown", family_name=values["family_name"] or "",
                      given_name=values["given_name"] or "")
        if values["bmi_kg_m2"] is not None:
            values["bmi_kg_m2"] = Decimal(str(values["bmi_kg_m2"]))
        if values["is_synthetic"] is not None:
            values["is_synthetic"] = bool(values["is_synthetic"])
        created = not owners
        if created:
            patient = Patient(**kept_unless_given(values, None))
            new[patient.pk] = patient
        else:
            patient = next(iter(owners.values()))
            # care team, BMI... not given: kept (for a patient new in this call too)
            values = kept_unless_given(values, patient)
            birth = values["birth_date"]
            if (patient.pk not in new and birth and birth != patient.birth_date
                    and (earliest := earliest_event_date(patient)) and birth > earliest):
                raise _indexed(RegistryValidationError(
                    "birth date is after recorded procedures or fractures", field="birthDate",
                    code="before-birth"), n)
            if any(getattr(patient, name) != value for name, value in values.items()):
                for name, value in values.items():
                    setattr(patient, name, value)
                if patient.pk not in new:
                    changed[patient.pk] = patient
        for ident, key in zip(item["identifiers"], item_keys, strict=True):
            if key not in owner_of:
                owner_of[key] = patient
                new_identifiers.append({
                    "patient": patient, "system": ident.system, "value": ident.value,
                    "use": ident.use, "type_code": ident.type_code})
        results.append((patient, created))
    # New and changed patients in one statement (unchanged ones are not rewritten).
    patient_rows = [{f.attname: getattr(p, f.attname) for f in Patient._meta.concrete_fields}
                    for p in [*new.values(), *changed.values()]]
    if patient_rows and new_identifiers and connection.vendor == "postgresql":
        # Patients and their new identifiers in ONE statement (a data-modifying CTE; the
        # identifiers' foreign key is checked at commit).
        p_sql, p_records = pg_insert_sql(Patient, patient_rows, ["id"], PATIENT_FIELDS, "")
        i_sql, i_records = pg_insert_sql(PatientIdentifier, new_identifiers, (), (), "")
        if deferred is not None and not changed:
            # only NEW patients: the caller writes them with its next bulk statement
            deferred.append(StatementPart(
                ctes=[f"patients AS ({p_sql})", f"patient_identifiers AS ({i_sql})"],
                params=[json_param(p_records), json_param(i_records)],
                select="SELECT NULL::bigint, NULL::boolean, NULL::text WHERE false",
                finish=lambda _rows: []))
        else:
            _write_patients(p_sql, i_sql, p_records, i_records)
        new_identifiers = []
    else:
        upsert_returning(Patient, patient_rows, conflict=["id"], update=PATIENT_FIELDS)
    if new_identifiers:
        try:  # no savepoint: on a conflict the caller retries the whole transaction
            insert_rows(PatientIdentifier, new_identifiers)
        except IntegrityError as exc:  # a concurrent writer attached one first
            raise ConcurrentWriteError(
                "identifier was claimed concurrently; retry the transaction") from exc
    with deferred_side_effects():
        for patient, created in results:
            audit_record(actor=actor, action=AuditAction.CREATE if created
                         else AuditAction.UPDATE, object_type="Patient",
                         object_id=str(patient.pk), patient_id=patient.pk)
            if patient.deceased_on is not None and not created:
                followup_changed(patient.pk)
    return results


def _write_patients(p_sql: str, i_sql: str, p_records: list[dict[str, Any]],
                    i_records: list[dict[str, Any]]) -> None:
    try:
        pg_execute(f"WITH patients AS ({p_sql}) {i_sql}", [
            json_param(p_records), json_param(i_records)])
    except IntegrityError as exc:  # a concurrent writer attached an identifier first
        raise ConcurrentWriteError(
            "identifier was claimed concurrently; retry the transaction") from exc


# --- Sourced clinical records -------------------------------------------------------------------
def _sourced_rows(build: Callable[..., dict[str, Any]], items: Sequence[dict[str, Any]]
                  ) -> list[dict[str, Any]]:
    rows = []
    for n, item in enumerate(items):
        kwargs = dict(item)
        identifier = kwargs.pop("identifier", None)
        try:
            values = build(**kwargs)
        except RegistryValidationError as exc:
            raise _indexed(exc, n) from exc
        has_id = identifier is not None and bool(identifier.value)
        values["identifier_system"] = identifier.system if has_id else ""
        values["identifier_value"] = identifier.value if has_id else ""
        rows.append(values)
    return rows


def _sourced_side_effects(model: type[models.Model], results: Sequence[tuple[Any, bool]],
                          rows: Sequence[dict[str, Any]], actor: Actor,
                          refresh_fractured: bool = True,
                          previous: Sequence[Any] | None = None) -> list[Any]:
    """Audit rows, follow-up re-evaluation and, for procedures and fractures, the patients'
    studies re-linked and (``refresh_fractured``: unless the caller does it once for several
    kinds) their VBQ results' fractured levels recomputed. ``previous``: per item, the patient
    the record had before the upsert (None: new, or unknown); a record re-sent for another
    patient (an EHR misfile correction) concerns both. Returns the former patients."""
    moved_from: list[Any] = []
    with deferred_side_effects():
        for n, ((pk, created), values) in enumerate(zip(results, rows, strict=True)):
            patient_id = values["patient"].pk
            before = previous[n] if previous else None
            moved = before is not None and str(before) != str(patient_id)
            audit_record(actor=actor, action=AuditAction.CREATE if created
                         else AuditAction.UPDATE, object_type=model.__name__,
                         object_id=str(pk), patient_id=patient_id,
                         detail={"moved_from_patient": str(before)} if moved else None)
            followup_changed(patient_id)
            if moved:
                followup_changed(uuid.UUID(str(before)))
                moved_from.append(before)
        if model is Procedure and rows:
            procedures_recorded([values["patient"].pk for values in rows] + moved_from)
        if refresh_fractured and model in (Procedure, Fracture) and rows:
            fractured_levels_changed([values["patient"].pk for values in rows] + moved_from,
                                      actor)
    return moved_from


def _sourced_many(model: type[models.Model], build: Callable[..., dict[str, Any]],
                  items: Sequence[dict[str, Any]], actor: Actor) -> list[tuple[Any, bool]]:
    kind = next(k for k, (m, _) in SOURCED_KINDS.items() if m is model)
    return sourced_record_many(groups={kind: items}, actor=actor).get(kind, [])


def _previous_patients_orm(model: type[models.Model], rows: Sequence[dict[str, Any]]
                           ) -> list[Any]:
    """Other databases: per row, the patient of the record already holding its identifier
    (None: none), in one query before the upsert."""
    keys = {(r["identifier_system"], r["identifier_value"]) for r in rows
            if r["identifier_value"]}
    if not keys:
        return [None] * len(rows)
    match = models.Q()
    for system, value in keys:
        match |= models.Q(identifier_system=system, identifier_value=value)
    held = {(system, value): patient_id for system, value, patient_id in
            model._default_manager.select_for_update().filter(match).values_list(
                "identifier_system", "identifier_value", "patient_id")}
    return [held.get((r["identifier_system"], r["identifier_value"])) if r["identifier_value"]
            else None for r in rows]


SOURCED_KINDS: dict[str, tuple[type[models.Model], Callable[..., dict[str, Any]]]] = {
    "procedure": (Procedure, procedure_values),
    "fracture": (Fracture, fracture_values),
    "therapy": (TherapyExposure, therapy_values),
}


def sourced_record_many(*, groups: dict[str, Sequence[dict[str, Any]]],
                        actor: Actor = SYSTEM_ACTOR,
                        extra: dict[str, StatementPart] | None = None
                        ) -> dict[str, list[tuple[Any, bool]]]:
    """``procedure_record_many`` / ``fracture_record_many`` / ``therapy_record_many`` at once
    (``groups``: kind → items): on PostgreSQL ONE statement, each model's upsert a
    data-modifying CTE. ``(pk, created)`` per item, by kind. A validation error carries
    ``kind`` and ``index``; nothing is written then. ``extra`` (PostgreSQL only): other bulk
    writes (kind → ``StatementPart``, e.g. imaging studies) in the same statement; their
    results by kind too."""
    extra = extra or {}
    prepared: dict[str, list[dict[str, Any]]] = {}
    for kind, items in groups.items():
        if not items:
            continue
        try:
            prepared[kind] = _sourced_rows(SOURCED_KINDS[kind][1], items)
        except RegistryValidationError as exc:
            exc.kind = kind  # type: ignore[attr-defined]
            raise
    moved_from: list[Any] = []
    if not prepared and not extra:
        return {}
    if connection.vendor != "postgresql":
        out = {kind: part.run() for kind, part in extra.items()}
        for kind, rows in prepared.items():
            model = SOURCED_KINDS[kind][0]
            update = [name for name in rows[0] if name not in SOURCED_CONFLICT]
            previous = _previous_patients_orm(model, rows)
            out[kind] = upsert_returning(model, rows, conflict=SOURCED_CONFLICT, update=update,
                                         conflict_where=SOURCED_CONFLICT_WHERE)
            moved = _sourced_side_effects(model, out[kind], rows, actor, refresh_fractured=False,
                                          previous=previous)
            if model in (Procedure, Fracture):
                moved_from += moved
        _fractured_levels_of_kinds(prepared, actor, moved_from)
        return out
    qn = connection.ops.quote_name
    ctes, params, plans, selects = [], [], [], []
    for n, (kind, rows) in enumerate(prepared.items()):
        model = SOURCED_KINDS[kind][0]
        table = qn(model._meta.db_table)
        slot_of, unique = dedupe_rows(rows, SOURCED_CONFLICT)
        update = [name for name in rows[0] if name not in SOURCED_CONFLICT]
        sql, records = pg_insert_sql(model, unique, SOURCED_CONFLICT, update,
                                      SOURCED_CONFLICT_WHERE)
        ctes.append(f"c{n} AS ({sql}RETURNING {n} AS k, "
                    f"{qn(model._meta.pk.column)} AS pk, (xmax = 0) AS inserted)")
        params.append(json_param(records))
        plans.append((kind, model, rows, slot_of))
        # The key column: the patient of an updated record BEFORE this statement (the
        # table's row here is the statement's snapshot: RETURNING only gives new values), for
        # a re-send that moves it to another patient. No round trip more. A scalar subquery,
        # not a join: the rows must come back in the CTE's order (the caller matches them to
        # the items by position; a hash join emitted them in the table's order).
        selects.append(
            f"SELECT c.k, c.pk, c.inserted, CASE WHEN c.inserted THEN NULL ELSE ("  # noqa: S608
            f"SELECT t.patient_id::text FROM {table} AS t "
            f"WHERE t.{qn(model._meta.pk.column)} = c.pk) END AS key FROM c{n} AS c")
    for n, part in enumerate(extra.values(), start=len(ctes)):
        ctes += part.ctes
        params += part.params
        selects.append(f"SELECT {n}, x.* FROM ({part.select}) AS x")  # noqa: S608
    by_k: dict[int, list[tuple[Any, Any, Any]]] = {n: [] for n in range(len(selects))}
    for k, pk, inserted, key in pg_execute(f"WITH {', '.join(ctes)} "
                                           f"{' UNION ALL '.join(selects)}", params):
        by_k[k].append((pk, bool(inserted), key))
    out = {}
    for n, (kind, model, rows, slot_of) in enumerate(plans):
        out[kind] = expand_results(slot_of, [(pk, inserted) for pk, inserted, _ in by_k[n]])
        previous = [by_k[n][slot][2] for slot in slot_of]
        moved = _sourced_side_effects(model, out[kind], rows, actor, refresh_fractured=False,
                                      previous=previous)
        if model in (Procedure, Fracture):
            moved_from += moved
    _fractured_levels_of_kinds(prepared, actor, moved_from)
    for n, (kind, part) in enumerate(extra.items(), start=len(plans)):
        out[kind] = part.finish(by_k[n])
    return out


def _fractured_levels_of_kinds(prepared: Mapping[str, Sequence[dict[str, Any]]],
                               actor: Actor, moved_from: Sequence[Any] = ()) -> None:
    """The fractured levels of the patients of the procedures and fractures written, and of
    the patients such a record moved away from (``moved_from``), once for both kinds (one
    statement on PostgreSQL)."""
    patients = [row["patient"].pk for kind in ("procedure", "fracture")
                for row in prepared.get(kind, ())] + list(moved_from)
    if patients:
        fractured_levels_changed(patients, actor)


def procedure_record_many(*, items: Sequence[dict[str, Any]], actor: Actor = SYSTEM_ACTOR
                          ) -> list[tuple[Any, bool]]:
    """``procedure_record`` for many procedures: ``(procedure pk, created)`` per item."""
    return _sourced_many(Procedure, procedure_values, items, actor)


def fracture_record_many(*, items: Sequence[dict[str, Any]], actor: Actor = SYSTEM_ACTOR
                         ) -> list[tuple[Any, bool]]:
    """``fracture_record`` for many fractures: ``(fracture pk, created)`` per item."""
    return _sourced_many(Fracture, fracture_values, items, actor)


def therapy_record_many(*, items: Sequence[dict[str, Any]], actor: Actor = SYSTEM_ACTOR
                        ) -> list[tuple[Any, bool]]:
    """``therapy_record`` for many exposures: ``(exposure pk, created)`` per item."""
    return _sourced_many(TherapyExposure, therapy_values, items, actor)
