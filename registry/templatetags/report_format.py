"""Template filters for the QI report pages."""

from __future__ import annotations

from typing import Any

from django import template

from registry.reports.cohort import format_p

register = template.Library()


@register.filter
def pvalue(value: Any) -> str:
    """A p-value as ``"< 0.001"`` or three decimals (never ``"0.000"``); ``"—"`` when absent."""
    try:
        return format_p(None if value is None or value == "" else float(value))
    except (TypeError, ValueError):
        return "—"
