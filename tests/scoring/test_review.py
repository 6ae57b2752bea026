"""VBQ review pages and services: slice image, ROI preview, corrected result, decisions,
needs-review queue, jobs and upload pages. SYNTHETIC phantoms only."""

from __future__ import annotations

import json

import pytest
from django.urls import reverse

from registry.models import AuditEvent
from scoring.models import VbqResult
from tests.factories import PatientFactory
from tests.ui.data import reviewable_result

pytestmark = pytest.mark.django_db


@pytest.fixture
def result(tmp_path):
    return reviewable_result(PatientFactory(given_name="Reviewone"), tmp_path)


@pytest.fixture
def reviewer(client, role_user):
    client.force_login(role_user("clinician"))
    return client


def _rois(result):
    return {lv.level: dict(lv.roi) for lv in result.levels.all()}


def test_review_page_shows_the_slice_viewer_and_audits_the_read(reviewer, result):
    response = reviewer.get(reverse("vbq-review", args=[result.pk]))
    html = response.content.decode()
    assert response.status_code == 200
    assert 'id="viewer-data"' in html
    assert "Reviewone" in html
    assert AuditEvent.objects.filter(object_type="VbqResult", object_id=str(result.pk),
                                     action="read", patient_id=result.patient_id).exists()


def test_slice_image_is_a_png_and_refuses_slices_beyond_two_from_the_chosen_one(
        reviewer, result):
    mid = result.truth["mid_slice"]
    url = reverse("vbq-review-image", args=[result.pk])
    response = reviewer.get(url, {"slice": mid + 2, "wc": 500, "ww": 800})
    assert response.status_code == 200
    assert response.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert reviewer.get(url, {"slice": mid + 3}).status_code == 400


def test_preview_of_moved_csf_roi_changes_the_vbq_and_saves_nothing(reviewer, result):
    rois = _rois(result)
    rois["csf"]["col"] += 12
    response = reviewer.post(reverse("vbq-review-preview", args=[result.pk]),
                             json.dumps({"rois": rois}), content_type="application/json")
    assert response.status_code == 200
    assert response.json()["vbq_all_levels"] != pytest.approx(result.vbq_all_levels, rel=1e-3)
    assert VbqResult.objects.count() == 1


def test_saving_corrected_rois_creates_a_new_manual_result_with_the_reviewer(
        reviewer, result):
    rois = _rois(result)
    response = reviewer.post(reverse("vbq-review-save", args=[result.pk]),
                             json.dumps({"rois": rois, "fractured_levels": ["L2"]}),
                             content_type="application/json")
    assert response.status_code == 201, response.content
    new = VbqResult.objects.get(pk=response.json()["id"])
    assert (new.source, new.revision, new.review_status) == ("manual", 1, "accepted")
    assert new.reviewer.username == "user-clinician"
    assert new.fractured_levels == ["L2"]
    assert new.levels.count() == 5
    assert new.vbq_all_levels == pytest.approx(result.vbq_all_levels, rel=1e-6)
    result.refresh_from_db()
    assert result.review_status == "rejected"
    assert str(new.pk) in result.review_note
    assert AuditEvent.objects.filter(object_type="VbqResult", object_id=str(new.pk),
                                     action="create").exists()


def test_bad_rois_are_a_clear_400_and_nothing_is_written(reviewer, result):
    rois = _rois(result)
    rois["L9"] = rois.pop("L1")
    response = reviewer.post(reverse("vbq-review-save", args=[result.pk]),
                             json.dumps({"rois": rois}), content_type="application/json")
    assert response.status_code == 400
    assert "L9" in response.json()["error"]
    rois = _rois(result)
    rois["csf"]["half_width"] = "wide"
    response = reviewer.post(reverse("vbq-review-save", args=[result.pk]),
                             json.dumps({"rois": rois}), content_type="application/json")
    assert response.status_code == 400
    assert VbqResult.objects.count() == 1


def test_reject_needs_a_coded_reason_and_is_audited(reviewer, result):
    url = reverse("vbq-review-action", args=[result.pk, "reject"])
    reviewer.post(url, {"reason": ""})
    result.refresh_from_db()
    assert result.review_status == "pending"
    reviewer.post(url, {"reason": "poor-quality", "note": "motion"})
    result.refresh_from_db()
    assert (result.review_status, result.review_note) == ("rejected", "poor-quality: motion")
    assert AuditEvent.objects.filter(object_type="VbqResult", action="update",
                                     detail__review="reject").exists()


def test_marking_a_fractured_level_recomputes_the_value_excluding_it(reviewer, result):
    reviewer.post(reverse("vbq-review-action", args=[result.pk, "fractured"]),
                  {"levels": ["L1", "L2"]})
    result.refresh_from_db()
    si = {lv.level: lv.median_si for lv in result.levels.all()}
    expected = (si["L3"] + si["L4"]) / 2 / si["csf"]
    assert result.fractured_levels == ["L1", "L2"]
    assert result.vbq_excluding_fractured == pytest.approx(expected)


def test_accepting_a_result_without_a_value_is_refused(reviewer, tmp_path):
    bare = reviewable_result(PatientFactory(), tmp_path, seed=3, with_rois=False)
    reviewer.post(reverse("vbq-review-action", args=[bare.pk, "accept"]))
    bare.refresh_from_db()
    assert bare.review_status == "pending"


def test_needs_review_queue_lists_pending_results_only(reviewer, result, tmp_path):
    done = reviewable_result(PatientFactory(given_name="Donealready"), tmp_path, seed=4)
    done.review_status = "accepted"
    done.save()
    html = reviewer.get(reverse("vbq-review-queue")).content.decode()
    assert "Reviewone" in html
    assert "Donealready" not in html


def test_a_coordinator_sees_the_needs_review_queue_read_only_with_links_to_the_patient(
        client, role_user, result):
    """Coordinators (worklist, identified data, identity overrides; no ``review_vbq``) see who
    waits for a review and why, with a link to each patient, but no Review button: judging a
    VBQ stays a clinician's. The navigation offers the queue as "Needs review"."""
    client.force_login(role_user("coordinator"))
    response = client.get(reverse("vbq-review-queue"))
    assert response.status_code == 200
    html = response.content.decode()
    assert "Reviewone" in html
    assert 'id="read-only-queue"' in html
    assert reverse("patient-detail", args=[result.patient_id]) in html
    assert reverse("vbq-review", args=[result.pk]) not in html
    assert ">Needs review</a>" in html
    client.force_login(role_user("qi_analyst"))
    assert client.get(reverse("vbq-review-queue")).status_code == 403


def test_a_reviewer_opens_each_queued_result_from_the_queue(reviewer, result):
    html = reviewer.get(reverse("vbq-review-queue")).content.decode()
    assert reverse("vbq-review", args=[result.pk]) in html
    assert 'id="read-only-queue"' not in html


def test_coordinator_may_not_review_but_sees_jobs_and_the_upload_page(client, role_user,
                                                                       result):
    client.force_login(role_user("coordinator"))
    assert client.get(reverse("vbq-review", args=[result.pk])).status_code == 403
    assert client.get(reverse("vbq-jobs")).status_code == 200
    response = client.get(reverse("imaging-upload", args=[result.patient_id]))
    assert response.status_code == 200
    assert b"upload-progress" in response.content


def test_jobs_page_shows_status_run_time_and_error(client, role_user):
    import datetime as dt

    from django.utils import timezone

    client.force_login(role_user("coordinator"))
    start = timezone.now() - dt.timedelta(minutes=1)
    VbqResult.objects.create(patient=PatientFactory(), algorithm_version="0.1.0",
                             source="auto", status="failed", started_at=start,
                             finished_at=start + dt.timedelta(seconds=2.5),
                             error_code="not-an-image", error_message="SYNTHETIC: no pixels")
    html = client.get(reverse("vbq-jobs"), {"status": "failed"}).content.decode()
    assert "2.5 s" in html
    assert "not-an-image" in html
    assert 'data-api="/api/imaging/jobs/"' in html
