"""Engine setup and transactions run off the event loop.

The store is synchronous SQLAlchemy Core; servicers call `await db.write(fn, ...)` or
`await db.read(fn, ...)`, which run `fn(conn, ...)` inside one transaction on a small
thread pool so the asyncio loop keeps serving streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DisconnectionError

from balsam_grpc.core.settings import default_database_url
from balsam_grpc.server.store import codec

log = structlog.get_logger(__name__)
T = TypeVar("T")
# Key in Connection.info where store.events records the highest event id it inserted.
MAX_EVENT_ID = "balsam_max_event_id"
# A pooled PostgreSQL connection idle for longer than this is pinged before reuse.
IDLE_PING_SECONDS = 5.0
_IDLE_SINCE = "balsam_idle_since"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


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
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False}, pool_size=8, **json_args)
        event.listen(engine, "connect", _sqlite_pragmas)
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
        dbapi_conn.adapters.register_loader(name, codec.JsonLoader)


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


class Database:
    def __init__(self, url: str | None = None, *, workers: int = 6,
                 idle_ping_seconds: float = IDLE_PING_SECONDS) -> None:
        self.url = url or default_database_url()
        self.engine = make_engine(self.url, idle_ping_seconds)
        self.is_sqlite = self.engine.dialect.name == "sqlite"
        self.is_postgres = self.engine.dialect.name == "postgresql"
        # SQLite allows one writer; serialising in-process avoids SQLITE_BUSY on upgrade.
        self._write_lock = threading.Lock() if self.is_sqlite else None
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="balsam-db")

        # Called on the event loop after a commit that appended events: (max event id).
        self.on_events: Callable[[int], None] | None = None

    def write_sync(self, fn: Callable[..., T], *args: Any) -> T:
        result, _ = self._write(fn, *args)
        return result

    def _write(self, fn: Callable[..., T], *args: Any) -> tuple[T, int | None]:
        lock = self._write_lock or contextlib.nullcontext()
        with lock, self.engine.begin() as conn:
            result = fn(conn, *args)
            return result, conn.info.pop(MAX_EVENT_ID, None)

    def read_sync(self, fn: Callable[..., T], *args: Any) -> T:
        with self.engine.connect() as conn:
            return fn(conn, *args)

    async def write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        call = functools.partial(self._write, functools.partial(fn, **kwargs), *args)
        result, max_event_id = await asyncio.get_running_loop().run_in_executor(self._pool, call)
        if max_event_id is not None and self.on_events is not None:
            self.on_events(max_event_id)
        return result

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        call = functools.partial(self.read_sync, functools.partial(fn, **kwargs), *args)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def dispose(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)
        self.engine.dispose()
