"""The worklist page: unresolved alerts, one-click actions, MRN search without PHI in URLs."""

import pytest
from django.urls import reverse

from followup.sweep import followup_sweep
from registry.models import Alert, AlertEvent
from tests.registry.followup_helpers import high_vbq_patient

pytestmark = pytest.mark.django_db


@pytest.fixture
def alert(db):
    high_vbq_patient(70, mrn="SYN-WL-1", given_name="Worklistone")
    followup_sweep()
    return Alert.objects.get()


def test_coordinator_sees_the_open_alert_with_vbq_and_days(client, role_user, alert):
    client.force_login(role_user("coordinator"))
    html = client.get(reverse("worklist")).content.decode()
    assert "Worklistone" in html
    assert "3.60" in html
    assert "High VBQ, untreated at day 60" in html


def test_acknowledge_then_resolve_from_the_worklist(client, role_user, alert):
    client.force_login(role_user("coordinator"))
    client.post(reverse("worklist-action", args=[alert.pk, "acknowledge"]))
    response = client.post(reverse("worklist-action", args=[alert.pk, "resolve"]),
                           {"reason": "therapy-started", "confirmed": "1"})
    assert response.status_code == 302
    alert.refresh_from_db()
    assert (alert.status, alert.resolution_reason) == ("resolved", "therapy-started")
    assert AlertEvent.objects.filter(alert=alert).count() == 3


def test_mrn_search_is_a_post_and_finds_the_alert(client, role_user, alert):
    client.force_login(role_user("coordinator"))
    high_vbq_patient(80, mrn="SYN-WL-2", given_name="Otherperson")
    followup_sweep()
    response = client.post(reverse("worklist"), {"mrn": "SYN-WL-1"})
    html = response.content.decode()
    assert "Worklistone" in html
    assert "Otherperson" not in html


def test_a_bad_snooze_date_is_reported_not_a_500(client, role_user, alert):
    client.force_login(role_user("coordinator"))
    response = client.post(reverse("worklist-action", args=[alert.pk, "snooze"]),
                           {"until": "soon"}, follow=True)
    assert response.status_code == 200
    assert "enter a valid date" in response.content.decode()


def test_qi_analyst_cannot_open_the_worklist(client, role_user, alert):
    client.force_login(role_user("qi_analyst"))
    assert client.get(reverse("worklist")).status_code == 403


def test_an_action_sent_by_script_answers_the_new_row_and_counts_without_a_redirect(
        client, role_user, alert):
    client.force_login(role_user("coordinator"))
    url = reverse("worklist-action", args=[alert.pk, "acknowledge"])
    body = client.post(url, HTTP_X_REQUESTED_WITH="fetch").json()
    assert body["ok"]
    assert body["status"] == "acknowledged"
    assert f'data-alert="{alert.pk}"' in body["html"]
    assert "Acknowledge</button>" not in body["html"]
    assert body["counts"]["acknowledged"] == 1
    url = reverse("worklist-action", args=[alert.pk, "resolve"])
    body = client.post(url, {"reason": "therapy-started", "confirmed": "1"},
                       HTTP_X_REQUESTED_WITH="fetch").json()
    assert body["status"] == "resolved"
    assert body["counts"]["unresolved"] == 0
    assert "Resolved: Therapy started" in body["html"]


def test_a_refused_script_action_answers_400_with_the_reason(client, role_user, alert):
    client.force_login(role_user("coordinator"))
    url = reverse("worklist-action", args=[alert.pk, "resolve"])
    response = client.post(url, {"reason": "not-a-reason"}, HTTP_X_REQUESTED_WITH="fetch")
    assert response.status_code == 400
    assert not response.json()["ok"]


def test_the_worklist_page_runs_the_same_few_queries_for_3_or_30_alerts(client, role_user):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    user = role_user("coordinator")
    client.force_login(user)

    def queries_for_page() -> int:
        client.get(reverse("worklist"))  # warm the session and permission caches
        with CaptureQueriesContext(connection) as ctx:
            html = client.get(reverse("worklist")).content.decode()
        real = [q for q in ctx.captured_queries if "SAVEPOINT" not in q["sql"]]
        return len(real), html.count('<tr data-alert="')

    for i in range(3):
        high_vbq_patient(70 + i, mrn=f"SYN-NQ-{i}")
    followup_sweep()
    few, rows_few = queries_for_page()
    for i in range(3, 30):
        high_vbq_patient(70 + i, mrn=f"SYN-NQ-{i}")
    followup_sweep()
    Alert.objects.filter(pk=Alert.objects.order_by("pk").first().pk).update(assignee=user)
    many, rows_many = queries_for_page()
    assert (rows_few, rows_many) == (3, 25)
    assert many == few  # no query per row (no N+1, no deferred field loaded per row)
    # session, user, 2 x permissions, status counts, the page, the colleagues an alert can be
    # assigned to, the page's patients' therapy records, session save
    assert many <= 9


def test_the_worklist_sorts_by_vbq_when_asked(client, role_user):
    client.force_login(role_user("coordinator"))
    for i, vbq in enumerate((3.2, 4.4, 3.7)):
        high_vbq_patient(70 + i, vbq=vbq, mrn=f"SYN-SORT-{i}", given_name=f"Sort{i}")
    followup_sweep()
    html = client.get(reverse("worklist"), {"sort": "vbq"}).content.decode()
    assert html.index("Sort1") < html.index("Sort2") < html.index("Sort0")
    html = client.get(reverse("worklist"), {"sort": "bogus"}).content.decode()
    assert html.count('<tr data-alert="') == 3


def test_an_alert_is_assigned_to_a_colleague_and_the_change_is_in_its_history(
        client, role_user, alert):
    coordinator, colleague = role_user("coordinator"), role_user("clinician")
    client.force_login(coordinator)
    html = client.get(reverse("worklist")).content.decode()
    assert f'<option value="{colleague.pk}">' in html
    client.post(reverse("worklist-action", args=[alert.pk, "assign"]),
                {"assignee": colleague.pk})
    alert.refresh_from_db()
    assert alert.assignee_id == colleague.pk
    assert AlertEvent.objects.filter(alert=alert, action="assign").exists()


def test_an_alert_cannot_be_assigned_to_someone_who_cannot_work_alerts(
        client, role_user, alert):
    client.force_login(role_user("coordinator"))
    analyst = role_user("qi_analyst")
    response = client.post(reverse("worklist-action", args=[alert.pk, "assign"]),
                           {"assignee": analyst.pk}, headers={"X-Requested-With": "fetch"})
    assert response.status_code == 400
    assert "colleague" in response.json()["message"]
    alert.refresh_from_db()
    assert alert.assignee_id is None


def test_a_note_added_from_the_worklist_is_kept_in_the_alert_history(client, role_user, alert):
    client.force_login(role_user("coordinator"))
    client.post(reverse("worklist-action", args=[alert.pk, "note"]),
                {"note": "Called the GP; DXA booked (SYNTHETIC)."})
    event = AlertEvent.objects.get(alert=alert, action="note")
    assert event.note.startswith("Called the GP")
    response = client.post(reverse("worklist-action", args=[alert.pk, "note"]), {"note": "  "},
                           headers={"X-Requested-With": "fetch"})
    assert response.status_code == 400


def test_the_assign_menu_lists_exactly_the_users_who_can_work_alerts(role_user, db):
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission

    from registry.ui_views import _alert_worker_choices

    users = {role: role_user(role) for role in ("coordinator", "clinician", "qi_analyst")}
    direct = get_user_model().objects.create_user("direct-grant", password="x" * 20)
    direct.user_permissions.add(Permission.objects.get(codename="work_alerts"))
    get_user_model().objects.create_superuser("root-user", password="x" * 20)
    inactive = role_user("coordinator", username="gone")
    inactive.is_active = False
    inactive.save()
    menu = _alert_worker_choices()
    expected = sorted((u.pk, u.username) for u in get_user_model().objects.all()
                      if u.is_active and u.has_perm("registry.work_alerts"))
    assert sorted(menu) == expected  # Django's own permission check is the oracle
    names = [name for _, name in menu]
    assert {"direct-grant", "root-user", users["coordinator"].username} <= set(names)
    assert users["qi_analyst"].username not in names
    assert "gone" not in names
    assert names == sorted(names)


@pytest.mark.parametrize("sort", ["due", "overdue", "vbq", "days", "patient"])
def test_every_sort_pages_through_the_alerts_in_the_order_of_one_sorted_query(
        client, role_user, sort):
    """The page picks its 25 ids with a narrow sorted query, then joins only those rows: page
    by page, the rows are the ones (and in the order) a single sorted query of the joined
    rows gives, ties broken by id (SYNTHETIC patients, ties in VBQ and days on purpose)."""
    import re

    from registry.ui_views import SORTS, _row_queryset, _rule_due

    client.force_login(role_user("coordinator"))
    for i in range(30):
        high_vbq_patient(61 + i % 7, vbq=(3.2, 3.9, 4.4)[i % 3], mrn=f"SYN-PG-{i:02d}",
                         given_name=f"Pg{i % 4}", family_name=f"SYNTHETIC{i % 5}")
    followup_sweep()
    one_query = _row_queryset()
    if sort == "overdue":
        one_query = one_query.alias(rule_due_at=_rule_due())
    expected = [str(pk) for pk in one_query.order_by(*SORTS[sort][1]).values_list(
        "pk", flat=True)]
    seen = []
    for page in (1, 2):
        html = client.get(reverse("worklist"), {"sort": sort, "page": page}).content.decode()
        seen += re.findall(r'<tr data-alert="(\d+)"', html)
    assert len(expected) == 30
    assert seen == expected
