"""store.driver: statements run on psycopg's cursor raise what SQLAlchemy would raise, so
the RPC layer maps a database that is gone to UNAVAILABLE and a bad statement to its
error, whether the statement ran at once, was sent ahead in pipeline mode or in a batch."""

from __future__ import annotations

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import DataError, DBAPIError

from balsam_grpc.server.store.driver import DriverStatement, driver_batch, driver_rows, sent_ahead

DIVIDE = text("SELECT 1 / CAST(:zero AS INT)")


@pytest.fixture
def engine(harness):
    if harness.backend != "postgres":
        pytest.skip("statements on the driver's cursor are PostgreSQL's")
    return harness.db.engine


@pytest.mark.parametrize("run", ["at_once", "sent_ahead", "batch"])
def test_a_failing_statement_raises_sqlalchemys_error_and_listeners_see_it(engine, run):
    stmt = DriverStatement(DIVIDE, engine.dialect)
    seen: list[str] = []
    with engine.connect() as conn:
        event.listen(conn, "before_cursor_execute", lambda c, cur, sql, *rest: seen.append(sql))
        with pytest.raises(DataError, match="division by zero"):
            if run == "at_once":
                driver_rows(conn, stmt, {"zero": 0})
            elif run == "batch":
                driver_batch(conn, [(stmt, {"zero": 0})])
            else:
                with sent_ahead(conn, stmt, {"zero": 0}) as row:
                    row()
    assert seen == [stmt.sql]


@pytest.mark.parametrize("run", ["at_once", "sent_ahead", "batch"])
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
            elif run == "batch":
                driver_batch(conn, [(stmt, {"one": 1})])
            else:
                with sent_ahead(conn, stmt, {"one": 1}) as row:
                    row()
        assert raised.value.connection_invalidated
        assert conn.invalidated


def test_a_statement_sent_ahead_answers_its_row_in_one_round_trip(engine, tmp_path):
    stmt = DriverStatement(text("SELECT CAST(:a AS INT) + 1"), engine.dialect)
    trace = tmp_path / "protocol"
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        pgconn = conn.connection.driver_connection.pgconn
        with trace.open("w") as out:
            pgconn.trace(out.fileno())
            try:
                with sent_ahead(conn, stmt, {"a": 41}) as row:
                    assert row() == (42,)
            finally:
                pgconn.untrace()
        conn.rollback()
    # libpq's trace (time, F from the client or B from the server, length, message): all
    # the client sends (the statement, its Sync) goes before anything comes back.
    messages = [line.split("\t")[1:4:2] for line in trace.read_text().splitlines()]
    directions = [direction for direction, _ in messages]
    assert directions == sorted(directions, key="FB".index), messages


def test_a_batch_answers_each_statement_in_order_in_its_transaction(engine):
    setting = DriverStatement(text("SET LOCAL application_name = 'batch'"), engine.dialect)
    shown = DriverStatement(text("SELECT current_setting('application_name') AS name, CAST(:a AS INT) AS a"),
                            engine.dialect)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))  # a transaction is open: SET LOCAL lasts to its end
        assert driver_batch(conn, [(setting, {}), (shown, {"a": 7})], dicts=True) == [[], [{"name": "batch", "a": 7}]]
        assert conn.execute(text("SELECT current_setting('application_name')")).scalar_one() == "batch"
        conn.rollback()


def test_a_failing_statement_stops_the_batch_and_its_transaction_commits_nothing(engine):
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS driver_batch_probe (v INT)"))
        conn.execute(text("DELETE FROM driver_batch_probe"))
    insert = DriverStatement(text("INSERT INTO driver_batch_probe VALUES (CAST(:v AS INT))"), engine.dialect)
    with pytest.raises(DataError), engine.begin() as conn:
        driver_batch(conn, [(insert, {"v": 1}), (DriverStatement(DIVIDE, engine.dialect), {"zero": 0}),
                            (insert, {"v": 2})])
    with engine.begin() as conn:
        assert conn.execute(text("SELECT count(*) FROM driver_batch_probe")).scalar_one() == 0
        conn.execute(text("DROP TABLE driver_batch_probe"))
