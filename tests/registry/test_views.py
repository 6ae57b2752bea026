"""Health checks are open; everything else needs a login and the right role."""

import pytest
from django.urls import reverse

from registry.models import AuditEvent
from tests.factories import PatientFactory

pytestmark = pytest.mark.django_db


def test_healthz_answers_without_login(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_reports_database_and_broker_ok(client):
    response = client.get("/readyz")
    body = response.json()
    assert response.status_code == 200, body
    assert body["database"] == "ok"
    assert body["broker"] == "ok"


def test_readyz_answers_503_with_a_reason_when_the_broker_is_down(client, settings):
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {}
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["broker"].startswith("error")


def test_pages_redirect_anonymous_users_to_login(client):
    patient = PatientFactory()
    for url in ["/", "/patients/", reverse("patient-detail", args=[patient.pk])]:
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith("/accounts/login/")


def test_coordinator_opens_a_patient_page_and_the_view_is_audited(client, role_user):
    client.force_login(role_user("coordinator"))
    patient = PatientFactory()
    response = client.get(reverse("patient-detail", args=[patient.pk]))
    assert response.status_code == 200
    assert AuditEvent.objects.filter(patient=patient, action="read", via="ui").count() == 1


@pytest.mark.parametrize("role", ["qi_analyst", "feed"])
def test_roles_without_phi_access_cannot_open_patient_pages(client, role_user, role):
    client.force_login(role_user(role))
    patient = PatientFactory()
    assert client.get(reverse("patient-detail", args=[patient.pk])).status_code == 403
    assert client.get(reverse("patient-list")).status_code == 403
    assert not AuditEvent.objects.filter(patient=patient, action="read").exists()


@pytest.mark.parametrize(
    ("role", "sees_patients_link", "sees_reports_link"),
    [
        ("clinician", True, True),
        ("coordinator", True, True),
        ("qi_analyst", False, True),
        ("feed", False, False),
        ("admin", True, True),
    ],
)
def test_navigation_matches_the_role(client, role_user, role, sees_patients_link,
                                     sees_reports_link):
    client.force_login(role_user(role))
    html = client.get("/").content.decode()
    assert ('href="/patients/"' in html) == sees_patients_link
    assert ('href="/reports/"' in html) == sees_reports_link


def test_only_admins_may_send_a_worker_probe(client, role_user):
    client.force_login(role_user("coordinator"))
    assert client.post(reverse("ops-worker-probe")).status_code == 403


def test_patient_search_by_mrn_finds_the_patient_and_never_puts_the_mrn_in_a_url(
        client, role_user):
    client.force_login(role_user("clinician"))
    PatientFactory(mrn="SYN-LOOKUP-7", given_name="Findme")
    PatientFactory(given_name="Other")
    response = client.post("/patients/", {"q": "SYN-LOOKUP-7"})
    assert response.status_code == 302
    assert "SYN-LOOKUP-7" not in response["Location"]
    assert response["Location"].startswith("/patients/?search=")
    html = client.get(response["Location"]).content.decode()
    assert "Findme" in html
    assert "Other" not in html
    assert 'method="post"' in html.split('role="search"')[0].rsplit("<form", 1)[1]


def test_a_search_token_of_another_session_finds_nothing(client, role_user):
    client.force_login(role_user("clinician"))
    PatientFactory(mrn="SYN-LOOKUP-8", given_name="Findme")
    location = client.post("/patients/", {"q": "SYN-LOOKUP-8"})["Location"]
    client.logout()
    client.force_login(role_user("coordinator"))
    html = client.get(location).content.decode()
    assert "This search has expired" in html
    assert "SYN-LOOKUP-8" not in html.split("</form>")[0]
