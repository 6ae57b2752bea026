"""Concurrent writers of one patient's fractures (two FHIR bundles at the same time) both end
up in the patient's VBQ fractured levels: the recompute locks the patient first and reads the
levels in the next statement, after the other writer committed (``scoring.fractured``).
SYNTHETIC patients; PostgreSQL (real concurrent transactions)."""

import threading

import pytest
from django.db import connections, transaction

from registry.services import Identifier
from registry.services_bulk import fracture_record_many
from registry.side_effects import deferred_side_effects
from tests.scoring.test_fractured_levels import CONDITION, _at, _patient, _scored

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def test_two_bundles_adding_fractures_at_the_same_time_keep_both_levels():
    patient = _patient()  # index procedure at T12, 70 days ago; fractures 75 days ago: index
    result = _scored(patient)
    first_written, release_first = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def bundle(level: str, value: str, hold: bool) -> None:
        try:
            with transaction.atomic():
                with deferred_side_effects():  # as a FHIR transaction bundle
                    fracture_record_many(items=[{
                        "patient": patient, "site": "vertebral", "vertebral_level": level,
                        "diagnosed_at": _at(75), "identifier": Identifier(CONDITION, value)}])
                if hold:  # flushed (recompute done, locks held), not yet committed
                    first_written.set()
                    assert release_first.wait(30)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connections.close_all()

    first = threading.Thread(target=bundle, args=("L1", "fx-concurrent-1", True))
    first.start()
    assert first_written.wait(30)
    second = threading.Thread(target=bundle, args=("L2", "fx-concurrent-2", False))
    second.start()
    second.join(1.5)
    assert second.is_alive()  # waits for the first writer's patient lock
    release_first.set()
    first.join(30)
    second.join(30)
    assert not errors, errors
    result.refresh_from_db()
    assert result.fractured_levels == ["L1", "L2"]
    assert set(result.levels.filter(fractured=True).values_list("level", flat=True)) == {
        "L1", "L2"}
