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

import datetime as dt
import json
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from django.db import IntegrityError, connection, models
from django.utils import timezone

from registry.models import (
    AuditAction,
    Fracture,
    Patient,
    PatientIdentifier,
    Procedure,
    TherapyExposure,
)
from registry.services import (
    SYSTEM_ACTOR,
    Actor,
    ConcurrentWriteError,
    RegistryValidationError,
    _earliest_event_date,
    _fractured_levels_changed,
    _procedures_recorded,
    audit_record,
    deferred_side_effects,
    followup_changed,
    fracture_values,
    kept_unless_given,
    patient_check,
    procedure_values,
    therapy_values,
)

# The partial unique index of SourcedRecord identifiers (``condition=~Q(identifier_value="")``).
SOURCED_CONFLICT = ["identifier_system", "identifier_value"]
SOURCED_CONFLICT_WHERE = "NOT (\"identifier_value\" = '')"
CHUNK = 500


def _indexed(exc: RegistryValidationError, index: int) -> RegistryValidationError:
    exc.index = index  # type: ignore[attr-defined]
    return exc


def upsert_returning(
    model: type[models.Model],
    rows: Sequence[dict[str, Any]],
    *,
    conflict: Sequence[str],
    update: Sequence[str],
    conflict_where: str = "",
) -> list[tuple[Any, bool]]:
    """Insert ``rows`` (dicts of field name → value), updating the row that already holds the
    same ``conflict`` key. Returns ``(pk, created)`` for every row, in order. Rows with the same
    non-empty key are written once (the last one wins) and share its result."""
    if not rows:
        return []
    slot_of, unique = _dedupe(rows, conflict)
    if connection.vendor == "postgresql":
        results: list[tuple[Any, bool]] = []
        for start in range(0, len(unique), CHUNK):
            results += _pg_write(model, unique[start:start + CHUNK], conflict, update,
                                 conflict_where)
    else:
        results = [_orm_upsert(model, row, conflict) for row in unique]
    return _expand(slot_of, results)


def insert_rows(model: type[models.Model], rows: Sequence[dict[str, Any]]) -> None:
    """Plain INSERT of many rows (dicts of field name → value) in one statement."""
    if not rows:
        return
    if connection.vendor != "postgresql":
        model._default_manager.bulk_create([model(**row) for row in rows])
        return
    for start in range(0, len(rows), CHUNK):
        _pg_write(model, rows[start:start + CHUNK], (), (), "")


def insert_rows_sql(model: type[models.Model], rows: Sequence[dict[str, Any]]
                    ) -> tuple[str, str]:
    """The PostgreSQL ``INSERT ... SELECT FROM json_populate_recordset(%s::json)`` of ``rows``
    (no RETURNING) and its one parameter, to embed in a larger statement (e.g. a CTE)."""
    sql, records = _pg_insert_sql(model, rows, (), (), "")
    return sql, json_param(records)


def pg_pipeline(statements: Sequence[tuple[str, Any, bool]]) -> list[tuple[Any, ...]]:
    """Run several PostgreSQL statements ``(sql, params, prepare)`` in ONE round trip (psycopg
    pipeline: one Sync), server-side binding as ``pg_execute``; returns the LAST statement's
    rows. Each statement runs after the one before it, with its own snapshot (a lock taken by
    one is held when the next starts, which then sees what the lock waited for). The first
    error is raised (as Django's) and the statements after it do not run; the caller's
    transaction then rolls back, as with separate statements. Outside a transaction (Django's
    autocommit) the pipeline is ONE implicit transaction: an error rolls back the statements
    before it too. Like ``pg_execute`` it bypasses Django's cursor (``connection.queries``
    and ``CaptureQueriesContext`` do not see these statements)."""
    import psycopg
    from django.conf import settings

    if not statements:
        return []
    if len(statements) == 1:
        [(sql, params, prepare)] = statements
        return pg_execute(sql, params, prepare=prepare)
    connection.close_if_health_check_failed()
    connection.ensure_connection()
    pg = connection.connection
    cursors = [psycopg.Cursor(pg) for _ in statements]
    try:
        with connection.wrap_database_errors:
            with pg.pipeline():
                for cursor, (sql, params, prepare) in zip(cursors, statements, strict=True):
                    cursor.execute(sql, params, prepare=True if prepare and (
                        settings.DB_PREPARED_STATEMENTS) else None)
            last = cursors[-1]
            return last.fetchall() if last.description else []
    finally:
        for cursor in cursors:
            cursor.close()


def pg_execute(sql: str, params: Sequence[Any] | Mapping[str, Any], *, prepare: bool = False
               ) -> list[tuple[Any, ...]]:
    """Run one PostgreSQL statement with SERVER-side parameter binding and return its rows.

    Django's psycopg cursor binds client-side (each value escaped into the SQL text); for the
    large JSON documents and raw payloads of a FHIR bundle, sending them as bound parameters
    halves the round trip. Errors are Django's (``IntegrityError``...), as with a Django cursor.

    ``prepare=True`` (when ``settings.DB_PREPARED_STATEMENTS`` is on): the statement is
    prepared on this connection the first time and executed by name afterwards, so the server
    parses and plans it once per connection instead of once per call. For the imaging
    pipeline's fixed-text statements run for every study and job (claim, result, jobs) the
    parse and plan were most of their server CPU (the claim: 0.40 -> 0.07 ms on 2026-11-25).
    A bundle's statements, whose text changes with its content, gain nothing (tried).
    """
    import psycopg
    from django.conf import settings

    # What Django's own cursor() does first: with CONN_HEALTH_CHECKS, a persistent connection
    # broken since the last request (database restarted) is replaced instead of failing.
    connection.close_if_health_check_failed()
    connection.ensure_connection()
    with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
        cursor.execute(sql, params,
                       prepare=True if prepare and settings.DB_PREPARED_STATEMENTS else None)
        return cursor.fetchall() if cursor.description else []


_JSON_CONVERT: dict[type, Callable[[Any], str]] = {
    dt.datetime: dt.datetime.isoformat, dt.date: dt.date.isoformat, uuid.UUID: str, Decimal: str}


_JSON_NATIVE = frozenset({str, int, float, bool, type(None)})


def _plain(value: Any) -> Any:
    """A row value as JSON can carry it (a model instance → its pk, dates → ISO text...)."""
    if isinstance(value, models.Model):
        value = value.pk
    convert = _JSON_CONVERT.get(type(value))
    return convert(value) if convert is not None else value


def _json_value(value: Any) -> Any:
    convert = _JSON_CONVERT.get(type(value))  # exact types first: one dict lookup per value
    if convert is not None:
        return convert(value)
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, uuid.UUID | Decimal):
        return str(value)
    raise TypeError(f"cannot send {type(value).__name__} to PostgreSQL as JSON")


def json_param(records: Any) -> str:
    """Rows as the one JSON parameter of a ``json_populate_recordset`` statement."""
    return json.dumps(records, default=_json_value)


@dataclass
class StatementPart:
    """Bulk writes as data-modifying CTEs, to run alone or inside another bulk statement (one
    round trip for several models). ``select`` reads the written rows as ``(pk, inserted,
    key)``; ``finish`` turns those rows into the caller's results (and does the side effects,
    e.g. audit rows)."""

    ctes: list[str]
    params: list[Any]
    select: str
    finish: Callable[[Sequence[tuple[Any, bool, Any]]], list[tuple[Any, bool]]]

    def run(self, *, prepare: bool = False) -> list[tuple[Any, bool]]:
        """``prepare``: see ``pg_execute`` (for a statement whose text repeats, e.g. the
        imaging ingest of one study: its rows travel as JSON parameters)."""
        return self.finish(pg_execute(f"WITH {', '.join(self.ctes)} {self.select}",
                                      self.params, prepare=prepare))


def _pg_write(model: type[models.Model], rows: Sequence[dict[str, Any]],
              conflict: Sequence[str], update: Sequence[str], where: str
              ) -> list[tuple[Any, bool]]:
    """One ``INSERT ... SELECT FROM json_populate_recordset(<the rows as one JSON document>)
    [ON CONFLICT DO UPDATE]``: PostgreSQL converts each value to its column's type, and the
    statement has one parameter whatever the number of rows. ``xmax = 0`` marks the rows that
    were inserted rather than updated."""
    sql, records = _pg_insert_sql(model, rows, conflict, update, where)
    sql += f"RETURNING {connection.ops.quote_name(model._meta.pk.column)}, (xmax = 0)"
    return [(pk, bool(inserted)) for pk, inserted in
            pg_execute(sql, [json_param(records)])]


def _pg_insert_sql(model: type[models.Model], rows: Sequence[dict[str, Any]],
                   conflict: Sequence[str], update: Sequence[str], where: str, *,
                   source: str = "", select: dict[str, str] | None = None,
                   update_sql: dict[str, str] | None = None
                   ) -> tuple[str, list[dict[str, Any]]]:
    """The INSERT of ``rows`` and its records (one JSON parameter). By default the values come
    from ``json_populate_recordset(NULL::<table>, %s::json) AS r``; ``source`` replaces that
    FROM clause (it must still name the record ``r``), ``select`` gives a column another SQL
    expression (e.g. a key RETURNED by an earlier CTE) and ``update_sql`` another ``DO UPDATE
    SET`` expression than ``EXCLUDED.<column>``."""
    meta = model._meta
    qn = connection.ops.quote_name
    now = timezone.now()
    fields = [f for f in meta.concrete_fields
              if not (f.primary_key and f.name not in rows[0] and f.attname not in rows[0])]
    constants: dict[str, Any] = {}  # the same for every row: converted once
    getters = []
    for f in fields:
        name = f.name if f.name in rows[0] else f.attname
        if getattr(f, "auto_now", False) or getattr(f, "auto_now_add", False):
            constants[f.column] = _plain(now)
        elif name not in rows[0]:
            constants[f.column] = _plain(f.get_default())
        else:
            getters.append((f.column, name))
    records = []
    for row in rows:
        record = dict(constants)
        for column, name in getters:
            value = row[name]
            if type(value) not in _JSON_NATIVE:
                value = _plain(value)
            record[column] = value
        records.append(record)
    columns = ", ".join(qn(f.column) for f in fields)
    select = select or {}
    values = ", ".join(select.get(f.column, f"r.{qn(f.column)}") for f in fields)
    source = source or f"json_populate_recordset(NULL::{qn(meta.db_table)}, %s::json) AS r"
    sql = (  # names from the model's metadata; the rows are the one parameter
        f"INSERT INTO {qn(meta.db_table)} ({columns}) "  # noqa: S608
        f"SELECT {values} FROM {source} "
    )
    if conflict:
        update_sql = update_sql or {}
        sets = [meta.get_field(n).column for n in update] + [
            f.column for f in fields if getattr(f, "auto_now", False)
            and f.name not in update]
        sets += [c for c in update_sql if c not in sets]
        sql += (
            f"ON CONFLICT ({', '.join(qn(meta.get_field(c).column) for c in conflict)}) "
            f"{'WHERE ' + where if where else ''} "
            "DO UPDATE SET " + ", ".join(
                f"{qn(c)} = {update_sql.get(c, f'EXCLUDED.{qn(c)}')}" for c in sets) + " "
        )
    return sql, records


def _orm_upsert(model: type[models.Model], row: dict[str, Any], conflict: Sequence[str]
                ) -> tuple[Any, bool]:
    key = {c: row[c] for c in conflict}
    defaults = {k: v for k, v in row.items() if k not in key}
    if not all(key.values()):
        return model._default_manager.create(**row).pk, True
    obj, created = model._default_manager.select_for_update().update_or_create(
        **key, defaults=defaults)
    return obj.pk, created


# --- Patients -----------------------------------------------------------------------------------
def patients_by_identifier(keys: Iterable[tuple[str, str]], *, lock: bool = False
                           ) -> dict[tuple[str, str], Patient]:
    """The patient holding each known ``(system, value)`` identifier, in ONE query.

    On PostgreSQL each key is one lookup in the unique ``(system, value)`` index (a LATERAL
    join on the keys), whatever the table's size or statistics: the former
    ``system IN (...) AND value IN (...)`` was planned, without statistics (a fresh or
    not-yet-analysed table), as a scan of every identifier of those systems — its cost grew
    with the registry. ``lock``: the identifier and patient rows are locked (FOR UPDATE), in
    key order."""
    return lookup_patients(keys, lock=lock)[0]


def lookup_patients(keys: Iterable[tuple[str, str]], *, lock: bool = False,
                    also: tuple[str, Sequence[Any]] | None = None
                    ) -> tuple[dict[tuple[str, str], Patient], list[tuple[Any, ...]]]:
    """``patients_by_identifier``, and ``also`` — another statement ``(sql, params)``, e.g.
    locking rows that depend on these patients — sent in the SAME round trip on PostgreSQL
    (two statements in one simple query); its rows are returned second. The lookup runs
    first."""
    wanted = sorted(set(keys))
    if connection.vendor != "postgresql":
        found: dict[tuple[str, str], Patient] = {}
        if wanted:
            qs = PatientIdentifier.objects.filter(
                system__in={k[0] for k in wanted}, value__in={k[1] for k in wanted}
            ).select_related("patient")
            if lock:
                qs = qs.select_for_update()
            found = {(i.system, i.value): i.patient for i in qs
                     if (i.system, i.value) in set(wanted)}
        rows: list[tuple[Any, ...]] = []
        if also is not None:
            with connection.cursor() as cursor:
                cursor.execute(*also)
                rows = list(cursor.fetchall())
        return found, rows
    qn = connection.ops.quote_name
    fields = Patient._meta.concrete_fields
    identifiers, patients = PatientIdentifier._meta.db_table, Patient._meta.db_table
    if not wanted and also is None:
        return {}, []
    columns = ", ".join(f"p.{qn(f.column)}" for f in fields)
    sql = (  # names from the model metadata; the keys are two array parameters
        f"SELECT i.system, i.value, {columns} "  # noqa: S608
        "FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS k(system, value, n) "
        f"CROSS JOIN LATERAL (SELECT system, value, patient_id FROM {identifiers} "
        "WHERE system = k.system AND value = k.value LIMIT 1) AS i "
        f"JOIN {patients} AS p ON p.id = i.patient_id ORDER BY k.n"
        + (" FOR UPDATE" if lock else ""))
    params: list[Any] = [[k[0] for k in wanted], [k[1] for k in wanted]]
    if also is not None:
        sql += "; " + also[0]
        params += list(also[1])
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        found_rows = cursor.fetchall()
        rows = []
        if also is not None:
            cursor.nextset()
            rows = list(cursor.fetchall())
    instances = models_from_rows(Patient, [r[2:] for r in found_rows])
    return {(r[0], r[1]): p for r, p in zip(found_rows, instances, strict=True)}, rows


def models_from_rows(model: type[models.Model], rows: Sequence[Sequence[Any]]) -> list[Any]:
    """Instances from raw rows of ALL the model's concrete columns (in ``concrete_fields``
    order), with Django's database converters applied (e.g. JSON fields), as the ORM would."""
    fields = model._meta.concrete_fields
    converters = []
    for n, f in enumerate(fields):
        col = f.get_col(model._meta.db_table)
        if convs := connection.ops.get_db_converters(col) + col.get_db_converters(connection):
            converters.append((n, convs, col))
    attnames = [f.attname for f in fields]
    out = []
    for row in rows:
        values = list(row)
        for n, convs, col in converters:
            for convert in convs:
                values[n] = convert(values[n], col, connection)
        out.append(model.from_db(connection.alias, attnames, values))
    return out


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
                    and (earliest := _earliest_event_date(patient)) and birth > earliest):
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
        p_sql, p_records = _pg_insert_sql(Patient, patient_rows, ["id"], PATIENT_FIELDS, "")
        i_sql, i_records = _pg_insert_sql(PatientIdentifier, new_identifiers, (), (), "")
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
            _procedures_recorded([values["patient"].pk for values in rows] + moved_from)
        if refresh_fractured and model in (Procedure, Fracture) and rows:
            _fractured_levels_changed([values["patient"].pk for values in rows] + moved_from,
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


def _dedupe(rows: Sequence[dict[str, Any]], conflict: Sequence[str]
            ) -> tuple[list[int], list[dict[str, Any]]]:
    """Rows with the same non-empty key are written once (the last one wins)."""
    slot_of: list[int] = []
    unique: list[dict[str, Any]] = []
    seen: dict[tuple[Any, ...], int] = {}
    for row in rows:
        key = tuple(row[c] for c in conflict)
        if all(key) and key in seen:
            unique[seen[key]] = row
            slot_of.append(seen[key])
            continue
        if all(key):
            seen[key] = len(unique)
        slot_of.append(len(unique))
        unique.append(row)
    return slot_of, unique


def _expand(slot_of: Sequence[int], results: Sequence[tuple[Any, bool]]
            ) -> list[tuple[Any, bool]]:
    out, used = [], set()
    for slot in slot_of:  # a repeated key: created once, then updated
        pk, created = results[slot]
        out.append((pk, created and slot not in used))
        used.add(slot)
    return out


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
        slot_of, unique = _dedupe(rows, SOURCED_CONFLICT)
        update = [name for name in rows[0] if name not in SOURCED_CONFLICT]
        sql, records = _pg_insert_sql(model, unique, SOURCED_CONFLICT, update,
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
        out[kind] = _expand(slot_of, [(pk, inserted) for pk, inserted, _ in by_k[n]])
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
        _fractured_levels_changed(patients, actor)


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
