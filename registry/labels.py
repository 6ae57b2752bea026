"""Readable labels for the registry's codes: alert rules, resolution reasons, alert history
actions, therapy agents and patient identifier systems.

PURE: no Django. One table used everywhere a person reads a code (clinic pages, email digests,
FHIR Communication text, CDS cards), so a rule never shows as ``high-vbq-untreated-60d`` on one
screen and as prose on another. An unknown code falls back to a readable form of itself.
"""

from __future__ import annotations

from urllib.parse import urlparse

from registry.codes import AGENTS
from registry.followup import HIGH_VBQ, RESOLUTION_REASONS, SECONDARY_FRACTURE, VBQ_MISSING

RULE_LABELS: dict[str, str] = {
    HIGH_VBQ: "High VBQ, untreated at day 60",
    SECONDARY_FRACTURE: "Secondary fracture, untreated",
    VBQ_MISSING: "VBQ missing",
}

REASON_LABELS: dict[str, str] = dict(RESOLUTION_REASONS)

ALERT_ACTION_LABELS: dict[str, str] = {
    "open": "Opened",
    "acknowledge": "Acknowledged",
    "snooze": "Snoozed",
    "resolve": "Resolved",
    "reopen": "Reopened (resolve undone)",
    "assign": "Assigned",
    "escalate": "Escalated",
    "note": "Note",
}

ALERT_STATUS_LABELS: dict[str, str] = {
    "open": "Open",
    "acknowledged": "Acknowledged",
    "snoozed": "Snoozed",
    "resolved": "Resolved",
}

# Identifier systems the registry knows by name; others are shown by ``identifier_system_label``.
IDENTIFIER_SYSTEM_LABELS: dict[str, str] = {
    "https://vbq-registry.example.org/fhir/sid/synthetic-mrn": "MRN (synthetic)",
    "http://hl7.org/fhir/sid/us-ssn": "SSN",
    "http://hl7.org/fhir/sid/us-medicare": "Medicare number",
    "https://fhir.nhs.uk/Id/nhs-number": "NHS number",
}
IDENTIFIER_TYPE_LABELS: dict[str, str] = {
    "MR": "MRN",
    "SS": "SSN",
    "PI": "Patient id",
    "NH": "National health number",
}


def _readable(code: str) -> str:
    text = code.replace("_", " ").replace("-", " ").strip()
    return text[:1].upper() + text[1:] if text else "—"


def rule_label(rule_id: str) -> str:
    """``high-vbq-untreated-60d`` → "High VBQ, untreated at day 60"."""
    return RULE_LABELS.get(rule_id) or _readable(rule_id)


def reason_label(reason: str) -> str:
    """``therapy-declined`` → "Therapy declined by the patient"; blank → "—"."""
    return REASON_LABELS.get(reason) or _readable(reason)


def alert_action_label(action: str) -> str:
    return ALERT_ACTION_LABELS.get(action) or _readable(action)


def alert_status_label(status: str) -> str:
    return ALERT_STATUS_LABELS.get(status) or _readable(status)


def agent_label(agent: str) -> str:
    """``zoledronic_acid`` → "Zoledronic acid"."""
    known = AGENTS.get(agent)
    return known.display if known else _readable(agent)


def identifier_system_label(system: str, type_code: str = "") -> str:
    """A readable name for an identifier's system: a known system, else its type code (MR →
    MRN), else the host and last path segment of the URI (``https://ehr.example.org/sid/mrn``
    → "ehr.example.org mrn"), never the raw URI."""
    if system in IDENTIFIER_SYSTEM_LABELS:
        return IDENTIFIER_SYSTEM_LABELS[system]
    if type_code in IDENTIFIER_TYPE_LABELS:
        return IDENTIFIER_TYPE_LABELS[type_code]
    if system.startswith("urn:oid:"):
        return f"Identifier (OID {system.removeprefix('urn:oid:')})"
    parsed = urlparse(system)
    if parsed.netloc:
        last = parsed.path.rstrip("/").rsplit("/", 1)[-1]
        return f"{parsed.netloc} {last}".strip()
    return _readable(system)
