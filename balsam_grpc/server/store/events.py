"""The append-only event log: every state change writes a row in its own transaction."""

from __future__ import annotations

import functools
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from weakref import WeakKeyDictionary

from sqlalchemy import Connection, Text, and_, func, select, text, type_coerce
from sqlalchemy.sql import ColumnElement

from balsam_grpc.server.store.bulk import COPY_MIN_ROWS, append_rows
from balsam_grpc.server.store.codec import array_params, array_text, dumps
from balsam_grpc.server.store.db import MAX_EVENT_ID
from balsam_grpc.server.store.driver import (
    DriverStatement,
    driver_batch,
    driver_rows,
    driver_statement,
    plain_statement,
)
from balsam_grpc.server.store.query import NULLABLE_JSON_TEXT, epoch_micros, tags_contain
from balsam_grpc.server.store.tables import events, jobs

JOB_STATE = "job_state"
TRANSFER_STATE = "transfer_state"
BATCH_JOB_STATE = "batch_job_state"

# PostgreSQL: the channel every event-writing transaction notifies (at commit) with a
# hint of whose events it wrote; each replica listens (server/notify.py).
EVENTS_CHANNEL = "balsam_events"
# NOTIFY payloads must stay under 8000 bytes; a hint that would not fit says "*" (everyone).
MAX_HINT_BYTES = 7000
WAKE_ALL = "*"

# In-flight markers (PostgreSQL). A writer takes a shared advisory lock whose key encodes
# the sequence's last value read just before it draws its own ids, so every id it inserts
# is above its marker, and holds it to commit. Shared locks never wait for each other:
# writers run concurrently. A reader (event_horizon) reads the sequence first and the
# markers second: an id at or below min(sequence, lowest marker) can no longer appear.
_MARK_NS = 0x5BA0_0000  # first key half: namespace + the marker's high bits
_MARK_LOW_BITS = 31
_MARK_LOW = (1 << _MARK_LOW_BITS) - 1
_LAST_ID = "coalesce(pg_sequence_last_value('events_id_seq'::regclass), 0)"
_NOTIFY = "SELECT pg_notify(%(channel)s, %(hint)s)"  # in the driver's terms (plain_statement)
_MARK = (f"SELECT pg_advisory_xact_lock_shared({_MARK_NS} + (s.v >> {_MARK_LOW_BITS})::int, "
         f"(s.v & {_MARK_LOW})::int) FROM (SELECT {_LAST_ID} AS v OFFSET 0) AS s")


def append(conn: Connection, rows: list[dict[str, Any]],
           before: list[tuple[DriverStatement, dict[str, Any]]] = ()) -> list[list[dict[str, Any]]]:
    """Insert event rows (keys: owner_id, site_id, job_id, kind, subject_id, from_state,
    to_state, time, data, message).

    Watchers resume from the highest id they saw, so no id may become visible below one
    they were already given. SQLite has a single writer: its ids are visible in commit
    order. PostgreSQL writers run concurrently; each marks itself in flight (see _MARK)
    and readers only go up to event_horizon(). Each PostgreSQL transaction also notifies
    EVENTS_CHANNEL with the (owner, site) pairs it wrote, delivered when it commits.

    `before` (PostgreSQL): statements to run first, sent with the insert when it is one
    statement; returns their rows (dicts).
    """
    answers: list[list[dict[str, Any]]] = []
    if not rows:
        return driver_batch(conn, list(before), dicts=True) if before else []
    for row in rows:
        row.setdefault("subject_id", None)
        row.setdefault("data", None)
        row.setdefault("message", "")
        row.setdefault("from_state", "")
        row.setdefault("job_id", None)
        row.setdefault("receive_time", row["time"])
    if conn.dialect.name == "postgresql" and len(rows) < COPY_MIN_ROWS:
        top, answers = _insert_marked(conn, rows, wake_hint(rows, conn), before)
    else:
        if conn.dialect.name == "postgresql":
            # The marker and the notification in one round trip with the statements
            # `before`, ahead of the COPY (which draws the ids): two exchanges and two
            # SQLAlchemy executions fewer for a launcher's report of 32 jobs or more.
            answers = driver_batch(conn, [*before, (plain_statement(_MARK), {}),
                                          (plain_statement(_NOTIFY), {"channel": EVENTS_CHANNEL,
                                                                      "hint": wake_hint(rows, conn)})],
                                   dicts=True)[:len(before)]
        top = append_rows(conn, events, rows)
    conn.info[MAX_EVENT_ID] = max(top, conn.info.get(MAX_EVENT_ID, 0))
    return answers


def marked_insert_sql(source: str) -> str:
    """`_MARKED_INSERT` for callers that insert other rows in the same statement: the
    CTEs event_mark and event_wake (params :channel, :hint) and an INSERT INTO events
    ... SELECT from `source`, a FROM item with the event columns (_COLUMNS; data as
    jsonb text), as a CTE `new_events` returning the ids. The caller passes the highest
    of them to note_inserted."""
    return (f"event_mark AS MATERIALIZED ({_MARK}), event_wake AS MATERIALIZED (SELECT pg_notify(:channel, :hint)), "
            f"new_events AS (INSERT INTO events ({', '.join(_COLUMNS)}) "
            f"SELECT {', '.join('v.data::jsonb' if c == 'data' else 'v.' + c for c in _COLUMNS)} "
            f"FROM event_mark, event_wake, {source} RETURNING id)")


def note_inserted(conn: Connection, top: int) -> None:
    """Record the highest event id a statement built with marked_insert_sql inserted."""
    conn.info[MAX_EVENT_ID] = max(top, conn.info.get(MAX_EVENT_ID, 0))


# Which Database wrote a hint ("@" and random hex, one per connection pool): a replica's
# own commits already wake its fanout (Database.write), so it skips their notifications
# instead of reading the horizon a second time. Per pool, not per process: tests run
# several replicas in one process.
_ORIGINS: WeakKeyDictionary[Any, str] = WeakKeyDictionary()


def origin(engine: Any) -> str:
    """The mark this engine's (its pool's) transactions put in their hints."""
    pool = engine.pool
    mark = _ORIGINS.get(pool)
    if mark is None:
        mark = _ORIGINS[pool] = "@" + secrets.token_hex(6)
    return mark


def one_hint(owner_id: int, site_id: int | None) -> str:
    """wake_hint of events of one (owner, site) pair, without an origin mark."""
    return f"{owner_id}:{site_id or 0}"


def wake_hint(rows: list[dict[str, Any]], conn: Connection | None = None) -> str:
    """The NOTIFY payload: the distinct "owner:site" pairs of these events, space-separated
    (or "*" when that would be too long), then the writer's origin mark when `conn` is
    given."""
    pairs = sorted({(r["owner_id"], r["site_id"]) for r in rows}, key=lambda p: (p[0], p[1] or 0))
    hint = " ".join(one_hint(o, s) for o, s in pairs)
    if len(hint) > MAX_HINT_BYTES:
        hint = WAKE_ALL
    return hint if conn is None else f"{hint} {origin(conn.engine)}"


def parse_hint(payload: str) -> list[tuple[int, int]] | None:
    """The (owner, site) pairs of a wake hint; None means "wake everyone" (also for a
    payload this version cannot read)."""
    try:
        pairs = [tuple(map(int, item.split(":"))) for item in payload.split() if not item.startswith("@")]
    except ValueError:
        return None
    if not pairs or any(len(p) != 2 for p in pairs):
        return None
    return pairs  # type: ignore[return-value]


def hint_origin(payload: str) -> str:
    """The origin mark of a wake hint ("" when it has none)."""
    last = payload.rpartition(" ")[2]
    return last if last.startswith("@") else ""


def event_horizon(conn: Connection) -> tuple[int, int]:
    """(horizon, last drawn id): every event with id <= horizon is committed or never will
    be, so a reader that delivers ids up to it in order never skips one committed later.
    On SQLite (one writer) both are the highest id."""
    if conn.dialect.name != "postgresql":
        top = driver_rows(conn, driver_statement("events.top_id", lambda: _TOP_ID, conn.dialect), {})[0][0]
        return top, top
    return horizon_of(*conn.execute(HORIZON).one())


def horizon_of(last: int, mark: int | None) -> tuple[int, int]:
    """event_horizon's answer from HORIZON's row."""
    return (last if mark is None else min(last, mark)), last


_TOP_ID = select(func.coalesce(func.max(events.c.id), 0))
# The sequence is read first (the FROM item) and the markers after it (a correlated
# subquery, evaluated per row of FROM): a writer that draws an id after the first read
# draws it above `last`; one that drew earlier had marked itself before drawing.
HORIZON = text(
    f"SELECT s.last, (SELECT min(((l.classid::bigint - {_MARK_NS}) << {_MARK_LOW_BITS}) | l.objid::bigint) "
    "FROM pg_locks AS l WHERE l.locktype = 'advisory' AND l.objsubid = 2 AND s.last IS NOT NULL "
    f"AND l.classid::bigint >= {_MARK_NS} AND l.classid::bigint < {_MARK_NS + (1 << 24)} "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())) "
    f"FROM (SELECT {_LAST_ID} AS last OFFSET 0) AS s")


_COLUMNS = ("owner_id", "site_id", "job_id", "kind", "subject_id", "from_state", "to_state", "time", "receive_time",
            "data", "message")
_TYPES = ("BIGINT", "BIGINT", "BIGINT", "TEXT", "BIGINT", "TEXT", "TEXT", "TIMESTAMPTZ", "TIMESTAMPTZ", "TEXT", "TEXT")
# The marker, the notification and the insert in one round trip (a single create is a
# handful of them). The marker is a materialized CTE joined to the rows, so it is taken
# before any row (and its nextval id) is produced; it is held to commit.
_MARKED_INSERT = text(
    f"WITH event_mark AS MATERIALIZED ({_MARK}), "
    "event_wake AS MATERIALIZED (SELECT pg_notify(:channel, :hint)) "
    f"INSERT INTO events ({', '.join(_COLUMNS)}) "
    f"SELECT {', '.join('v.data::jsonb' if c == 'data' else 'v.' + c for c in _COLUMNS)} "
    f"FROM event_mark, event_wake, "
    f"unnest({', '.join(f'CAST(:{c} AS {t}[])' for c, t in zip(_COLUMNS, _TYPES, strict=True))}) "
    f"AS v({', '.join(_COLUMNS)}) RETURNING id")


def _insert_marked(conn: Connection, rows: list[dict[str, Any]], hint: str,
                   before: list[tuple[DriverStatement, dict[str, Any]]] = ()) -> tuple[int, list[list[Any]]]:
    """PostgreSQL, a few rows: marker + notify + INSERT as one statement, in one round
    trip with the statements `before`; the highest id and their rows (dicts)."""
    params: dict[str, Any] = {c: array_text([row[c] for row in rows]) for c in _COLUMNS if c != "data"}
    params["data"] = array_text([None if row["data"] is None else dumps(row["data"]) for row in rows])
    params["channel"] = EVENTS_CHANNEL
    params["hint"] = hint
    stmt = driver_statement("events.marked_insert", lambda: _MARKED_INSERT, conn.dialect)
    if before:
        *answers, ids = driver_batch(conn, [*before, (stmt, params)], dicts=True)
        return max(r["id"] for r in ids), answers
    return max(r[0] for r in driver_rows(conn, stmt, params)), []


def job_event(owner_id: int, site_id: int, job_id: int, src: str, dst: str, now: datetime,
              data: dict[str, Any] | None = None, message: str = "",
              receive_time: datetime | None = None) -> dict[str, Any]:
    """A job_state event row; `now` is when it happened, `receive_time` when the server
    recorded it (default: the same)."""
    return {"owner_id": owner_id, "site_id": site_id, "job_id": job_id, "kind": JOB_STATE,
            "from_state": src, "to_state": dst, "time": now, "receive_time": receive_time or now, "data": data,
            "message": message}


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


def routing_match(q: EventQuery) -> Callable[[Any], bool] | None:
    """_conditions on a routing row (server/fanout.py EventRow: kind, states, job, site,
    subject; no time, data or tags): whether that event is in `q`'s selection, with the
    owner and the sites already matched by the routing. None when `q` also filters on
    what such a row lacks (tags, times): only the database can tell."""
    if q.tags or q.time_start is not None or q.time_end is not None:
        return None
    job_ids, site_ids, kinds = set(q.job_ids), set(q.site_ids), set(q.kinds)
    to_states, from_states, batch_job_ids = set(q.to_states), set(q.from_states), set(q.batch_job_ids)

    def match(row: Any) -> bool:
        return ((not job_ids or row.job_id in job_ids)
                and (not site_ids or row.site_id in site_ids)
                and (not kinds or row.kind in kinds)
                and (not to_states or (row.kind == JOB_STATE and row.to_state in to_states))
                and (not from_states or (row.kind == JOB_STATE and row.from_state in from_states))
                and (not batch_job_ids or (row.kind == BATCH_JOB_STATE and row.subject_id in batch_job_ids)))

    return match


# Where each column is in list_events's rows.
EVENT_COLUMN = {c.name: i for i, c in enumerate(events.columns)}


@functools.cache
def _listed(dialect: str) -> tuple[Any, ...]:
    """list_events's select list: the times as stored (see list_events), data decoded by
    codec.loads straight away."""
    times = {"time", "receive_time"}
    if dialect == "postgresql":
        return tuple(epoch_micros(c) if c.name in times else c for c in events.columns)
    return tuple(type_coerce(c, Text).label(c.name) if c.name in times
                 else type_coerce(c, NULLABLE_JSON_TEXT).label(c.name) if c.name == "data" else c
                 for c in events.columns)


def list_events(conn: Connection, q: EventQuery, *, after_id: int | None, limit: int,
                descending: bool = False, upto: int | None = None) -> list[Any]:
    """The events of `q` after (or before, `descending`) `after_id`, up to `upto`, as rows
    in the table's column order (EVENT_COLUMN). The times come as stored: integer
    microseconds since the epoch on PostgreSQL, SQLite's UTC text (convert.set_timestamp
    takes both): making datetimes of them, then dicts of the rows, took 3/4 of the time
    of reading 1,000 events."""
    c = events.c
    conds = _conditions(q)
    if after_id is not None:
        conds.append(c.id < after_id if descending else c.id > after_id)
    if upto is not None:
        conds.append(c.id <= upto)
    order = c.id.desc() if descending else c.id
    return list(conn.execute(select(*_listed(conn.dialect.name)).where(*conds).order_by(order).limit(limit)))


def list_events_statement(q: EventQuery, *, after_id: int | None, limit: int, descending: bool = False,
                          upto: int | None = None) -> tuple[str, dict[str, Any]]:
    """PostgreSQL: list_events's statement in the driver's terms (psycopg's %(name)s),
    for Database.statement_now on the event loop, and its parameters; the same rows. A
    watch's every wake-up runs one: through a database thread and SQLAlchemy it took 3-4
    ms from the fanout's wake to the answer on an idle server. The SQL text is built once
    per shape (which filters are given); lists bind as one array each."""
    params: dict[str, Any] = {"owner_id": q.owner_id, "limit": limit}
    for name in ("job_ids", "site_ids", "kinds", "to_states", "from_states", "batch_job_ids", "time_start",
                 "time_end"):
        value = getattr(q, name)
        if value:
            params[name] = value
    array_params(params)
    if q.tags:
        params["tags"] = dumps(q.tags)
    if after_id is not None:
        params["after_id"] = after_id
    if upto is not None:
        params["upto"] = upto
    return _pg_list_sql(tuple(params), descending), params


@functools.cache  # one per shape: which of the few filters are given, and the order
def _pg_list_sql(names: tuple[str, ...], descending: bool) -> str:
    from sqlalchemy.dialects.postgresql import psycopg as pg_psycopg

    listed = select(*_listed("postgresql")).compile(dialect=pg_psycopg.dialect(),
                                                     compile_kwargs={"literal_binds": True})
    conds = [_PG_CONDITIONS[name] for name in names if name in _PG_CONDITIONS]
    if "after_id" in names:
        conds.append("events.id < %(after_id)s" if descending else "events.id > %(after_id)s")
    return f"{listed} WHERE {' AND '.join(conds)} ORDER BY events.id{' DESC' if descending else ''} LIMIT %(limit)s"


# _conditions in psycopg's terms, by parameter name.
_PG_CONDITIONS = {
    "owner_id": "events.owner_id = %(owner_id)s",
    "job_ids": "events.job_id = ANY(CAST(%(job_ids)s AS BIGINT[]))",
    "site_ids": "events.site_id = ANY(CAST(%(site_ids)s AS BIGINT[]))",
    "kinds": "events.kind = ANY(CAST(%(kinds)s AS TEXT[]))",
    "to_states": f"(events.kind = '{JOB_STATE}' AND events.to_state = ANY(CAST(%(to_states)s AS TEXT[])))",
    "from_states": f"(events.kind = '{JOB_STATE}' AND events.from_state = ANY(CAST(%(from_states)s AS TEXT[])))",
    "batch_job_ids": f"(events.kind = '{BATCH_JOB_STATE}' "
                     "AND events.subject_id = ANY(CAST(%(batch_job_ids)s AS BIGINT[])))",
    "time_start": "events.time >= %(time_start)s",
    "time_end": "events.time < %(time_end)s",
    "tags": "events.job_id IN (SELECT jobs.id FROM jobs WHERE jobs.owner_id = %(owner_id)s "
            "AND jobs.tags @> CAST(%(tags)s AS JSONB))",
    "upto": "events.id <= %(upto)s",
}


def max_event_id(conn: Connection, owner_id: int) -> int:
    """The owner's highest event id, but never above the horizon (a watch that starts
    there misses nothing committed later)."""
    top = conn.execute(select(func.coalesce(func.max(events.c.id), 0)).where(events.c.owner_id == owner_id)).scalar_one()
    return min(top, event_horizon(conn)[0]) if conn.dialect.name == "postgresql" else top
