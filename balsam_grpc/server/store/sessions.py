"""Launcher sessions: read them, and close one on a user's request.

Scoped by `owner_id`. Sessions are opened and kept alive by SessionService.Connect (the
launcher issue); this module only reads them and closes them. States are the short names
of SessionState ("ACTIVE", "CLOSED", "EXPIRED").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, func, or_, select, update

from balsam_grpc.core.errors import NotFound
from balsam_grpc.server.store import events
from balsam_grpc.server.store.tables import jobs, sessions

ACTIVE = "ACTIVE"
CLOSED = "CLOSED"


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


def close_session(conn: Connection, owner_id: int, session_id: str, now: datetime) -> dict[str, Any]:
    """Close a session on a user's request (DeleteSession).

    Kept deliberately simple until the launcher issue refines it: the session becomes
    CLOSED, and every job it still holds in RUNNING moves to RUN_TIMEOUT (with a job_state
    event each), loses its lease (session_id cleared, lease generation bumped so a report
    from the launcher that held it is rejected as stale). What happens next to those jobs
    (restart or fail) is the job state machine's business, not this function's.
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
    held = conn.execute(
        update(jobs)
        .where(jobs.c.owner_id == owner_id, jobs.c.session_id == session_id, jobs.c.state == "RUNNING")
        .values(state="RUN_TIMEOUT", state_message=f"session {session_id} was closed by its owner",
                session_id=None, lease_expire_time=None, lease_generation=jobs.c.lease_generation + 1,
                state_time=now, update_time=now)
        .returning(jobs.c.id, jobs.c.site_id)
    ).all()
    events.append(conn, [
        events.job_event(owner_id, site_id, job_id, "RUNNING", "RUN_TIMEOUT", now,
                         message=f"session {session_id} closed by its owner")
        for job_id, site_id in held
    ])
    session.update(state=CLOSED, expire_time=now)
    return session


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
