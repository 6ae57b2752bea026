"""``pg_execute`` (server-side binding on the raw psycopg connection) keeps Django's connection
rules: with CONN_HEALTH_CHECKS, a persistent connection broken since the last request (the
database was restarted) is replaced, not turned into an error."""

import psycopg
import pytest
from django.db import close_old_connections, connection

from db.pg import pg_execute

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


def _prepared(marker: str) -> list[str]:
    """The statements prepared on this connection whose text holds ``marker``."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements WHERE statement LIKE %s",
                       [f"%{marker}%"])
        return [row[0] for row in cursor.fetchall()]


@pytest.mark.django_db
def test_a_hot_statement_is_prepared_once_and_the_setting_turns_it_off(settings):
    """``prepare=True``: parsed and planned once per connection (the imaging pipeline's claim,
    result and jobs statements); ``DB_PREPARED_STATEMENTS=False`` (a transaction-mode PgBouncer
    older than 1.21) prepares nothing; a plain call never prepares (Django's default)."""
    settings.DB_PREPARED_STATEMENTS = True
    for n in range(3):
        assert pg_execute("SELECT %s::int + 1 AS vbq_prepared_probe", [n], prepare=True) == [
            (n + 1,)]
    assert len(_prepared("vbq_prepared_probe")) == 1
    pg_execute("SELECT %s::int AS vbq_unprepared_probe", [1])
    settings.DB_PREPARED_STATEMENTS = False
    pg_execute("SELECT %s::int AS vbq_switched_off_probe", [1], prepare=True)
    assert _prepared("vbq_unprepared_probe") == []
    assert _prepared("vbq_switched_off_probe") == []


@pytest.mark.django_db
def test_a_claimed_job_uses_the_prepared_claim(settings):
    """The worker's claim (one conditional UPDATE per job) is among the prepared statements
    once a job was claimed on this connection."""
    from scoring.tasks import _claim

    settings.DB_PREPARED_STATEMENTS = True
    assert _claim(987654321) is None  # no such job: nothing claimed, the statement still ran
    assert len(_prepared("WITH claimed AS")) == 1


@pytest.mark.django_db(transaction=True)
def test_a_pipeline_runs_its_statements_in_order_and_an_error_stops_and_rolls_back():
    from django.db import DatabaseError, transaction

    from db.pg import pg_pipeline

    pg_execute("CREATE TEMP TABLE pipe_t (n int PRIMARY KEY)", [])
    with transaction.atomic():
        rows = pg_pipeline([("INSERT INTO pipe_t VALUES (%s)", [1], False),
                            # sees the first one's row: statements run in order
                            ("INSERT INTO pipe_t SELECT n + 1 FROM pipe_t RETURNING n", [],
                             True)])
    assert rows == [(2,)]  # the last statement's rows
    assert pg_execute("SELECT n FROM pipe_t ORDER BY n", []) == [(1,), (2,)]
    with pytest.raises(DatabaseError), transaction.atomic():
        pg_pipeline([("INSERT INTO pipe_t VALUES (%s)", [3], False),
                     ("INSERT INTO pipe_t VALUES (%s)", [1], False),  # duplicate key
                     ("INSERT INTO pipe_t VALUES (%s)", [4], False)])
    assert pg_execute("SELECT n FROM pipe_t ORDER BY n", []) == [(1,), (2,)]
    pg_execute("DROP TABLE pipe_t", [])
