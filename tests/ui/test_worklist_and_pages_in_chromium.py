"""The worklist, patient and error pages driven in Debian chromium (Playwright) against a live
server on the test database: notes in the alert history, resolve with a reason, a confirmation
and an undo, the therapy / MRN / birth-date / overdue columns, the phone layout, a session that
ends before a worklist action, error pages with navigation, and a walk of every page by every
role with zero console errors, failed requests or HTTP errors (favicon included).

Every patient and image here is SYNTHETIC. Select with ``-m browser``.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from urllib.parse import urlsplit

import pytest
from django.contrib.sessions.models import Session
from playwright.sync_api import expect

from followup.sweep import followup_sweep
from registry.models import Alert, AlertEvent
from registry.timeutil import clinic_today
from tests.factories import PatientFactory, TherapyExposureFactory
from tests.registry.followup_helpers import high_vbq_patient
from tests.ui.chromium import PASSWORD, PHONE, launch, login, shot
from tests.ui.data import reviewable_result

pytestmark = [pytest.mark.browser, pytest.mark.postgres, pytest.mark.slow]

ROLES = ("coordinator", "clinician", "qi_analyst", "feed", "admin")


@pytest.fixture(scope="module")
def browser():
    yield from launch()


@pytest.fixture
def clinic(transactional_db, role_user, tmp_path, settings):
    """Users of every role and SYNTHETIC alerts: day 75 (Ada), day 718 (Bea, whose denosumab
    lapsed), a fracture case, and a result waiting for review with its phantom images."""
    settings.DICOM_STORAGE_ROOT = tmp_path / "dicom"
    users = {}
    for role in ROLES:
        users[role] = role_user(role, username=f"demo-{role}")
        users[role].set_password(PASSWORD)
        users[role].save()
    ada = high_vbq_patient(75, vbq=3.4, given_name="Ada", mrn="SYN-UI-0075")
    bea = high_vbq_patient(718, vbq=3.9, given_name="Bea", mrn="SYN-UI-0718")
    TherapyExposureFactory(patient=bea, agent="denosumab", route="sc", kind="administration",
                           status="completed", start_on=clinic_today() - dt.timedelta(days=500),
                           end_on=None)
    for i in range(3):
        high_vbq_patient(90 + 30 * i, vbq=3.1 + 0.2 * i, given_name=f"Other{i}")
    followup_sweep()
    reviewable_result(ada, tmp_path / "dicom", seed=11)
    PatientFactory(given_name="Nobody")
    return {"users": users, "ada": Alert.objects.get(patient=ada),
            "bea": Alert.objects.get(patient=bea)}


def _row(page, alert):
    return page.locator(f'tr[data-alert="{alert.pk}"]')


def test_a_note_added_on_the_worklist_shows_in_the_alert_history_with_who_and_what(
        browser, live_server, clinic):
    alert = clinic["ada"]
    page = login(browser, live_server, "demo-coordinator")
    page.goto(f"{live_server.url}/worklist/")
    row = _row(page, alert)
    row.get_by_text("More…").click()
    row.get_by_label("Note").fill("Called the GP; DXA booked (SYNTHETIC).")
    row.get_by_role("button", name="Add note").click()
    expect(page.locator("#worklist-status")).to_contain_text("note added")
    page.goto(f"{live_server.url}/patients/{alert.patient_id}/")
    history = page.locator(f'li[data-alert="{alert.pk}"] table.alert-history')
    expect(history).to_contain_text("Called the GP; DXA booked (SYNTHETIC).")
    note_row = history.locator("tr", has_text="Called the GP")
    expect(note_row).to_contain_text("demo-coordinator")
    expect(note_row).to_contain_text("Note")
    expect(history).to_contain_text("Opened")
    history.scroll_into_view_if_needed()
    shot(page, "alert-history")
    expect(page.locator("main")).not_to_contain_text("high-vbq-untreated-60d")
    assert page.problems == []
    page.context.close()


def test_resolve_needs_a_reason_and_a_confirmation_and_can_be_undone(
        browser, live_server, clinic):
    alert = clinic["ada"]
    page = login(browser, live_server, "demo-coordinator")
    page.goto(f"{live_server.url}/worklist/")
    row = _row(page, alert)
    assert row.get_by_label("Resolution reason").input_value() == ""  # no default reason
    row.get_by_role("button", name="Resolve").click()
    expect(page.locator("#worklist-status")).to_contain_text("Choose why")
    alert.refresh_from_db()
    assert alert.status == "open"

    row.get_by_label("Resolution reason").select_option("therapy-declined")
    row.get_by_role("button", name="Resolve").click()
    expect(row.locator(".confirm-panel")).to_contain_text(
        "Resolve as “Therapy declined by the patient”?")
    shot(page, "worklist-resolve-confirm")
    row.get_by_role("button", name="Cancel").click()
    alert.refresh_from_db()
    assert alert.status == "open"  # nothing sent without the confirmation

    row.get_by_role("button", name="Resolve").click()
    row.get_by_role("button", name="Confirm resolve").click()
    expect(_row(page, alert)).to_have_class(re.compile("status-resolved"))
    expect(_row(page, alert)).to_contain_text("Resolved: Therapy declined by the patient")
    alert.refresh_from_db()
    assert (alert.status, alert.resolution_reason) == ("resolved", "therapy-declined")

    _row(page, alert).get_by_role("button", name="Undo resolve").click()
    expect(_row(page, alert)).to_have_class(re.compile("status-open"))
    alert.refresh_from_db()
    assert (alert.status, alert.resolution_reason) == ("open", "")
    assert list(AlertEvent.objects.filter(alert=alert).values_list("action", flat=True))[-2:] \
        == ["resolve", "reopen"]
    assert page.problems == []
    page.context.close()


def test_the_worklist_shows_therapy_mrn_birth_date_and_puts_the_most_overdue_first(
        browser, live_server, clinic):
    ada, bea = clinic["ada"], clinic["bea"]
    page = login(browser, live_server, "demo-coordinator")
    page.goto(f"{live_server.url}/worklist/")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.get_by_label("Sort").select_option("overdue")
    page.get_by_role("button", name="Apply").click()
    page.wait_for_url(re.compile(r".*sort=overdue"))
    headers = page.locator("#worklist-table thead th").all_inner_texts()
    for title in ("MRN", "Born", "Last therapy", "Days since procedure", "Due"):
        assert title in headers, headers
    first = page.locator("#worklist-table tbody tr").first
    assert first.get_attribute("data-alert") == str(bea.pk)  # day 718 before day 75
    bea_row, ada_row = _row(page, bea), _row(page, ada)
    expect(bea_row).to_contain_text("SYN-UI-0718")
    expect(bea_row).to_contain_text(bea.patient.birth_date.isoformat())
    expect(bea_row.locator("td.therapy")).to_contain_text("Denosumab")
    expect(bea_row.locator("td.therapy")).to_contain_text("lapsed")
    expect(bea_row).to_contain_text("658 d overdue")
    expect(ada_row).to_contain_text("15 d overdue")
    expect(ada_row.locator("td.therapy")).to_contain_text("none recorded")
    expect(ada_row).to_contain_text("75")
    assert page.problems == []
    page.context.close()


def test_the_worklist_fits_a_390_px_phone_without_horizontal_scroll(
        browser, live_server, clinic):
    alert = clinic["ada"]
    page = login(browser, live_server, "demo-coordinator", viewport=PHONE)
    page.goto(f"{live_server.url}/worklist/")
    width = page.evaluate("document.documentElement.scrollWidth")
    inner = page.evaluate("window.innerWidth")
    assert width <= inner, f"page is {width} px wide in a {inner} px viewport"
    shot(page, "worklist-phone")
    button = _row(page, alert).get_by_role("button", name="Acknowledge")
    button.scroll_into_view_if_needed()
    box = button.bounding_box()
    assert box["x"] >= 0
    assert box["x"] + box["width"] <= inner
    button.click()
    expect(_row(page, alert)).to_have_class(re.compile("status-acknowledged"))
    assert page.evaluate("document.documentElement.scrollWidth") <= inner
    page.goto(f"{live_server.url}/patients/{alert.patient_id}/")
    assert page.evaluate("document.documentElement.scrollWidth") <= inner
    assert page.problems == []
    page.context.close()


def test_a_session_that_ends_before_a_worklist_note_asks_to_log_in_then_sends_the_note(
        browser, live_server, clinic):
    alert = clinic["ada"]
    page = login(browser, live_server, "demo-coordinator")
    page.goto(f"{live_server.url}/worklist/?sort=vbq")
    row = _row(page, alert)
    row.get_by_text("More…").click()
    text = "Patient asked to call back on Monday (SYNTHETIC)."
    row.get_by_label("Note").fill(text)
    Session.objects.all().delete()  # the idle timeout ends the session on the server
    row.get_by_role("button", name="Add note").click()
    dialog = page.locator("#relogin-dialog")
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("Your session has ended")
    shot(page, "worklist-session-ended")
    expect(page.locator("body")).not_to_contain_text("Check the connection")
    expect(page.locator("body")).not_to_contain_text("Network error")
    assert not AlertEvent.objects.filter(alert=alert, action="note").exists()
    refused = f"/worklist/{alert.pk}/note/"
    assert any("HTTP 401" in p and refused in p for p in page.problems)  # the server's answer
    page.problems[:] = [p for p in page.problems if refused not in p and "401" not in p]

    page.get_by_role("link", name="Log in again").click()
    page.wait_for_url(re.compile(r".*/accounts/login/\?next="))
    page.fill("#id_username", "demo-coordinator")
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r".*/worklist/\?sort=vbq$"))
    status = page.locator("#worklist-status")
    expect(status).to_contain_text("it is sent now that you are logged in again")
    expect(status).to_contain_text("note added")
    assert AlertEvent.objects.get(alert=alert, action="note").note == text  # sent once
    assert page.evaluate("sessionStorage.length") == 0  # the draft is gone
    assert page.problems == []
    page.context.close()


def test_error_pages_have_the_navigation_and_a_way_back(browser, live_server, clinic):
    from scoring.models import VbqResult

    result = VbqResult.objects.get(patient=clinic["ada"].patient, source="auto")
    page = login(browser, live_server, "demo-coordinator")
    page.goto(f"{live_server.url}/worklist/")
    with page.expect_navigation() as navigation:  # a link followed: the browser sends Referer
        # a result's review page: reviewers only (coordinators see the queue read only)
        page.evaluate(f"location.href = '/vbq/review/{result.pk}/'")
    assert navigation.value.status == 403
    expect(page.locator("h1")).to_contain_text("not allowed")
    expect(page.locator("nav[aria-label=Main]")).to_contain_text("Worklist")
    page.get_by_role("link", name="Back to the previous page").click()
    page.wait_for_url(re.compile(r".*/worklist/$"))
    response = page.goto(f"{live_server.url}/patients/00000000-0000-0000-0000-00000000abcd/")
    assert response.status == 404
    expect(page.locator("h1")).to_contain_text("Page not found")
    page.get_by_role("link", name="Home").click()
    page.wait_for_url(re.compile(r".*/$"))
    expect(page.locator("main")).to_contain_text("Worklist")
    expected = re.compile(r"(HTTP 40[34]: GET |console on ).*/(vbq/review/|patients/0{8})")
    assert [p for p in page.problems if not expected.search(p)] == []
    page.context.close()


PER_ROUTE = 8


def _route_key(path: str) -> str:
    """A page's route with its ids blanked: the walk opens at most ``PER_ROUTE`` pages of one
    route (8 patients, not all of them)."""
    return re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}|\d+", "#", path)


def _walk(page, live_server, limit: int = 60) -> list[str]:
    """Open "/" and the API docs, then every same-site page linked from the pages reached (at
    most ``PER_ROUTE`` per route), in breadth-first order; downloads, logout and the admin
    site left out. Every link and form target met is checked for an MRN. Returns the paths
    with their status."""
    per_route: Counter[str] = Counter()
    seen: set[str] = set()
    queue, visited = ["/", "/api/docs/"], []
    while queue and len(visited) < limit:
        path = queue.pop(0)
        key = _route_key(urlsplit(path).path)
        if path in seen or per_route[key] >= PER_ROUTE:
            continue
        seen.add(path)
        per_route[key] += 1
        response = page.goto(f"{live_server.url}{path}")
        page.wait_for_load_state("networkidle")
        visited.append(f"{path} {response.status}")
        targets = page.eval_on_selector_all(
            "a[href], form[action]",
            "els => els.map(e => e.getAttribute('href') || e.getAttribute('action'))")
        assert not [t for t in targets if "SYN-" in t], (path, targets)  # no MRN in a URL
        for href in page.eval_on_selector_all(
                "a[href]", "els => els.map(e => e.getAttribute('href'))"):
            parts = urlsplit(href)
            if parts.netloc and parts.netloc != urlsplit(live_server.url).netloc:
                continue
            if not parts.path.startswith("/") or parts.path.startswith(("/admin/",
                                                                        "/accounts/")):
                continue
            if "csv" in href or "download" in href or parts.path == "/api/schema/":
                continue
            queue.append(parts.path + (f"?{parts.query}" if parts.query else ""))
    return visited


@pytest.mark.parametrize("role", ROLES)
def test_every_page_a_role_reaches_loads_without_a_console_error_or_a_failed_request(
        browser, live_server, clinic, role):
    page = login(browser, live_server, f"demo-{role}")
    visited = _walk(page, live_server)
    assert page.problems == [], (visited, page.problems)
    assert len(visited) >= (2 if role == "feed" else 4), visited
    page.context.close()


def test_the_favicon_is_served(browser, live_server, clinic):
    page = login(browser, live_server, "demo-clinician")
    href = page.get_attribute("link[rel='icon']", "href")
    assert href
    assert page.request.get(f"{live_server.url}{href}").status == 200
    page.context.close()


def test_the_jobs_page_says_the_session_ended_instead_of_retrying_for_ever(
        browser, live_server, clinic):
    page = login(browser, live_server, "demo-clinician")
    page.goto(f"{live_server.url}/vbq/jobs/")
    expect(page.locator("#jobs-updated")).to_contain_text("Updated")
    Session.objects.all().delete()
    expect(page.locator("#jobs-updated")).to_contain_text("Your session has ended",
                                                          timeout=12_000)
    link = page.locator("#jobs-updated").get_by_role("link", name="Log in again")
    assert "next=%2Fvbq%2Fjobs%2F" in link.get_attribute("href")
    assert [p for p in page.problems if "403" not in p] == []  # the API's own answer
    page.context.close()


def test_an_upload_after_the_session_ended_says_so_and_offers_the_login(
        browser, live_server, clinic, tmp_path):
    import zipfile

    page = login(browser, live_server, "demo-coordinator")
    page.goto(f"{live_server.url}/patients/{clinic['ada'].patient_id}/imaging/upload/")
    archive = tmp_path / "empty.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("README.txt", "SYNTHETIC: not DICOM")
    page.set_input_files("#dicom-file", str(archive))
    Session.objects.all().delete()
    page.click("#upload-button")
    status = page.locator("#upload-status")
    expect(status).to_contain_text("Your session has ended, so nothing was uploaded")
    expect(status.get_by_role("link", name="Log in again")).to_have_attribute(
        "href", re.compile(r"next=%2Fpatients%2F"))
    assert [p for p in page.problems if "403" not in p] == []  # the API's own answer
    page.context.close()


@pytest.mark.parametrize("role", ["coordinator", "clinician"])
def test_every_page_fits_a_390_px_phone_without_horizontal_scroll(
        browser, live_server, clinic, role):
    page = login(browser, live_server, f"demo-{role}", viewport=PHONE)
    too_wide = []
    for entry in _walk(page, live_server, limit=25):
        path = entry.rsplit(" ", 1)[0]
        page.goto(f"{live_server.url}{path}")
        page.wait_for_load_state("networkidle")
        width = page.evaluate("document.documentElement.scrollWidth")
        if width > PHONE["width"]:
            too_wide.append((path, width))
    assert too_wide == [], too_wide
    assert page.problems == []
    page.context.close()


def test_the_upload_pages_override_form_stays_hidden_until_shown_and_then_fits_a_phone(
        browser, live_server, clinic):
    page = login(browser, live_server, "demo-coordinator", viewport=PHONE)
    page.goto(f"{live_server.url}/patients/{clinic['ada'].patient_id}/imaging/upload/")
    override = page.locator("#identity-override")
    expect(override).to_be_hidden()  # the hidden attribute wins over .stack's display:flex
    page.evaluate("document.getElementById('identity-override').hidden = false")  # as the JS does
    expect(override).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    assert page.problems == []
    page.context.close()


WIDER_THAN_THE_WINDOW = """Array.from(document.querySelectorAll('body *'))
  .filter(e => e.getBoundingClientRect().right > window.innerWidth + 0.5)
  .slice(0, 8).map(e => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '')
                        + (e.className && typeof e.className === 'string'
                           ? '.' + e.className.split(' ')[0] : '')
                        + ':' + Math.round(e.getBoundingClientRect().right))"""


def test_the_review_page_of_an_automatic_result_fits_a_390_px_phone(
        browser, live_server, clinic):
    """The review page (viewer, toolbar, figures, ROI table, save, decision forms) at 390 px:
    no horizontal scroll, and the image and the save and accept buttons inside the window
    (SYNTHETIC phantom)."""
    from scoring.models import VbqResult

    result = VbqResult.objects.get(patient=clinic["ada"].patient, source="auto")
    page = login(browser, live_server, "demo-clinician", viewport=PHONE)
    page.goto(f"{live_server.url}/vbq/review/{result.pk}/")
    page.wait_for_load_state("networkidle")
    expect(page.locator("#roi-layer .roi[data-level='L2']")).to_be_visible()
    width, inner = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert width <= inner, (width, inner, page.evaluate(WIDER_THAN_THE_WINDOW))
    for selector in ("#viewer", "#save-corrected", "form.js-decision button[type=submit]"):
        box = page.locator(selector).first.bounding_box()
        assert box["x"] >= 0, (selector, box)
        assert box["x"] + box["width"] <= inner, (selector, box)
    shot(page, "review-phone")
    assert page.problems == []
    page.context.close()
