"""Migration 0005 re-reads the levels of fractures stored under the old S22.0- table (SYNTHETIC)."""

import importlib

import pytest
from django.apps import apps

from registry.models import Fracture
from tests.factories import FractureFactory

pytestmark = pytest.mark.django_db
migration = importlib.import_module("registry.migrations.0005_h19_icd10_thoracic_levels")


def test_fractures_stored_with_the_old_thoracic_levels_get_the_classifications_levels():
    stored = {
        "S22.020A": "T3",  # old table: T3; S22.02 is the second thoracic vertebra
        "S22.060A": "T11",  # old table: T11; S22.06 is T7–T8, the level is not known
        "S22.080A": "T12",  # not in the old table: T12 came from the body site, kept
        "S22.070A": "T12",  # body site outside T9–T10: unknown
        "S32.010A": "L1",
    }
    rows = {code: FractureFactory(site="vertebral", code=code, vertebral_level=level).pk
            for code, level in stored.items()}
    migration.forwards(apps, None)
    levels = {code: Fracture.objects.get(pk=pk).vertebral_level for code, pk in rows.items()}
    assert levels == {"S22.020A": "T2", "S22.060A": "", "S22.080A": "T12", "S22.070A": "",
                      "S32.010A": "L1"}
