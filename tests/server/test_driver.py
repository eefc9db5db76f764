"""store.driver: statements run on psycopg's cursor raise what SQLAlchemy would raise, so
the RPC layer maps a database that is gone to UNAVAILABLE and a bad statement to its
error, whether the statement ran at once or was sent ahead in pipeline mode."""

from __future__ import annotations

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import DataError, DBAPIError

from balsam_grpc.server.store.driver import DriverStatement, driver_rows, sent_ahead

DIVIDE = text("SELECT 1 / CAST(:zero AS INT)")


@pytest.fixture
def engine(harness):
    if harness.backend != "postgres":
        pytest.skip("statements on the driver's cursor are PostgreSQL's")
    return harness.db.engine


@pytest.mark.parametrize("run", ["at_once", "sent_ahead"])
def test_a_failing_statement_raises_sqlalchemys_error_and_listeners_see_it(engine, run):
    stmt = DriverStatement(DIVIDE, engine.dialect)
    seen: list[str] = []
    with engine.connect() as conn:
        event.listen(conn, "before_cursor_execute", lambda c, cur, sql, *rest: seen.append(sql))
        with pytest.raises(DataError, match="division by zero"):
            if run == "at_once":
                driver_rows(conn, stmt, {"zero": 0})
            else:
                with sent_ahead(conn, stmt, {"zero": 0}) as row:
                    row()
    assert seen == [stmt.sql]


@pytest.mark.parametrize("run", ["at_once", "sent_ahead"])
def test_a_connection_that_is_gone_is_invalidated(engine, run):
    stmt = DriverStatement(text("SELECT CAST(:one AS INT)"), engine.dialect)
    with engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        conn.commit()
        with engine.connect() as other:
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(DBAPIError) as raised:
            if run == "at_once":
                driver_rows(conn, stmt, {"one": 1})
            else:
                with sent_ahead(conn, stmt, {"one": 1}) as row:
                    row()
        assert raised.value.connection_invalidated
        assert conn.invalidated


def test_a_statement_sent_ahead_answers_its_row(engine):
    stmt = DriverStatement(text("SELECT CAST(:a AS INT) + 1"), engine.dialect)
    with engine.connect() as conn, sent_ahead(conn, stmt, {"a": 41}) as row:
        assert row() == (42,)
