"""Launcher sessions: open, resume, keep alive, expire, close, and read them.

Scoped by `owner_id`. States are the short names of SessionState ("ACTIVE", "CLOSED",
"EXPIRED"). A session's running jobs are released through the Transitioner
(store/leases.time_out_held), so they follow their app's timeout policy.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, and_, func, insert, or_, select, update

from balsam_grpc.core.errors import FailedPrecondition, InvalidArgument, NotFound
from balsam_grpc.server.store import batch_jobs as batch_job_store
from balsam_grpc.server.store import sites as site_store
from balsam_grpc.server.store.leases import time_out_held
from balsam_grpc.server.store.tables import jobs, sessions

ACTIVE = "ACTIVE"
CLOSED = "CLOSED"
EXPIRED = "EXPIRED"


@dataclass
class SessionQuery:
    owner_id: int
    ids: list[str] = field(default_factory=list)
    site_ids: list[int] = field(default_factory=list)
    batch_job_ids: list[int] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    only_site_id: int | None = None


def _leased_jobs() -> Any:
    """Correlated count of the session's jobs a launcher holds (RUNNING under its lease)."""
    return (select(func.count()).select_from(jobs)
            .where(jobs.c.session_id == sessions.c.id, jobs.c.owner_id == sessions.c.owner_id,
                   jobs.c.state == "RUNNING")
            .scalar_subquery().label("leased_jobs"))


def get_session(conn: Connection, owner_id: int, session_id: str) -> dict[str, Any] | None:
    row = conn.execute(
        select(sessions, _leased_jobs()).where(sessions.c.id == session_id, sessions.c.owner_id == owner_id)
    ).first()
    return dict(row._mapping) if row else None


def require_session(conn: Connection, owner_id: int, session_id: str, *, field: str = "id") -> dict[str, Any]:
    row = get_session(conn, owner_id, session_id)
    if row is None:
        raise NotFound(f"{field}: session {session_id!r} not found", field=field)
    return row


def open_session(conn: Connection, owner_id: int, site_id: int, batch_job_id: int | None, job_mode: str,
                 nodes: list[dict[str, Any]], hostname: str, now: datetime, expire_time: datetime) -> dict[str, Any]:
    """A new ACTIVE session at the caller's site (NOT_FOUND for a site or batch job that
    is missing or someone else's; INVALID_ARGUMENT for a batch job of another site;
    FAILED_PRECONDITION PILOT_ENDED for a batch job cancelled, ended or never submitted,
    whose sessions were ended with it). The batch job row is locked, so a session opened
    while its pilot is being cancelled is either refused or ended by the cancellation."""
    site_store.require_site(conn, owner_id, site_id, field="open.site_id", reference=True)
    if batch_job_id:
        bj = batch_job_store.require_batch_job(conn, owner_id, batch_job_id, field="open.batch_job_id",
                                               for_update=True)
        if bj["site_id"] != site_id:
            raise InvalidArgument(f"open.batch_job_id: batch job {batch_job_id} belongs to site {bj['site_id']}, "
                                  f"not {site_id}", field="open.batch_job_id")
        if bj["state"] in batch_job_store.PILOT_GONE:
            raise FailedPrecondition(f"open.batch_job_id: batch job {batch_job_id} is {bj['state']}: its pilot is "
                                     "ending and takes no new session", reason="PILOT_ENDED",
                                     field="open.batch_job_id")
    row = {"id": uuid.uuid4().hex, "owner_id": owner_id, "site_id": site_id, "batch_job_id": batch_job_id or None,
           "job_mode": job_mode, "nodes": nodes, "state": ACTIVE, "hostname": hostname, "applied_through_seq": 0,
           "create_time": now, "heartbeat_time": now, "expire_time": expire_time}
    conn.execute(insert(sessions).values(**row))
    return {**row, "leased_jobs": 0}


def resume_session(conn: Connection, owner_id: int, session_id: str, now: datetime,
                   expire_time: datetime) -> dict[str, Any]:
    """Reattach to an ACTIVE session (its leases are kept); an EXPIRED or CLOSED one is
    FAILED_PRECONDITION with reason SESSION_EXPIRED / SESSION_CLOSED."""
    row = conn.execute(select(sessions).where(sessions.c.id == session_id, sessions.c.owner_id == owner_id)
                       .with_for_update()).first()
    if row is None:
        raise NotFound(f"open.resume_session_id: session {session_id!r} not found", field="open.resume_session_id")
    if row.state != ACTIVE:
        why = "its stream was gone longer than the lease timeout" if row.state == EXPIRED else "it was closed"
        raise FailedPrecondition(f"session {session_id} cannot be resumed: {why} and its jobs were released; "
                                 "open a new session", reason=f"SESSION_{row.state}")
    conn.execute(update(sessions).where(sessions.c.id == session_id)
                 .values(heartbeat_time=now, expire_time=expire_time))
    return require_session(conn, owner_id, session_id)


def touch_sessions(conn: Connection, session_ids: list[str], now: datetime, expire_time: datetime) -> None:
    """Heartbeat of connected sessions: their leases stay valid until `expire_time`."""
    if session_ids:
        conn.execute(update(sessions).where(sessions.c.id.in_(session_ids), sessions.c.state == ACTIVE)
                     .values(heartbeat_time=now, expire_time=expire_time))


def next_expiry(conn: Connection, exclude: list[str]) -> datetime | None:
    """The earliest expire_time of an ACTIVE session (any owner, any replica) other than
    `exclude` (the sessions whose streams this replica holds and keeps alive)."""
    c = sessions.c
    conds = [c.state == ACTIVE]
    if exclude:
        conds.append(c.id.not_in(exclude))
    found = conn.execute(select(func.min(c.expire_time)).where(*conds)).scalar_one()
    return None if found is None else _aware(found)


def reap_expired(conn: Connection, now: datetime, exclude: list[str], limit: int = 100
                 ) -> list[tuple[dict[str, Any], list[int]]]:
    """Expire ACTIVE sessions whose expire_time has passed, whichever replica held them:
    each is claimed with FOR UPDATE SKIP LOCKED (on PostgreSQL), so replicas reaping at
    the same moment take different sessions and none waits on a session being resumed.
    Returns (session, released job ids) for each one expired."""
    c = sessions.c
    conds = [c.state == ACTIVE, c.expire_time <= now]
    if exclude:
        conds.append(c.id.not_in(exclude))
    due = select(c.id).where(*conds).order_by(c.expire_time).limit(limit)
    if conn.dialect.name == "postgresql":
        due = due.with_for_update(skip_locked=True)
    out = []
    for session_id in conn.execute(due).scalars().all():
        session, released = expire_session(conn, session_id, now)
        if session is not None and session["state"] == EXPIRED:
            out.append((session, released))
    return out


def extend_active(conn: Connection, not_before: datetime) -> int:
    """After a server restart: give every ACTIVE session until `not_before` to resume,
    since its launcher could not reach the server while it was down."""
    return conn.execute(update(sessions).where(sessions.c.state == ACTIVE, sessions.c.expire_time < not_before)
                        .values(expire_time=not_before)).rowcount


def expire_session(conn: Connection, session_id: str, now: datetime) -> tuple[dict[str, Any] | None, list[int]]:
    """Expire an ACTIVE session whose expire_time has passed: state EXPIRED, its running
    jobs time out. Returns (the session row or None when missing, released job ids); when
    the session is no longer ACTIVE or was renewed meanwhile, nothing changes."""
    row = conn.execute(select(sessions).where(sessions.c.id == session_id).with_for_update()).first()
    if row is None:
        return None, []
    session = dict(row._mapping)
    if session["state"] != ACTIVE or _aware(session["expire_time"]) > now:
        return session, []
    conn.execute(update(sessions).where(sessions.c.id == session_id).values(state=EXPIRED))
    released = time_out_held(conn, session["owner_id"], session_id, now,
                             f"session {session_id} expired: its launcher was gone longer than the lease timeout")
    session["state"] = EXPIRED
    return session, released


def close_session(conn: Connection, owner_id: int, session_id: str, now: datetime, *,
                  reason: str = "closed by its owner") -> dict[str, Any]:
    """Close a session (DeleteSession, or its launcher half-closing the stream).

    The session becomes CLOSED, and every job it still holds in RUNNING moves to
    RUN_TIMEOUT through the Transitioner (one event each), which then follows the app's
    timeout policy (default RESTART_READY); each loses its lease (session_id cleared,
    lease generation bumped so a report from the launcher that held it is stale).
    Closing a session that is already closed or expired changes nothing.
    """
    row = conn.execute(
        select(sessions).where(sessions.c.id == session_id, sessions.c.owner_id == owner_id).with_for_update()
    ).first()
    if row is None:
        raise NotFound(f"session {session_id!r} not found", field="id")
    session = dict(row._mapping)
    if session["state"] != ACTIVE:
        return session
    conn.execute(update(sessions).where(sessions.c.id == session_id, sessions.c.owner_id == owner_id)
                 .values(state=CLOSED, expire_time=now))
    time_out_held(conn, owner_id, session_id, now, f"session {session_id} {reason}")
    session.update(state=CLOSED, expire_time=now)
    return session


def _aware(dt: datetime) -> datetime:
    """SQLite returns naive datetimes; everything stored is UTC."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


def list_sessions(conn: Connection, q: SessionQuery, *, after: tuple[datetime, str] | None,
                  limit: int) -> list[dict[str, Any]]:
    """Newest first: ordered by (create_time, id) descending; `after` is the last key seen."""
    c = sessions.c
    conds = [c.owner_id == q.owner_id]
    if q.ids:
        conds.append(c.id.in_(q.ids))
    if q.site_ids:
        conds.append(c.site_id.in_(q.site_ids))
    if q.batch_job_ids:
        conds.append(c.batch_job_id.in_(q.batch_job_ids))
    if q.states:
        conds.append(c.state.in_(q.states))
    if q.only_site_id is not None:
        conds.append(c.site_id == q.only_site_id)
    if after is not None:
        t, sid = after
        conds.append(or_(c.create_time < t, and_(c.create_time == t, c.id < sid)))
    rows = conn.execute(select(sessions, _leased_jobs()).where(*conds)
                        .order_by(c.create_time.desc(), c.id.desc()).limit(limit))
    return [dict(r._mapping) for r in rows]
