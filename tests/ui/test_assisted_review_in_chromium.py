"""The review page's "Place ROIs from one click", driven in Debian chromium (Playwright) against a
live server on the test database: a clinician opens a result the automatic localiser could not
measure, names L3, clicks once inside it, gets a new ``assisted`` result with L1–L4 and the
CSF ROIs and a VBQ, and accepts it.

The series is SYNTHETIC and shaped like a real sagittal T1 exam (512 × 512 matrix, ~0.6 mm
pixels, 15 slices of 3–4.5 mm), stored the way the DICOM receiver stores it. Select with
``-m browser``.
"""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from registry.models import AuditEvent
from scoring.engine.phantom import make_phantom
from scoring.models import ImagingSeries, ImagingStudy, VbqResult
from tests.factories import PatientFactory
from tests.ui.chromium import PASSWORD, launch, shot

pytestmark = [pytest.mark.browser, pytest.mark.postgres, pytest.mark.slow]

@pytest.fixture(scope="module")
def browser():
    """Debian chromium through Playwright (tests/ui/chromium.py)."""
    yield from launch()


@pytest.fixture
def unmeasured(transactional_db, role_user, tmp_path, settings):
    """A clinician and an automatic result that found no vertebrae (no ROIs, no value) on a
    real-exam-shaped SYNTHETIC series."""
    settings.DICOM_STORAGE_ROOT = tmp_path / "dicom"
    user = role_user("clinician", username="demo-clinician")
    user.set_password(PASSWORD)
    user.save()
    phantom = make_phantom(104, fractured=(), rows=512, cols=512, slices=15)
    study_uid = phantom.datasets[0].StudyInstanceUID
    series_uid = phantom.datasets[0].SeriesInstanceUID
    folder = tmp_path / "dicom" / study_uid / series_uid
    phantom.write(folder)
    patient = PatientFactory(given_name="Ilse")
    study = ImagingStudy.objects.create(
        patient=patient, study_instance_uid=study_uid, source="upload", modality="MR",
        description="SYNTHETIC lumbar MRI")
    series = ImagingSeries.objects.create(
        study=study, series_instance_uid=series_uid, modality="MR",
        description="SAG T1 (SYNTHETIC)", local_path=str(folder))
    result = VbqResult.objects.create(
        series=series, patient=patient, algorithm_version="0.3.0", source="auto",
        status=VbqResult.Status.NEEDS_REVIEW, confidence=0.0,
        qc_flags=[{"code": "localisation-failed", "severity": "warning",
                   "message": "only 1 vertebral bodies were found (SYNTHETIC example)"}])
    return {"result": result, "truth": phantom.truth}


def _login(browser, live_server):
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    context.set_default_timeout(20_000)
    page = context.new_page()
    page.problems = []  # script errors and CSP violations: none allowed
    page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
    page.on("pageerror", lambda e: page.problems.append(str(e)))
    page.goto(f"{live_server.url}/accounts/login/")
    page.fill("#id_username", "demo-clinician")
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r".*/$"))
    return page


def _show_slice(page, wanted):
    """Step the viewer to slice ``wanted`` with its buttons."""
    for _ in range(6):
        href = page.locator("#viewer-image").get_attribute("href")
        current = int(re.search(r"slice=(\d+)", href).group(1))
        if current == wanted:
            return
        page.click("#slice-next" if wanted > current else "#slice-prev")
    raise AssertionError(f"slice {wanted} cannot be shown")


def _click_pixel(page, row, col):
    """Click the image at pixel (row, col), through the SVG's own transform."""
    page.locator("#viewer").scroll_into_view_if_needed()
    x, y = page.evaluate(
        """([row, col]) => {
            const svg = document.getElementById("viewer");
            const pt = svg.createSVGPoint(); pt.x = col; pt.y = row;
            const p = pt.matrixTransform(svg.getScreenCTM());
            return [p.x, p.y];
        }""", [row, col])
    page.mouse.click(x, y)


def test_clinician_places_rois_from_one_click_in_l3_sees_the_vbq_and_accepts_it(
        browser, live_server, unmeasured):
    result, truth = unmeasured["result"], unmeasured["truth"]
    page = _login(browser, live_server)
    page.goto(f"{live_server.url}/vbq/review/{result.pk}/")
    expect(page.locator("#roi-layer .roi")).to_have_count(0)
    expect(page.locator("#assist-level")).to_have_value("L3")
    slice_index, row, col = truth["centres_px"]["L3"]
    _show_slice(page, slice_index)

    page.click("#assist-arm")
    expect(page.locator("#assist-state")).to_contain_text("Click once inside L3")
    _click_pixel(page, row + 3, col - 4)  # a click a little off the body's centre

    page.wait_for_url(re.compile(rf".*/vbq/review/(?!{result.pk}/)\d+/$"))
    assisted = VbqResult.objects.get(source="assisted")
    assert page.url.endswith(f"/vbq/review/{assisted.pk}/")
    expect(page.locator("#roi-layer .roi")).to_have_count(5)
    for level in ("L1", "L2", "L3", "L4", "csf"):
        expect(page.locator(f'#roi-layer .roi[data-level="{level}"]')).to_have_count(1)
    shown = float(page.locator("#vbq-all").inner_text())
    assert shown == pytest.approx(truth["vbq_all_levels"], rel=0.03)
    page.wait_for_timeout(300)  # the slice PNG paints
    shot(page, "vbq-review-assisted")
    expect(page.get_by_text("Assisted (one click)").first).to_be_visible()
    assert assisted.status == "needs_review"
    assert assisted.review_status == "pending"
    assert AuditEvent.objects.filter(object_type="VbqResult", object_id=str(assisted.pk),
                                     action="create", detail__review="assisted").exists()
    # no click was taken as a manual ROI placement on the original result
    assert not VbqResult.objects.filter(source="manual").exists()

    page.get_by_role("button", name="Accept as is").click()
    expect(page.locator(".page-head")).to_contain_text("Accepted")
    assisted.refresh_from_db()
    assert assisted.review_status == "accepted"
    assert assisted.reviewer.username == "demo-clinician"
    assert page.problems == []
    page.context.close()


def test_a_click_outside_the_spine_saves_nothing_and_says_why(browser, live_server, unmeasured):
    result, truth = unmeasured["result"], unmeasured["truth"]
    page = _login(browser, live_server)
    page.goto(f"{live_server.url}/vbq/review/{result.pk}/")
    slice_index, row, _ = truth["centres_px"]["L3"]
    _show_slice(page, slice_index)
    page.click("#assist-arm")
    _click_pixel(page, row, 8)  # far in front of the spine
    expect(page.locator("#assist-state")).to_contain_text("no ROIs could be placed")
    assert page.url.endswith(f"/vbq/review/{result.pk}/")
    assert not VbqResult.objects.filter(source="assisted").exists()
    expect(page.locator("#roi-layer .roi")).to_have_count(0)  # nor a manual ROI placed
    page.context.close()
