"""Structured JSON logs (``LOG_FORMAT=json``) and a PHI redaction filter for every handler.

Application code logs ids (patient uuid, feed id, job id), never names, MRNs or birth dates.
The filter is the safety net for mistakes: it masks values that look like medical record
numbers in the message, and drops ``extra=`` fields whose key names PHI (``name``, ``mrn``...).
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

# Identifier-looking tokens: the synthetic MRNs (SYN-...) and "MRN 123456"-style values.
MRN_PATTERN = re.compile(r"\b(?:SYN-[A-Za-z0-9-]+|MRN[:#\s=-]*[A-Za-z0-9-]{4,})\b", re.IGNORECASE)
# ``extra=`` keys that name PHI (``family_name``, ``patient_mrn``, ``dob``...); ``task_name``,
# ``logger_name`` and other technical names are not PHI.
PHI_KEY_PATTERN = re.compile(
    r"^(?:name|names|family|given|identifier|identifiers|address|phone|email|ssn)$"
    r"|(?:^|_)(?:family_name|given_name|full_name|patient_name|mrn|mrns|birth_date|"
    r"birthdate|dob)$",
    re.IGNORECASE,
)
REDACTED = "[redacted]"

# Attributes every LogRecord has; everything else came from ``extra=``.
_STANDARD_ATTRS = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


def redact_text(text: str) -> str:
    return MRN_PATTERN.sub(REDACTED, text)


class RedactPhiFilter(logging.Filter):
    """Mask MRN-like values in messages and drop PHI-named ``extra`` fields. Never drops records."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not lose the record
            message = str(record.msg)
        redacted = redact_text(message)
        if redacted != message or record.args:
            record.msg, record.args = redacted, ()
        for key in list(record.__dict__):
            if key not in _STANDARD_ATTRS and PHI_KEY_PATTERN.search(key):
                setattr(record, key, REDACTED)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request/task ids, extras."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for key, value in record.__dict__.items():
            if key in _STANDARD_ATTRS or key.startswith("_") or key == "request":
                continue
            body[key] = value if isinstance(value, (str, int, float, bool, type(None))) else str(
                value
            )
        request = record.__dict__.get("request")
        if request is not None:
            # The path only: query strings can carry search terms typed by users.
            body["path"] = getattr(request, "path", "")
            body["method"] = getattr(request, "method", "")
        status_code = record.__dict__.get("status_code")
        if status_code is not None:
            body["status_code"] = status_code
        if record.exc_info:
            exc_type = record.exc_info[0]
            body["exc_type"] = exc_type.__name__ if exc_type else ""
            body["exc"] = redact_text(self.formatException(record.exc_info))
        return json.dumps(body, default=str)


def build_logging(*, log_format: str, level: str) -> dict[str, Any]:
    """The LOGGING dict for ``plain`` or ``json`` output on stderr, with PHI redaction."""
    formatter = "json" if log_format == "json" else "plain"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact_phi": {"()": "config.logging.RedactPhiFilter"}},
        "formatters": {
            "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
            "json": {"()": "config.logging.JsonFormatter"},
        },
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "formatter": formatter,
                "filters": ["redact_phi"],
            }
        },
        "root": {"handlers": ["console"], "level": level},
        "loggers": {
            "django.db.backends": {"level": "WARNING"},
            # highdicom logs each copied module with the source instance's UID at INFO
            "highdicom": {"level": "WARNING"},
        },
    }
