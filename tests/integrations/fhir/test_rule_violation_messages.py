"""``rule_violation`` reads SQLite's errors too (the embedded default has no SQLSTATE): a CHECK
constraint or a registry trigger is a 422 naming the rule, a unique violation is not a rule
(the caller's 409). Real sqlite3 errors, wrapped as Django wraps them."""

from __future__ import annotations

import sqlite3

import pytest
from django.db import IntegrityError

from integrations.fhir.errors import rule_violation


def _django_error(*statements: str) -> IntegrityError:
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE t (x int CONSTRAINT x_positive CHECK (x > 0), u int UNIQUE)")
    db.execute("CREATE TRIGGER t_rule BEFORE INSERT ON t WHEN NEW.x = 99 BEGIN "
               "SELECT RAISE(ABORT, 'registry: performed_at on t is before the patient''s "
               "birth date'); END")
    try:
        for statement in statements:
            db.execute(statement)
    except sqlite3.IntegrityError as exc:
        try:
            raise IntegrityError(*exc.args) from exc
        except IntegrityError as wrapped:
            return wrapped
    raise AssertionError("no integrity error")


@pytest.mark.parametrize(("statements", "diagnostics"), [
    (["INSERT INTO t VALUES (-1, 1)"], "the database rule x_positive refused this data"),
    (["INSERT INTO t VALUES (99, 1)"],
     "performed_at on t is before the patient's birth date"),
])
def test_sqlite_rule_errors_are_422_business_rule(statements, diagnostics):
    error = rule_violation(_django_error(*statements))
    assert error is not None
    assert (error.status, error.issues[0].code, error.issues[0].diagnostics) == (
        422, "business-rule", diagnostics)


def test_a_sqlite_unique_violation_is_not_a_rule():
    assert rule_violation(_django_error("INSERT INTO t VALUES (1, 1)",
                                        "INSERT INTO t VALUES (2, 1)")) is None
