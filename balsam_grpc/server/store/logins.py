"""Wrong-password counts per (user name, client address) and per address, for the login
limiter (server/admission.py decides; this only reads and writes the rows)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, delete, func, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from balsam_grpc.server.convert import aware
from balsam_grpc.server.store.tables import login_failures as t

Key = tuple[str, str]  # (user name, or "" for any name; address)


def blocked_until(conn: Connection, keys: Sequence[Key]) -> datetime | None:
    """The latest end of a block among `keys`, or None when none is blocked now or later."""
    found = conn.execute(select(func.max(t.c.blocked_until)).where(
        tuple_(t.c.username, t.c.address).in_(list(keys)))).scalar()
    return aware(found) if found is not None else None


def record_failure(conn: Connection, keys: Sequence[Key], now: datetime, window: timedelta,
                   lockout: Callable[[Key, int], timedelta | None]) -> None:
    """Count one failure on each key (a count older than `window` starts over) and block
    the key until now + lockout(key, failures) when that is not None. Rows idle longer
    than the window and their block are deleted on the way."""
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    for username, address in keys:
        # The row exists before it is locked, so concurrent failures serialize on it.
        conn.execute(insert(t).values(username=username, address=address, failures=0, last_failure=now)
                     .on_conflict_do_nothing(index_elements=["username", "address"]))
        row: Any = conn.execute(select(t.c.failures, t.c.last_failure).where(
            t.c.username == username, t.c.address == address).with_for_update()).one()
        failures = 1 if aware(row.last_failure) < now - window else row.failures + 1
        block = lockout((username, address), failures)
        conn.execute(update(t).where(t.c.username == username, t.c.address == address).values(
            failures=failures, last_failure=now, blocked_until=now + block if block else None))
    conn.execute(delete(t).where(t.c.last_failure < now - window,
                                 (t.c.blocked_until.is_(None)) | (t.c.blocked_until < now)))


def clear(conn: Connection, key: Key) -> None:
    conn.execute(delete(t).where(t.c.username == key[0], t.c.address == key[1]))
