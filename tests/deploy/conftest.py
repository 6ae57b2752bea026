"""Whole-suite PHI-in-logs guard.

While the suite runs, every log record that reaches the root logger (INFO and above, i.e. what
production would emit) is grepped for synthetic MRNs (``SYN-…``) and factory patient names. At
the end of the session any hit is printed and the run fails: code must log ids, not
identifiers. ``PHI_LOG_GUARD=0`` turns the guard off (e.g. to debug something else).
"""

from __future__ import annotations

import logging
import os
import re

import pytest

PHI_IN_TEXT = re.compile(r"\bSYN-[A-Z0-9][A-Za-z0-9-]*|\bTest\d{4}\b|\bMatrixgiven\b")


class _PhiLogGuard(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.hits: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        match = PHI_IN_TEXT.search(message)
        if match and len(self.hits) < 50:
            self.hits.append(f"{record.name} {record.levelname}: …{match.group(0)}…")


_GUARD = _PhiLogGuard()


def pytest_collection_finish(session: pytest.Session) -> None:
    # After Django's dictConfig (which replaces the root handlers), before any test runs;
    # first in line, so it sees records before the console handler's redaction filter.
    if os.environ.get("PHI_LOG_GUARD", "1") != "0":
        logging.getLogger().handlers.insert(0, _GUARD)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _GUARD.hits:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = "\n  ".join(_GUARD.hits)
        message = f"PHI-in-logs guard: synthetic MRNs/names were logged:\n  {lines}"
        if reporter:
            reporter.write_line(message, red=True)
        else:
            print(message)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
