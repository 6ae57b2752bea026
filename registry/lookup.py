"""Find patients by their identifiers: the one locked lookup every write path starts with."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from django.db import connection

from db.pg import models_from_rows
from registry.models import Patient, PatientIdentifier


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
