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

Interactive work first (`Lanes`): a task that runs the work of a long-lived stream (site
daemons, launchers, watchers) calls `bulk_work()`, and its transactions then wait for a
bulk slot before they enter the pool. While any interactive transaction (a unary call,
the server's own upkeep) is queued or running, only `bulk_when_busy` bulk transactions
run at once, else up to `bulk_when_idle`. Without it, 100 launcher sessions kept the
pool's queue ~600 ms deep and every unary call waited behind them. Streams lose little:
a delayed stream coalesces more reports into its next transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import gc
import os
import shutil
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog
from sqlalchemy import Connection, create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import DisconnectionError

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
    conn.exec_driver_sql(conn.get_execution_options().get(SQLITE_BEGIN, "BEGIN"))


def _sqlite_transaction_gone(conn: Connection) -> bool:
    return conn.in_transaction() and not conn.connection.dbapi_connection.in_transaction


def _refuse_lost_transaction(conn: Connection, *_: Any) -> None:
    """Before each statement and the commit."""
    if _sqlite_transaction_gone(conn):
        raise TransactionLost(conn.info.get(_ROLLED_BACK_BY))


def _sqlite_error(context: Any) -> None:
    # SQLITE_FULL, SQLITE_IOERR and SQLITE_NOMEM may roll back the whole transaction, not
    # only the failed statement: remember why, for the error raised when it is used again.
    conn = context.connection
    if conn is not None and not conn.closed and not conn.invalidated and _sqlite_transaction_gone(conn):
        conn.info.setdefault(_ROLLED_BACK_BY, context.original_exception)


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
    event.listen(engine, "connect", _pg_loaders)
    _ping_when_idle(engine, idle_ping_seconds)
    return engine


def _pg_loaders(dbapi_conn: Any, _record: Any) -> None:
    # Runs after SQLAlchemy's own connect hook, so these loaders replace its wrappers.
    for name in ("json", "jsonb"):
        dbapi_conn.adapters.register_loader(name, codec.json_loader())


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
    bulk work, which yields to interactive work (`Lanes`)."""
    _BULK.set(True)


class Lanes:
    """Admits transactions to the pool, interactive ones first. Event-loop bookkeeping only
    (no locks): interactive work enters at once; bulk work enters while fewer than its
    limit of bulk transactions are in the pool, in arrival order, at least one at a time,
    so streams slow down under interactive load but never stop."""

    def __init__(self, bulk_when_idle: int, bulk_when_busy: int) -> None:
        self.bulk_when_idle = max(1, bulk_when_idle)
        self.bulk_when_busy = max(1, min(bulk_when_busy, self.bulk_when_idle))
        self.interactive = 0  # interactive transactions queued or running in the pool
        self.bulk = 0  # bulk transactions queued or running in the pool
        self._waiting: deque[asyncio.Future[None]] = deque()

    def _limit(self) -> int:
        return self.bulk_when_busy if self.interactive else self.bulk_when_idle

    def enter_interactive(self) -> None:
        self.interactive += 1

    def leave_interactive(self) -> None:
        self.interactive -= 1
        self._admit_waiting()

    async def enter_bulk(self) -> None:
        if not self._waiting and self.bulk < self._limit():
            self.bulk += 1
            return
        admitted = asyncio.get_running_loop().create_future()
        self._waiting.append(admitted)
        try:
            await admitted
        except asyncio.CancelledError:
            if admitted.cancelled():
                with contextlib.suppress(ValueError):
                    self._waiting.remove(admitted)
            else:  # admitted, then cancelled before it could run: hand the slot on
                self.leave_bulk()
            raise

    def leave_bulk(self) -> None:
        self.bulk -= 1
        self._admit_waiting()

    def _admit_waiting(self) -> None:
        while self._waiting and self.bulk < self._limit():
            admitted = self._waiting.popleft()
            if not admitted.done():
                self.bulk += 1
                admitted.set_result(None)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nothing waits any more
        loop.call_soon_threadsafe(fn)


class Database:
    def __init__(self, url: str | None = None, *, workers: int = 6,
                 idle_ping_seconds: float = IDLE_PING_SECONDS, bulk_when_idle: int | None = None,
                 bulk_when_busy: int = 1) -> None:
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
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="balsam-db")
        # Bulk work never takes every worker: interactive work finds one free.
        self.lanes = Lanes(bulk_when_idle if bulk_when_idle is not None else workers - 1, bulk_when_busy)
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
            raise self._storage_error(exc) or exc
        if self._storage_full:
            self._storage_full = False
            log.warning("database writes succeed again", database=describe_location(self.engine.url))
        return result, max_event_id

    def read_sync(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            with self.engine.connect() as conn:
                return fn(conn, *args)
        except Exception as exc:
            raise self._storage_error(exc) or exc

    def read_now_sync(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            with self._now_reader.connect() as conn:
                return fn(conn, *args)
        except Exception as exc:
            raise self._storage_error(exc) or exc

    def _storage_error(self, exc: Exception) -> ResourceExhausted | None:
        detail = storage_full_detail(exc)
        if detail is None:
            return None
        where = describe_location(self.engine.url)
        if not self._storage_full:
            self._storage_full = True
            log.error("database storage is full; writes are refused until there is room", database=where,
                      error=detail)
        err = ResourceExhausted(
            f"the database's storage is full: {where} ({detail}); nothing was written. "
            "Free space there and retry: the server writes again as soon as there is room, reads keep working",
            reason="STORAGE_FULL", metadata={"database": where})
        err.__cause__ = exc
        return err

    async def _run(self, call: Callable[[], T]) -> T:
        lanes = self.lanes
        if _BULK.get():
            await lanes.enter_bulk()
            leave = lanes.leave_bulk
        else:
            lanes.enter_interactive()
            leave = lanes.leave_interactive
        loop = asyncio.get_running_loop()
        try:
            job = self._pool.submit(call)
        except BaseException:
            leave()
            raise
        try:
            result = await asyncio.wrap_future(job, loop=loop)
        except asyncio.CancelledError:
            # The caller gave up, the transaction may still run: its slot is held until then.
            job.add_done_callback(lambda _: _call_soon(loop, leave))
            raise
        except BaseException:
            leave()
            raise
        leave()
        return result

    async def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        result, max_event_id = await self._run(functools.partial(self._write, functools.partial(fn, **kwargs), *args))
        if max_event_id is not None and self.on_events is not None:
            self.on_events(max_event_id)
        return result

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self._run(functools.partial(self.read_sync, functools.partial(fn, **kwargs), *args))

    async def read_now(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`read` for a function whose statements need no common transaction (each one
        alone is consistent: READ COMMITTED gives every statement its own snapshot
        anyway). On PostgreSQL it runs in autocommit: no BEGIN and ROLLBACK round trips,
        two of a one-query read's three. Not for SET LOCAL, locks or FOR UPDATE."""
        return await self._run(functools.partial(self.read_now_sync, functools.partial(fn, **kwargs), *args))

    def dispose(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)
        self.engine.dispose()
