"""Report page, API, plots and CSV on the registry database, per role."""

import csv
import datetime as dt
import io
import re

import pytest
from django.core.management import call_command

from registry.models import AuditEvent, Patient
from registry.reports.queries import build_cohort
from registry.reports.survival import build_report
from registry.timeutil import clinic_today

pytestmark = pytest.mark.django_db


@pytest.fixture
def demo(db):
    call_command("demo_cohort", "--patients", "60", "--seed", "2025")


def test_demo_cohort_report_has_the_shape_of_the_paper(demo):
    cohort = build_cohort()
    report = build_report(cohort.rows, cohort.alerts)
    incidence = report.sections["incidence"].data
    assert cohort.synthetic
    assert incidence["pct_with_secondary_fracture"] == pytest.approx(33.3, abs=0.1)
    assert incidence["pct_fractures_after_followup_days"] >= 75
    assert incidence["pct_fractured_with_high_vbq"] >= 80
    hr = report.sections["cox"].data["models"]["group_unadjusted"]["terms"]["vbq_high"]["hr"]
    assert hr > 1


def test_report_page_is_marked_synthetic_and_links_the_downloads(client, role_user, demo):
    client.force_login(role_user("qi_analyst"))
    html = client.get("/reports/").content.decode()
    assert "SYNTHETIC DATA" in html
    assert "/reports/cohort.csv" in html
    assert "Kaplan" in html


def test_qi_analyst_gets_a_deidentified_csv_without_ids_names_or_dates(client, role_user, demo):
    client.force_login(role_user("qi_analyst"))
    response = client.get("/reports/cohort.csv")
    text = response.content.decode()
    assert response.status_code == 200
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 60
    assert "patient_id" not in rows[0]
    assert not re.search(r"\d{4}-\d{2}-\d{2}", text), "dates must be day offsets"
    for patient in Patient.objects.all()[:10]:
        assert str(patient.pk) not in text
        assert patient.given_name not in text
    assert "SYN-0000" not in text
    assert AuditEvent.objects.filter(action="export", object_type="CohortCsv").exists()


def test_coordinator_gets_the_identified_csv(client, role_user, demo):
    client.force_login(role_user("coordinator"))
    text = client.get("/reports/cohort.csv").content.decode()
    first = next(csv.DictReader(io.StringIO(text)))
    assert Patient.objects.filter(pk=first["patient_id"]).exists()


def test_small_cells_are_suppressed_for_the_qi_analyst(client, role_user, demo):
    client.force_login(role_user("qi_analyst"))
    body = client.get("/reports/api/", {"sex": "male", "age_min": 90}).json()
    assert body["deidentified"] is True
    n = body["report"]["n_patients"]
    assert n is None or n >= 5


def test_report_api_answers_json_for_clinicians(client, role_user, demo):
    client.force_login(role_user("clinician"))
    body = client.get("/reports/api/").json()
    assert body["deidentified"] is False
    assert body["report"]["sections"]["kaplan_meier"]["available"] is True


@pytest.mark.parametrize("name", ["km", "roc", "days", "bland-altman", "schoenfeld"])
def test_plots_render_as_svg(client, role_user, demo, name):
    client.force_login(role_user("qi_analyst"))
    response = client.get(f"/reports/plot/{name}.svg")
    assert response.status_code == 200
    assert response["Content-Type"] == "image/svg+xml"
    assert b"<svg" in response.content[:500]


def test_an_empty_cohort_shows_messages_not_errors(client, role_user):
    client.force_login(role_user("qi_analyst"))
    response = client.get("/reports/")
    assert response.status_code == 200
    assert "No patients in the cohort." in response.content.decode()
    assert client.get("/reports/plot/km.png").status_code == 200


def test_invalid_filters_answer_400_with_a_reason(client, role_user):
    client.force_login(role_user("qi_analyst"))
    response = client.get("/reports/", {"index_from": "2025-05-01", "index_to": "2024-01-01"})
    assert response.status_code == 400
    assert "index_from is after index_to" in response.content.decode()
    assert client.get("/reports/api/", {"age_min": "abc"}).status_code == 400


def test_feed_accounts_cannot_read_reports(client, role_user):
    client.force_login(role_user("feed"))
    assert client.get("/reports/").status_code == 403
    assert client.get("/reports/api/").status_code == 403
    assert client.get("/reports/cohort.csv").status_code == 403


def test_printable_summary_renders(client, role_user, demo):
    client.force_login(role_user("qi_analyst"))
    response = client.get("/reports/summary/")
    assert response.status_code == 200
    assert "quality-improvement summary" in response.content.decode()


@pytest.mark.parametrize(
    ("role", "identified"),
    [("clinician", True), ("coordinator", True), ("admin", True), ("qi_analyst", False)],
)
def test_every_reporting_role_can_view_and_only_non_qi_roles_get_identified_rows(
    client, role_user, role, identified
):
    call_command("demo_cohort", "--patients", "12", "--seed", "7")
    client.force_login(role_user(role))
    assert client.get("/reports/").status_code == 200
    assert client.get("/reports/api/").status_code == 200
    header = client.get("/reports/cohort.csv").content.decode().splitlines()[0].split(",")
    assert ("patient_id" in header) is identified


def test_pages_print_tiny_p_values_as_less_than_0_001():
    from django.template import Context, Template

    template = Template("{% load report_format %}{{ p|pvalue }} {{ q|pvalue }}")
    assert template.render(Context({"p": 3e-12, "q": 0.2})) == "&lt; 0.001 0.200"


def test_the_report_words_the_proportional_hazards_test_as_not_rejected_or_violated(
    client, role_user, demo
):
    client.force_login(role_user("clinician"))
    html = client.get("/reports/").content.decode()
    assert ("not rejected" in html) or ("violated" in html)
    assert ">holds<" not in html
    assert "Treated (numerator) / eligible (denominator)" in html
    assert "reverse Kaplan–Meier" in html


def test_a_past_cut_off_reports_only_what_was_recorded_by_then(client, role_user, demo):
    client.force_login(role_user("clinician"))
    # The demo cohort was written today: at last year's cut-off none of it was recorded.
    past = (clinic_today() - dt.timedelta(days=365)).isoformat()
    recorded = client.get("/reports/api/", {"cutoff": past}).json()
    dated = client.get("/reports/api/", {"cutoff": past, "as_of": "dated"}).json()
    assert recorded["report"]["n_patients"] == 0
    assert dated["report"]["n_patients"] > 0
    assert (recorded["as_of"], dated["as_of"]) == ("recorded", "dated")
