"""The clinic pages driven in Debian chromium (Playwright) against a live server on the test
database: a coordinator works an alert from open to resolved without a page reload, opens the
patient, uploads a DICOM zip and downloads the report CSV; a clinician corrects an ROI by
dragging it, sees the VBQ change and saves a corrected result; a qi_analyst is refused the
patient page. Screenshots of each page (desktop width) are taken on every run; they replace
docs/screenshots/ only when ``UPDATE_SCREENSHOTS=1`` (``make screenshots``), so a test run
leaves the checkout unchanged.

Every patient and image here is SYNTHETIC. Select with ``-m browser``.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import zipfile
from pathlib import Path

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from followup.sweep import followup_sweep
from registry.models import Alert, AuditEvent
from scoring.engine.phantom import make_phantom
from scoring.models import VbqResult
from tests.factories import FractureFactory, PatientFactory
from tests.registry.followup_helpers import high_vbq_patient
from tests.ui.chromium import PASSWORD, launch, shot
from tests.ui.data import reviewable_result

pytestmark = [pytest.mark.browser, pytest.mark.postgres, pytest.mark.slow]

VIEWPORT = {"width": 1366, "height": 860}


@pytest.fixture(scope="module")
def browser():
    """Debian chromium through Playwright (tests/ui/chromium.py)."""
    yield from launch()


def _login(browser, live_server, username):
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    context.set_default_timeout(15_000)
    page = context.new_page()
    # Script errors and Content-Security-Policy violations show up here: none is allowed.
    page.problems = []
    page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
    page.on("pageerror", lambda e: page.problems.append(str(e)))
    page.goto(f"{live_server.url}/accounts/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r".*/$"))
    return page


@pytest.fixture
def clinic(transactional_db, role_user, tmp_path, settings):
    """Users of three roles, a morning's worth of SYNTHETIC alerts, a result to review."""
    settings.DICOM_STORAGE_ROOT = tmp_path / "dicom"
    users = {role: role_user(role, username=f"demo-{role}")
             for role in ("coordinator", "clinician", "qi_analyst")}
    for user in users.values():
        user.set_password(PASSWORD)
        user.save()
    names = ["Ada", "Beatrix", "Clara", "Dora", "Edith", "Flora", "Greta"]
    patients = [high_vbq_patient(62 + 9 * i, vbq=3.1 + 0.25 * i, given_name=n)
                for i, n in enumerate(names)]
    low = [high_vbq_patient(70 + 40 * i, vbq=2.2 + 0.12 * i, given_name=f"Low{i}")
           for i in range(6)]
    for p, days in ((patients[2], 20), (patients[5], 45), (low[4], 60)):
        FractureFactory(patient=p, diagnosed_at=timezone.now() - dt.timedelta(days=days))
    followup_sweep()
    target = patients[0]
    result = reviewable_result(target, tmp_path / "dicom", seed=11)
    bare = reviewable_result(PatientFactory(given_name="Hilda"), tmp_path / "dicom", seed=5,
                             with_rois=False)
    VbqResult.objects.create(patient=patients[3], algorithm_version="0.1.0", source="auto",
                             status="failed", error_code="pacs-unavailable",
                             error_message="the PACS did not answer (SYNTHETIC example)")
    return {"users": users, "patient": target, "alert": Alert.objects.get(patient=target),
            "result": result, "bare": bare, "tmp": tmp_path}


def test_coordinator_works_an_alert_opens_the_patient_uploads_and_downloads_the_csv(
        browser, live_server, clinic):
    page = _login(browser, live_server, "demo-coordinator")
    alert = clinic["alert"]
    assert clinic["alert"].status == "open"
    page.goto(f"{live_server.url}/worklist/")
    row = page.locator(f'tr[data-alert="{alert.pk}"]')
    assert "Ada" in row.inner_text()
    shot(page, "worklist")
    page.evaluate("window.__noReload = 'still here'")

    row.get_by_role("button", name="Acknowledge").click()
    expect(page.locator(f'tr[data-alert="{alert.pk}"]')).to_have_class(
        re.compile("status-acknowledged"))
    assert page.locator('[data-count="acknowledged"]').inner_text() == "1"
    row = page.locator(f'tr[data-alert="{alert.pk}"]')
    row.get_by_label("Resolution reason").select_option("therapy-started")
    row.get_by_role("button", name="Resolve").click()
    row.get_by_role("button", name="Confirm resolve").click()
    expect(page.locator(f'tr[data-alert="{alert.pk}"]')).to_have_class(
        re.compile("status-resolved"))
    assert page.evaluate("window.__noReload") == "still here"  # no full page load happened
    assert "resolved" in page.locator("#worklist-status").inner_text()
    alert.refresh_from_db()
    assert (alert.status, alert.resolution_reason) == ("resolved", "therapy-started")
    assert list(alert.events.order_by("pk").values_list("to_status", flat=True))[-2:] == [
        "acknowledged", "resolved"]

    page.locator(f'tr[data-alert="{alert.pk}"] a').first.click()
    page.wait_for_url(f"**/patients/{alert.patient_id}/")
    assert page.locator("h1").inner_text().startswith("SYNTHETIC, Ada")
    assert AuditEvent.objects.filter(patient_id=alert.patient_id, action="read",
                                     object_type="Patient").exists()
    shot(page, "patient")

    page.get_by_role("link", name="Upload MRI (DICOM zip)").click()
    archive = clinic["tmp"] / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i, ds in enumerate(make_phantom(21, slices=5, rows=128, cols=128).datasets):
            ds.PatientID = alert.patient.identifiers.first().value  # the files are Ada's
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            zf.writestr(f"IM{i:03d}.dcm", buffer.getvalue())
    page.set_input_files("#dicom-file", str(archive))
    page.click("#upload-button")
    expect(page.locator("#upload-status")).to_contain_text("Stored 5 file", timeout=30_000)
    assert page.locator("#upload-progress").get_attribute("value") == "100"
    shot(page, "upload")

    page.goto(f"{live_server.url}/vbq/jobs/")
    expect(page.locator("#jobs-updated")).to_contain_text("Updated")
    assert "pacs-unavailable" in page.locator("#jobs-table").inner_text()
    shot(page, "jobs")

    page.goto(f"{live_server.url}/reports/")
    shot(page, "report")
    with page.expect_download() as download_info:
        page.get_by_role("link", name="Download cohort CSV").click()
    download = download_info.value
    assert download.suggested_filename.startswith("vbq-cohort-identified-")
    rows = list(csv.reader(io.StringIO(Path(download.path()).read_text())))
    assert rows[0][0] == "patient_id"
    assert len(rows) == 1 + 13  # header + the 13 patients with an index procedure
    assert str(alert.patient_id) in {r[0] for r in rows[1:]}
    page.get_by_role("link", name="Printable summary").click()
    page.wait_for_url("**/reports/summary/**")
    expect(page.locator("h1")).to_contain_text("summary", ignore_case=True)
    assert page.problems == []
    page.context.close()


def test_clinician_drags_an_roi_sees_the_vbq_change_and_saves_a_corrected_result(
        browser, live_server, clinic):
    result = clinic["result"]
    page = _login(browser, live_server, "demo-clinician")
    page.goto(f"{live_server.url}/vbq/review/")
    assert page.locator("tbody tr").count() == 2
    shot(page, "needs-review-queue")

    page.goto(f"{live_server.url}/vbq/review/{result.pk}/")
    expect(page.locator("#roi-layer .roi")).to_have_count(5)
    page.wait_for_timeout(300)  # the slice PNG paints
    shot(page, "vbq-review")
    before = page.locator("#vbq-all").inner_text()
    assert before == f"{result.vbq_all_levels:.2f}"

    box = page.locator('#roi-layer .roi[data-level="csf"] ellipse').bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 12, y + 4, steps=4)
    page.mouse.move(x + 26, y + 6, steps=4)
    page.mouse.up()
    expect(page.locator("#vbq-state")).to_contain_text("Recomputed")
    after = page.locator("#vbq-all").inner_text()
    assert after != before
    assert VbqResult.objects.filter(source="manual").count() == 0  # a preview saves nothing
    shot(page, "vbq-review-corrected")

    page.click("#save-corrected")
    page.wait_for_url(re.compile(rf".*/vbq/review/(?!{result.pk}/)\d+/$"))
    saved = VbqResult.objects.get(source="manual")
    assert saved.reviewer.username == "demo-clinician"
    assert f"{saved.vbq_all_levels:.2f}" == after
    assert page.locator("#vbq-all").inner_text() == after
    result.refresh_from_db()
    # the CSF ROI was dragged off the canal: the correction has QC warnings, so it waits in
    # the needs-review queue and the reviewed result is not superseded yet (scoring.trust)
    assert (saved.review_status, saved.qc_clear, result.review_status) == (
        "pending", False, "pending")
    assert AuditEvent.objects.filter(object_type="VbqResult", object_id=str(saved.pk),
                                     action="create", actor__username="demo-clinician").exists()

    # A result without localisation: the reviewer places the five ROIs by clicking.
    bare = clinic["bare"]
    page.goto(f"{live_server.url}/vbq/review/{bare.pk}/")
    expect(page.locator("#vbq-state")).to_contain_text("Place the CSF ROI")
    svg = page.locator("#viewer").bounding_box()
    scale = svg["width"] / bare.series_cols
    targets = {lv: bare.truth["centres_px"][lv][1:] for lv in ("L1", "L2", "L3", "L4")}
    row, col = targets["L3"]
    targets["csf"] = (row, col + 27 / bare.truth["spacing_mm"])
    for level, (row, col) in targets.items():
        page.select_option("#place-level", level)
        page.mouse.click(svg["x"] + col * scale, svg["y"] + row * scale)
    expect(page.locator("#roi-layer .roi")).to_have_count(5)
    expect(page.locator("#vbq-state")).to_contain_text("Recomputed")
    placed = float(page.locator("#vbq-all").inner_text())
    assert 0.5 < placed < 10
    assert page.problems == []
    page.context.close()


def test_qi_analyst_cannot_open_a_patient_page(browser, live_server, clinic):
    page = _login(browser, live_server, "demo-qi_analyst")
    response = page.goto(f"{live_server.url}/patients/{clinic['patient'].pk}/")
    assert response.status == 403
    assert "Ada" not in page.content()
    assert page.locator("nav[aria-label=Main]").get_by_text("Patients").count() == 0
    page.context.close()
