"""``pg_execute`` (server-side binding on the raw psycopg connection) keeps Django's connection
rules: with CONN_HEALTH_CHECKS, a persistent connection broken since the last request (the
database was restarted) is replaced, not turned into an error."""

import psycopg
import pytest
from django.db import close_old_connections, connection

from registry.services_bulk import pg_execute

pytestmark = pytest.mark.postgres


@pytest.mark.django_db(transaction=True)
def test_a_connection_broken_between_requests_is_replaced_before_the_statement():
    assert pg_execute("SELECT 1", []) == [(1,)]
    settings_dict = connection.settings_dict
    before = settings_dict.get("CONN_HEALTH_CHECKS"), settings_dict.get("CONN_MAX_AGE")
    settings_dict["CONN_HEALTH_CHECKS"], settings_dict["CONN_MAX_AGE"] = True, 600
    try:
        connection.close()
        pg_execute("SELECT 1", [])  # a fresh persistent connection with health checks on
        with pytest.raises(psycopg.OperationalError), connection.connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")  # as a restart does
        close_old_connections()  # what the next request (or Celery task) starts with
        assert pg_execute("SELECT 1", []) == [(1,)]
    finally:
        settings_dict["CONN_HEALTH_CHECKS"], settings_dict["CONN_MAX_AGE"] = before
        connection.close()
