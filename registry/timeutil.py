"""Clinic-time helpers. Clinical day counts are made in the clinic's time zone."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from django.conf import settings
from django.utils import timezone


def clinic_zone() -> ZoneInfo:
    return ZoneInfo(settings.CLINIC_TIME_ZONE)


def clinic_date(moment: dt.datetime) -> dt.date:
    """The calendar date of an aware ``moment`` in the clinic's time zone."""
    if timezone.is_naive(moment):
        raise ValueError("clinic_date() needs a timezone-aware datetime")
    return moment.astimezone(clinic_zone()).date()


def clinic_today() -> dt.date:
    return clinic_date(timezone.now())


def start_of_clinic_day(day: dt.date) -> dt.datetime:
    """Midnight of ``day`` in the clinic zone, as an aware datetime (for date-only inputs)."""
    return dt.datetime.combine(day, dt.time.min, tzinfo=clinic_zone())
