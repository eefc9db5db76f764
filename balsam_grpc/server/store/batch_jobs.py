"""Batch jobs: pilot jobs in a site's scheduler.

Scoped by `owner_id`. States are the short names of BatchJobState ("PENDING_SUBMISSION",
"QUEUED", ...). Every state change appends a `batch_job_state` event in the same
transaction. `partitions` is [{"job_mode": "SERIAL"|"MPI", "num_nodes", "filter_tags"}].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update

from balsam_grpc.core.errors import FailedPrecondition, NotFound
from balsam_grpc.server.convert import utcnow
from balsam_grpc.server.store import events
from balsam_grpc.server.store.leases import time_out_held
from balsam_grpc.server.store.rows import owned_row
from balsam_grpc.server.store.tables import batch_jobs, sessions, sites

PENDING_SUBMISSION = "PENDING_SUBMISSION"
PENDING_DELETION = "PENDING_DELETION"
# A user may cancel a batch job from these states (the site daemon removes it from the
# scheduler, or never submits it).
CANCELLABLE = frozenset({PENDING_SUBMISSION, "QUEUED", "RUNNING"})
# A batch job may be deleted only when it never reached the scheduler or has ended.
DELETABLE = frozenset({PENDING_SUBMISSION, "SUBMIT_FAILED", "FINISHED"})
QUEUED, RUNNING, FINISHED, SUBMIT_FAILED = "QUEUED", "RUNNING", "FINISHED", "SUBMIT_FAILED"
# What the site daemon may report next, from each state (it mirrors the scheduler).
SITE_TRANSITIONS: dict[str, frozenset[str]] = {
    PENDING_SUBMISSION: frozenset({QUEUED, RUNNING, FINISHED, SUBMIT_FAILED}),
    QUEUED: frozenset({RUNNING, FINISHED}),
    RUNNING: frozenset({FINISHED}),
    # Removed from the scheduler (or never submitted): it ends.
    PENDING_DELETION: frozenset({FINISHED, SUBMIT_FAILED}),
    SUBMIT_FAILED: frozenset(),
    FINISHED: frozenset(),
}
# How far along the scheduler's life each state is: a report behind the current state is
# an old one arriving late (resent after a reconnect), not an error.
_PROGRESS = {PENDING_SUBMISSION: 0, QUEUED: 1, RUNNING: 2, SUBMIT_FAILED: 3, FINISHED: 3}
# States only users (or the server) set; a daemon reporting them is refused.
_NOT_FROM_SITE = frozenset({PENDING_SUBMISSION, PENDING_DELETION})
# The pilot is gone or going (cancelled, ended, never submitted): its launcher sessions
# end at once and their jobs follow the app's timeout policy, not a lease timeout later.
PILOT_GONE = frozenset({PENDING_DELETION, FINISHED, SUBMIT_FAILED})
# Fields other than state; editable only before submission.
EDITABLE_BEFORE_SUBMISSION = ("num_nodes", "wall_time_min", "queue", "project", "job_mode", "partitions",
                              "filter_tags", "optional_params")


@dataclass
class BatchJobQuery:
    owner_id: int
    ids: list[int] = field(default_factory=list)
    site_ids: list[int] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    queue: str = ""
    scheduler_id: str = ""
    create_start: datetime | None = None
    create_end: datetime | None = None
    only_site_id: int | None = None


def get_batch_job(conn: Connection, owner_id: int, batch_job_id: int, *,
                  for_update: bool = False) -> dict[str, Any] | None:
    return owned_row(conn, batch_jobs, owner_id, batch_job_id, for_update=for_update)


def require_batch_job(conn: Connection, owner_id: int, batch_job_id: int, *, field: str = "id",
                      for_update: bool = False) -> dict[str, Any]:
    row = get_batch_job(conn, owner_id, batch_job_id, for_update=for_update)
    if row is None:
        raise NotFound(f"{field}: batch job {batch_job_id} not found", field=field)
    return row


def _event(row: dict[str, Any], src: str, dst: str, now: datetime, message: str = "") -> dict[str, Any]:
    return {"owner_id": row["owner_id"], "site_id": row["site_id"], "job_id": None,
            "kind": events.BATCH_JOB_STATE, "subject_id": row["id"], "from_state": src, "to_state": dst,
            "time": now, "message": message}


def create_batch_job(conn: Connection, owner_id: int, site_id: int, values: dict[str, Any],
                     now: datetime) -> dict[str, Any]:
    """Insert a batch job in PENDING_SUBMISSION with its creation event. The caller has
    validated `values` against the owner's site."""
    row = dict(conn.execute(
        insert(batch_jobs).values(owner_id=owner_id, site_id=site_id, state=PENDING_SUBMISSION, scheduler_id="",
                                  status_info="", create_time=now, update_time=now,
                                  **{k: values[k] for k in EDITABLE_BEFORE_SUBMISSION if k in values})
        .returning(*batch_jobs.c)
    ).one()._mapping)
    events.append(conn, [_event(row, "", PENDING_SUBMISSION, now, "created")])
    return row


def update_batch_job(conn: Connection, row: dict[str, Any], values: dict[str, Any], new_state: str | None,
                     now: datetime) -> dict[str, Any]:
    """A user's change: `new_state` may only be PENDING_DELETION (from a cancellable state);
    other fields only while PENDING_SUBMISSION. `row` was read FOR UPDATE in this transaction."""
    state = row["state"]
    if new_state is not None and new_state != state:
        if new_state != PENDING_DELETION:
            raise FailedPrecondition(
                f"batch_job.state: a user may only set state PENDING_DELETION (to cancel it); "
                f"{new_state} is set by the site daemon", reason="ILLEGAL_TRANSITION", field="batch_job.state")
        if state not in CANCELLABLE:
            raise FailedPrecondition(
                f"batch_job.state: batch job {row['id']} is {state} and cannot be cancelled; only "
                f"{', '.join(sorted(CANCELLABLE))} batch jobs can", reason="ILLEGAL_TRANSITION",
                field="batch_job.state")
    if values and state != PENDING_SUBMISSION:
        names = ", ".join(sorted(values))
        first = f"batch_job.{sorted(values)[0]}"
        raise FailedPrecondition(
            f"{first}: batch job {row['id']} is {state}: {names} can only change before submission "
            f"(state {PENDING_SUBMISSION}); cancel it and request a new one instead", field=first)
    changes = {k: v for k, v in values.items() if k in EDITABLE_BEFORE_SUBMISSION}
    state_changed = new_state is not None and new_state != state
    if state_changed:
        changes["state"] = new_state
    if not changes:
        return row
    out = dict(conn.execute(
        update(batch_jobs).where(batch_jobs.c.id == row["id"], batch_jobs.c.owner_id == row["owner_id"])
        .values(update_time=now, **changes).returning(*batch_jobs.c)
    ).one()._mapping)
    if state_changed:
        events.append(conn, [_event(out, state, new_state, now, "cancellation requested")])  # type: ignore[arg-type]
        end_pilot_sessions(conn, out, now, "was cancelled")
    return out


def delete_batch_job(conn: Connection, owner_id: int, batch_job_id: int) -> None:
    row = require_batch_job(conn, owner_id, batch_job_id, for_update=True)
    if row["state"] not in DELETABLE:
        raise FailedPrecondition(
            f"batch job {batch_job_id} is {row['state']}; only {', '.join(sorted(DELETABLE))} batch jobs can "
            "be deleted (cancel it first by setting state PENDING_DELETION)")
    if row["state"] == PENDING_SUBMISSION and _site_connected(conn, row["site_id"]):
        # The daemon is offered a pending batch job the moment it exists and may be
        # submitting it now: deleting the row would leave its pilot unknown to the server.
        raise FailedPrecondition(
            f"batch job {batch_job_id} may be being submitted by site {row['site_id']}'s daemon, which is "
            "connected; cancel it by setting state PENDING_DELETION, then delete it once it is "
            "FINISHED or SUBMIT_FAILED", reason="BATCH_JOB_SUBMITTING")
    end_pilot_sessions(conn, row, utcnow(), "was deleted")
    conn.execute(delete(batch_jobs).where(batch_jobs.c.id == batch_job_id, batch_jobs.c.owner_id == owner_id))


def end_pilot_sessions(conn: Connection, row: dict[str, Any], now: datetime, what: str) -> list[int]:
    """Close every ACTIVE launcher session of the batch job `row` (its pilot is gone or
    going); each job a session holds times out at once through the Transitioner, which
    follows the app's timeout policy (default RESTART_READY), and the events name the
    pilot. Returns the released job ids."""
    found = conn.execute(select(sessions.c.id).where(
        sessions.c.owner_id == row["owner_id"], sessions.c.batch_job_id == row["id"], sessions.c.state == "ACTIVE")
        .order_by(sessions.c.id).with_for_update()).scalars().all()
    released: list[int] = []
    for session_id in found:
        conn.execute(update(sessions).where(sessions.c.id == session_id).values(state="CLOSED", expire_time=now))
        released += time_out_held(conn, row["owner_id"], session_id, now,
                                  f"session {session_id} ended with its pilot: batch job {row['id']} {what}",
                                  data={"batch_job_id": row["id"], "batch_job_state": row["state"]})
    return released


def _site_connected(conn: Connection, site_id: int) -> bool:
    return bool(conn.execute(select(sites.c.connected).where(sites.c.id == site_id)).scalar())


def list_batch_jobs(conn: Connection, q: BatchJobQuery, *, after_id: int | None,
                    limit: int) -> list[dict[str, Any]]:
    c = batch_jobs.c
    conds = [c.owner_id == q.owner_id]
    if q.ids:
        conds.append(c.id.in_(q.ids))
    if q.site_ids:
        conds.append(c.site_id.in_(q.site_ids))
    if q.states:
        conds.append(c.state.in_(q.states))
    if q.queue:
        conds.append(c.queue == q.queue)
    if q.scheduler_id:
        conds.append(c.scheduler_id == q.scheduler_id)
    if q.create_start is not None:
        conds.append(c.create_time >= q.create_start)
    if q.create_end is not None:
        conds.append(c.create_time < q.create_end)
    if q.only_site_id is not None:
        conds.append(c.site_id == q.only_site_id)
    if after_id is not None:
        conds.append(c.id > after_id)
    rows = conn.execute(select(batch_jobs).where(*conds).order_by(c.id).limit(limit))
    return [dict(r._mapping) for r in rows]


def site_report(conn: Connection, row: dict[str, Any], state: str, *, scheduler_id: str = "",
                status_info: str = "", start_time: datetime | None = None, end_time: datetime | None = None,
                now: datetime) -> bool:
    """Apply what the site daemon saw in the scheduler to `row` (read FOR UPDATE).

    Returns False when the report changes nothing (an old report arriving late, or a
    repeat). A state change appends a batch_job_state event. While cancellation is
    pending, QUEUED/RUNNING reports only record the scheduler id and times: the state
    stays PENDING_DELETION until the daemon has removed the job. Start and end times
    default to now when the job is first seen running / when it ends.
    """
    current = row["state"]
    if state in _NOT_FROM_SITE:
        raise FailedPrecondition(f"batch job {row['id']}: the site daemon cannot set state {state}; it reports "
                                 f"{', '.join(sorted(_PROGRESS.keys() - {PENDING_SUBMISSION}))}",
                                 reason="ILLEGAL_TRANSITION")
    new_state = current
    if state and state != current:
        if state in SITE_TRANSITIONS[current]:
            new_state = state
        elif current == PENDING_DELETION and state in (QUEUED, RUNNING):
            pass
        elif current in _PROGRESS and _PROGRESS[state] <= _PROGRESS[current]:
            return False
        else:
            raise FailedPrecondition(f"batch job {row['id']} is {current}; the site daemon cannot move it to {state}",
                                     reason="ILLEGAL_TRANSITION")
    changes: dict[str, Any] = {}
    if scheduler_id and scheduler_id != row["scheduler_id"]:
        changes["scheduler_id"] = scheduler_id[:64]
    if status_info and status_info != row["status_info"]:
        changes["status_info"] = status_info[:8000]
    reported = state or current
    if start_time and start_time != row["start_time"]:
        changes["start_time"] = start_time
    elif row["start_time"] is None and reported == RUNNING:
        changes["start_time"] = now
    if row["end_time"] is None and (end_time or new_state in (FINISHED, SUBMIT_FAILED)):
        changes["end_time"] = end_time or now
    if new_state != current:
        changes["state"] = new_state
    if not changes:
        return False
    out = dict(conn.execute(
        update(batch_jobs).where(batch_jobs.c.id == row["id"]).values(update_time=now, **changes)
        .returning(*batch_jobs.c)
    ).one()._mapping)
    if new_state != current:
        events.append(conn, [_event(out, current, new_state, now, status_info or "reported by the site daemon")])
        if new_state in PILOT_GONE:
            end_pilot_sessions(conn, out, now, "ended" if new_state == FINISHED else "failed to submit")
    row.update(out)
    return True
