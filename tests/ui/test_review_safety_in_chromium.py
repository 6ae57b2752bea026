"""The safety half of the clinic pages, driven in Debian chromium (Playwright) against a live
server on the test database: review works on a result the real engine made automatically
(every level it stores), a series of another patient is refused at upload, a manual edit that
changes the VBQ category waits in the needs-review queue without closing the alert, and an
expired session mid-review keeps the reviewer's ROIs through a new login.

Every patient and image here is SYNTHETIC. Select with ``-m browser``.
"""

from __future__ import annotations

import datetime as dt
import io
import re
import zipfile
from pathlib import Path

import pytest
from django.contrib.sessions.models import Session
from django.utils import timezone
from playwright.sync_api import expect

from followup.sweep import followup_sweep
from registry.models import Alert, AuditEvent
from scoring.engine import ALGORITHM_VERSION, Roi, compute_vbq
from scoring.engine.phantom import make_phantom
from scoring.models import ImagingSeries, ImagingStudy, VbqLevel, VbqResult
from scoring.tasks import vbq_compute
from tests.factories import FractureFactory, PatientFactory
from tests.registry.followup_helpers import high_vbq_patient
from tests.ui.chromium import PASSWORD, shot
from tests.ui.data import phantom_rois
from tests.ui.test_clinic_pages_in_chromium import browser  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.browser, pytest.mark.postgres, pytest.mark.slow]
NO_HORIZONTAL_SCROLL = "document.documentElement.scrollWidth <= window.innerWidth"
WIDER_THAN_THE_WINDOW = """[document.documentElement.scrollWidth, window.innerWidth,
  Array.from(document.querySelectorAll('body *'))
    .filter(e => e.getBoundingClientRect().right > window.innerWidth).slice(0, 8)
    .map(e => e.tagName + '#' + e.id + ':' + Math.round(e.getBoundingClientRect().right))]"""


def _login(browser, live_server, username, viewport=None):  # noqa: F811 (the fixture)
    context = browser.new_context(viewport=viewport or {"width": 1440, "height": 900})
    context.set_default_timeout(15_000)
    page = context.new_page()
    page.problems = []
    page.on("console", lambda m: m.type == "error" and page.problems.append(m.text))
    page.on("pageerror", lambda e: page.problems.append(str(e)))
    page.goto(f"{live_server.url}/accounts/login/")
    _fill_login(page, username)
    page.wait_for_url(re.compile(r".*/$"))
    return page


def _fill_login(page, username):
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")


def _mrn(patient):
    return patient.identifiers.first().value


def _phantom_for(patient, seed, **kw):
    """A SYNTHETIC phantom whose DICOM patient is ``patient`` (PatientID = its MRN)."""
    phantom = make_phantom(seed, **kw)
    for ds in phantom.datasets:
        ds.PatientID = _mrn(patient)
        ds.PatientName = f"{patient.family_name}^{patient.given_name}"
    return phantom


def _series(patient, phantom, folder: Path) -> ImagingSeries:
    ds = phantom.datasets[0]
    series_dir = folder / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID)
    phantom.write(series_dir)
    study = ImagingStudy.objects.create(
        patient=patient, study_instance_uid=str(ds.StudyInstanceUID), source="upload",
        modality="MR", description="SYNTHETIC lumbar MRI")
    return ImagingSeries.objects.create(
        study=study, series_instance_uid=str(ds.SeriesInstanceUID), modality="MR",
        description="SAG T1 (SYNTHETIC)", local_path=str(series_dir))


def _automatic_result(patient, folder: Path, seed: int) -> VbqResult:
    """A result made by the real engine through the worker task (claim, read, score, store),
    on a SYNTHETIC phantom of ``patient``."""
    series = _series(patient, _phantom_for(patient, seed, fractured=()), folder)
    job = VbqResult.objects.create(series=series, patient=patient,
                                   algorithm_version=ALGORITHM_VERSION, source="auto")
    vbq_compute(job.pk)
    job.refresh_from_db()
    assert job.status in ("succeeded", "needs_review"), job.error_message
    return job


def _zip(datasets) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for i, ds in enumerate(datasets):
            one = io.BytesIO()
            ds.save_as(one, enforce_file_format=True)
            zf.writestr(f"IM{i:03d}.dcm", one.getvalue())
    return buffer.getvalue()


@pytest.fixture
def staff(transactional_db, role_user, tmp_path, settings):
    settings.DICOM_STORAGE_ROOT = tmp_path / "dicom"
    users = {role: role_user(role, username=f"demo-{role}")
             for role in ("coordinator", "clinician")}
    for user in users.values():
        user.set_password(PASSWORD)
        user.save()
    return {"users": users, "tmp": tmp_path, "dicom": tmp_path / "dicom"}


def _drag(page, locator, dx, dy):
    box = locator.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + dx / 2, y + dy / 2, steps=3)
    page.mouse.move(x + dx, y + dy, steps=3)
    page.mouse.up()


def test_a_reviewer_drags_an_roi_on_an_automatic_result_sees_the_vbq_change_saves_and_accepts(
        browser, live_server, staff):  # noqa: F811
    patient = PatientFactory(given_name="Autumn")
    auto = _automatic_result(patient, staff["dicom"], seed=11)
    stored = set(auto.levels.values_list("level", flat=True))
    assert {"L5", "S1"} <= stored  # the engine stores levels beyond L1–L4

    page = _login(browser, live_server, "demo-clinician")
    page.goto(f"{live_server.url}/vbq/review/{auto.pk}/")
    expect(page.locator("#roi-layer .roi")).to_have_count(len(stored))
    before = page.locator("#vbq-all").inner_text()
    assert before == f"{auto.vbq_all_levels:.2f}"

    _drag(page, page.locator('#roi-layer .roi[data-level="L3"] ellipse'), 0, 14)
    expect(page.locator("#vbq-state")).to_have_text("Recomputed from your ROIs (not saved).")
    after = page.locator("#vbq-all").inner_text()
    assert after not in (before, "—")
    expect(page.locator("#save-outcome")).to_contain_text("Saving")
    expect(page.locator('#level-table tr[data-level="S1"]')).to_contain_text("not in VBQ")
    # the review page fits a 1440 px screen
    assert page.evaluate(NO_HORIZONTAL_SCROLL), page.evaluate(WIDER_THAN_THE_WINDOW)

    page.click("#save-corrected")
    page.wait_for_url(re.compile(rf".*/vbq/review/(?!{auto.pk}/)\d+/$"))
    saved = VbqResult.objects.get(source="manual", series=auto.series)
    assert f"{saved.vbq_all_levels:.2f}" == after
    assert set(saved.levels.values_list("level", flat=True)) == stored
    page.get_by_role("button", name="Accept as is").click()
    expect(page.locator("p.card.flash", has_text=f"Result {saved.pk}: accepted")).to_be_visible()
    saved.refresh_from_db()
    auto.refresh_from_db()
    assert (saved.review_status, saved.reviewer.username) == ("accepted", "demo-clinician")
    assert auto.review_status == "rejected"  # superseded by the accepted correction
    assert page.problems == []
    page.context.close()


def test_an_upload_whose_dicom_patient_is_another_patient_is_refused_and_stores_nothing(
        browser, live_server, staff):  # noqa: F811
    ada = high_vbq_patient(90, vbq=3.43, given_name="Ada")
    FractureFactory(patient=ada, diagnosed_at=timezone.now() - dt.timedelta(days=10))
    followup_sweep()
    alert = Alert.objects.get(patient=ada, rule_id="high-vbq-untreated-60d")
    assert alert.escalation_level >= 1
    other = PatientFactory(given_name="Other")
    wrong = staff["tmp"] / "wrong.zip"
    wrong.write_bytes(_zip(_phantom_for(other, 21, slices=5, rows=128, cols=128).datasets))

    page = _login(browser, live_server, "demo-coordinator")
    page.goto(f"{live_server.url}/patients/{ada.pk}/")
    page.get_by_role("link", name="Upload MRI (DICOM zip)").click()
    page.set_input_files("#dicom-file", str(wrong))
    page.click("#upload-button")
    expect(page.locator("#upload-status")).to_contain_text("Upload refused (409)")
    expect(page.locator("#upload-status")).to_contain_text("not this patient's")
    expect(page.locator("#upload-status")).to_contain_text("Nothing was stored")
    shot(page, "upload-wrong-patient")
    assert not ImagingStudy.objects.exists()
    assert not VbqResult.objects.filter(patient=ada).exclude(source="imported").exists()
    alert.refresh_from_db()
    assert alert.status != "resolved"
    assert AuditEvent.objects.filter(patient_id=ada.pk, object_type="ImagingStudy",
                                     detail__upload="refused").exists()

    # The right patient's files: stored, and the answer says no job was made and why
    right = staff["tmp"] / "right.zip"
    right.write_bytes(_zip(_phantom_for(ada, 22, slices=5, rows=128, cols=128).datasets))
    page.set_input_files("#dicom-file", str(right))
    page.click("#upload-button")
    expect(page.locator("#upload-status")).to_contain_text("Stored 5 file")
    status = page.locator("#upload-status").inner_text()
    assert "Scoring is queued" not in status
    assert "No scoring job was made: " in status
    assert "window" in status
    assert ImagingStudy.objects.filter(patient=ada).count() == 1
    # the refusal's 409 is the only thing the browser reports
    assert [p for p in page.problems if "status of 409" not in p] == []
    page.context.close()


def test_a_category_crossing_manual_edit_waits_for_review_and_does_not_close_the_alert(
        browser, live_server, staff, settings):  # noqa: F811
    patient = high_vbq_patient(90, vbq=3.5, given_name="Crossing")
    VbqResult.objects.filter(patient=patient).delete()  # the VBQ comes from the images below
    phantom = _phantom_for(patient, 7, fractured=())
    series = _series(patient, phantom, staff["dicom"])
    rois = phantom_rois(phantom.truth)
    measured = compute_vbq(phantom.datasets, manual_rois=rois)
    shift_px = 25  # five Shift+ArrowRight presses: the CSF ROI moves 25 px posteriorly
    moved = dict(rois, csf=Roi(**{**rois["csf"].__dict__, "col": rois["csf"].col + shift_px}))
    lower = compute_vbq(phantom.datasets, manual_rois=moved).vbq_all_levels
    assert lower < measured.vbq_all_levels - 0.05
    cut = round((measured.vbq_all_levels + lower) / 2, 3)  # the edit crosses the threshold
    settings.VBQ_HIGH_THRESHOLD = settings.VBQ_HIGH_THRESHOLD_1_5T = cut
    settings.VBQ_HIGH_THRESHOLD_3T = cut
    accepted = VbqResult.objects.create(
        series=series, patient=patient, algorithm_version=ALGORITHM_VERSION, source="manual",
        status="succeeded", review_status="accepted", confidence=1.0, qc_clear=True,
        vbq_all_levels=measured.vbq_all_levels,
        vbq_excluding_fractured=measured.vbq_excluding_fractured,
        field_strength_t=measured.acquisition.field_strength_t)
    VbqLevel.objects.bulk_create([
        VbqLevel(result=accepted, level=m.level, median_si=m.median_si,
                 pixel_count=m.pixel_count, roi=m.roi.__dict__)
        for m in [*measured.levels.values(), measured.csf]])
    FractureFactory(patient=patient, diagnosed_at=timezone.now() - dt.timedelta(days=10))
    followup_sweep()
    alert = Alert.objects.get(patient=patient, rule_id="high-vbq-untreated-60d")
    assert alert.escalation_level >= 1
    assert alert.status == "open"
    assert alert.vbq_threshold == pytest.approx(cut)

    page = _login(browser, live_server, "demo-clinician")
    page.goto(f"{live_server.url}/vbq/review/{accepted.pk}/")
    expect(page.locator("#roi-layer .roi")).to_have_count(5)
    csf = page.locator('#roi-layer .roi[data-level="csf"]')
    csf.focus()
    for _ in range(shift_px // 5):
        page.keyboard.press("Shift+ArrowRight")
    expect(page.locator("#vbq-all")).to_have_text(f"{lower:.2f}")
    outcome = page.locator("#save-outcome")
    expect(outcome).to_contain_text("needs-review queue")
    expect(outcome).to_contain_text("crosses the high-VBQ threshold")
    shot(page, "vbq-review-category-change")

    page.click("#save-corrected")
    page.wait_for_url(re.compile(rf".*/vbq/review/(?!{accepted.pk}/)\d+/$"))
    expect(page.locator("p.card.flash")).to_contain_text("needs-review queue")
    saved = VbqResult.objects.get(source="manual", revision=1)
    assert (saved.review_status, saved.status) == ("pending", "needs_review")
    assert "category-change" in {f["code"] for f in saved.qc_flags}
    followup_sweep()  # the follow-up re-evaluation the save asked for (no worker runs here)
    alert.refresh_from_db()
    assert alert.status == "open"  # not resolved by an unreviewed category change
    accepted.refresh_from_db()
    assert accepted.review_status == "accepted"  # still the value the follow-up uses

    page.goto(f"{live_server.url}/vbq/review/")
    row = page.locator("tbody tr").filter(
        has=page.locator("td:first-child", has_text=re.compile(rf"^{saved.pk}$")))
    expect(row).to_contain_text("changes the VBQ category")
    shot(page, "needs-review-queue-reasons")
    page.goto(f"{live_server.url}/patients/{patient.pk}/")
    expect(page.locator("#vbq-threshold")).to_contain_text(f"≥ {cut:g}")
    expect(page.locator("#vbq-threshold")).to_contain_text("threshold")
    assert page.problems == []
    page.context.close()


def test_an_expired_session_mid_review_keeps_the_rois_and_the_save_completes_after_login(
        browser, live_server, staff):  # noqa: F811
    patient = PatientFactory(given_name="Expiry")
    auto = _automatic_result(patient, staff["dicom"], seed=5)
    page = _login(browser, live_server, "demo-clinician")
    page.goto(f"{live_server.url}/vbq/review/{auto.pk}/")
    expect(page.locator("#roi-layer .roi")).to_have_count(auto.levels.count())
    _drag(page, page.locator('#roi-layer .roi[data-level="L2"] ellipse'), 0, 10)
    expect(page.locator("#vbq-state")).to_have_text("Recomputed from your ROIs (not saved).")
    kept = page.evaluate(f"JSON.parse(sessionStorage.getItem('vbq-review-work-{auto.pk}'))")
    moved_l2 = kept["rois"]["L2"]
    original_l2 = auto.levels.get(level="L2").roi
    assert moved_l2["row"] != pytest.approx(original_l2["row"])

    Session.objects.all().delete()  # the session expires while the reviewer works
    page.click("#save-corrected")
    dialog = page.locator("#session-expired")
    expect(dialog).to_be_visible()
    expect(page.locator("#save-state")).to_contain_text("session has expired")
    assert not VbqResult.objects.filter(source="manual").exists()
    page.get_by_role("link", name="Log in again").click()
    page.wait_for_url(re.compile(r".*/accounts/login/.*"))
    _fill_login(page, "demo-clinician")
    # back on the review page: the ROIs are restored and the interrupted save completes
    page.wait_for_url(re.compile(rf".*/vbq/review/(?!{auto.pk}/)\d+/$"))
    saved = VbqResult.objects.get(source="manual", series=auto.series)
    roi = saved.levels.get(level="L2").roi
    assert (roi["row"], roi["col"]) == pytest.approx((moved_l2["row"], moved_l2["col"]))
    assert saved.reviewer.username == "demo-clinician"
    assert page.evaluate(f"sessionStorage.getItem('vbq-review-work-{auto.pk}')") is None

    # a decision interrupted the same way completes after the new login
    Session.objects.all().delete()
    page.get_by_role("button", name="Accept as is").click()
    expect(page.locator("#session-expired")).to_be_visible()
    page.get_by_role("link", name="Log in again").click()
    page.wait_for_url(re.compile(r".*/accounts/login/.*"))
    _fill_login(page, "demo-clinician")
    expect(page.locator("p.card.flash", has_text=f"Result {saved.pk}: accepted")).to_be_visible()
    saved.refresh_from_db()
    assert saved.review_status == "accepted"
    assert page.problems == []
    page.context.close()
