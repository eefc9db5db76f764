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


def _trace(conn, path, run):
    """libpq's trace of `run()` on `conn`'s connection: (direction, message) pairs."""
    pgconn = conn.connection.driver_connection.pgconn
    with path.open("w") as out:
        pgconn.trace(out.fileno())
        try:
            run()
        finally:
            pgconn.untrace()
    return [tuple(line.split("\t")[1:4:2]) for line in path.read_text().splitlines()]


def test_a_batch_is_sent_with_one_sync_and_answered_in_order(engine, tmp_path):
    """All of a batch's statements and its one Sync leave before any answer is read."""
    stmt = DriverStatement(text("SELECT CAST(:a AS INT) + 1"), engine.dialect)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        got: list[object] = []
        messages = _trace(conn, tmp_path / "protocol",
                          lambda: got.extend(driver_batch(conn, [(stmt, {"a": i}) for i in range(5)])))
        conn.rollback()
    assert got == [[(i + 1,)] for i in range(5)]
    directions = [direction for direction, _ in messages]
    assert directions == sorted(directions, key="FB".index), messages
    assert [m for _, m in messages].count("Sync") == 1


def test_the_first_statement_of_a_transaction_begins_it(engine):
    """A driver statement that opens the transaction sends BEGIN first, as psycopg's cursor
    does: its write is undone by the rollback, not committed on its own."""
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS driver_begin_probe (v INT)"))
        conn.execute(text("DELETE FROM driver_begin_probe"))
    insert = DriverStatement(text("INSERT INTO driver_begin_probe VALUES (CAST(:v AS INT))"), engine.dialect)
    try:
        with engine.connect() as conn:
            driver_rows(conn, insert, {"v": 1})
            conn.rollback()
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM driver_begin_probe")).scalar_one() == 0
    finally:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE driver_begin_probe"))


def _ours(conn) -> list[str]:
    return sorted(conn.exec_driver_sql("SELECT name FROM pg_prepared_statements WHERE name LIKE '\\_balsam\\_%%'")
                  .scalars())


def test_prepared_statements_outlive_the_rollbacks_that_end_reads(engine, monkeypatch):
    """A statement is prepared at its PREPARE_AFTER-th execution and stays prepared across
    the rollback with which the pool ends every read. psycopg deallocated all of a
    connection's statements, ours too, at such a rollback once it had prepared one of its
    own: the next execution of ours failed ('prepared statement does not exist')."""
    from balsam_grpc.server.store import db as db_module

    stmt = DriverStatement(text("SELECT CAST(:a AS INT) * 2"), engine.dialect)
    with engine.connect() as conn:
        for i in range(db_module.PREPARE_AFTER + 1):
            conn.execute(text("SELECT CAST(:a AS INT) * 3"), {"a": i})  # what psycopg would prepare
            assert driver_rows(conn, stmt, {"a": i}) == [(2 * i,)]
        assert len(_ours(conn)) == 1
        conn.rollback()
        assert driver_rows(conn, stmt, {"a": 21}) == [(42,)]
        assert len(_ours(conn)) == 1
        conn.rollback()


def test_at_most_max_prepared_the_least_recently_used_deallocated(engine, monkeypatch):
    from balsam_grpc.server.store import db as db_module

    monkeypatch.setattr(db_module, "MAX_PREPARED", 2)
    statements = [DriverStatement(text(f"SELECT CAST(:a AS INT) + {k}"), engine.dialect) for k in range(3)]
    with engine.connect() as conn:
        for stmt in statements:
            for _ in range(db_module.PREPARE_AFTER):
                driver_rows(conn, stmt, {"a": 1})
        driver_rows(conn, statements[2], {"a": 1})  # the deallocation goes out with the next batch
        assert len(_ours(conn)) == 2
        assert driver_rows(conn, statements[0], {"a": 1}) == [(1,)]  # unprepared again, still answered
        conn.rollback()


def test_a_value_no_dumper_takes_leaves_the_connection_usable(engine):
    stmt = DriverStatement(text("SELECT CAST(:a AS INT)"), engine.dialect)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        with pytest.raises(Exception, match="adapt"):
            driver_batch(conn, [(stmt, {"a": 1}), (stmt, {"a": object()})])
        conn.rollback()
        assert driver_rows(conn, stmt, {"a": 5}) == [(5,)]
        conn.rollback()
