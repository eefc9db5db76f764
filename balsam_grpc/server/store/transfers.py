"""Transfer items: files moved for a job through one of its app's transfer slots.

Scoped by `owner_id`. Items are created with their job (jobs store) and progress through
the site daemon; here users read them and retry failed ones. States are the short names
of TransferState ("PENDING", "ERROR", ...); directions "IN" / "OUT". Every state change
appends a `transfer_state` event in the same transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, and_, literal_column, or_, select, update

from balsam_grpc.core.errors import FailedPrecondition, NotFound
from balsam_grpc.server.store import events
from balsam_grpc.server.store.query import id_in
from balsam_grpc.server.store.rows import owned_row
from balsam_grpc.server.store.tables import jobs, transfer_items

# State changes a user may request: retry a failed transfer.
USER_TRANSITIONS: dict[str, frozenset[str]] = {"ERROR": frozenset({"PENDING"})}
# Fields other than state that UpdateTransferItem may set.
MUTABLE = ("error", "task_id", "bytes", "files", "duration_seconds")


@dataclass
class TransferQuery:
    owner_id: int
    ids: list[int] = field(default_factory=list)
    job_ids: list[int] = field(default_factory=list)
    site_ids: list[int] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    direction: str = ""
    task_id: str = ""
    only_site_id: int | None = None


def get_item(conn: Connection, owner_id: int, item_id: int, *, for_update: bool = False) -> dict[str, Any] | None:
    return owned_row(conn, transfer_items, owner_id, item_id, for_update=for_update)


def require_item(conn: Connection, owner_id: int, item_id: int, *, field: str = "id",
                 for_update: bool = False) -> dict[str, Any]:
    row = get_item(conn, owner_id, item_id, for_update=for_update)
    if row is None:
        raise NotFound(f"{field}: transfer item {item_id} not found", field=field)
    return row


def update_item(conn: Connection, row: dict[str, Any], values: dict[str, Any], new_state: str | None,
                now: datetime) -> dict[str, Any]:
    """Apply a user's change to an item read FOR UPDATE in this transaction.

    The only state change a user may make is ERROR -> PENDING (a retry, which clears the
    error and the old task id unless the same request sets them)."""
    state = row["state"]
    changes = {k: v for k, v in values.items() if k in MUTABLE}
    state_changed = new_state is not None and new_state != state
    if state_changed:
        if new_state not in USER_TRANSITIONS.get(state, frozenset()):
            raise FailedPrecondition(
                f"transfer_item.state: transfer item {row['id']} is {state}; the only state change you can request is "
                "ERROR -> PENDING (retry); the site daemon moves items otherwise",
                reason="ILLEGAL_TRANSITION", field="transfer_item.state")
        changes["state"] = new_state
        if new_state == "PENDING":
            changes.setdefault("error", "")
            changes.setdefault("task_id", "")
    if not changes:
        return row
    out = dict(conn.execute(
        update(transfer_items).where(transfer_items.c.id == row["id"], transfer_items.c.owner_id == row["owner_id"])
        .values(update_time=now, **changes).returning(*transfer_items.c)
    ).one()._mapping)
    if state_changed:
        events.append(conn, [{
            "owner_id": out["owner_id"], "site_id": out["site_id"], "job_id": out["job_id"],
            "kind": events.TRANSFER_STATE, "subject_id": out["id"], "from_state": state,
            "to_state": new_state, "time": now, "message": "retry requested" if new_state == "PENDING" else "",
        }])
    return out


def list_items(conn: Connection, q: TransferQuery, *, after_id: int | None, limit: int) -> list[dict[str, Any]]:
    c = transfer_items.c
    conds = [c.owner_id == q.owner_id]
    if q.ids:
        conds.append(c.id.in_(q.ids))
    if q.job_ids:
        conds.append(c.job_id.in_(q.job_ids))
    if q.site_ids:
        conds.append(c.site_id.in_(q.site_ids))
    if q.states:
        conds.append(c.state.in_(q.states))
    if q.direction:
        conds.append(c.direction == q.direction)
    if q.task_id:
        conds.append(c.task_id == q.task_id)
    if q.only_site_id is not None:
        conds.append(c.site_id == q.only_site_id)
    if after_id is not None:
        conds.append(c.id > after_id)
    rows = conn.execute(select(transfer_items).where(*conds).order_by(c.id).limit(limit))
    return [dict(r._mapping) for r in rows]


# ---------------------------------------------------------------------------- site work
#
# The site daemon's transfer service moves items; the server decides which items it may
# move (offerable_items), records what it reports (apply_site_reports) and moves the job
# on in the same transaction. Item states reported by the site:
#
#     PENDING -> ACTIVE (task_id) -> DONE (metrics) | ERROR (error)
#     PENDING -> DONE | ERROR     (a task that finished before its ACTIVE report arrived)
#
# Stage-in items move while their job rests in READY, stage-out items while it rests in
# POSTPROCESSED; stage-out items wait in AWAITING_JOB until then (released by the job's
# transition to POSTPROCESSED, store/transitions.py).

# Where a job rests while the items of a direction move, and where it goes when they are done.
STAGE_STATE = {"IN": "READY", "OUT": "POSTPROCESSED"}
STAGE_DONE = {"IN": "STAGED_IN", "OUT": "STAGED_OUT"}
FINAL_ITEM_STATES = ("DONE", "ERROR")
# State changes the site may report.
SITE_TRANSITIONS: dict[str, frozenset[str]] = {
    "PENDING": frozenset({"ACTIVE", "DONE", "ERROR"}),
    "ACTIVE": frozenset({"DONE", "ERROR"}),
}
# Rows read per page while looking for offerable items past the ones already offered.
OFFER_PAGE = 500
MAX_SITE_ERROR = 4000


def offerable_items(conn: Connection, owner_id: int, site_id: int, skip: set[int], limit: int) -> list[dict[str, Any]]:
    """Items the site should move or keep track of, oldest first, leaving out `skip`
    (offered on this stream already): PENDING items whose job rests where they move, and
    ACTIVE items (so a daemon that lost its journal is told of the tasks it started).
    Rows carry the job's workdir as `job_workdir`."""
    c = transfer_items.c
    movable = or_(
        and_(c.state == "PENDING", or_(and_(c.direction == "IN", jobs.c.state == STAGE_STATE["IN"]),
                                       and_(c.direction == "OUT", jobs.c.state == STAGE_STATE["OUT"]))),
        c.state == "ACTIVE")
    out: list[dict[str, Any]] = []
    after = 0
    while len(out) < limit:
        page = conn.execute(
            select(transfer_items, jobs.c.workdir.label("job_workdir")).join(jobs, jobs.c.id == c.job_id)
            .where(c.owner_id == owner_id, c.site_id == site_id, c.state.in_(("PENDING", "ACTIVE")), movable,
                   c.id > after)
            .order_by(c.id).limit(OFFER_PAGE)).all()
        for r in page:
            after = r.id
            if r.id not in skip:
                out.append(dict(r._mapping))
        if len(page) < OFFER_PAGE:
            break
    return out[:limit]


@dataclass
class SiteReport:
    """One item's state as the site's transfer service reports it (short state names)."""

    id: int
    state: str
    task_id: str = ""
    error: str = ""
    bytes: int = 0
    files: int = 0
    duration_seconds: float = 0.0


@dataclass
class ReportOutcome:
    changed: int = 0          # items whose state moved
    unchanged: int = 0        # reports of a state the item already has (repeats)
    refused: list[str] = field(default_factory=list)
    job_moves: list[str] = field(default_factory=list)  # "job 7 READY -> PREPROCESSED", for logs


def _report_values(report: SiteReport) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if report.task_id:
        values["task_id"] = report.task_id[:128]
    if report.state == "ERROR":
        values["error"] = (report.error or "the site reported an error without a message")[:MAX_SITE_ERROR]
    if report.state in FINAL_ITEM_STATES and (report.bytes or report.files or report.duration_seconds):
        values.update(bytes=max(0, report.bytes), files=max(0, report.files),
                      duration_seconds=max(0.0, report.duration_seconds))
    return values


def reported_items_statement(dialect: str, ids: list[int], owner_id: int, site_id: int) -> Any:
    """The items a site reported on, by id, locked for the change on PostgreSQL. On SQLite
    the site term is kept out of index selection (unary +): without statistics it chose
    ix_transfer_items_site_id_state and read every item of the site for each report."""
    c = transfer_items.c
    site = literal_column("+transfer_items.site_id") if dialect == "sqlite" else c.site_id
    stmt = select(transfer_items).where(id_in(c.id, ids, dialect), c.owner_id == owner_id,
                                        site == site_id).order_by(c.id)
    return stmt.with_for_update() if dialect == "postgresql" else stmt


def apply_site_reports(conn: Connection, owner_id: int, site_id: int, reports: list[SiteReport],
                       now: datetime) -> ReportOutcome:
    """Record the site's reports and move the jobs whose items are all done (or fail the
    ones with a failed item), all in the caller's transaction. Idempotent: a repeated
    report finds its item already there (unchanged); a report for an item that already
    finished is ignored."""
    out = ReportOutcome()
    if not reports:
        return out
    c = transfer_items.c
    ids = sorted({r.id for r in reports})
    stmt = reported_items_statement(conn.dialect.name, ids, owner_id, site_id)
    rows = {r.id: dict(r._mapping) for r in conn.execute(stmt)}
    event_rows: list[dict[str, Any]] = []
    touched_jobs: set[int] = set()
    for report in reports:
        row = rows.get(report.id)
        if row is None:
            out.refused.append(f"transfer item {report.id} not found at this site")
            continue
        values = _report_values(report)
        if report.state == row["state"]:
            # A repeat, or new figures for the same state (a task id once submitted).
            changes = {k: v for k, v in values.items() if row.get(k) != v}
            if changes:
                conn.execute(update(transfer_items).where(c.id == row["id"]).values(update_time=now, **changes))
                row.update(changes)
            out.unchanged += 1
            continue
        if report.state not in SITE_TRANSITIONS.get(row["state"], frozenset()):
            if row["state"] in FINAL_ITEM_STATES:
                out.unchanged += 1  # finished already (a late or repeated report): nothing to do
            else:
                out.refused.append(f"transfer item {row['id']} is {row['state']}; the site cannot move it to "
                                   f"{report.state}")
            continue
        conn.execute(update(transfer_items).where(c.id == row["id"])
                     .values(state=report.state, update_time=now, **values))
        data = {k: v for k, v in values.items() if k != "error"} or None
        event_rows.append({
            "owner_id": row["owner_id"], "site_id": row["site_id"], "job_id": row["job_id"],
            "kind": events.TRANSFER_STATE, "subject_id": row["id"], "from_state": row["state"],
            "to_state": report.state, "time": now, "data": data, "message": values.get("error", "")})
        row.update(values, state=report.state)
        out.changed += 1
        if report.state in FINAL_ITEM_STATES:
            touched_jobs.add(row["job_id"])
    events.append(conn, event_rows)
    if touched_jobs:
        out.job_moves = settle_jobs(conn, owner_id, site_id, sorted(touched_jobs), now)
    return out


def _describe(item: dict[str, Any]) -> str:
    remote = f"{item['location_alias']}:{item['remote_path']}"
    src, dst = (remote, item["local_path"]) if item["direction"] == "IN" else (item["local_path"], remote)
    stage = "stage-in" if item["direction"] == "IN" else "stage-out"
    return f"{stage} of slot {item['slot']!r} ({src} -> {dst})"


def failure_message(failed: list[dict[str, Any]]) -> str:
    """Why a job failed, naming each failed item (slot, location, paths) and its error."""
    parts = [f"{_describe(i)} failed: {i['error'] or 'no error message'}" for i in failed[:3]]
    if len(failed) > 3:
        parts.append(f"and {len(failed) - 3} more failed transfer(s)")
    return "; ".join(parts)[:MAX_SITE_ERROR]


def settle_jobs(conn: Connection, owner_id: int, site_id: int, job_ids: list[int], now: datetime) -> list[str]:
    """Jobs resting in READY / POSTPROCESSED whose items of that direction all finished:
    all DONE -> STAGED_IN / STAGED_OUT (and on, by the server's automatic steps), any
    ERROR -> FAILED with the reason. Returns a line per move (for logs)."""
    from balsam_grpc.core.states import JobState, Role
    from balsam_grpc.server.store.transitions import ENGINE_COLUMNS, Transitioner

    dialect = conn.dialect.name
    stmt = select(*ENGINE_COLUMNS).where(id_in(jobs.c.id, job_ids, dialect), jobs.c.owner_id == owner_id,
                                         jobs.c.site_id == site_id,
                                         jobs.c.state.in_(tuple(STAGE_STATE.values()))).order_by(jobs.c.id)
    if dialect == "postgresql":
        stmt = stmt.with_for_update()
    waiting = [dict(r._mapping) for r in conn.execute(stmt)]
    if not waiting:
        return []
    items: dict[int, list[dict[str, Any]]] = {}
    for r in conn.execute(select(transfer_items).where(id_in(transfer_items.c.job_id, [j["id"] for j in waiting],
                                                             dialect)).order_by(transfer_items.c.id)):
        items.setdefault(r.job_id, []).append(dict(r._mapping))
    engine = Transitioner(conn, now)
    moves: list[str] = []
    done_by_target: dict[str, list[dict[str, Any]]] = {}
    summary: dict[int, dict[str, Any]] = {}
    for job in waiting:
        direction = "IN" if job["state"] == STAGE_STATE["IN"] else "OUT"
        mine = [i for i in items.get(job["id"], []) if i["direction"] == direction]
        failed = [i for i in mine if i["state"] == "ERROR"]
        if failed:
            before = job["state"]
            engine.move([job], JobState.FAILED, Role.SERVER, message=failure_message(failed),
                         data={"failed_transfer_ids": [i["id"] for i in failed][:100]})
            moves.append(f"job {job['id']} {before} -> FAILED")
        elif mine and all(i["state"] == "DONE" for i in mine):
            done_by_target.setdefault(STAGE_DONE[direction], []).append(job)
            summary[job["id"]] = {"transfers": len(mine), "bytes": sum(i["bytes"] for i in mine),
                                  "files": sum(i["files"] for i in mine)}
    for target, movers in done_by_target.items():
        # One apply per job: the event data carries the job's own transfer figures.
        for job in movers:
            before = job["state"]
            engine.move([job], JobState(target), Role.SERVER, message="transfers done",
                         data=summary[job["id"]])
            moves.append(f"job {job['id']} {before} -> {engine.changed[job['id']]}")
    engine.flush()
    return moves
