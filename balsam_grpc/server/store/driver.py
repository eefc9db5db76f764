"""PostgreSQL: statements of the launcher report path run on the driver's cursor of the
transaction's own connection, without SQLAlchemy's per-execution work.

SQLAlchemy spends about as much server CPU on a compiled, cached statement (execution
context, parameter processing, result metadata) as psycopg and the network together: a
third of a report transaction's server CPU. The statements here are compiled once by
SQLAlchemy into the driver's terms (psycopg's %(name)s with SQLAlchemy's casts) and run
in the same transaction, on the same connection, so nothing about atomicity or locking
changes. Only for statements whose parameters need no type processing: the caller binds
lists as array literals (codec.array_text) and JSON as text. Rows come as tuples or dicts
(JSON already decoded by the connection's loader, as for SQLAlchemy's rows).

Listeners of before_cursor_execute see them as they see SQLAlchemy's. Errors are raised
as SQLAlchemy raises them (DBAPIError, with the connection
invalidated when it is gone), so callers and rpc.database_unavailable see no difference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

_TUPLES_OK = 2  # psycopg.pq.ExecStatus.TUPLES_OK


class DriverStatement:
    """A statement in the driver's terms, with the values of the parameters it fixes
    itself (literals SQLAlchemy bound, such as `num_nodes = 1`)."""

    __slots__ = ("sql", "fixed")

    def __init__(self, stmt: Any, dialect: Any) -> None:
        compiled = stmt.compile(dialect=dialect)
        self.sql = str(compiled)
        self.fixed = {k: v for k, v in compiled.params.items() if v is not None}


_COMPILED: dict[Hashable, DriverStatement] = {}


def driver_statement(key: Hashable, build: Callable[[], Any], dialect: Any) -> DriverStatement:
    """The statement `build` makes, in the driver's terms, compiled once per `key` (the
    PostgreSQL dialect compiles a statement alike for every engine)."""
    stmt = _COMPILED.get(key)
    if stmt is None:
        stmt = _COMPILED[key] = DriverStatement(build(), dialect)
    return stmt


def driver_rows(conn: Connection, stmt: DriverStatement, params: dict[str, Any], *,
                dicts: bool = False) -> list[Any]:
    """Run `stmt` with `params` in `conn`'s transaction; its rows (tuples, or dicts when
    `dicts`; [] when it returns none)."""
    from psycopg.rows import dict_row, tuple_row

    dbapi_conn = conn.connection.driver_connection
    params = _bound(stmt, params)
    with _sqlalchemy_errors(conn, stmt.sql, params):
        cursor = dbapi_conn.cursor(row_factory=dict_row if dicts else tuple_row)
        try:
            _execute(conn, cursor, stmt.sql, params)
            result = cursor.pgresult
            return cursor.fetchall() if result is not None and result.status == _TUPLES_OK else []
        finally:
            cursor.close()


@contextlib.contextmanager
def sent_ahead(conn: Connection, stmt: DriverStatement, params: dict[str, Any]) -> Iterator[Callable[[], Any]]:
    """Send `stmt` in pipeline mode and go on while PostgreSQL runs it: yields the function
    that waits for its (one) row. In `conn`'s transaction, errors as driver_rows raises them."""
    dbapi_conn = conn.connection.driver_connection
    params = _bound(stmt, params)
    with _sqlalchemy_errors(conn, stmt.sql, params), dbapi_conn.pipeline():
        cursor = dbapi_conn.cursor()
        try:
            _execute(conn, cursor, stmt.sql, params)
            yield cursor.fetchone
        finally:
            cursor.close()


def _bound(stmt: DriverStatement, params: dict[str, Any]) -> dict[str, Any]:
    return {**stmt.fixed, **params} if stmt.fixed else params


def _execute(conn: Connection, cursor: Any, sql: str, params: dict[str, Any]) -> None:
    if conn._has_events or conn.engine._has_events:
        # Seen by the same listeners as SQLAlchemy's statements (tests that watch them).
        conn.dispatch.before_cursor_execute(conn, cursor, sql, params, None, False)
    cursor.execute(sql, params)


@contextlib.contextmanager
def _sqlalchemy_errors(conn: Connection, sql: str, params: dict[str, Any]) -> Iterator[None]:
    """The driver's errors raised as SQLAlchemy raises them, the connection invalidated
    when it is gone; any other exception passes as it is."""
    import psycopg

    try:
        yield
    except psycopg.Error as exc:
        dbapi_conn = conn.connection.driver_connection
        gone = conn.dialect.is_disconnect(exc, dbapi_conn, None)
        err = DBAPIError.instance(sql, params, exc, psycopg.Error, hide_parameters=True,
                                  connection_invalidated=gone)
        if gone:
            conn.invalidate(err)
        raise err from exc


def driver_execute(conn: Connection, sql: str) -> None:
    """A statement without parameters or rows (SET LOCAL) in `conn`'s transaction."""
    driver_rows(conn, _plain(sql), {})


_PLAIN: dict[str, DriverStatement] = {}


def _plain(sql: str) -> DriverStatement:
    stmt = _PLAIN.get(sql)
    if stmt is None:
        stmt = _PLAIN[sql] = DriverStatement.__new__(DriverStatement)
        stmt.sql, stmt.fixed = sql, {}
    return stmt
