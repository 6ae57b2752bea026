"""schemathesis against the OpenAPI schema served by a live server on PostgreSQL: every
generated request to every documented operation answers without a server error.

Bounded: ``SCHEMATHESIS_MAX_EXAMPLES`` examples per operation (default 25), no deadline.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import requests
import schemathesis
from django.urls import reverse
from hypothesis import HealthCheck, given, settings

from registry.side_effects import Actor, audit_record
from tests.factories import PatientFactory

MAX_EXAMPLES = int(os.environ.get("SCHEMATHESIS_MAX_EXAMPLES", "25"))


@pytest.fixture
def api_session(live_server, role_user) -> Iterator[requests.Session]:
    """A logged-in admin session (every API permission) with the CSRF header set."""
    from registry.models import Alert

    role_user("admin", username="schema-admin")
    patient = PatientFactory()
    from django.utils import timezone

    Alert.objects.create(patient=patient, rule_id="high-vbq-untreated-60d", reason="fuzz",
                         opened_at=timezone.now(), care_team=patient.care_team)
    audit_record(actor=Actor(via="command"), action="read", object_type="Fixture")
    session = requests.Session()
    login_url = live_server.url + reverse("login")
    session.get(login_url, timeout=30)
    response = session.post(
        login_url,
        data={"username": "schema-admin", "password": "a-long-test-password-1",
              "csrfmiddlewaretoken": session.cookies["csrftoken"]},
        timeout=30, allow_redirects=False,
    )
    assert response.status_code == 302
    session.headers["X-CSRFToken"] = session.cookies["csrftoken"]
    yield session
    # The live server's request threads keep persistent connections (CONN_MAX_AGE) that
    # outlive them and would block dropping the test database at the end of the session.
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


@pytest.fixture
def openapi_schema(api_session, live_server):
    response = api_session.get(live_server.url + reverse("api-schema"),
                               headers={"Accept": "application/vnd.oai.openapi+json"},
                               timeout=60)
    assert response.status_code == 200, response.text[:300]
    return schemathesis.openapi.from_dict(response.json())


@pytest.mark.postgres
@pytest.mark.slow
def test_no_generated_api_request_causes_a_server_error(openapi_schema, api_session, live_server):
    # One hypothesis run per operation inside this test (schemathesis' pytest plugin
    # subtests do not run under pytest 9), every failure collected and reported together.
    failures: list[str] = []
    operations = [result.ok() for result in openapi_schema.get_all_operations()]
    assert operations, "the served schema documents no operation"
    calls = 0

    for operation in operations:

        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy())
        def exercise(case):
            nonlocal calls
            calls += 1
            response = case.call(base_url=live_server.url, session=api_session, timeout=30)
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} -> {response.status_code}: "
                    f"{response.text[:200]}"
                )

        exercise()
    assert calls >= len(operations)
    assert not failures, f"{len(failures)} server errors:\n" + "\n".join(failures[:20])
