"""Statements of the launcher report path run on the driver's cursor of the transaction's
own connection, without SQLAlchemy's per-execution work.

SQLAlchemy spends about as much server CPU on a compiled, cached statement (execution
context, parameter processing, result metadata) as the driver and the database together:
a third of a report transaction's server CPU on PostgreSQL, more on SQLite. The
statements here are compiled once by SQLAlchemy into the driver's terms (psycopg's
%(name)s with SQLAlchemy's casts; pysqlite's :name) and run in the same transaction, on
the same connection, so nothing about atomicity or locking changes. Only for statements
whose parameters need no type processing but times: the caller binds lists as array
literals (codec.array_text) on PostgreSQL and as JSON arrays (query.ids_value) on SQLite,
and JSON as text. Rows come as tuples or dicts with the values SQLAlchemy's rows have
(JSON decoded; on SQLite times as naive datetimes, booleans as bool).

On PostgreSQL they go out through libpq's pipeline directly (_send, _receive): every statement
of a batch, then one Sync and one flush, and their results read back together, each
prepared as psycopg would prepare it (store.db.PreparedStatements). psycopg's pipeline
sends and polls once per statement, with a cursor, a query conversion and a row maker
each: 15 % of a launcher report's server instructions (bench_instructions --phases
report).

Listeners of before_cursor_execute see them as they see SQLAlchemy's (on PostgreSQL
without a cursor): on SQLite that is store.db's guard that refuses to run a statement
after SQLite rolled the transaction back by itself (and an error that did so is noted
there, as SQLAlchemy's handle_error would).
Errors are raised as SQLAlchemy raises them (DBAPIError, with the connection invalidated
when it is gone), so callers and rpc.database_unavailable see no difference.
"""

from __future__ import annotations

import contextlib
import functools
import select
import sqlite3
from collections.abc import Callable, Hashable, Iterator
from datetime import datetime
from typing import Any
from weakref import WeakKeyDictionary

from sqlalchemy import Boolean, Connection, DateTime
from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite
from sqlalchemy.exc import DBAPIError

from balsam_grpc.server.store.codec import is_json_type, loads, sqlite_time
from balsam_grpc.server.store.db import PreparedStatements, driver_shape, note_sqlite_error

_TUPLES_OK = 2  # psycopg.pq.ExecStatus.TUPLES_OK
# SQLite statements compiled with pysqlite's named placeholders (the engine's dialect
# uses positional ones), so that callers bind by name on both databases.
_SQLITE_NAMED = SQLiteDialect_pysqlite(paramstyle="named")


class DriverStatement:
    """A statement in the driver's terms, with the values of the parameters it fixes
    itself (literals SQLAlchemy bound, such as `num_nodes = 1`). SQLite: also which
    parameters are times (bound as SQLAlchemy stores them) and the names of the result
    columns with the conversion of each that needs one."""

    __slots__ = ("sql", "fixed", "times", "names", "convert")

    def __init__(self, stmt: Any, dialect: Any) -> None:
        sqlite = dialect.name == "sqlite"
        compiled = stmt.compile(dialect=_SQLITE_NAMED if sqlite else dialect)
        self.sql = str(compiled)
        self.fixed = {k: v for k, v in compiled.params.items() if v is not None}
        self.times: tuple[str, ...] = ()
        self.names: tuple[str, ...] = ()
        self.convert: tuple[tuple[int, Callable[[Any], Any]], ...] = ()
        if sqlite:
            self.times = tuple(name for name, bind in compiled.binds.items() if isinstance(bind.type, DateTime))
            self.fixed = {k: sqlite_time(v) if k in self.times else v for k, v in self.fixed.items()}
            columns = compiled._result_columns  # noqa: SLF001 - (keyname, name, objects, type) per column
            self.names = tuple(c[0] for c in columns)
            self.convert = tuple((i, fn) for i, c in enumerate(columns) if (fn := _sqlite_result(c[3])) is not None)


def _sqlite_result(type_: Any) -> Callable[[Any], Any] | None:
    """How a value SQLite returns becomes what SQLAlchemy's row would hold (None: as is)."""
    if isinstance(type_, DateTime):
        return datetime.fromisoformat
    if isinstance(type_, Boolean):
        return bool
    if is_json_type(type_):
        return loads
    return None


_COMPILED: dict[Hashable, DriverStatement] = {}


def driver_statement(key: Hashable, build: Callable[[], Any], dialect: Any, *, tag: str = "") -> DriverStatement:
    """The statement `build` makes, in the driver's terms, compiled once per `key`, `tag`
    and database (a dialect compiles a statement alike for every engine). A `tag` puts a
    comment before it: another text, so PostgreSQL prepares and plans it apart from the
    untagged one (its plans are built under that caller's settings, see
    store/leases.GENERIC_PLANS)."""
    stmt = _COMPILED.get((dialect.name, key, tag))
    if stmt is None:
        stmt = DriverStatement(build(), dialect)
        if tag:
            stmt.sql = f"/* {tag} */ {stmt.sql}"
        _COMPILED[(dialect.name, key, tag)] = stmt
    return stmt


def driver_rows(conn: Connection, stmt: DriverStatement, params: dict[str, Any], *,
                dicts: bool = False) -> list[Any]:
    """Run `stmt` with `params` in `conn`'s transaction; its rows (tuples, or dicts when
    `dicts`; [] when it returns none)."""
    if conn.dialect.name == "sqlite":
        return _sqlite_rows(conn, stmt, params, dicts)
    return _postgresql_batch(conn, [(stmt, _bound(stmt, params))], dicts)[0]


def _sqlite_rows(conn: Connection, stmt: DriverStatement, params: dict[str, Any], dicts: bool) -> list[Any]:
    params = _sqlite_params(stmt, params)
    cursor = conn.connection.driver_connection.cursor()
    try:
        with _sqlite_errors(conn, stmt.sql, params):
            _execute(conn, cursor, stmt.sql, params)
            rows = cursor.fetchall()
            described = cursor.description
    finally:
        cursor.close()
    if stmt.convert and rows:
        converted = []
        for row in rows:
            values = list(row)
            for i, fn in stmt.convert:
                if values[i] is not None:
                    values[i] = fn(values[i])
            converted.append(values)
        rows = converted
    if dicts:
        names = stmt.names or tuple(d[0] for d in described or ())
        return [dict(zip(names, row, strict=True)) for row in rows]
    return [tuple(row) for row in rows] if stmt.convert else rows


def driver_executemany(conn: Connection, stmt: DriverStatement, params: list[Any]) -> None:
    """SQLite: run `stmt` (no rows) once per parameter set in `params` (dicts; tuples for
    a plain_statement with positional placeholders), in `conn`'s transaction, as one
    executemany of the driver (the statement prepared once)."""
    if stmt.fixed or stmt.times:
        params = [_sqlite_params(stmt, p) for p in params]
    cursor = conn.connection.driver_connection.cursor()
    try:
        with _sqlite_errors(conn, stmt.sql, params):
            _execute(conn, cursor, stmt.sql, params, many=True)
    finally:
        cursor.close()


def _sqlite_params(stmt: DriverStatement, params: dict[str, Any]) -> dict[str, Any]:
    params = _bound(stmt, params)
    if stmt.times:
        params = {**params, **{k: sqlite_time(params[k]) for k in stmt.times if type(params.get(k)) is datetime}}
    return params


@contextlib.contextmanager
def sent_ahead(conn: Connection, stmt: DriverStatement, params: dict[str, Any]) -> Iterator[Callable[[], Any]]:
    """PostgreSQL: send `stmt` (with its Sync) and go on while the database runs it: yields
    the function that waits for its row (its first; None when it has none). In `conn`'s
    transaction, errors as driver_rows raises them; nothing else may run on the
    connection until the wait (or the end of the block, which reads and drops the
    answer). One round trip."""
    bound = [(stmt, _bound(stmt, params))]
    dbapi_conn = conn.connection.driver_connection
    with _sqlalchemy_errors(conn, stmt.sql, {}):
        _dispatch(conn, bound)
        sent = _send(dbapi_conn, bound)
        received = False

        def wait() -> Any:
            nonlocal received
            received = True
            rows = _receive(dbapi_conn, sent, False)[0]
            return rows[0] if rows else None

        try:
            yield wait
        except BaseException:
            if not received:  # the block's error is the one to raise
                with contextlib.suppress(_psycopg()[0].Error):
                    _receive(dbapi_conn, sent, False)
            raise
        if not received:
            _receive(dbapi_conn, sent, False)


def driver_batch(conn: Connection, items: list[tuple[DriverStatement, dict[str, Any]]], *,
                 dicts: bool = False) -> list[list[Any]]:
    """PostgreSQL: run the statements of `items` in order in `conn`'s transaction, sent
    together (pipeline mode) and answered in one round trip: for statements whose
    parameters do not depend on an earlier one's rows. Each one's rows as driver_rows
    returns them. An error in one is raised as driver_rows raises it, and none after it
    runs; the transaction then only rolls back (the Sync that ends the batch commits
    nothing inside BEGIN)."""
    return _postgresql_batch(conn, [(stmt, _bound(stmt, params)) for stmt, params in items], dicts)


def _postgresql_batch(conn: Connection, bound: list[tuple[DriverStatement, dict[str, Any]]],
                      dicts: bool) -> list[list[Any]]:
    with _sqlalchemy_errors(conn, "; ".join(stmt.sql for stmt, _ in bound), {}):
        _dispatch(conn, bound)
        dbapi_conn = conn.connection.driver_connection
        return _receive(dbapi_conn, _send(dbapi_conn, bound), dicts)


def _dispatch(conn: Connection, bound: list[tuple[DriverStatement, dict[str, Any]]]) -> None:
    if conn._has_events or conn.engine._has_events:
        for stmt, params in bound:
            conn.dispatch.before_cursor_execute(conn, None, stmt.sql, params, None, False)


class _Connection:
    """What _pipeline keeps per connection: its transformer (dumpers and loaders; a cursor
    copies the adapters at every statement), its prepared statements, and the names to
    deallocate at the start of the next pipeline."""

    __slots__ = ("tx", "statements", "deallocate", "names", "encoding")

    def __init__(self, dbapi_conn: Any) -> None:
        from psycopg import adapt

        self.tx = adapt.Transformer(dbapi_conn)
        self.statements = PreparedStatements()
        self.deallocate: list[bytes] = []
        self.names: dict[bytes, list[str]] = {}  # a statement's column names (rows as dicts)
        self.encoding = dbapi_conn.info.encoding


_CONNECTIONS: WeakKeyDictionary[Any, _Connection] = WeakKeyDictionary()


@functools.cache
def _psycopg() -> tuple[Any, Any, Any]:
    """psycopg, its errors and pq, imported once on first use (a SQLite-only install has no
    psycopg; an import statement in a function is a lookup and the import lock per call)."""
    import psycopg
    from psycopg import errors, pq

    return psycopg, errors, pq


def _send(dbapi_conn: Any, bound: list[tuple[DriverStatement, dict[str, Any]]]) -> tuple[_Connection, list[Any]]:
    """Send the statements in one libpq pipeline: BEGIN first when no transaction is open
    yet (as psycopg's cursor would send it), the deallocations due, each statement
    (prepared first at its PREPARE_AFTER-th execution), and one Sync, flushed. The
    connection stays in pipeline mode until _receive reads the answers. Returns what
    _receive needs: the connection's state and the pipeline's result groups, in order:
    None (BEGIN, a deallocation), a statement's PREPARE (its key and name), or a
    statement (its query)."""
    psycopg, _, pq = _psycopg()
    if dbapi_conn.pgconn.pipeline_status != pq.PipelineStatus.OFF:
        raise RuntimeError("a driver statement while another one's answer is awaited (store.driver.sent_ahead)")
    state = _CONNECTIONS.get(dbapi_conn)
    if state is None:
        state = _CONNECTIONS[dbapi_conn] = _Connection(dbapi_conn)
    pgconn, tx, statements = dbapi_conn.pgconn, state.tx, state.statements
    groups: list[Any] = []
    pgconn.enter_pipeline_mode()
    synced = False
    try:
        if pgconn.transaction_status == pq.TransactionStatus.IDLE and not dbapi_conn.autocommit:
            pgconn.send_query_params(b"BEGIN", None)
            groups.append(None)
        while state.deallocate:
            pgconn.send_query_params(b"DEALLOCATE " + state.deallocate.pop(), None)
            groups.append(None)
        for stmt, params in bound:
            shape = driver_shape(stmt.sql)
            values = tx.dump_sequence(shape.values(params), shape.formats) if shape.count else ()
            types = tuple(tx.types or ()) if shape.count else ()
            formats = tx.formats if shape.count else None
            key = (shape.query, types)
            name, prepare = statements.name_for(key)
            if name is None:
                pgconn.send_query_params(shape.query, values, param_formats=formats, param_types=types)
            else:
                if prepare:
                    pgconn.send_prepare(name, shape.query, param_types=types)
                    groups.append((key, name))
                pgconn.send_query_prepared(name, values, param_formats=formats)
            groups.append(shape.query)
        pgconn.pipeline_sync()
        synced = True
        _flush(pgconn)
    except BaseException as exc:
        # Failed while sending (a value no dumper takes): what went out runs to a Sync and
        # is read and dropped, so the connection leaves pipeline mode usable, in its
        # transaction, which the caller rolls back. A lost connection stays as it is.
        with contextlib.suppress(psycopg.Error):
            if not synced and pgconn.status == pq.ConnStatus.OK:
                pgconn.pipeline_sync()
                _flush(pgconn)
                _pipeline_results(pgconn, None)
            pgconn.exit_pipeline_mode()
        if isinstance(exc, OSError):
            raise psycopg.OperationalError(f"connection socket failed: {exc}") from exc
        raise
    return state, groups


def _receive(dbapi_conn: Any, sent: tuple[_Connection, list[Any]], dicts: bool) -> list[list[Any]]:
    """The answers of what _send sent, read back together (pipeline mode ends): each
    statement's rows (tuples, or dicts when `dicts`) as text loaded by the connection's
    own loaders, as its cursors load them; a statement's error raised after all is read."""
    psycopg, errors, pq = _psycopg()
    state, groups = sent
    pgconn, tx, statements = dbapi_conn.pgconn, state.tx, state.statements
    try:
        results = _pipeline_results(pgconn, len(groups))
    finally:
        with contextlib.suppress(psycopg.Error):
            pgconn.exit_pipeline_mode()
    error = None
    out: list[list[Any]] = []
    for group, got in zip(groups, results, strict=True):
        for result in got:
            if result.status == pq.ExecStatus.FATAL_ERROR and error is None:
                error = errors.error_from_result(result, encoding=state.encoding)
        if group is None:
            continue
        if type(group) is tuple:  # a PREPARE: kept once it succeeded (a failed one fails its statement)
            if got and got[-1].status == pq.ExecStatus.COMMAND_OK:
                evicted = statements.prepared(*group)
                if evicted is not None:
                    state.deallocate.append(evicted)
            continue
        last = got[-1] if got else None
        if last is None or last.status != _TUPLES_OK:
            out.append([])
            continue
        tx.set_pgresult(last)
        rows = tx.load_rows(0, last.ntuples, tuple)
        if dicts:
            names = state.names.get(group)
            if names is None:
                names = state.names[group] = [last.fname(i).decode(state.encoding) for i in range(last.nfields)]
            rows = [dict(zip(names, row, strict=True)) for row in rows]
        out.append(rows)
    if error is not None:
        raise error
    return out


def _flush(pgconn: Any) -> None:
    """Send what libpq holds; a batch larger than the socket's buffer waits to write,
    reading meanwhile (the server may be answering the first statements)."""
    fd = pgconn.socket
    while pgconn.flush():
        _wait(fd, select.POLLIN | select.POLLOUT)
        pgconn.consume_input()


def _pipeline_results(pgconn: Any, groups: int | None) -> list[list[Any]]:
    """Read a pipeline's answers: `groups` lists of results (a statement's end is a None
    from get_result; None: as many as come), then the Sync's. The waits release the GIL."""
    psycopg, _, pq = _psycopg()
    fd = pgconn.socket
    try:
        out: list[list[Any]] = []
        current: list[Any] = []
        while True:
            while pgconn.is_busy():
                _wait(fd, select.POLLIN)
                pgconn.consume_input()
            result = pgconn.get_result()
            if result is None:
                out.append(current)
                current = []
            elif result.status == pq.ExecStatus.PIPELINE_SYNC:
                if groups is not None and len(out) != groups:
                    raise psycopg.InternalError(f"pipeline answered {len(out)} statements of {groups}")
                return out
            else:
                current.append(result)
    except OSError as exc:
        raise psycopg.OperationalError(f"connection socket failed: {exc}") from exc


def _wait(fd: int, events: int) -> None:
    poller = select.poll()
    poller.register(fd, events)
    poller.poll()


def _bound(stmt: DriverStatement, params: dict[str, Any]) -> dict[str, Any]:
    return {**stmt.fixed, **params} if stmt.fixed else params


def _execute(conn: Connection, cursor: Any, sql: str, params: Any, *, many: bool = False) -> None:
    if conn._has_events or conn.engine._has_events:
        # Seen by the same listeners as SQLAlchemy's statements (tests that watch them, and
        # SQLite's guard against running on after a silent rollback).
        conn.dispatch.before_cursor_execute(conn, cursor, sql, params, None, many)
    if many:
        cursor.executemany(sql, params)
    else:
        cursor.execute(sql, params)


@contextlib.contextmanager
def _sqlite_errors(conn: Connection, sql: str, params: Any) -> Iterator[None]:
    """sqlite3's errors raised as SQLAlchemy raises them, after noting one that rolled the
    whole transaction back (db.note_sqlite_error)."""
    try:
        yield
    except sqlite3.Error as exc:
        note_sqlite_error(conn, exc)
        raise DBAPIError.instance(sql, params, exc, sqlite3.Error, hide_parameters=True) from exc


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


_PLAIN: dict[str, DriverStatement] = {}


def plain_statement(sql: str) -> DriverStatement:
    """`sql`, already in the driver's terms, as a DriverStatement (its parameters and
    rows converted by nobody)."""
    stmt = _PLAIN.get(sql)
    if stmt is None:
        stmt = _PLAIN[sql] = DriverStatement.__new__(DriverStatement)
        stmt.sql, stmt.fixed, stmt.times, stmt.names, stmt.convert = sql, {}, (), (), ()
    return stmt
