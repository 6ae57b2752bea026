"""Held resources that cannot be applied when their Patient arrives are PARKED with the
reason (shown to admins) and never block that patient's later deliveries; a held resource
is applied in its own feed's context (SYNTHETIC data)."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.utils.html import escape

from integrations.fhir import mappers
from integrations.models import HeldResource
from registry.feeds import feed_create
from registry.models import AuditEvent, Procedure
from tests.integrations.fhir.adversarial.helpers import (
    MRN,
    bundle,
    counts,
    delta,
    patient,
    procedure,
)

pytestmark = [pytest.mark.django_db, pytest.mark.postgres]


def _hold(send, resource):
    response = send("POST", f"/fhir/{resource['resourceType']}", resource)
    assert response.status_code == 202, response.content
    return HeldResource.objects.latest("pk")


DELIVERIES = {
    "put": lambda send: send("PUT", f"/fhir/Patient?identifier={MRN}|SYN-ADV-0001", patient()),
    "post": lambda send: send("POST", "/fhir/Patient", patient()),
    "transaction": lambda send: send("POST", "/fhir", bundle("transaction", patient())),
    "batch": lambda send: send("POST", "/fhir", bundle("batch", patient())),
}


@pytest.mark.parametrize("first", list(DELIVERIES))
def test_a_held_resource_a_rule_refuses_is_parked_and_later_deliveries_succeed(send, first):
    held = _hold(send, procedure(performed="1930-01-01T10:00:00Z"))  # before the birth
    assert DELIVERIES[first](send).status_code in {200, 201}
    held.refresh_from_db()
    assert held.parked_at is not None
    assert held.applied_at is None
    assert held.error  # the reason, for the admin
    for again in DELIVERIES.values():  # every later delivery of that patient goes through
        before = counts()
        response = again(send)
        assert response.status_code in {200, 201}, response.content
        assert delta(before, counts()) == {}
    assert not Procedure.objects.exists()


@pytest.mark.parametrize("first", list(DELIVERIES))
def test_a_held_resource_that_crashes_when_applied_is_parked_not_a_500(send, monkeypatch,
                                                                      first):
    held = _hold(send, procedure())

    def crash(resource, ctx):
        raise RuntimeError("SYNTHETIC crash while applying a held resource")

    monkeypatch.setitem(mappers.MAPPERS, "Procedure", crash)
    response = DELIVERIES[first](send)
    assert response.status_code in {200, 201}, response.content
    held.refresh_from_db()
    assert held.parked_at is not None
    assert "RuntimeError" in held.error
    monkeypatch.undo()
    assert DELIVERIES["transaction"](send).status_code == 200  # parked: not tried again
    held.refresh_from_db()
    assert held.applied_at is None


def test_a_held_resource_over_a_column_limit_is_parked_with_the_element(send):
    held = _hold(send, procedure(code={"coding": [{"system": "http://www.ama-assn.org/go/cpt",
                                                   "code": "22511", "display": "D" * 300}]}))
    assert DELIVERIES["put"](send).status_code == 201
    held.refresh_from_db()
    assert held.parked_at is not None
    assert "255" in held.error


def test_an_admin_sees_the_parked_reason_and_can_retry_it(send, admin_client):
    held = _hold(send, procedure(performed="1930-01-01T10:00:00Z"))
    assert DELIVERIES["put"](send).status_code == 201
    held.refresh_from_db()
    assert held.parked_at is not None
    page = admin_client.get("/admin/integrations/heldresource/")
    assert page.status_code == 200
    assert escape(held.error[:40]) in page.content.decode()
    response = admin_client.post("/admin/integrations/heldresource/", {
        "action": "retry", "_selected_action": [held.pk]})
    assert response.status_code == 302
    held.refresh_from_db()
    assert held.parked_at is None  # tried again at the next delivery (parked again here)


def test_a_held_resource_is_applied_in_its_own_feeds_context(send, client):
    _, other = feed_create(name="other-ehr")
    held_by_other = procedure("SYN-OTHER-P")
    held_by_other.pop("identifier")
    held_by_other["id"] = "proc-7"
    response = send("POST", "/fhir/Procedure", held_by_other, bearer=other)
    assert response.status_code == 202, response.content
    assert send("POST", "/fhir/Patient", patient()).status_code == 201  # adv-ehr's Patient
    written = Procedure.objects.get()
    assert (written.identifier_system, written.identifier_value) == (
        "urn:vbq-registry:feed:other-ehr:Procedure", "proc-7")
    audit = AuditEvent.objects.filter(object_type="Procedure").latest("pk")
    assert audit.feed.name == "other-ehr"


@pytest.fixture
def admin_client(client, db):
    user = get_user_model().objects.create_superuser("syn-admin", "a@example.org", "x" * 20)
    client.force_login(user)
    return client
