"""Live statistics per site for routing: backlog, running jobs, held nodes, and the
throughput and queue wait over a recent window.

Every query walks an index and touches only the rows it counts:
- job counts by state: ix_jobs_owner_id_state_id_site_id (owner, state, id, site), grouped;
- held nodes: the ACTIVE sessions (ix_sessions_site_id_state);
- the window: the owner's events from the first one at or after the window start. That
  id is found by a binary search over ix_events_owner_id_id (event ids grow with commit
  time), so the cost is a few index probes plus the window's own events, however long
  the log is;
- queue wait: for each RUNNING event of the window, the event that last put the job in
  the state it left (ix_events_job_id).

Pure functions (`median`, `window_figures`) compute the figures from plain rows so they
are tested apart from the SQL. Times are aware UTC datetimes (SQLite's naive values are
made aware on read).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Float, cast, func, select

from balsam_grpc.core.states import JobState as S
from balsam_grpc.server.convert import aware
from balsam_grpc.server.store.events import JOB_STATE
from balsam_grpc.server.store.sites import SiteQuery, list_sites
from balsam_grpc.server.store.tables import events, jobs, sessions

BACKLOG_STATES = (S.CREATED, S.AWAITING_PARENTS, S.READY, S.STAGED_IN, S.PREPROCESSED, S.RESTART_READY)
RUNNABLE_STATES = (S.PREPROCESSED, S.RESTART_READY)
FINISHING_STATES = (S.RUN_DONE, S.RUN_ERROR, S.RUN_TIMEOUT, S.POSTPROCESSED, S.STAGED_OUT)
_COUNTED = [str(s) for s in (*BACKLOG_STATES, S.RUNNING, *FINISHING_STATES)]
# Queue-wait samples per call: the most recent starts. Bounds the cost of a very busy
# window; a median over this many is already stable.
MAX_WAIT_SAMPLES = 5000
_IN_CHUNK = 500
# The shortest time throughput divides by: a run's first seconds (a job or two done) would
# otherwise read as hundreds a minute.
MIN_WORKED_SECONDS = 10.0


@dataclass
class SiteFigures:
    """The SiteStatistics fields of one site (proto field names)."""

    site_id: int
    site_name: str
    connected: bool
    last_seen_time: datetime | None
    backlog_jobs: int = 0
    backlog_node_footprint: float = 0.0
    runnable_jobs: int = 0
    running_jobs: int = 0
    running_node_footprint: float = 0.0
    finishing_jobs: int = 0
    active_sessions: int = 0
    held_nodes: int = 0
    finished_in_window: int = 0
    failed_in_window: int = 0
    throughput_per_minute: float = 0.0
    started_in_window: int = 0
    queue_wait_mean_seconds: float = 0.0
    queue_wait_p50_seconds: float = 0.0
    node_capacity: int = 0
    waits: list[float] = field(default_factory=list, repr=False)


# ------------------------------------------------------------------------------ pure parts

def node_capacity(elastic_queue: dict[str, Any] | None) -> int:
    """The nodes a site's elastic queue may hold at once, from the settings its daemon
    published (0: no elastic queue, or no cap)."""
    eq = elastic_queue or {}
    if not eq.get("enabled"):
        return 0
    try:
        return max(0, int(eq.get("max_total_nodes") or 0))
    except (TypeError, ValueError):
        return 0


def median(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


@dataclass(frozen=True)
class WindowEvent:
    """A job state change inside the window (the fields the figures need)."""

    id: int
    site_id: int
    job_id: int
    from_state: str
    to_state: str
    time: datetime


def window_figures(figures: dict[int, SiteFigures], window_events: Iterable[WindowEvent],
                   runnable_since: dict[int, datetime], start: datetime, now: datetime) -> None:
    """Fill the window fields of `figures` (by site id) from the window's events (in id
    order) of the window `start` .. `now`.

    `runnable_since` maps a RUNNING event's id to the time its job entered the state it
    left (PREPROCESSED or RESTART_READY); starts without one (their runnable event fell
    out of the log) give no wait sample.

    Throughput divides by the part of the window the site was at work: from its first
    start in the window, or from the window's start when a job that finished in it had
    started before. Divided by the whole window, a run 40 s old read 0.8/min in a one-hour
    window while it finished 90 a minute."""
    started: set[int] = set()
    at_work_since: dict[int, datetime] = {}
    for ev in window_events:
        fig = figures.get(ev.site_id)
        if fig is None:
            continue
        if ev.to_state == S.JOB_FINISHED:
            fig.finished_in_window += 1
            if ev.job_id not in started:
                at_work_since[ev.site_id] = start
        elif ev.to_state == S.FAILED:
            fig.failed_in_window += 1
        elif ev.to_state == S.RUNNING:
            fig.started_in_window += 1
            started.add(ev.job_id)
            at_work_since.setdefault(ev.site_id, ev.time)
            since = runnable_since.get(ev.id)
            if since is not None:
                fig.waits.append(max(0.0, (ev.time - since).total_seconds()))
    window_seconds = (now - start).total_seconds()
    for fig in figures.values():
        if fig.finished_in_window:
            worked = (now - at_work_since.get(fig.site_id, start)).total_seconds()
            minutes = min(window_seconds, max(worked, MIN_WORKED_SECONDS)) / 60.0
            fig.throughput_per_minute = fig.finished_in_window / minutes
        if fig.waits:
            fig.queue_wait_mean_seconds = sum(fig.waits) / len(fig.waits)
            fig.queue_wait_p50_seconds = median(fig.waits)


# ------------------------------------------------------------------------------ SQL parts

def first_event_id_at(conn: Connection, owner_id: int, start: datetime) -> int | None:
    """Id of the owner's first event at or after `start` (None if there is none).

    Binary search over ids: event ids follow commit order and events are stamped at
    commit time, so time grows with id (give or take the few milliseconds between a
    transaction's clock read and its commit, which only blurs the window's edge)."""
    c = events.c
    lo, hi = conn.execute(select(func.min(c.id), func.max(c.id)).where(c.owner_id == owner_id)).one()
    if lo is None:
        return None

    def at_or_after(event_id: int) -> tuple[int, datetime]:
        row = conn.execute(select(c.id, c.time).where(c.owner_id == owner_id, c.id >= event_id)
                           .order_by(c.id).limit(1)).one()
        return row[0], aware(row[1])

    answer, last_time = at_or_after(hi)
    if last_time < start:
        return None
    # Invariant: event `answer` is at or after start; no event with an id below lo is.
    while lo <= hi:
        mid = (lo + hi) // 2
        found_id, found_time = at_or_after(mid)
        if found_time >= start:
            answer = min(answer, found_id)  # ids mid .. found_id-1 do not exist
            hi = mid - 1
        else:
            lo = found_id + 1
    return answer


def _job_counts(conn: Connection, owner_id: int, site_ids: list[int], figures: dict[int, SiteFigures]) -> None:
    footprint = cast(jobs.c.num_nodes, Float) / jobs.c.node_packing_count
    rows = conn.execute(
        select(jobs.c.site_id, jobs.c.state, func.count(), func.coalesce(func.sum(footprint), 0.0))
        .where(jobs.c.owner_id == owner_id, jobs.c.state.in_(_COUNTED), jobs.c.site_id.in_(site_ids))
        .group_by(jobs.c.site_id, jobs.c.state))
    for site_id, state, count, nodes in rows:
        fig = figures[site_id]
        if state in BACKLOG_STATES:
            fig.backlog_jobs += count
            fig.backlog_node_footprint += float(nodes)
            if state in RUNNABLE_STATES:
                fig.runnable_jobs += count
        elif state == S.RUNNING:
            fig.running_jobs += count
            fig.running_node_footprint += float(nodes)
        else:
            fig.finishing_jobs += count
    for fig in figures.values():
        fig.backlog_node_footprint = round(fig.backlog_node_footprint, 6)
        fig.running_node_footprint = round(fig.running_node_footprint, 6)


def _sessions(conn: Connection, owner_id: int, site_ids: list[int], figures: dict[int, SiteFigures]) -> None:
    rows = conn.execute(select(sessions.c.site_id, sessions.c.nodes).where(
        sessions.c.owner_id == owner_id, sessions.c.site_id.in_(site_ids), sessions.c.state == "ACTIVE"))
    for site_id, nodes in rows:
        figures[site_id].active_sessions += 1
        figures[site_id].held_nodes += len(nodes or []) or 1  # a session holds at least its own node


def _window_events(conn: Connection, owner_id: int, site_ids: list[int], start: datetime) -> list[WindowEvent]:
    first = first_event_id_at(conn, owner_id, start)
    if first is None:
        return []
    c = events.c
    rows = conn.execute(
        select(c.id, c.site_id, c.job_id, c.from_state, c.to_state, c.time)
        .where(c.owner_id == owner_id, c.id >= first, c.kind == JOB_STATE, c.site_id.in_(site_ids),
               c.to_state.in_([str(S.JOB_FINISHED), str(S.FAILED), str(S.RUNNING)]))
        .order_by(c.id))
    return [WindowEvent(r[0], r[1], r[2], r[3], r[4], aware(r[5])) for r in rows if aware(r[5]) >= start]


def _runnable_since(conn: Connection, owner_id: int, starts: list[WindowEvent]) -> dict[int, datetime]:
    """RUNNING event id -> when its job last came to rest in the state it left."""
    starts = starts[-MAX_WAIT_SAMPLES:]
    by_job: dict[int, list[WindowEvent]] = defaultdict(list)
    for ev in starts:
        by_job[ev.job_id].append(ev)
    entered: dict[int, list[tuple[int, str, datetime]]] = defaultdict(list)
    job_ids = list(by_job)
    c = events.c
    for i in range(0, len(job_ids), _IN_CHUNK):
        rows = conn.execute(
            select(c.job_id, c.id, c.to_state, c.time)
            .where(c.job_id.in_(job_ids[i:i + _IN_CHUNK]), c.owner_id == owner_id, c.kind == JOB_STATE,
                   c.to_state.in_([str(s) for s in RUNNABLE_STATES]),
                   # not a held-ahead job's release (from and to its state): the job
                   # waited since it entered the state, not since it was released
                   c.from_state != c.to_state))
        for job_id, event_id, to_state, time in rows:
            entered[job_id].append((event_id, to_state, aware(time)))
    out: dict[int, datetime] = {}
    for job_id, runs in by_job.items():
        candidates = sorted(entered.get(job_id, []))
        for run in runs:
            before = [t for eid, state, t in candidates if eid < run.id and state == run.from_state]
            if before:
                out[run.id] = before[-1]
    return out


def site_statistics(conn: Connection, q: SiteQuery, *, now: datetime, window_seconds: float,
                    limit: int = 1000) -> list[SiteFigures]:
    """Figures of the selected sites of `q.owner_id`, by site id."""
    rows = list_sites(conn, q, after_id=None, limit=limit)
    figures = {r["id"]: SiteFigures(site_id=r["id"], site_name=r["name"], connected=bool(r["connected"]),
                                    last_seen_time=aware(r["last_seen_time"]),
                                    node_capacity=node_capacity(r["elastic_queue"])) for r in rows}
    if not figures:
        return []
    site_ids = list(figures)
    _job_counts(conn, q.owner_id, site_ids, figures)
    _sessions(conn, q.owner_id, site_ids, figures)
    start = now - timedelta(seconds=window_seconds)
    window = _window_events(conn, q.owner_id, site_ids, start)
    runs = [ev for ev in window if ev.to_state == S.RUNNING]
    since = _runnable_since(conn, q.owner_id, runs) if runs else {}
    window_figures(figures, window, since, start, now)
    return [figures[i] for i in sorted(figures)]


def as_fields(fig: SiteFigures) -> dict[str, Any]:
    """The figures as SiteStatistics keyword arguments (without the timestamp)."""
    out = {k: v for k, v in vars(fig).items() if k not in ("waits", "last_seen_time")}
    return out
