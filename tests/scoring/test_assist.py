"""The review page's one-click assisted placement (``POST /vbq/review/<id>/assist/``): a new
pending ``assisted`` result per click, clear 400s for bad clicks, nothing half-written, only
for reviewers. SYNTHETIC phantoms only."""

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
    return reviewable_result(PatientFactory(given_name="Assistone"), tmp_path, seed=11,
                             with_rois=False)


@pytest.fixture
def reviewer(client, role_user):
    client.force_login(role_user("clinician"))
    return client


def _click(result, level="L3", **change):
    s, row, col = result.truth["centres_px"][level]
    return {"level": level, "slice_index": s, "row": row, "col": col, **change}


def _post(client, result, body):
    return client.post(reverse("vbq-review-assist", args=[result.pk]),
                       json.dumps(body) if not isinstance(body, str) else body,
                       content_type="application/json")


def test_a_click_in_l3_saves_a_pending_assisted_result_with_l1_to_l4_and_the_csf(
        reviewer, result):
    response = _post(reviewer, result, _click(result))
    assert response.status_code == 201, response.content
    body = response.json()
    new = VbqResult.objects.get(pk=body["id"])
    assert body["url"] == reverse("vbq-review", args=[new.pk])
    assert (new.source, new.revision, new.status, new.review_status) == (
        "assisted", 1, "needs_review", "pending")
    assert sorted(new.levels.values_list("level", flat=True)) == ["L1", "L2", "L3", "L4", "csf"]
    assert new.vbq_all_levels == pytest.approx(result.truth["vbq_all_levels"], rel=0.03)
    assert body["vbq_all_levels"] == pytest.approx(new.vbq_all_levels)
    assert new.patient_id == result.patient_id
    assert new.series_id == result.series_id
    assert AuditEvent.objects.filter(object_type="VbqResult", object_id=str(new.pk),
                                     action="create", detail__review="assisted").exists()
    result.refresh_from_db()
    assert result.review_status == "rejected"  # superseded: the queue holds the new one
    assert str(new.pk) in result.review_note


def test_a_second_click_saves_the_next_revision(reviewer, result):
    first = _post(reviewer, result, _click(result)).json()["id"]
    second = _post(reviewer, result, _click(result, "L2")).json()["id"]
    revisions = dict(VbqResult.objects.filter(pk__in=[first, second])
                     .values_list("pk", "revision"))
    assert revisions == {first: 1, second: 2}


def test_the_assisted_result_is_on_its_review_page_with_its_source(reviewer, result):
    new = _post(reviewer, result, _click(result)).json()["id"]
    html = reviewer.get(reverse("vbq-review", args=[new])).content.decode()
    assert "Assisted (one click)" in html
    assert 'id="assist-card"' in html


@pytest.mark.parametrize(("body", "message"), [
    ("not json", "not JSON"),
    ({"level": "C2", "slice_index": 0, "row": 5, "col": 5}, "must be one of"),
    ({"level": "L3", "slice_index": 0, "row": "x", "col": 5}, "numeric"),
    ({"level": "L3", "slice_index": 99, "row": 5, "col": 5}, "outside the series"),
    ({"level": "L3", "slice_index": 0, "row": 5, "col": 99999}, "outside the image"),
])
def test_a_bad_click_is_a_clear_400_and_nothing_is_written(reviewer, result, body, message):
    response = _post(reviewer, result, body)
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert VbqResult.objects.count() == 1


def test_a_click_outside_the_spine_answers_the_engines_reason_and_saves_nothing(
        reviewer, result):
    response = _post(reviewer, result, _click(result, col=3.0))
    assert response.status_code == 400
    assert "no ROIs could be placed" in response.json()["error"]
    assert VbqResult.objects.count() == 1


def test_only_reviewers_may_place_rois(client, role_user, result):
    client.force_login(role_user("qi_analyst"))
    assert _post(client, result, _click(result)).status_code == 403
    assert VbqResult.objects.count() == 1


def test_superseding_a_result_marks_the_patients_follow_up_due_today(reviewer, result):
    from registry.models import Patient
    from registry.timeutil import clinic_today

    Patient.objects.filter(pk=result.patient_id).update(followup_next_check_on=None)
    assert _post(reviewer, result, _click(result)).status_code == 201
    patient = Patient.objects.get(pk=result.patient_id)
    assert patient.followup_next_check_on == clinic_today()
