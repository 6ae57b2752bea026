"""Clinic pages (server side): alert history in words, readable labels, resolve only with a
reason and a confirmation, undo of a resolve within its window, the worklist's therapy,
MRN, birth-date and overdue columns, the patient page's identifiers and image fallback, and
error pages with navigation. Every patient is SYNTHETIC."""

from __future__ import annotations

import datetime as dt

import pytest
from django.urls import reverse
from django.utils import timezone

from followup.sweep import followup_sweep
from registry import labels
from registry.models import Alert, AlertEvent, AuditEvent
from registry.timeutil import clinic_today
from scoring.models import ImagingSeries, ImagingStudy, VbqResult
from tests.factories import PatientFactory, TherapyExposureFactory
from tests.registry.followup_helpers import high_vbq_patient

pytestmark = pytest.mark.django_db


@pytest.fixture
def alert(db):
    high_vbq_patient(75, mrn="SYN-H18-1", given_name="Historyone")
    followup_sweep()
    return Alert.objects.get()


def _act(client, alert, action, **data):
    return client.post(reverse("worklist-action", args=[alert.pk, action]), data,
                       HTTP_X_REQUESTED_WITH="fetch")


def test_a_note_appears_on_the_patient_page_with_who_when_and_what(client, role_user, alert):
    user = role_user("coordinator", username="coord-notes")
    client.force_login(user)
    _act(client, alert, "note", note="Called the GP; DXA booked (SYNTHETIC).")
    _act(client, alert, "resolve", reason="therapy-declined", confirmed="1",
         note="Declined at the clinic visit (SYNTHETIC).")
    html = client.get(reverse("patient-detail", args=[alert.patient_id])).content.decode()
    assert "Called the GP; DXA booked (SYNTHETIC)." in html
    assert "Declined at the clinic visit (SYNTHETIC)." in html
    assert "coord-notes" in html
    assert "Resolved: Therapy declined by the patient" in html
    assert "High VBQ, untreated at day 60" in html
    assert "high-vbq-untreated-60d" not in html
    assert "therapy-declined" not in html
    when = timezone.localtime(AlertEvent.objects.get(action="note").at,
                              labels_zone()).strftime("%Y-%m-%d %H:%M")
    assert when in html


def labels_zone():
    from registry.timeutil import clinic_zone

    return clinic_zone()


def test_one_label_table_names_rules_and_reasons_everywhere():
    assert labels.rule_label("high-vbq-untreated-60d") == "High VBQ, untreated at day 60"
    assert labels.reason_label("therapy-declined") == "Therapy declined by the patient"
    assert labels.rule_label("some-new-rule") == "Some new rule"
    assert labels.identifier_system_label(
        "https://vbq-registry.example.org/fhir/sid/synthetic-mrn") == "MRN (synthetic)"
    assert labels.identifier_system_label("https://ehr.example.org/sid/enc", "") == (
        "ehr.example.org enc")
    assert labels.identifier_system_label("urn:oid:1.2.3", "MR") == "MRN"


def test_the_email_digest_and_fhir_text_name_the_rule_in_words(alert):
    from followup.delivery import _digest_body, communication_resource

    row = alert.deliveries.first()
    assert "High VBQ, untreated at day 60" in _digest_body([row])
    assert "high-vbq-untreated-60d" not in _digest_body([row])
    text = communication_resource(row)["payload"][0]["contentString"]
    assert "High VBQ, untreated at day 60" in text


def test_resolve_without_a_reason_or_a_confirmation_is_refused(client, role_user, alert):
    client.force_login(role_user("coordinator"))
    response = _act(client, alert, "resolve", reason="therapy-started")
    assert response.status_code == 400
    assert "confirm" in response.json()["message"]
    response = _act(client, alert, "resolve", reason="", confirmed="1")
    assert response.status_code == 400
    assert "choose why" in response.json()["message"]
    alert.refresh_from_db()
    assert alert.status == "open"
    html = client.get(reverse("worklist")).content.decode()
    select = html.split(f'id="reason-{alert.pk}"')[1].split("</select>")[0]
    assert select.split("<option")[1].startswith(' value=""')  # no reason chosen for you
    assert "selected" not in select


def test_a_resolve_is_undone_within_the_window_and_the_undo_is_audited(
        client, role_user, alert):
    client.force_login(role_user("coordinator"))
    _act(client, alert, "acknowledge")
    body = _act(client, alert, "resolve", reason="treated-elsewhere", confirmed="1").json()
    assert "Undo resolve" in body["html"]
    body = _act(client, alert, "reopen").json()
    assert body["ok"], body
    alert.refresh_from_db()
    assert (alert.status, alert.resolution_reason, alert.resolved_at) == (
        "acknowledged", "", None)
    event = AlertEvent.objects.filter(alert=alert).latest("pk")
    assert (event.action, event.detail["undone_reason"]) == ("reopen", "treated-elsewhere")
    assert AuditEvent.objects.filter(object_type="Alert", object_id=str(alert.pk),
                                     detail__alert_action="reopen").exists()


def test_a_resolve_cannot_be_undone_after_the_window(client, role_user, alert, settings):
    client.force_login(role_user("coordinator"))
    _act(client, alert, "resolve", reason="treated-elsewhere", confirmed="1")
    Alert.objects.filter(pk=alert.pk).update(
        resolved_at=timezone.now() - dt.timedelta(seconds=settings.ALERT_REOPEN_WINDOW_SECONDS
                                                  + 5))
    response = _act(client, alert, "reopen")
    assert response.status_code == 400
    assert "can no longer be undone" in response.json()["message"]
    assert "Undo resolve" not in response.json()["html"]


def test_a_resolve_by_a_rule_cannot_be_undone_from_the_worklist(client, role_user, alert):
    from followup.alerts import alert_resolve
    from registry.side_effects import SYSTEM_ACTOR

    alert_resolve(alert=alert, reason="therapy-started", actor=SYSTEM_ACTOR)
    client.force_login(role_user("coordinator"))
    html = client.get(reverse("worklist"), {"status": "resolved"}).content.decode()
    assert f'data-alert="{alert.pk}"' in html
    assert "Undo resolve" not in html
    assert _act(client, alert, "reopen").status_code == 400


def test_the_worklist_shows_mrn_birth_date_and_a_lapsed_denosumab(client, role_user, alert):
    patient = alert.patient
    start = clinic_today() - dt.timedelta(days=400)
    TherapyExposureFactory(patient=patient, agent="denosumab", route="sc", kind="administration",
                   status="completed", start_on=start, end_on=None)
    client.force_login(role_user("coordinator"))
    html = client.get(reverse("worklist")).content.decode()
    row = html.split(f'data-alert="{alert.pk}"')[1].split("</tr>")[0]
    assert "{#" not in html
    assert "comment" not in row
    assert "SYN-H18-1" in row
    assert patient.birth_date.isoformat() in row
    assert "Denosumab" in row
    assert f"lapsed {(start + dt.timedelta(days=182)).isoformat()}" in row


def test_day_718_sorts_before_day_75_and_says_how_overdue(client, role_user, alert):
    high_vbq_patient(718, mrn="SYN-H18-2", given_name="Longago")
    followup_sweep()
    old = Alert.objects.get(patient__given_name="Longago")
    assert old.due_on == alert.due_on  # both opened today by the sweep
    client.force_login(role_user("coordinator"))
    html = client.get(reverse("worklist"), {"sort": "overdue"}).content.decode()
    assert html.index(f'data-alert="{old.pk}"') < html.index(f'data-alert="{alert.pk}"')
    html = client.get(reverse("worklist"), {"sort": "overdue", "status": "open"}).content.decode()
    assert html.index(f'data-alert="{old.pk}"') < html.index(f'data-alert="{alert.pk}"')
    old_row = html.split(f'data-alert="{old.pk}"')[1].split("</tr>")[0]
    new_row = html.split(f'data-alert="{alert.pk}"')[1].split("</tr>")[0]
    assert "658 d overdue" in old_row
    assert "15 d overdue" in new_row


def test_the_patient_page_names_identifier_systems_and_shows_no_raw_uri(client, role_user):
    patient = PatientFactory(mrn="SYN-H18-ID")
    client.force_login(role_user("clinician"))
    html = client.get(reverse("patient-detail", args=[patient.pk])).content.decode()
    assert "MRN (synthetic)" in html
    assert "SYN-H18-ID" in html
    assert "https://vbq-registry.example.org/fhir/sid/synthetic-mrn" not in html


def test_an_imported_vbq_says_no_image_instead_of_linking_a_broken_one(client, role_user):
    patient = high_vbq_patient(70, given_name="Imported")
    client.force_login(role_user("clinician"))
    html = client.get(reverse("patient-detail", args=[patient.pk])).content.decode()
    assert "No image: this VBQ was imported" in html
    assert "image.png" not in html


def test_a_series_stored_nowhere_says_no_image_and_names_no_setting(client, role_user,
                                                                     settings):
    settings.PACS_DICOMWEB_URL = ""
    patient = PatientFactory()
    study = ImagingStudy.objects.create(patient=patient, study_instance_uid="2.25.1801",
                                        source="fhir", modality="MR")
    series = ImagingSeries.objects.create(study=study, series_instance_uid="2.25.1802",
                                          modality="MR", description="SAG T1")
    VbqResult.objects.create(patient=patient, series=series, algorithm_version="t",
                             source="auto", status="succeeded", vbq_all_levels=3.2,
                             vbq_excluding_fractured=3.2, qc_clear=True, confidence=0.95)
    client.force_login(role_user("clinician"))
    html = client.get(reverse("patient-detail", args=[patient.pk])).content.decode()
    assert "No image: the MRI images of this result are not stored here" in html
    assert "image.png" not in html
    assert "PACS_DICOMWEB_URL" not in html


@pytest.mark.parametrize(("url", "status", "title"), [
    ("/patients/00000000-0000-0000-0000-000000000001/", 404, "Page not found"),
    ("/vbq/review/1/", 403, "You are not allowed to open this page"),  # reviewers only
])
def test_error_pages_use_the_layout_with_navigation_and_a_way_back(
        client, role_user, url, status, title):
    client.force_login(role_user("coordinator"))
    response = client.get(url, HTTP_REFERER="http://testserver/worklist/?sort=vbq")
    html = response.content.decode()
    assert response.status_code == status
    assert title in html
    assert 'nav aria-label="Main"' in html
    assert 'href="/worklist/?sort=vbq">Back to the previous page' in html
    assert 'href="/">Home' in html


def test_the_500_page_renders_without_a_request_or_a_database(client):
    from django.db import connection
    from django.test import RequestFactory
    from django.test.utils import CaptureQueriesContext

    from config.error_views import server_error

    with CaptureQueriesContext(connection) as ctx:
        response = server_error(RequestFactory().get("/broken/"))
    assert response.status_code == 500
    assert "Something went wrong on the server" in response.content.decode()
    assert 'href="/">Home' in response.content.decode()
    assert ctx.captured_queries == []


def test_the_coordinator_home_links_the_worklist_and_the_favicon_is_served(client, role_user):
    client.force_login(role_user("coordinator"))
    html = client.get("/").content.decode()
    assert f'href="{reverse("worklist")}"' in html.split("<main>")[1]
    response = client.get("/favicon.ico")
    assert response.status_code == 301
    assert client.get(response["Location"]).status_code == 200


def test_an_old_link_note_naming_a_setting_reads_in_words_on_the_patient_page(
        client, role_user):
    patient = PatientFactory()
    ImagingStudy.objects.create(
        patient=patient, study_instance_uid="2.25.1803", source="fhir", modality="MR",
        started_at=timezone.now(), started_on=clinic_today(), description="SYNTHETIC lumbar MRI",
        link_reason="linked; not scored: no PACS endpoint (PACS_DICOMWEB_URL) and no local copy")
    client.force_login(role_user("clinician"))
    html = client.get(reverse("patient-detail", args=[patient.pk])).content.decode()
    assert "PACS_DICOMWEB_URL" not in html
    assert "no PACS is configured and the images are not stored here" in html


def test_the_api_reopens_a_resolve_and_refuses_a_second_reopen(client, role_user, alert):
    client.force_login(role_user("coordinator"))
    resolved = client.post(f"/api/alerts/{alert.pk}/resolve/", {"reason": "transferred"},
                           content_type="application/json")
    assert resolved.status_code == 200, resolved.content
    reopened = client.post(f"/api/alerts/{alert.pk}/reopen/", {"note": "wrong patient"},
                           content_type="application/json")
    assert (reopened.status_code, reopened.json()["status"]) == (200, "open")
    again = client.post(f"/api/alerts/{alert.pk}/reopen/", {}, content_type="application/json")
    assert again.status_code == 409
    assert AlertEvent.objects.get(alert=alert, action="reopen").note == "wrong patient"


def test_a_page_script_whose_session_ended_gets_401_json_and_a_browser_the_login_page(
        client, alert):
    url = reverse("worklist-action", args=[alert.pk, "note"])
    scripted = client.post(url, {"note": "x"}, HTTP_X_REQUESTED_WITH="fetch")
    assert scripted.status_code == 401
    assert scripted.json()["login_url"] == reverse("login")
    browsing = client.post(url, {"note": "x"})
    assert browsing.status_code == 302
    assert browsing["Location"].startswith(reverse("login"))
    assert not AlertEvent.objects.filter(alert=alert, action="note").exists()
