"""Alert lifecycle services, the worklist API and the CDS Hooks service."""

import datetime as dt

import pytest
from django.urls import reverse

from followup.alerts import (
    alert_acknowledge,
    alert_add_note,
    alert_open,
    alert_resolve,
    alert_snooze,
)
from registry.feeds import feed_create
from registry.models import AlertDelivery, AlertEvent, AuditEvent
from registry.services import RegistryValidationError
from registry.side_effects import Actor
from registry.timeutil import clinic_today
from tests.factories import MRN_SYSTEM, PatientFactory

pytestmark = pytest.mark.django_db
STAFF = Actor(via="ui")


def _open(patient=None):
    return alert_open(patient=patient or PatientFactory(), rule_id="high-vbq-untreated-60d",
                      reason="VBQ 3.60 ≥ 3, no therapy", vbq_value=3.6)


def test_opening_an_alert_writes_history_audit_and_outbox_rows_together():
    alert = _open()
    assert AlertEvent.objects.filter(alert=alert, action="open").count() == 1
    assert AuditEvent.objects.filter(object_type="Alert", object_id=str(alert.pk)).exists()
    assert set(AlertDelivery.objects.filter(alert=alert).values_list("channel", flat=True)) == {
        "in-app", "email"}


def test_a_second_unresolved_alert_for_the_same_rule_is_not_opened():
    patient = PatientFactory()
    assert _open(patient) is not None
    assert _open(patient) is None


def test_lifecycle_open_acknowledged_snoozed_resolved():
    alert = _open()
    alert = alert_acknowledge(alert=alert, actor=STAFF)
    alert = alert_snooze(alert=alert, until=clinic_today() + dt.timedelta(days=14), actor=STAFF)
    alert = alert_resolve(alert=alert, reason="therapy-declined", actor=STAFF, note="discussed")
    assert alert.status == "resolved"
    assert alert.resolution_reason == "therapy-declined"
    history = list(AlertEvent.objects.filter(alert=alert).values_list("action", "to_status"))
    assert history == [("open", "open"), ("acknowledge", "acknowledged"),
                       ("snooze", "snoozed"), ("resolve", "resolved")]


def test_resolving_with_an_unknown_reason_is_refused():
    with pytest.raises(RegistryValidationError, match="unknown resolution reason"):
        alert_resolve(alert=_open(), reason="bored", actor=STAFF)


def test_a_resolved_alert_cannot_be_acknowledged():
    alert = alert_resolve(alert=_open(), reason="transferred", actor=STAFF)
    with pytest.raises(RegistryValidationError) as err:
        alert_acknowledge(alert=alert, actor=STAFF)
    assert err.value.code == "invalid-transition"


def test_snooze_must_be_in_the_future():
    with pytest.raises(RegistryValidationError, match="future"):
        alert_snooze(alert=_open(), until=clinic_today(), actor=STAFF)


def test_notes_are_kept_in_the_history():
    alert = _open()
    alert_add_note(alert=alert, note="Called the GP, letter sent.", actor=STAFF)
    assert AlertEvent.objects.filter(alert=alert, action="note").get().note.startswith("Called")


def test_worklist_api_lists_unresolved_alerts_and_resolves_one(client, role_user):
    client.force_login(role_user("coordinator"))
    alert = _open()
    listing = client.get("/api/alerts/").json()
    assert [a["id"] for a in listing["results"]] == [alert.pk]
    response = client.post(f"/api/alerts/{alert.pk}/resolve/",
                           {"reason": "therapy-started"}, content_type="application/json")
    assert response.status_code == 200
    assert response.json()["status"] == "resolved"
    assert client.get("/api/alerts/").json()["count"] == 0


def test_worklist_api_answers_409_for_an_impossible_transition(client, role_user):
    client.force_login(role_user("coordinator"))
    alert = alert_resolve(alert=_open(), reason="transferred", actor=STAFF)
    response = client.post(f"/api/alerts/{alert.pk}/acknowledge/", {},
                           content_type="application/json")
    assert response.status_code == 409


def test_worklist_api_validates_filters_and_input(client, role_user):
    client.force_login(role_user("coordinator"))
    assert client.get("/api/alerts/", {"status": "weird"}).status_code == 400
    alert = _open()
    response = client.post(f"/api/alerts/{alert.pk}/snooze/", {"until": "not-a-date"},
                           content_type="application/json")
    assert response.status_code == 400


@pytest.mark.parametrize("role", ["qi_analyst", "feed"])
def test_roles_without_alert_work_cannot_use_the_worklist_api(client, role_user, role):
    client.force_login(role_user(role))
    alert = _open()
    assert client.get("/api/alerts/").status_code == 403
    assert client.post(f"/api/alerts/{alert.pk}/acknowledge/", {},
                       content_type="application/json").status_code == 403


def test_cds_hooks_discovery_lists_the_patient_view_service(client):
    body = client.get("/cds-services").json()
    assert body["services"][0]["hook"] == "patient-view"


def test_cds_hooks_returns_a_card_for_a_patient_with_an_open_alert(client):
    patient = PatientFactory(mrn="SYN-CDS-1")
    _open(patient)
    _, token = feed_create(name="ehr-cds")
    response = client.post(
        reverse("cds-patient-view"),
        {"hook": "patient-view", "hookInstance": "x", "context": {"patientId": "SYN-CDS-1",
                                                                 "userId": "Practitioner/1"}},
        content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {token}",
    )
    cards = response.json()["cards"]
    assert response.status_code == 200
    assert len(cards) == 1
    assert "VBQ 3.60 (high ≥ 3, default threshold, field strength unknown)" in cards[0]["detail"]
    assert cards[0]["indicator"] == "warning"


def test_the_cds_card_names_the_field_strength_threshold_that_applied(client):
    patient = PatientFactory(mrn="SYN-CDS-3T")
    alert_open(patient=patient, rule_id="high-vbq-untreated-60d", reason="r", vbq_value=2.8,
               vbq_threshold=2.6, vbq_threshold_field="3 T")
    _, token = feed_create(name="ehr-cds-3t")
    response = client.post(
        reverse("cds-patient-view"),
        {"hook": "patient-view", "hookInstance": "x", "context": {"patientId": "SYN-CDS-3T"}},
        content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert "VBQ 2.80 (high ≥ 2.6, 3 T threshold)" in response.json()["cards"][0]["detail"]


def test_cds_hooks_needs_a_feed_token(client):
    response = client.post(reverse("cds-patient-view"), {"context": {"patientId": "x"}},
                           content_type="application/json")
    assert response.status_code == 401


def test_cds_hooks_returns_no_card_for_an_unknown_patient(client):
    _, token = feed_create(name="ehr-cds-2")
    response = client.post(reverse("cds-patient-view"), {"context": {"patientId": "nobody"}},
                           content_type="application/json",
                           HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.json() == {"cards": []}
    assert MRN_SYSTEM


@pytest.mark.postgres
def test_a_snooze_during_a_sweep_waits_for_it_instead_of_deadlocking(transactional_db):
    """The sweep holds a due patient's row and then locks the patient's alerts; a staff snooze
    of one of those alerts (which also moves the patient's next check) must take the same order,
    patient then alert: it waits and then succeeds, with no deadlock. Real concurrency: a
    second PostgreSQL connection plays the sweep."""
    import threading
    import time

    import psycopg
    from django.db import connection

    from tests.conftest import test_database_url

    alert = _open()
    patient_table, alert_table = alert.patient._meta.db_table, alert._meta.db_table
    sweep = psycopg.connect(test_database_url().replace("postgres://", "postgresql://"))
    sweep.execute(f"SELECT 1 FROM {patient_table} WHERE id = %s FOR UPDATE",  # noqa: S608
                  [alert.patient_id])
    errors: list[BaseException] = []

    def snooze() -> None:
        try:
            alert_snooze(alert=alert, until=clinic_today() + dt.timedelta(days=7), actor=STAFF)
        except BaseException as exc:  # reported to the test below
            errors.append(exc)
        finally:
            connection.close()

    staff = threading.Thread(target=snooze)
    staff.start()
    time.sleep(0.5)  # the snooze is now waiting (on the patient with the fix; on it too,
    # holding the alert, without it)
    try:
        sweep.execute(f"SELECT 1 FROM {alert_table} WHERE id = %s FOR UPDATE",  # noqa: S608
                      [alert.pk])
        sweep.commit()
    finally:
        sweep.close()
    staff.join(timeout=30)
    assert not errors, errors  # without the order: "deadlock detected" for one of the two
    alert.refresh_from_db()
    assert alert.status == "snoozed"
