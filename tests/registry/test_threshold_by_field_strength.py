"""The high-VBQ threshold chosen by field strength (registry/followup.py, pure) and stored on
the alert with its basis by both sweep paths (SQL on PostgreSQL, ORM elsewhere)."""

import datetime as dt

import pytest

from followup.batch_writes import bulk_open
from followup.sweep import followup_evaluate, followup_sweep
from registry.followup import (
    HIGH_VBQ,
    OPEN,
    RESOLVE,
    Decision,
    FollowupConfig,
    OpenAlert,
    PatientFacts,
    evaluate,
    threshold_for,
)
from registry.models import Alert
from scoring.models import VbqResult
from tests.registry.followup_helpers import high_vbq_patient

CFG = FollowupConfig(threshold=3.0, threshold_1_5t=3.0, threshold_3t=2.6)
INDEX = dt.date(2025, 1, 8)


@pytest.mark.parametrize(("field", "value", "basis"), [
    (1.5, 3.0, "1.5 T threshold"), (1.494, 3.0, "1.5 T threshold"),
    (3.0, 2.6, "3 T threshold"), (2.89, 2.6, "3 T threshold"),
    (None, 3.0, "default threshold, field strength unknown"),
    (0.3, 3.0, "default threshold, field strength unknown"),
    (7.0, 3.0, "default threshold, field strength unknown"),
])
def test_the_threshold_follows_the_field_strength_and_says_which(field, value, basis):
    cut = threshold_for(field, CFG)
    assert (cut.value, cut.basis) == (value, basis)
    assert cut.label == f"≥ {value:g} ({basis})"


def test_an_unset_per_field_threshold_falls_back_to_the_default():
    assert threshold_for(3.0, FollowupConfig(threshold=2.9)).value == 2.9


def test_a_3t_vbq_of_2_8_opens_the_alert_that_1_5t_would_not():
    def facts(field):
        return PatientFacts(index_date=INDEX, vbq_all_levels=2.8, vbq_excluding_fractured=2.8,
                            vbq_field_strength_t=field)

    today = INDEX + dt.timedelta(days=61)
    [opened] = [d for d in evaluate(facts(3.0), today, CFG).decisions if d.rule_id == HIGH_VBQ]
    assert (opened.action, opened.threshold, opened.threshold_field) == (OPEN, 2.6, "3 T")
    assert "≥ 2.6 (3 T threshold)" in opened.reason
    assert not [d for d in evaluate(facts(1.5), today, CFG).decisions if d.rule_id == HIGH_VBQ]
    alert = OpenAlert(HIGH_VBQ, "acknowledged", INDEX + dt.timedelta(days=60))
    with_alert = PatientFacts(index_date=INDEX, vbq_all_levels=2.8, vbq_excluding_fractured=2.8,
                              vbq_field_strength_t=1.5, open_alerts=(alert,))
    [resolved] = evaluate(with_alert, today, CFG).decisions
    assert (resolved.action, resolved.reason) == (
        RESOLVE, "VBQ revised to 2.80 (below 3: 1.5 T threshold)")


@pytest.fixture
def two_patients(settings):
    settings.VBQ_HIGH_THRESHOLD, settings.VBQ_HIGH_THRESHOLD_3T = 3.0, 2.6
    at_3t = high_vbq_patient(70, vbq=2.8)
    unknown = high_vbq_patient(70, vbq=3.2)
    VbqResult.objects.filter(patient=at_3t).update(field_strength_t=3.0)
    return at_3t, unknown


def _stored(at_3t, unknown):
    a = Alert.objects.get(patient=at_3t, rule_id=HIGH_VBQ)
    b = Alert.objects.get(patient=unknown, rule_id=HIGH_VBQ)
    return (a.vbq_threshold, a.vbq_threshold_field), (b.vbq_threshold, b.vbq_threshold_field)


@pytest.mark.django_db
def test_the_sweep_stores_the_threshold_and_its_basis_on_the_alert(two_patients):
    followup_sweep()  # PostgreSQL: the one-statement batch write; else the ORM path
    assert _stored(*two_patients) == ((2.6, "3 T"), (3.0, ""))


@pytest.mark.django_db
def test_the_event_path_stores_the_threshold_and_its_basis_on_the_alert(two_patients):
    followup_evaluate([p.pk for p in two_patients])
    assert _stored(*two_patients) == ((2.6, "3 T"), (3.0, ""))


@pytest.mark.django_db
def test_the_orm_batch_write_stores_the_threshold_and_its_basis(two_patients):
    at_3t, unknown = two_patients
    decisions = [(at_3t.pk, Decision(HIGH_VBQ, OPEN, "r", vbq_value=2.8, threshold=2.6,
                                     threshold_field="3 T")),
                 (unknown.pk, Decision(HIGH_VBQ, OPEN, "r", vbq_value=3.2, threshold=3.0))]
    assert bulk_open(decisions, {}) == 2
    assert _stored(at_3t, unknown) == ((2.6, "3 T"), (3.0, ""))


@pytest.mark.django_db
def test_the_worklist_and_the_patient_page_say_which_threshold_applied(
        client, role_user, two_patients):
    at_3t, unknown = two_patients
    followup_sweep()
    client.force_login(role_user("clinician"))
    worklist = client.get("/worklist/").content.decode()
    assert "high ≥ 2.6 at 3 T" in worklist
    assert "high ≥ 3 (field strength unknown)" in worklist
    page = client.get(f"/patients/{at_3t.pk}/").content.decode()
    assert "High VBQ ≥ 2.6 (3 T threshold): high." in page
    page = client.get(f"/patients/{unknown.pk}/").content.decode()
    assert "High VBQ ≥ 3 (default threshold, field strength unknown): high." in page
