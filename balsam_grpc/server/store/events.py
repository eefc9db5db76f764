"""The append-only event log: every state change writes a row in its own transaction."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, func, select, text
from sqlalchemy.sql import ColumnElement

from balsam_grpc.server.store.bulk import COPY_MIN_ROWS, insert_rows
from balsam_grpc.server.store.codec import dumps
from balsam_grpc.server.store.db import MAX_EVENT_ID
from balsam_grpc.server.store.query import tags_contain
from balsam_grpc.server.store.tables import events, jobs

JOB_STATE = "job_state"
TRANSFER_STATE = "transfer_state"
BATCH_JOB_STATE = "batch_job_state"

_EVENT_LOCK_KEY = 7283001


def append(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """Insert event rows (keys: owner_id, site_id, job_id, kind, subject_id, from_state,
    to_state, time, data, message).

    On PostgreSQL a transaction-scoped advisory lock is taken first and held to commit,
    so event ids become visible in commit order: watchers resume from the highest id they
    saw, and a lower id committed later would otherwise be skipped. SQLite has a single
    writer, so its ids are already in commit order.
    """
    if not rows:
        return
    for row in rows:
        row.setdefault("subject_id", None)
        row.setdefault("data", None)
        row.setdefault("message", "")
        row.setdefault("from_state", "")
        row.setdefault("job_id", None)
    if conn.dialect.name == "postgresql" and len(rows) < COPY_MIN_ROWS:
        top = _insert_locked(conn, rows)
    else:
        if conn.dialect.name == "postgresql":
            conn.execute(text(f"SELECT pg_advisory_xact_lock({_EVENT_LOCK_KEY})"))
        top = max(insert_rows(conn, events, rows))
    conn.info[MAX_EVENT_ID] = max(top, conn.info.get(MAX_EVENT_ID, 0))


_COLUMNS = ("owner_id", "site_id", "job_id", "kind", "subject_id", "from_state", "to_state", "time", "data", "message")
_TYPES = ("BIGINT", "BIGINT", "BIGINT", "TEXT", "BIGINT", "TEXT", "TEXT", "TIMESTAMPTZ", "TEXT", "TEXT")
# The lock and the insert in one round trip (a single create is a handful of them). The
# lock is a materialized CTE joined to the rows, so it is taken before any row (and its
# nextval id) is produced; it is held to commit as in the two-statement form.
_LOCKED_INSERT = text(
    f"WITH event_lock AS MATERIALIZED (SELECT pg_advisory_xact_lock({_EVENT_LOCK_KEY})) "
    f"INSERT INTO events ({', '.join(_COLUMNS)}) "
    f"SELECT {', '.join('v.data::jsonb' if c == 'data' else 'v.' + c for c in _COLUMNS)} "
    f"FROM event_lock, unnest({', '.join(f'CAST(:{c} AS {t}[])' for c, t in zip(_COLUMNS, _TYPES, strict=True))}) "
    f"AS v({', '.join(_COLUMNS)}) RETURNING id")


def _insert_locked(conn: Connection, rows: list[dict[str, Any]]) -> int:
    """PostgreSQL, a few rows: advisory lock + INSERT as one statement; the highest id."""
    params: dict[str, list[Any]] = {c: [] for c in _COLUMNS}
    for row in rows:
        for c in _COLUMNS:
            value = row[c]
            if c == "data":
                value = None if value is None else dumps(value)
            elif c in ("kind", "from_state", "to_state"):
                value = str(value)
            params[c].append(value)
    return max(conn.execute(_LOCKED_INSERT, params).scalars())


def job_event(owner_id: int, site_id: int, job_id: int, src: str, dst: str, now: datetime,
              data: dict[str, Any] | None = None, message: str = "") -> dict[str, Any]:
    return {"owner_id": owner_id, "site_id": site_id, "job_id": job_id, "kind": JOB_STATE,
            "from_state": src, "to_state": dst, "time": now, "data": data, "message": message}


@dataclass
class EventQuery:
    owner_id: int
    job_ids: list[int] = field(default_factory=list)
    site_ids: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    to_states: list[str] = field(default_factory=list)
    from_states: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    batch_job_ids: list[int] = field(default_factory=list)
    time_start: datetime | None = None
    time_end: datetime | None = None


def _conditions(q: EventQuery) -> list[ColumnElement[bool]]:
    c = events.c
    conds: list[ColumnElement[bool]] = [c.owner_id == q.owner_id]
    if q.job_ids:
        conds.append(c.job_id.in_(q.job_ids))
    if q.site_ids:
        conds.append(c.site_id.in_(q.site_ids))
    if q.kinds:
        conds.append(c.kind.in_(q.kinds))
    if q.to_states:
        conds.append(and_(c.kind == JOB_STATE, c.to_state.in_(q.to_states)))
    if q.from_states:
        conds.append(and_(c.kind == JOB_STATE, c.from_state.in_(q.from_states)))
    if q.batch_job_ids:
        conds.append(and_(c.kind == BATCH_JOB_STATE, c.subject_id.in_(q.batch_job_ids)))
    if q.time_start is not None:
        conds.append(c.time >= q.time_start)
    if q.time_end is not None:
        conds.append(c.time < q.time_end)
    if q.tags:
        tagged = select(jobs.c.id).where(jobs.c.owner_id == q.owner_id, tags_contain(jobs.c.tags, q.tags))
        conds.append(c.job_id.in_(tagged))
    return conds


def list_events(conn: Connection, q: EventQuery, *, after_id: int | None, limit: int,
                descending: bool = False) -> list[dict[str, Any]]:
    c = events.c
    conds = _conditions(q)
    if after_id is not None:
        conds.append(c.id < after_id if descending else c.id > after_id)
    order = c.id.desc() if descending else c.id
    rows = conn.execute(select(events).where(*conds).order_by(order).limit(limit))
    return [dict(r._mapping) for r in rows]


def max_event_id(conn: Connection, owner_id: int) -> int:
    return conn.execute(select(func.coalesce(func.max(events.c.id), 0)).where(events.c.owner_id == owner_id)).scalar_one()
