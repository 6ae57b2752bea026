"""FHIR errors and OperationOutcome rendering."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Issue:
    severity: str  # fatal | error | warning | information
    code: str  # FHIR issue-type: invalid, required, value, not-supported, security, ...
    diagnostics: str
    expression: list[str] = field(default_factory=list)

    def to_fhir(self) -> dict[str, Any]:
        out: dict[str, Any] = {"severity": self.severity, "code": self.code,
                               "diagnostics": self.diagnostics}
        if self.expression:
            out["expression"] = self.expression
        return out


class FhirError(Exception):
    """A request or entry that cannot be processed. ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, issues: list[Issue]) -> None:
        super().__init__("; ".join(i.diagnostics for i in issues))
        self.status = status
        self.issues = issues

    @classmethod
    def single(cls, status: int, code: str, diagnostics: str, expression: str = "") -> FhirError:
        return cls(status, [Issue("error", code, diagnostics, [expression] if expression else [])])

    def prefixed(self, prefix: str) -> FhirError:
        """The same error with every expression placed under ``prefix`` (bundle entries)."""
        issues = [
            Issue(i.severity, i.code, f"{prefix}: {i.diagnostics}",
                  [f"{prefix}.{e}" if not e.startswith(prefix) else e for e in i.expression]
                  or [prefix])
            for i in self.issues
        ]
        return FhirError(self.status, issues)


RULE_PREFIX = "registry: "  # the registry's own trigger messages (ids and field names only)
SQLITE_CHECK = "CHECK constraint failed:"  # SQLite's message: the constraint's name only


def rule_violation(exc: BaseException) -> FhirError | None:
    """The 422 for a write a database rule refused (SQLSTATE 23514: a CHECK constraint or one
    of the registry's triggers, e.g. an event dated before the patient's birth), or ``None``
    for any other integrity error (a concurrent writer: the caller's 409). The diagnostics are
    the registry trigger's own message or the constraint's name, never the database's DETAIL
    (it quotes the row, which may hold PHI). Not retried: the same data fails the same way."""
    cause = exc.__cause__
    first_line = (str(exc).splitlines() or [""])[0]
    sqlite_check = first_line.startswith(SQLITE_CHECK)  # SQLite has no SQLSTATE
    if (getattr(cause, "sqlstate", None) != "23514" and not sqlite_check
            and not first_line.startswith(RULE_PREFIX)):
        return None
    if first_line.startswith(RULE_PREFIX):
        text = first_line.removeprefix(RULE_PREFIX)
    elif sqlite_check:
        text = f"the database rule {first_line.removeprefix(SQLITE_CHECK).strip()} refused " \
               "this data"
    else:
        name = getattr(getattr(cause, "diag", None), "constraint_name", None)
        text = f"the database rule {name} refused this data" if name else (
            "a database rule refused this data")
    return FhirError.single(422, "business-rule", text)


def operation_outcome(issues: list[Issue]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [i.to_fhir() for i in issues]}
