"""Engine setup and transactions run off the event loop.

The store is synchronous SQLAlchemy Core; servicers call `await db.write(fn, ...)` or
`await db.read(fn, ...)`, which run `fn(conn, ...)` inside one transaction on a small
thread pool so the asyncio loop keeps serving streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import structlog
from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url

from balsam_grpc.core.settings import default_database_url

log = structlog.get_logger(__name__)
T = TypeVar("T")
# Key in Connection.info where store.events records the highest event id it inserted.
MAX_EVENT_ID = "balsam_max_event_id"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False}, pool_size=8)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return create_engine(parsed, pool_size=10, max_overflow=10, pool_pre_ping=True)


class Database:
    def __init__(self, url: str | None = None, *, workers: int = 6) -> None:
        self.url = url or default_database_url()
        self.engine = make_engine(self.url)
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
