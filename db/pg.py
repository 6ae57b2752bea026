"""Generic PostgreSQL helpers over Django models: the bottom layer (see docs/architecture.md).

Nothing here knows a clinical model: callers pass the model and rows. ``pg_execute`` and
``pg_pipeline`` run statements with server-side binding (one statement; several in one round
trip); ``pg_insert_sql`` / ``insert_rows_sql`` build ``INSERT ... SELECT FROM
json_populate_recordset`` statements whose rows travel as ONE JSON parameter, for the caller to
embed in larger statements (data-modifying CTEs); ``upsert_returning`` and ``insert_rows`` run
them; ``models_from_rows`` turns raw rows back into instances. Other databases than PostgreSQL
get the ORM equivalent where a helper has one.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg
from django.conf import settings
from django.db import connection, models
from django.utils import timezone

CHUNK = 500


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
    slot_of, unique = dedupe_rows(rows, conflict)
    if connection.vendor == "postgresql":
        results: list[tuple[Any, bool]] = []
        for start in range(0, len(unique), CHUNK):
            results += _pg_write(model, unique[start:start + CHUNK], conflict, update,
                                 conflict_where)
    else:
        results = [_orm_upsert(model, row, conflict) for row in unique]
    return expand_results(slot_of, results)


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
    sql, records = pg_insert_sql(model, rows, (), (), "")
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
    parse and plan were most of their server CPU (figures: docs/benchmarks.md).
    A bundle's statements, whose text changes with its content, gain nothing (tried).
    """
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
    sql, records = pg_insert_sql(model, rows, conflict, update, where)
    sql += f"RETURNING {connection.ops.quote_name(model._meta.pk.column)}, (xmax = 0)"
    return [(pk, bool(inserted)) for pk, inserted in
            pg_execute(sql, [json_param(records)])]


def pg_insert_sql(model: type[models.Model], rows: Sequence[dict[str, Any]],
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

def dedupe_rows(rows: Sequence[dict[str, Any]], conflict: Sequence[str]
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


def expand_results(slot_of: Sequence[int], results: Sequence[tuple[Any, bool]]
            ) -> list[tuple[Any, bool]]:
    out, used = [], set()
    for slot in slot_of:  # a repeated key: created once, then updated
        pk, created = results[slot]
        out.append((pk, created and slot not in used))
        used.add(slot)
    return out
