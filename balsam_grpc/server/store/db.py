"""Engine setup and transactions run off the event loop.

The store is synchronous SQLAlchemy Core; servicers call `await db.write(fn, ...)` or
`await db.read(fn, ...)`, which run `fn(conn, ...)` inside one transaction on a small
thread pool so the asyncio loop keeps serving streams.

SQLite transactions are SQLAlchemy's, not pysqlite's: pysqlite's default handling opens a
transaction only before INSERT/UPDATE/DELETE, so a SAVEPOINT taken before the first of
them was a transaction of its own that its RELEASE committed (a bulk create's jobs
committed without their events). Here pysqlite's BEGIN handling is off and every
transaction starts with an explicit BEGIN (BEGIN IMMEDIATE for writes: the write lock is
taken up front instead of on the first write), so savepoints nest as on PostgreSQL.

A write that fails for lack of disk space answers RESOURCE_EXHAUSTED (STORAGE_FULL)
naming the database and its disk, and writes nothing; the next write simply tries again.

Interactive work first (`Workers`): a task that runs the work of a long-lived stream
(site daemons, launchers, watchers) calls `bulk_work()`, and its transactions then go to
the bulk queue. A free database thread takes interactive work (unary calls, the server's
own upkeep) before bulk work, except that bulk work always gets up to `bulk_reserved`
threads when it has any waiting (streams slow down under interactive load, never stop),
and never takes the last thread (a unary call always finds one). Without it, 100
launcher sessions kept the pool's queue ~600 ms deep and every unary call waited behind
them. A delayed stream loses little: it coalesces more reports into its next transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import gc
import operator
import os
import re
import shutil
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import structlog
from sqlalchemy import Connection, create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError

from balsam_grpc.core.errors import ResourceExhausted
from balsam_grpc.core.settings import default_database_url
from balsam_grpc.server.store import codec

log = structlog.get_logger(__name__)
T = TypeVar("T")
# Key in Connection.info where store.events records the highest event id it inserted.
MAX_EVENT_ID = "balsam_max_event_id"
# A pooled PostgreSQL connection idle for longer than this is pinged before reuse.
IDLE_PING_SECONDS = 5.0
_IDLE_SINCE = "balsam_idle_since"


# Execution option: the statement that opens a SQLite transaction (default "BEGIN").
SQLITE_BEGIN = "balsam_sqlite_begin"
# Key in Connection.info: the error after which SQLite rolled the transaction back.
_ROLLED_BACK_BY = "balsam_sqlite_rolled_back_by"


class TransactionLost(Exception):
    """SQLite rolled the whole transaction back after an error (disk full, I/O error, out
    of memory) that the code in it caught: nothing of it may run or commit any more, or
    its later statements would each commit on their own."""

    def __init__(self, cause: BaseException | None) -> None:
        super().__init__(f"SQLite rolled the transaction back after an error: {cause}")
        self.cause = cause


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # pysqlite emits no BEGIN; _sqlite_begin does
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    conn.info.pop(_ROLLED_BACK_BY, None)
    begin = conn.get_execution_options().get(SQLITE_BEGIN, "BEGIN")
    # On the driver: SQLAlchemy's execution of it cost more than SQLite's work, once per
    # transaction. Its error is raised as SQLAlchemy's (a lock not had in busy_timeout is
    # an OperationalError, UNAVAILABLE to a caller).
    try:
        conn.connection.driver_connection.execute(begin)
    except sqlite3.Error as exc:
        raise DBAPIError.instance(begin, {}, exc, sqlite3.Error) from exc


def _sqlite_transaction_gone(conn: Connection) -> bool:
    return conn.in_transaction() and not conn.connection.dbapi_connection.in_transaction


def _refuse_lost_transaction(conn: Connection, *_: Any) -> None:
    """Before each statement and the commit."""
    if _sqlite_transaction_gone(conn):
        raise TransactionLost(conn.info.get(_ROLLED_BACK_BY))


def _sqlite_error(context: Any) -> None:
    if context.connection is not None:
        note_sqlite_error(context.connection, context.original_exception)


def note_sqlite_error(conn: Connection, exc: BaseException) -> None:
    """After `exc` from a statement of `conn` (SQLite). SQLITE_FULL, SQLITE_IOERR and
    SQLITE_NOMEM may roll back the whole transaction, not only the failed statement:
    remember why, for the error raised when it is used again."""
    if not conn.closed and not conn.invalidated and _sqlite_transaction_gone(conn):
        conn.info.setdefault(_ROLLED_BACK_BY, exc)


def _private_sqlite_file(path: Path) -> None:
    """Create the database file owner-only (0600) before SQLite opens it: SQLite gives its
    -wal and -shm files the database file's mode. A file left group- or world-readable
    by an older version is narrowed."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            mode = p.stat().st_mode & 0o777
            if mode & 0o077:
                p.chmod(mode & 0o700)
                log.warning("database file was readable by others; now owner-only", path=str(p),
                            old_mode=oct(mode))


def _ping_when_idle(engine: Engine, idle_seconds: float) -> None:
    """Ping a pooled connection only when it sat idle, not on every checkout.

    SQLAlchemy's pool_pre_ping costs a round trip per transaction, a large share of a
    single-row create. A connection returned moments ago is almost surely alive; one
    idle longer may have been cut (server restart, firewall), so it is pinged and
    replaced when dead (the pool retries checkout on DisconnectionError).
    """

    @event.listens_for(engine, "checkin")
    def _checkin(_dbapi_conn: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get(_IDLE_SINCE)
        if since is None or time.monotonic() - since < idle_seconds:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # noqa: BLE001 - any failure means the connection is unusable
            raise DisconnectionError(f"pooled connection failed its ping: {exc}") from exc
        if alive is False:
            raise DisconnectionError("pooled connection failed its ping")


def make_engine(url: str, idle_ping_seconds: float = IDLE_PING_SECONDS) -> Engine:
    parsed = make_url(url)
    # Faster JSON column codecs (store.codec); SQLAlchemy hands them to psycopg as well.
    json_args = {"json_serializer": codec.dumps, "json_deserializer": codec.loads}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            _private_sqlite_file(Path(parsed.database))
        engine = create_engine(url, connect_args={"check_same_thread": False}, pool_size=8, **json_args)
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        event.listen(engine, "before_cursor_execute", _refuse_lost_transaction)
        event.listen(engine, "commit", _refuse_lost_transaction)
        event.listen(engine, "handle_error", _sqlite_error)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    engine = create_engine(parsed, pool_size=10, max_overflow=10, **json_args)
    event.listen(engine, "connect", _pg_connect)
    _ping_when_idle(engine, idle_ping_seconds)
    return engine


def _pg_connect(dbapi_conn: Any, record: Any) -> None:
    # psycopg prepares nothing on these connections: the driver statements (store.driver)
    # are prepared by their own PreparedStatements, and psycopg deallocates every
    # statement of a connection, ours with its own, at each rollback (the pool ends every
    # read so). Statements SQLAlchemy runs are planned at each execution.
    dbapi_conn.prepare_threshold = None
    _pg_loaders(dbapi_conn, record)


def _pg_loaders(dbapi_conn: Any, _record: Any) -> None:
    # Runs after SQLAlchemy's own connect hook, so these loaders replace its wrappers.
    for name in ("json", "jsonb"):
        dbapi_conn.adapters.register_loader(name, codec.json_loader())
    # statement_now's results are binary (run_tuples): the same values.
    dbapi_conn.adapters.register_loader("json", codec.json_binary_loader())
    dbapi_conn.adapters.register_loader("jsonb", codec.jsonb_binary_loader())


_gc_relaxed = False


def relax_gc() -> None:
    """Collect garbage cycles less eagerly, once per process.

    Called by the server process at start. A page or batch of jobs allocates hundreds of thousands of small containers that
    all survive the request; with CPython's default thresholds (700, 10, 10) the
    collector keeps re-scanning them and the rest of the heap, a fifth of the CPU time
    of bulk create and list. Objects alive at startup are frozen out of collection.
    """
    global _gc_relaxed
    if not _gc_relaxed:
        _gc_relaxed = True
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)


def storage_full_detail(exc: BaseException) -> str | None:
    """The driver's words when `exc` (or what it was raised from) means the database's
    disk is full: SQLite's SQLITE_FULL (or a shared-memory file it could not grow),
    PostgreSQL's disk_full (SQLSTATE 53100, "could not extend file"). Else None."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, sqlite3.Error) and getattr(err, "sqlite_errorcode", None) in _SQLITE_FULL_CODES:
            return str(err)
        if getattr(err, "sqlstate", None) == _PG_DISK_FULL:
            return str(err).strip().splitlines()[0]
        todo += [getattr(err, "orig", None), getattr(err, "cause", None), err.__cause__, err.__context__]
    return None


_SQLITE_FULL_CODES = (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR_SHMSIZE)
_PG_DISK_FULL = "53100"


def describe_location(url: URL) -> str:
    """Where the database lives, for messages: the SQLite file and the filesystem holding
    it (with its free space now), or the PostgreSQL database and server."""
    if url.get_backend_name() == "sqlite":
        path = Path(url.database or ":memory:")
        if not url.database or url.database == ":memory:":
            return "the in-memory SQLite database"
        mount = path.resolve().parent
        while not os.path.ismount(mount) and mount != mount.parent:
            mount = mount.parent
        try:
            free = f", {shutil.disk_usage(mount).free:,} bytes free"
        except OSError:
            free = ""
        return f"SQLite database {path} (filesystem mounted at {mount}{free})"
    return f"PostgreSQL database {url.database!r} on {url.host or 'localhost'}:{url.port or 5432}"


_BULK: contextvars.ContextVar[bool] = contextvars.ContextVar("balsam_db_bulk", default=False)


def bulk_work() -> None:
    """From here on, the calling task's transactions (and those of tasks it creates) are
    bulk work, which yields to interactive work (`Workers`)."""
    _BULK.set(True)


class Workers:
    """The database threads, with two queues: `submit(call, bulk)` returns a
    concurrent.futures.Future. A free thread takes, in this order: bulk work while fewer
    than `bulk_reserved` threads run bulk work; interactive work; bulk work while fewer
    than all threads but one run bulk work. Each queue is first in, first out."""

    def __init__(self, workers: int, bulk_reserved: int = 2, name: str = "balsam-db") -> None:
        self.workers = max(2, workers)
        self.bulk_reserved = max(1, min(bulk_reserved, self.workers - 1))
        self.bulk_running = 0
        self._interactive: deque[tuple[Future[Any], Callable[[], Any]]] = deque()
        self._bulk: deque[tuple[Future[Any], Callable[[], Any]]] = deque()
        self._ready = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}_{i}", daemon=True)
                         for i in range(self.workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, call: Callable[[], T], bulk: bool = False) -> Future[T]:
        job: Future[T] = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the database is closed")
            (self._bulk if bulk else self._interactive).append((job, call))
            self._ready.notify()
        return job

    def _next(self) -> tuple[Future[Any], Callable[[], Any], bool] | None:
        """Under the lock: the next job for a free thread (and whether it is bulk)."""
        if self._bulk and self.bulk_running < self.bulk_reserved:
            return (*self._bulk.popleft(), True)
        if self._interactive:
            return (*self._interactive.popleft(), False)
        if self._bulk and self.bulk_running < self.workers - 1:
            return (*self._bulk.popleft(), True)
        return None

    def _work(self) -> None:
        while True:
            with self._ready:
                picked = self._next()
                while picked is None:
                    if self._closed and not self._interactive and not self._bulk:
                        return
                    self._ready.wait()
                    picked = self._next()
                job, call, bulk = picked
                del picked
                if bulk:
                    self.bulk_running += 1
            try:
                if job.set_running_or_notify_cancel():
                    try:
                        job.set_result(call())
                    except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                        job.set_exception(exc)
            finally:
                # An idle thread must not keep its last request and answer alive: after
                # large creates that held ~100 MiB the server could not give back.
                del job, call
                if bulk:
                    with self._ready:
                        self.bulk_running -= 1
                        # Bulk work may have waited for this thread; with none queued, a
                        # wake-up would only cost the woken thread a switch and the GIL.
                        if self._bulk:
                            self._ready.notify()

    def shutdown(self) -> None:
        """Run what is queued, then stop the threads."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        for thread in self._threads:
            thread.join()


_TUPLES_OK = 2  # psycopg.pq.ExecStatus.TUPLES_OK (psycopg is imported on first use)
# psycopg.pq.Format.BINARY: statement_now's rows come in binary. An integer column's text
# is parsed by PyLong_FromString, about 400 instructions a value (16 per listed job, a
# sixth of reading a page of jobs); its binary form is read as it is.
_BINARY = 1


@functools.cache
def _psycopg() -> Any:
    """The psycopg module, imported on first use (the `postgres` extra: a SQLite-only
    install has none) and then held: an import statement in a function costs a lookup
    of the module, its attribute and the import lock at every call."""
    import psycopg

    return psycopg


@functools.cache
def _statement_connection_class() -> type:
    """psycopg's AsyncConnection, waiting for its socket with less work per wait. Its own
    wait arms a timer and builds a closure besides registering the socket, at every wait
    of every statement. Here the socket's reader is registered once and stays registered
    between statements (registering and removing it cost two epoll_ctl calls and the
    loop's bookkeeping per wait); a wait only sets the future the reader completes."""
    import psycopg
    from psycopg import adapt, errors
    from psycopg.waiting import READY_R, READY_W, WAIT_R, WAIT_W

    def ready(waiter: asyncio.Future[int], state: int) -> None:
        if not waiter.done():
            waiter.set_result(state)

    fatal_error = psycopg.pq.ExecStatus.FATAL_ERROR

    class StatementConnection(psycopg.AsyncConnection):  # type: ignore[type-arg]
        # The loop and socket the reader is registered with (None: not registered), the
        # future a statement waits on, and whether a statement is under way.
        _reader: tuple[asyncio.AbstractEventLoop, int] | None = None
        _waiter: asyncio.Future[int] | None = None
        _busy = False
        # run_tuples: the transformer (dumpers and loaders of this connection) and the
        # statements prepared here.
        _tx: Any = None
        _statements: PreparedStatements

        async def run_tuples(self, shape: _DriverShape, params: dict[str, Any]) -> list[tuple[Any, ...]]:
            """One statement (a driver shape) with `params`, its rows as tuples: what
            cursor.execute and fetchall do for it, without the cursor (a new one per
            statement, each with a copy of the connection's adapters), the connection's
            lock and the query's conversion at every execution (a third of a
            statement's server CPU). Prepared as psycopg prepares: after PREPARE_AFTER
            executions, at most MAX_PREPARED per connection (the least recently used
            deallocated)."""
            tx = self._tx
            if tx is None:
                tx = self._tx = adapt.Transformer(self)
                self._statements = PreparedStatements()
            pgconn = self.pgconn
            values = tx.dump_sequence(shape.values(params), shape.formats) if shape.count else ()
            types = tx.types or () if shape.count else ()
            formats = tx.formats if shape.count else None
            key = (shape.query, types)
            name, prepare = self._statements.name_for(key)
            if prepare:
                pgconn.send_prepare(name, shape.query, param_types=types)
                await self._results(pgconn)  # raises the statement's error: not kept
                evicted = self._statements.prepared(key, name)
                if evicted is not None:
                    self.pgconn.send_query(b"DEALLOCATE " + evicted)
                    await self._results(self.pgconn)
            if name is None:
                pgconn.send_query_params(shape.query, values, param_formats=formats, param_types=types,
                                         result_format=_BINARY)
            else:
                pgconn.send_query_prepared(name, values, param_formats=formats, result_format=_BINARY)
            result = await self._results(pgconn)
            if result is None or result.status != _TUPLES_OK:
                return []
            tx.set_pgresult(result)
            return tx.load_rows(0, result.ntuples, tuple)  # type: ignore[no-any-return]

        async def _results(self, pgconn: Any) -> Any:
            """Send what is queued, wait for the statement's results and return the last
            one (psycopg's execute generator, on this connection's reader); a failed
            statement's error is raised."""
            loop = asyncio.get_running_loop()
            fd = pgconn.socket
            self._busy = True
            try:
                while pgconn.flush():  # a statement larger than the socket's buffer: rare
                    waiter = loop.create_future()
                    loop.add_writer(fd, ready, waiter, READY_W)
                    try:
                        await waiter
                    finally:
                        loop.remove_writer(fd)
                if self._reader != (loop, fd):
                    self.stop_reading()
                    loop.add_reader(fd, self._readable)
                    self._reader = (loop, fd)
                last = error = None
                while True:
                    while pgconn.is_busy():
                        self._waiter = waiter = loop.create_future()
                        try:
                            await waiter
                        finally:
                            self._waiter = None
                        pgconn.consume_input()
                    result = pgconn.get_result()
                    if result is None:
                        break
                    if result.status == fatal_error and error is None:
                        error = errors.error_from_result(result, encoding=self.info.encoding)
                    last = result
            except OSError as exc:
                raise psycopg.OperationalError("connection socket closed") from exc
            finally:
                self._busy = False
            if error is not None:
                raise error
            return last

        def _readable(self) -> None:
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(READY_R)
            elif not self._busy:
                # Readable with no statement under way: a notice (read now, so the socket
                # is quiet again), or the server closed the connection. A closed one is
                # closed here too (its socket would stay readable and call this at every
                # turn of the loop), and replaced when next taken (conn.closed), so no
                # caller gets its error.
                try:
                    self.pgconn.consume_input()
                except psycopg.OperationalError:
                    self.stop_reading()
                    self.pgconn.finish()

        def stop_reading(self) -> None:
            """Remove the socket's reader; on the loop it was registered with, before the
            socket closes."""
            if self._reader is not None:
                loop, fd = self._reader
                self._reader = None
                if not loop.is_closed():
                    loop.remove_reader(fd)

        async def wait(self, gen: Any, interval: float | None = None, timeout: float | None = None) -> Any:
            if timeout is not None:  # none of the statements here has a time limit
                return await super().wait(gen, timeout=timeout)
            fd = self.pgconn.socket
            loop = asyncio.get_running_loop()
            self._busy = True
            try:
                s = next(gen)
                while True:
                    waiter = loop.create_future()
                    if s & WAIT_R:
                        if self._reader != (loop, fd):
                            self.stop_reading()
                            loop.add_reader(fd, self._readable)
                            self._reader = (loop, fd)
                        self._waiter = waiter
                    if s & WAIT_W:  # a statement larger than the socket's buffer: rare
                        loop.add_writer(fd, ready, waiter, READY_W)
                    try:
                        state = await waiter
                    finally:
                        self._waiter = None
                        if s & WAIT_W:
                            loop.remove_writer(fd)
                    s = gen.send(state)
            except StopIteration as done:
                return done.value
            except OSError as exc:
                raise psycopg.OperationalError("connection socket closed") from exc
            finally:
                self._busy = False

    return StatementConnection


# Executions of a (query, parameter types) before it is prepared, and the statements
# prepared per connection (psycopg's defaults).
PREPARE_AFTER = 5
MAX_PREPARED = 100


class PreparedStatements:
    """The statements prepared on one connection, by (query, parameter types), as psycopg
    prepares its own: at the PREPARE_AFTER-th execution, at most MAX_PREPARED, the least
    recently used deallocated."""

    __slots__ = ("names", "seen", "count")

    def __init__(self) -> None:
        self.names: dict[tuple[bytes, tuple[int, ...]], bytes] = {}  # least recently used first
        self.seen: dict[tuple[bytes, tuple[int, ...]], int] = {}
        self.count = 0

    def name_for(self, key: tuple[bytes, tuple[int, ...]]) -> tuple[bytes | None, bool]:
        """(the name to execute `key` as, None for unprepared; whether to prepare it first)."""
        name = self.names.pop(key, None)
        if name is not None:
            self.names[key] = name
            return name, False
        seen = self.seen.get(key, 0) + 1
        if seen >= PREPARE_AFTER:
            self.seen.pop(key, None)
            self.count += 1
            return b"_balsam_%d" % self.count, True
        if len(self.seen) >= MAX_PREPARED:
            del self.seen[next(iter(self.seen))]
        self.seen[key] = seen
        return None, False

    def prepared(self, key: tuple[bytes, tuple[int, ...]], name: bytes) -> bytes | None:
        """`name` was prepared for `key`: kept. The name to deallocate now, if one must go."""
        self.names[key] = name
        if len(self.names) > MAX_PREPARED:
            return self.names.pop(next(iter(self.names)))
        return None
# A %(name)s placeholder, or %% (a literal %), in the driver's (psycopg's) terms.
_PLACEHOLDER = re.compile(rb"%\((\w+)\)s|%%")


class _DriverShape:
    """A statement in psycopg's %(name)s terms converted once to PostgreSQL's ($1, $2, ...,
    a repeated name keeping its number) with the order its parameters are sent in."""

    __slots__ = ("query", "names", "count", "formats", "values")

    def __init__(self, sql: str) -> None:
        from psycopg.adapt import PyFormat

        names: dict[bytes, int] = {}

        def number(match: re.Match[bytes]) -> bytes:
            name = match.group(1)
            if name is None:
                return b"%"
            return b"$%d" % names.setdefault(name, len(names) + 1)

        self.query = _PLACEHOLDER.sub(number, sql.encode())
        self.names = tuple(name.decode() for name in names)
        self.count = len(self.names)
        self.formats = [PyFormat.AUTO] * self.count
        getter = operator.itemgetter(*self.names) if self.names else None
        # The parameters in order, as a sequence (itemgetter of one name gives the value).
        self.values: Callable[[dict[str, Any]], Any] = (
            (lambda params: (getter(params),)) if self.count == 1 else getter)  # type: ignore[assignment,misc]


# Converted once per statement text: the callers' statements are few and held (built once
# per shape), so their str hashes are kept too.
_SHAPES: dict[str, _DriverShape] = {}
_MAX_SHAPES = 1024


def driver_shape(sql: str) -> _DriverShape:
    shape = _SHAPES.get(sql)
    if shape is None:
        if len(_SHAPES) >= _MAX_SHAPES:
            _SHAPES.clear()
        shape = _SHAPES[sql] = _DriverShape(sql)
    return shape


def _runs_on(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether this thread is running `loop`."""
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class _StatementConnections:
    """PostgreSQL connections in autocommit, used on the event loop itself (psycopg's
    AsyncConnection) for `Database.statement_now`: a single statement costs no hop to a
    database thread and back (a lock, a thread wake-up, a wake-up of the loop and two GIL
    hand-offs, about a third of a single create's server CPU) and none of SQLAlchemy's
    per-execution work. At most `size` connections; one idle longer than
    `idle_ping_seconds` is pinged before use (replaced when dead), as the pool does."""

    def __init__(self, url: URL, size: int, idle_ping_seconds: float) -> None:
        self.conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.size = size
        self.idle_ping_seconds = idle_ping_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None
        self._idle: list[tuple[Any, float]] = []

    def _bind(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._slots is None:  # connections belong to one loop
            self.close()
            self._loop, self._slots = loop, asyncio.Semaphore(self.size)
        return self._slots

    async def run(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        psycopg = _psycopg()
        slots = self._bind()
        async with slots:
            conn = await self._take(psycopg)
            broken = True
            try:
                rows = await conn.run_tuples(driver_shape(sql), params)
                broken = False
                return rows
            except psycopg.Error as exc:
                broken = conn.closed or isinstance(exc, psycopg.OperationalError)
                # As SQLAlchemy raises it (rpc.database_unavailable, storage_full_detail
                # and the callers' IntegrityError handling read these).
                raise DBAPIError.instance(sql, params, exc, psycopg.Error, hide_parameters=True,
                                          connection_invalidated=broken) from exc
            finally:
                if broken:
                    self._discard(conn)
                else:
                    self._idle.append((conn, time.monotonic()))

    async def _take(self, psycopg: Any) -> Any:
        while self._idle:
            conn, since = self._idle.pop()
            if conn.closed:
                self._discard(conn)
                continue
            if time.monotonic() - since < self.idle_ping_seconds:
                return conn
            try:
                await conn.execute("SELECT 1")
                return conn
            except psycopg.Error:
                self._discard(conn)
        try:
            conn = await _statement_connection_class().connect(self.conninfo, autocommit=True)
        except psycopg.OperationalError as exc:
            raise DisconnectionError(f"could not connect to the database: {exc}") from exc
        _pg_loaders(conn, None)  # JSON columns decoded as the engine's connections do
        return conn

    @staticmethod
    def _discard(conn: Any) -> None:
        """Close `conn`, on the loop its socket's reader is registered with (or with none)."""
        conn.stop_reading()
        with contextlib.suppress(Exception):
            conn.pgconn.finish()  # libpq's close: synchronous

    def close(self) -> None:
        """Close the idle connections. From any thread: their readers are removed, and the
        sockets closed, on their loop when it runs in another thread."""
        idle, self._idle = self._idle, []
        if not idle:
            return
        loop = self._loop
        conns = [conn for conn, _ in idle]
        if loop is not None and loop.is_running() and not _runs_on(loop):
            loop.call_soon_threadsafe(self._discard_all, conns)
        else:
            self._discard_all(conns)

    @classmethod
    def _discard_all(cls, conns: list[Any]) -> None:
        for conn in conns:
            cls._discard(conn)


class Database:
    def __init__(self, url: str | None = None, *, workers: int = 6,
                 idle_ping_seconds: float = IDLE_PING_SECONDS, bulk_reserved: int = 2) -> None:
        self.url = url or default_database_url()
        self.engine = make_engine(self.url, idle_ping_seconds)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self.is_postgres = self.engine.dialect.name == "postgresql"
        # SQLite allows one writer; serialising in-process avoids SQLITE_BUSY on upgrade.
        self._write_lock = threading.Lock() if self.is_sqlite else None
        # Writers take SQLite's write lock at BEGIN (another process's writer waits on
        # busy_timeout there instead of failing to upgrade a read transaction).
        self._writer = self.engine.execution_options(**{SQLITE_BEGIN: "BEGIN IMMEDIATE"}) if self.is_sqlite \
            else self.engine
        # Reads of single statements: no transaction on PostgreSQL (read_now).
        self._now_reader = self.engine.execution_options(isolation_level="AUTOCOMMIT") if self.is_postgres \
            else self.engine
        self.workers = Workers(workers, bulk_reserved)
        self._statements = _StatementConnections(self.engine.url, workers, idle_ping_seconds) \
            if self.is_postgres else None
        self._storage_full = False

        # Called on the event loop after a commit that appended events: (max event id).
        self.on_events: Callable[[int], None] | None = None

    def write_sync(self, fn: Callable[..., T], *args: Any) -> T:
        result, _ = self._write(fn, *args)
        return result

    def _write(self, fn: Callable[..., T], *args: Any) -> tuple[T, int | None]:
        lock = self._write_lock or contextlib.nullcontext()
        try:
            with lock, self._writer.begin() as conn:
                conn.info.pop(MAX_EVENT_ID, None)  # left by a transaction that failed on this connection
                result = fn(conn, *args)
                max_event_id = conn.info.pop(MAX_EVENT_ID, None)
        except Exception as exc:
            self._raise_if_storage_full(exc)
            raise
        self._wrote()
        return result, max_event_id

    def _wrote(self) -> None:
        """A write succeeded: say so once if the storage was full before."""
        if self._storage_full:
            self._storage_full = False
            log.warning("database writes succeed again", database=describe_location(self.engine.url))

    def read_sync(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            with self.engine.connect() as conn:
                return fn(conn, *args)
        except Exception as exc:
            self._raise_if_storage_full(exc)
            raise

    def read_now_sync(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            with self._now_reader.connect() as conn:
                return fn(conn, *args)
        except Exception as exc:
            self._raise_if_storage_full(exc)
            raise

    def _raise_if_storage_full(self, exc: Exception) -> None:
        detail = storage_full_detail(exc)
        if detail is None:
            return
        where = describe_location(self.engine.url)
        if not self._storage_full:
            self._storage_full = True
            log.error("database storage is full; writes are refused until there is room", database=where,
                      error=detail)
        raise ResourceExhausted(
            f"the database's storage is full: {where} ({detail}); nothing was written. "
            "Free space there and retry: the server writes again as soon as there is room, reads keep working",
            reason="STORAGE_FULL", metadata={"database": where}) from exc

    async def _run(self, call: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self.workers.submit(call, bulk=_BULK.get()))

    async def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        result, max_event_id = await self._run(functools.partial(self._write, functools.partial(fn, **kwargs), *args))
        if max_event_id is not None and self.on_events is not None:
            self.on_events(max_event_id)
        return result
    async def statement_now(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        """PostgreSQL: run one statement in the driver's own terms (psycopg's %(name)s
        placeholders) in autocommit, on the event loop, and return its rows (plain tuples;
        [] when it returns none). Committed before it returns;
        errors are raised as SQLAlchemy's (IntegrityError, OperationalError with the
        connection invalidated, ...). Not for statements whose rows need SQLAlchemy's type
        processing.

        Events it appends reach this replica's streams as another replica's do: by the
        notification its commit sends (store/events.py, server/notify.py; with no origin
        mark), which wakes the fanout only when a stream here is concerned. `on_events` is
        not called: on PostgreSQL it wakes the fanout for every commit, and the fanout then
        asks the database for the event horizon, concerned or not."""
        assert self._statements is not None, "statement_now: PostgreSQL only"
        try:
            return await self._statements.run(sql, params)
        except Exception as exc:
            self._raise_if_storage_full(exc)
            raise

    async def sqlite_statement(self, sql: str, params: dict[str, Any], *, write: bool = False) -> list[Any]:
        """SQLite: run one statement in the driver's own terms (pysqlite's :name
        placeholders) on a database thread, straight on a pooled connection, and return
        its rows (plain tuples). A `write` runs in its own transaction (BEGIN IMMEDIATE,
        under the in-process write lock, committed before it returns); a read runs alone
        (one statement is consistent by itself). No SQLAlchemy per execution (cache key,
        compilation, type processing, result set-up: half of a get or list's server CPU),
        so parameters are given as SQLite stores them and rows come back as stored.
        Errors are raised as SQLAlchemy's (IntegrityError, ...; STORAGE_FULL as `write`)."""
        assert self.is_sqlite, "sqlite_statement: SQLite only"
        return await self._run(functools.partial(self._sqlite_statement, sql, params, write))

    def _sqlite_statement(self, sql: str, params: dict[str, Any], write: bool) -> list[Any]:
        lock = self._write_lock if write else None
        try:
            with lock or contextlib.nullcontext():
                pooled = self.engine.raw_connection()
                try:
                    raw = pooled.driver_connection
                    if not write:
                        return raw.execute(sql, params).fetchall()
                    raw.execute("BEGIN IMMEDIATE")
                    try:
                        rows = raw.execute(sql, params).fetchall()
                        raw.execute("COMMIT")
                    except BaseException:
                        if raw.in_transaction:
                            with contextlib.suppress(sqlite3.Error):  # the statement's error is the one to tell
                                raw.execute("ROLLBACK")
                        raise
                finally:
                    pooled.close()
        except sqlite3.Error as exc:
            wrapped = DBAPIError.instance(sql, params, exc, sqlite3.Error, hide_parameters=True)
            self._raise_if_storage_full(wrapped)
            raise wrapped from exc
        if write:
            self._wrote()
        return rows

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self._run(functools.partial(self.read_sync, functools.partial(fn, **kwargs), *args))

    async def read_now(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`read` for a function whose statements need no common transaction (each one
        alone is consistent: READ COMMITTED gives every statement its own snapshot
        anyway). On PostgreSQL it runs in autocommit: no BEGIN and ROLLBACK round trips,
        two of a one-query read's three. Not for SET LOCAL, locks or FOR UPDATE."""
        return await self._run(functools.partial(self.read_now_sync, functools.partial(fn, **kwargs), *args))

    def dispose(self) -> None:
        if self._statements is not None:
            self._statements.close()
        self.workers.shutdown()
        self.engine.dispose()
