"""A transaction bundle's raw payload survives a worker killed in the middle of the bundle.

The payload is stored (outcome ``received``) in its own commit before the bundle's entries
are parsed and written (``inbound.store_at_begin``: in the pipeline that opens the bundle's
transaction on PostgreSQL; a local commit first on SQLite), and its outcome set by the
bundle's last statement, or after the rollback of a refused bundle. No enclosing test transaction
(``transactional_db``), as in production: the store-first path only runs there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from django.db import connection

from integrations.models import InboundMessage
from registry.feeds import feed_create
from registry.models import Patient, Procedure

pytestmark = pytest.mark.django_db(transaction=True)
FIXTURES = Path(__file__).parent / "fixtures"
FHIR = "application/fhir+json"


class _WorkerKilled(BaseException):
    """What a worker killed mid-request looks like to the view: nothing after it runs (and,
    as when the process dies, the bundle's open transaction is rolled back)."""


def _bundle() -> dict:
    return json.loads((FIXTURES / "transaction-vertebroplasty.json").read_text())


@pytest.fixture
def token():
    return feed_create(name="durability-ehr")[1]


def _post(client, token, body, path="/fhir"):
    return client.post(path, data=json.dumps(body), content_type=FHIR,
                       HTTP_AUTHORIZATION=f"Bearer {token}")


def _rows_seen_by_another_connection() -> list[tuple[str, int | None]]:
    """The InboundMessage rows another session sees now (PostgreSQL): committed ones only."""
    import psycopg

    settings = connection.settings_dict
    with psycopg.connect(dbname=settings["NAME"], user=settings["USER"],
                         password=settings["PASSWORD"] or None, host=settings["HOST"],
                         port=settings["PORT"] or None, autocommit=True) as other:
        table = InboundMessage._meta.db_table
        return other.execute(f"SELECT outcome, status_code FROM {table} "  # noqa: S608
                             "ORDER BY id").fetchall()


@pytest.mark.parametrize("where", ["flush_pending", "parse_entry"])
def test_a_transaction_bundle_cut_off_mid_write_leaves_its_raw_payload(
    client, token, monkeypatch, where
):
    """Killed after the bundle's patients were written, before its other rows (or while its
    entries were being parsed): the bundle is rolled back, its payload stays (``received``);
    the sender's resend is then applied once."""
    import integrations.fhir.ingest as ingest

    original = getattr(ingest, where)
    seen_meanwhile = []

    def killed(*args, **kwargs):
        original(*args, **kwargs)  # e.g. the bundle's patients, in its open transaction
        if connection.vendor == "postgresql":  # committed already, not only in this session
            seen_meanwhile.extend(_rows_seen_by_another_connection())
        raise _WorkerKilled

    monkeypatch.setattr(ingest, where, killed)
    bundle = _bundle()
    with pytest.raises(_WorkerKilled):
        _post(client, token, bundle)
    message = InboundMessage.objects.get()
    assert json.loads(message.body) == bundle
    assert (message.outcome, message.status_code) == ("received", None)
    assert Patient.objects.count() == 0  # the bundle itself: all or nothing
    if connection.vendor == "postgresql":
        assert seen_meanwhile == [("received", None)]

    monkeypatch.setattr(ingest, where, original)
    for _ in range(2):  # the sender got no answer: it resends, maybe twice
        response = _post(client, token, bundle)
        assert response.status_code == 200, response.json()
    assert Patient.objects.count() == 1
    assert Procedure.objects.count() == 1
    assert list(InboundMessage.objects.order_by("pk").values_list(
        "outcome", "status_code")) == [("received", None), ("accepted", 200), ("accepted", 200)]


def test_a_committed_bundle_has_one_row_with_its_outcome(client, token):
    bundle = _bundle()
    response = _post(client, token, bundle)
    assert response.status_code == 200, response.json()
    message = InboundMessage.objects.get()
    assert (message.outcome, message.status_code, message.summary) == (
        "accepted", 200, {"entries": 5, "statuses": [201], "partial": False})
    assert json.loads(message.body) == bundle
    # the connection is left as Django expects it: autocommit, outside any transaction
    assert connection.get_autocommit()
    if connection.vendor == "postgresql":
        assert connection.connection.autocommit
        assert connection.connection.pgconn.transaction_status == 0  # IDLE
    patient = next(e["resource"] for e in bundle["entry"]
                   if e["resource"]["resourceType"] == "Patient")
    assert _post(client, token, patient, "/fhir/Patient").status_code in {200, 201}
    assert Patient.objects.count() == 1
    assert InboundMessage.objects.count() == 2


@pytest.mark.parametrize(
    ("mutate", "status"),
    [
        # refused inside the bundle's transaction (a business rule: before birth)
        (lambda b: b["entry"][1]["resource"].update(performedDateTime="1930-01-01T10:00:00Z"),
         422),
        # refused before it (validation)
        (lambda b: b["entry"][1]["resource"].update(resourceType="Spaceship"), 400),
    ],
)
def test_a_refused_bundle_keeps_its_payload_with_the_refusal(client, token, mutate, status):
    bundle = _bundle()
    mutate(bundle)
    response = _post(client, token, bundle)
    assert response.status_code == status
    assert response.json()["resourceType"] == "OperationOutcome"
    message = InboundMessage.objects.get()
    assert (message.outcome, message.status_code) == ("rejected", status)
    assert "Bundle.entry[1]" in message.summary["error"]
    assert json.loads(message.body) == bundle
    assert Patient.objects.count() == 0
    assert connection.get_autocommit()


@pytest.mark.parametrize("level", ["SERIALIZABLE", "REPEATABLE_READ"])
def test_the_bundles_transaction_keeps_the_connections_isolation_level(token, level):
    """``DATABASES OPTIONS isolation_level``: the BEGIN sent in the payload's pipeline is the
    one psycopg would have sent, so the bundle runs at the configured level."""
    if connection.vendor != "postgresql":
        pytest.skip("the pipelined BEGIN is PostgreSQL's")
    import hashlib

    import psycopg
    from django.db import transaction
    from django.utils import timezone

    from integrations.fhir.inbound import store_at_begin
    from integrations.models import Feed

    body = json.dumps(_bundle())
    message = InboundMessage(
        feed=Feed.objects.get(name="durability-ehr"), channel="fhir-rest", content_type=FHIR,
        sha256=hashlib.sha256(body.encode()).hexdigest(), size_bytes=len(body), body=body.encode(),
        received_at=timezone.now())
    connection.ensure_connection()
    pg = connection.connection
    configured = pg.isolation_level
    pg.isolation_level = getattr(psycopg.IsolationLevel, level)
    try:
        with transaction.atomic():
            store_at_begin(message)()
            with connection.cursor() as cursor:
                cursor.execute("SHOW transaction_isolation")
                seen = cursor.fetchone()[0]
    finally:
        pg.isolation_level = configured
    assert seen == level.replace("_", " ").lower()
    assert [outcome for outcome, _ in _rows_seen_by_another_connection()] == ["received"]
