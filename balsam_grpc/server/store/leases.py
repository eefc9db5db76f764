"""Leases of runnable jobs to launcher sessions: acquisition under a credit, fenced
transition reports, release of a session's jobs, and the event-log scans that tell a
session stream when to look again. Pure SQL; no protobuf.

Concurrency: on PostgreSQL the candidate rows are taken with `FOR UPDATE SKIP LOCKED`, so
two sessions acquiring at once never wait for each other nor get the same job; the
session row is locked first so a session's acquisition and its expiry serialize. On
SQLite every write transaction runs under `Database`'s single in-process writer lock
(store/db.py), which serializes acquisitions the same way.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Float, Integer, and_, bindparam, exists, literal_column, or_, select, text, update

from balsam_grpc.core.errors import Aborted, BalsamError, FailedPrecondition, InvalidArgument
from balsam_grpc.core.states import RUNNABLE_STATES, JobState, Role, role_refusal
from balsam_grpc.server.store import events as event_log
from balsam_grpc.server.store.codec import array_text
from balsam_grpc.server.store.driver import (
    DriverStatement,
    driver_batch,
    driver_rows,
    driver_statement,
    plain_statement,
)
from balsam_grpc.server.store.query import ids_param, ids_value, tags_contain
from balsam_grpc.server.store.tables import apps, events, job_parents, jobs, runnable_condition, sessions
from balsam_grpc.server.store.transitions import ENGINE_COLUMNS, Transitioner

S = JobState
ACTIVE = "ACTIVE"
_RUNNABLE = sorted(str(s) for s in RUNNABLE_STATES)
_RUNNABLE_SET = frozenset(_RUNNABLE)
_STATE_NAMES = frozenset(str(s) for s in S)
# Slack on node arithmetic so 1/3 + 1/3 + 1/3 still fits in 1.0 node.
_EPS = 1e-6


@dataclass(frozen=True, slots=True)
class Credit:
    """What a launcher can take now (SessionCredit, lowered by what was leased since)."""

    max_jobs: int = 0
    free_nodes: float = 0.0
    max_nodes_per_job: int = 0  # 0 = no limit besides free_nodes
    wall_time_remaining_min: int = 0  # 0 = no limit
    serial_only: bool = False
    filter_tags: dict[str, str] = field(default_factory=dict)
    app_ids: tuple[int, ...] = ()
    # Held ahead of free capacity (prefetch): leased but left in their runnable state.
    reserve_jobs: int = 0
    reserve_nodes: float = 0.0

    @property
    def start_exhausted(self) -> bool:
        return self.max_jobs <= 0 or self.free_nodes <= _EPS

    @property
    def reserve_exhausted(self) -> bool:
        return self.reserve_jobs <= 0 or self.reserve_nodes <= _EPS

    @property
    def exhausted(self) -> bool:
        return self.start_exhausted and self.reserve_exhausted

    def minus(self, n_jobs: int, nodes: float, reserved_jobs: int = 0, reserved_nodes: float = 0.0) -> Credit:
        return replace(self, max_jobs=self.max_jobs - n_jobs, free_nodes=max(0.0, self.free_nodes - nodes),
                       reserve_jobs=self.reserve_jobs - reserved_jobs,
                       reserve_nodes=max(0.0, self.reserve_nodes - reserved_nodes))

    def reserve_part(self) -> Credit:
        """The held-ahead part as a credit of its own (to pick jobs with)."""
        return replace(self, max_jobs=self.reserve_jobs, free_nodes=self.reserve_nodes, reserve_jobs=0,
                       reserve_nodes=0.0)


def footprint(num_nodes: int, node_packing_count: int) -> float:
    """Nodes a job occupies: a single-node job packed n to a node takes 1/n."""
    return num_nodes / max(1, node_packing_count)


@dataclass(frozen=True, slots=True)
class SessionRef:
    id: str
    owner_id: int
    site_id: int
    job_mode: str
    batch_job_id: int | None


# The hot path's statements are built and compiled once (per shape and database) with
# named parameters: building a Select and its cache key each time costs several times
# what running it costs.
def _driver(conn: Connection, key: tuple[Any, ...], build: Any) -> DriverStatement:
    """The statement `build` makes, in the driver's terms (store/driver.py), built once
    per key and database."""
    return driver_statement(("leases", *key), build, conn.dialect)


def _run(conn: Connection, key: tuple[Any, ...], build: Any, params: dict[str, Any],
         ids: dict[str, list[int]] | None = None, *,
         before: list[tuple[DriverStatement, dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """The statement `build` makes (once per key and dialect), run on the driver's cursor
    with `params` and the id lists `ids` (array literals on PostgreSQL, JSON arrays on
    SQLite); its rows as dicts. PostgreSQL: sent with the statements `before` (taken from
    the list) in one round trip."""
    item = _item(conn, key, build, params, ids)
    if before:
        batch, before[:] = [*before, item], []
        return driver_batch(conn, batch, dicts=True)[-1]
    return driver_rows(conn, *item, dicts=True)


def _item(conn: Connection, key: tuple[Any, ...], build: Any, params: dict[str, Any],
          ids: dict[str, list[int]] | None = None) -> tuple[DriverStatement, dict[str, Any]]:
    """_run's statement and parameters (for driver_batch on PostgreSQL)."""
    dialect = conn.dialect.name
    return _driver(conn, key, build), {
        **params, **{name: array_text(values) if dialect == "postgresql" else ids_value(values, dialect)
                     for name, values in (ids or {}).items()}}


_LOCK_SESSION = (select(sessions)
                 .where(sessions.c.id == bindparam("b_sid"), sessions.c.owner_id == bindparam("b_owner"))
                 .with_for_update())
_ADVANCE_SESSION = (update(sessions).where(sessions.c.id == bindparam("b_sid"))
                    .values(applied_through_seq=bindparam("b_seq"), heartbeat_time=bindparam("b_now")))


# PostgreSQL: the statements of a launcher session's transactions (a report, leases) run
# generic plans, built with sequential scans off. A report of a few jobs binds id arrays
# of a few elements, and the plan cache rates a generic plan for 10 (its guess for an
# array parameter) against custom plans for 4: it planned four statements afresh at every
# report (bench_load's pattern, scripts/bench_reports.py: PostgreSQL 1,250 kIr a job with
# them, 930 without). Every statement here reads
# jobs by primary key or walks ix_jobs_lease_order (sorting off), so the generic plan is
# the custom one; built with sequential scans off, it stays an index plan when it was built
# while the table was small (a cached plan is not rebuilt as the table grows, nor without
# an ANALYZE). The session path's row writes (Transitioner's, tagged SESSION_TAG) have a
# text of their own, so no plan another transaction built, under other settings, is used
# here. Both settings end with the transaction (set_config's is_local); plans of the
# jobs triggers built here keep index access, which they use at any size.
GENERIC_PLANS = ("SELECT set_config('plan_cache_mode', 'force_generic_plan', true), "
                 "set_config('enable_seqscan', 'off', true)")
SESSION_TAG = "session"


# PostgreSQL: lock the session row, advance it and return what it was, in one round trip
# (a report's two session statements). The subquery's row lock is taken before the
# UPDATE, and RETURNING gives the values from before it. SQLite cannot return a FROM
# item's columns: it runs _LOCK_SESSION and _ADVANCE_SESSION (no round trips there).
# It also makes the settings of GENERIC_PLANS (a CTE, evaluated first): the statements
# after it in the transaction are planned under them (this one is planned before).
_LOCK_AND_ADVANCE = text(
    f"WITH plans AS MATERIALIZED ({GENERIC_PLANS}) "
    "UPDATE sessions AS s SET heartbeat_time = :b_now, "
    "applied_through_seq = GREATEST(o.applied_through_seq, :b_seq) "
    "FROM plans, (SELECT id, state, applied_through_seq FROM sessions WHERE id = :b_sid AND owner_id = :b_owner "
    "FOR UPDATE) AS o WHERE s.id = o.id RETURNING o.state, o.applied_through_seq"
).bindparams(bindparam("b_now", type_=sessions.c.heartbeat_time.type), bindparam("b_seq", type_=Integer()))


def _generic_plans(conn: Connection) -> list[tuple[DriverStatement, dict[str, Any]]]:
    """GENERIC_PLANS as the first statement of a batch (none on SQLite)."""
    return [(plain_statement(GENERIC_PLANS), {})] if conn.dialect.name == "postgresql" else []


def session_transitioner(conn: Connection, now: datetime) -> Transitioner:
    """The Transitioner of a session transaction (its writes' text tagged, see GENERIC_PLANS)."""
    return Transitioner(conn, now, tag=SESSION_TAG if conn.dialect.name == "postgresql" else "")


def _session_refusal(session_id: str, state: str | None) -> FailedPrecondition | None:
    if state is None:
        return FailedPrecondition(f"session {session_id} no longer exists; open a new session",
                                  reason="SESSION_CLOSED")
    if state != ACTIVE:
        return FailedPrecondition(f"session {session_id} is {state}; open a new session",
                                  reason=f"SESSION_{state}")
    return None


def lock_active_session(conn: Connection, owner_id: int, session_id: str, *,
                        before: list[tuple[DriverStatement, dict[str, Any]]] | None = None) -> dict[str, Any]:
    """The session row, locked for this transaction; refuses a session that is not ACTIVE.
    PostgreSQL: sent with the statements `before`."""
    got = _run(conn, ("lock_session",), lambda: _LOCK_SESSION, {"b_sid": session_id, "b_owner": owner_id},
               before=before)
    refusal = _session_refusal(session_id, got[0]["state"] if got else None)
    if refusal is not None:
        raise refusal
    return got[0]


# ---------------------------------------------------------------------------- acquire

def _candidate_conditions(session: SessionRef, credit: Credit, free_nodes: float) -> list[Any]:
    c = jobs.c
    # No owner_id term: a site's jobs are all its owner's, and that term would tempt the
    # planner (with stale statistics after a bulk create) into the owner/state index and a
    # sort of the whole backlog instead of walking ix_jobs_lease_order and stopping early.
    conds = [c.site_id == session.site_id, runnable_condition(),
             c.session_id.is_(None),  # not held ahead by a session (SessionCredit.reserve_jobs)
             # footprint <= free_nodes, without a division: num_nodes <= free * packing.
             c.num_nodes <= (free_nodes + _EPS) * c.node_packing_count]
    if credit.max_nodes_per_job > 0:
        conds.append(c.num_nodes <= credit.max_nodes_per_job)
    if credit.wall_time_remaining_min > 0:
        conds.append(c.wall_time_min <= credit.wall_time_remaining_min)
    if credit.serial_only or session.job_mode == "SERIAL":
        conds += [c.num_nodes == 1, c.ranks_per_node == 1]
    if credit.filter_tags:
        conds.append(tags_contain(c.tags, credit.filter_tags))
    if credit.app_ids:
        conds.append(c.app_id.in_(list(credit.app_ids)))
    return conds


LEASE_ORDER = (jobs.c.priority.desc(), jobs.c.num_nodes.desc(), jobs.c.wall_time_min.desc(), jobs.c.id)


# Run with exec_driver_sql (no compile, no cache lookup, no parameters): twice per
# acquisition.
_SORT_OFF = "SET LOCAL enable_sort = off"
# Back on before anything writes: an event insert (INSERT ... RETURNING in parameter
# order) takes over 100 ms with sorting off, and a jobs UPDATE fires the job_counts
# trigger. After an error the transaction rolls back, and the setting with it.
_SORT_DEFAULT = "SET LOCAL enable_sort TO DEFAULT"


def _pick_pages(conn: Connection, session: SessionRef, credit: Credit, exclude: list[int],
                before: list[tuple[DriverStatement, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Runnable rows that fit the credit, in lease order, greedily packed.

    On PostgreSQL the caller switches sorting off around these queries (_SORT_OFF): with
    the statistics left
    stale by a bulk create (the usual moment to acquire), the planner would otherwise sort
    the whole backlog (tens of ms for 20,000 jobs) instead of walking ix_jobs_lease_order
    and stopping after a few rows (under a millisecond).

    Each page is queried with the node capacity still free, so its first row always
    fits; rows skipped inside a page were too big for what was left and stay excluded by
    the smaller bound of the next page. Locked rows (another session's acquisition in
    flight) are skipped on PostgreSQL. The statements `before` (PostgreSQL) are sent with
    the first query and taken from the list.
    """
    picked: list[dict[str, Any]] = []
    free = credit.free_nodes
    dialect = conn.dialect.name
    serial = credit.serial_only or session.job_mode == "SERIAL"
    params: dict[str, Any] = {"b_site": session.site_id, "b_maxn": credit.max_nodes_per_job,
                              "b_wall": credit.wall_time_remaining_min}
    while len(picked) < credit.max_jobs and free > _EPS:
        want = credit.max_jobs - len(picked)
        excluded = exclude + [r["id"] for r in picked]
        shape = (dialect, credit.max_nodes_per_job > 0, credit.wall_time_remaining_min > 0, serial,
                 bool(credit.app_ids), bool(excluded))
        params.update(b_free=free + _EPS, b_lim=want)
        id_lists = {"b_apps": list(credit.app_ids), "b_excl": excluded}
        if credit.filter_tags:  # the tags are in the statement: built each time
            if before:
                driver_batch(conn, before)
                before.clear()
            stmt = _pick_statement(*shape, tags=credit.filter_tags)
            bound = {**params, **{name: ids_value(values, dialect) for name, values in id_lists.items()}}
            rows = [dict(r._mapping) for r in conn.execute(stmt, bound)]
        else:
            rows = _run(conn, ("pick", *shape), lambda: _pick_statement(*shape), params, id_lists, before=before)
        for row in rows:
            need = footprint(row["num_nodes"], row["node_packing_count"])
            if need <= free + _EPS:
                picked.append(row)
                free -= need
                if len(picked) >= credit.max_jobs or free <= _EPS:
                    break
        if len(rows) < want:
            break
    return picked


def _pick_statement(dialect: str, max_nodes: bool, wall_time: bool, serial: bool, app_ids: bool, exclude: bool,
                    tags: dict[str, str] | None = None) -> Any:
    """_pick_pages's query for one shape of credit, with named parameters (b_site, b_free,
    b_maxn, b_wall, b_apps, b_excl, b_lim); the terms are _candidate_conditions's."""
    c = jobs.c
    conds = [c.site_id == bindparam("b_site"), runnable_condition(), c.session_id.is_(None),
             c.num_nodes <= bindparam("b_free", type_=Float()) * c.node_packing_count]
    if max_nodes:
        conds.append(c.num_nodes <= bindparam("b_maxn"))
    if wall_time:
        conds.append(c.wall_time_min <= bindparam("b_wall"))
    if serial:
        conds += [c.num_nodes == 1, c.ranks_per_node == 1]
    if tags:
        conds.append(tags_contain(c.tags, tags))
    if app_ids:
        conds.append(ids_param(c.app_id, "b_apps", dialect))
    if exclude:
        conds.append(~ids_param(c.id, "b_excl", dialect))
    return (select(jobs).where(*conds).order_by(*LEASE_ORDER).limit(bindparam("b_lim", type_=Integer()))
            .with_for_update(skip_locked=True))


def has_candidate(conn: Connection, session: SessionRef, credit: Credit) -> bool:
    """Whether a runnable job fits `credit`: a read, so a launcher granting credit with
    nothing to run costs no acquisition transaction (the session row lock and, on SQLite,
    the single writer). In lease order like _pick_pages, so it walks the same index."""
    if credit.exhausted:
        return False
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(_SORT_OFF)  # as in acquire; the read transaction ends here
    free = max(0.0 if credit.start_exhausted else credit.free_nodes,
               0.0 if credit.reserve_exhausted else credit.reserve_nodes)
    stmt = (select(jobs.c.id).where(*_candidate_conditions(session, credit, free))
            .order_by(*LEASE_ORDER).limit(1))
    return conn.execute(stmt).first() is not None


@dataclass
class Acquired:
    jobs: list[dict[str, Any]]  # RUNNING ones first, then those held ahead (in their runnable state)
    apps: dict[int, dict[str, Any]]
    nodes: float  # footprint of the RUNNING ones
    reserved: int = 0  # how many of `jobs` are held ahead
    reserved_nodes: float = 0.0


def acquire(conn: Connection, session: SessionRef, credit: Credit, now: datetime, *,
            tr: Transitioner | None = None) -> Acquired:
    """Lease runnable jobs matching `credit` to `session`: each moves to RUNNING through
    the Transitioner (one event per job), gets the session id, a new lease generation,
    one more run_count and the session's batch job.

    With `tr` the session row is already locked by the caller (report_and_acquire) and
    the events go into its Transitioner, which the caller flushes (on PostgreSQL this
    flushes it, the caller's events with the leases')."""
    if credit.exhausted:
        return Acquired([], {}, 0.0)
    if tr is None:
        lock_active_session(conn, session.owner_id, session.id, before=_generic_plans(conn))
    t = tr or session_transitioner(conn, now)
    # Both picks in one window with sorting off (see _pick_pages). Nothing that writes
    # jobs runs inside it: the job_counts trigger's plan, cached by its backend, would be
    # planned with sorting off for good (a 100-fold slower UPDATE was measured).
    # PostgreSQL: sorting goes off with the first pick, in one round trip.
    dialect = conn.dialect.name
    postgres = dialect == "postgresql"
    before = [(plain_statement(_SORT_OFF), {})] if postgres else []
    rows = _pick_pages(conn, session, credit, [], before) if not credit.start_exhausted else []
    reserved: list[dict[str, Any]] = []
    if not credit.reserve_exhausted:
        reserved = _pick_pages(conn, session, credit.reserve_part(), [r["id"] for r in rows], before)
    hold_params = {"b_sid": session.id, "b_bj": session.batch_job_id, "b_now": now}
    hold_key = ("hold_ahead", bool(session.batch_job_id))
    app_ids = {r["app_id"] for r in rows + reserved}
    # PostgreSQL: sorting back on, the held-ahead rows written (see below) and the apps
    # read by the flush at the end, first, in one round trip with the lease's UPDATE and
    # the events: their inputs are the picked rows, and nothing runs before (the move
    # to RUNNING reads nothing, and its write is deferred to the flush).
    batch = [(plain_statement(_SORT_DEFAULT), {})]
    if postgres and session.batch_job_id and len(rows) + len(reserved) >= 2:
        # Every job taken is linked to the session's batch job: its lock, once, spares the
        # per-row check of jobs_batch_job_changed (revision 0015). Not for one job: the
        # statement costs PostgreSQL a little more than the one check it spares.
        batch.append(_item(conn, ("lock_batch_job",), lambda: LOCK_BATCH_JOB, {"b_bj": session.batch_job_id}))
    if postgres and reserved:
        batch.append(_item(conn, hold_key, lambda: _hold_ahead_statement(dialect, bool(session.batch_job_id)),
                              hold_params, {"b_ids": [r["id"] for r in reserved]}))
    if postgres and app_ids:
        batch.append(_item(conn, ("apps",), lambda: _apps_statement(dialect), {}, {"b_ids": sorted(app_ids)}))
    message = f"leased to session {session.id}"
    if rows:
        values = {r["id"]: {"session_id": session.id, "lease_generation": r["lease_generation"] + 1,
                            "run_count": r["run_count"] + 1,
                            "batch_job_id": session.batch_job_id or r["batch_job_id"]} for r in rows}
        refused = t.move(rows, S.RUNNING, Role.SESSION, message=message, data={"session_id": session.id},
                         values=values, defer=set(values) if postgres else frozenset())
        rows = [r for r in rows if r["id"] not in refused]
        # The rows as written (Transitioner._write), without reading them back.
        for r in rows:
            r.update(values[r["id"]], state_message=message, state_time=now, update_time=now)
    if reserved:
        # Held ahead: the lease (session, a new generation) without a state change or an
        # event; the launcher's RUNNING report starts it (apply_report). The picked rows
        # are locked and have no session, so the UPDATE changes each of them.
        if not postgres:  # PostgreSQL wrote them above
            _run(conn, hold_key, lambda: _hold_ahead_statement(dialect, bool(session.batch_job_id)), hold_params,
                 {"b_ids": [r["id"] for r in reserved]})
        for r in reserved:
            r.update(session_id=session.id, lease_generation=r["lease_generation"] + 1,
                     batch_job_id=session.batch_job_id or r["batch_job_id"], update_time=now)
    loaded: dict[int, dict[str, Any]] = {}
    if postgres:  # the caller's Transitioner too: its events go in the same insert
        answers = t.flush(batch)
        if app_ids:
            loaded = {r["id"]: r for r in answers[-1]}
    elif tr is None:
        t.flush()
    if not rows and not reserved:
        return Acquired([], {}, 0.0)
    if postgres:  # without the apps of rows the move refused
        apps_of = {i: loaded[i] for i in {r["app_id"] for r in rows + reserved} if i in loaded}
    else:
        apps_of = load_apps(conn, app_ids)
    return Acquired(rows + reserved, apps_of,
                    sum(footprint(r["num_nodes"], r["node_packing_count"]) for r in rows),
                    len(reserved), sum(footprint(r["num_nodes"], r["node_packing_count"]) for r in reserved))


# PostgreSQL: the batch job a lease links its jobs to, locked FOR KEY SHARE as the key check
# of jobs_batch_job_changed would, and named in a transaction-local setting that the
# trigger's WHEN clause skips (revision 0015): one check per lease instead of one per job.
# A missing batch job sets nothing, and the trigger refuses the links as before.
LOCK_BATCH_JOB = text(
    "SELECT set_config('balsam.bj', id::text, true) FROM batch_jobs WHERE id = :b_bj FOR KEY SHARE"
).bindparams(bindparam("b_bj", type_=Integer()))


def _hold_ahead_statement(dialect: str, batch_job: bool) -> Any:
    return update(jobs).where(ids_param(jobs.c.id, "b_ids", dialect), jobs.c.session_id.is_(None)).values(
        session_id=bindparam("b_sid"), lease_generation=jobs.c.lease_generation + 1,
        batch_job_id=bindparam("b_bj") if batch_job else jobs.c.batch_job_id, update_time=bindparam("b_now"))


def _apps_statement(dialect: str) -> Any:
    return select(apps).where(ids_param(apps.c.id, "b_ids", dialect))


def load_apps(conn: Connection, app_ids: set[int]) -> dict[int, dict[str, Any]]:
    if not app_ids:
        return {}
    dialect = conn.dialect.name
    return {r["id"]: r for r in _run(conn, ("apps",), lambda: _apps_statement(dialect), {}, {"b_ids": sorted(app_ids)})}


def held_jobs(conn: Connection, owner_id: int, session_id: str) -> list[dict[str, Any]]:
    """The session's jobs: RUNNING under its lease, and held ahead in their runnable state
    (a job leaving RUNNING, or any state change of one held ahead, clears its session)."""
    rows = conn.execute(select(jobs).where(jobs.c.owner_id == owner_id, jobs.c.session_id == session_id,
                                           jobs.c.state.in_([S.RUNNING, *_RUNNABLE])).order_by(jobs.c.id))
    return [dict(r._mapping) for r in rows]


# ---------------------------------------------------------------------------- reports

@dataclass(slots=True)
class Transition:
    """A launcher's report of one job, as received (never modified). Not frozen: a frozen
    dataclass sets each field through object.__setattr__, 1.4 us a transition against
    0.25 us (session_stream.transition_from_pb makes one per transition reported)."""

    seq: int
    job_id: int
    lease_generation: int
    state: str  # short JobState name, "" when the launcher sent an unknown value
    return_code: int | None = None
    error_tail: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    time: datetime | None = None  # when it happened, by the launcher's clock


@dataclass(frozen=True, slots=True)
class Rejection:
    seq: int
    job_id: int
    error: BalsamError


@dataclass
class ReportResult:
    applied_through_seq: int
    rejections: list[Rejection]
    released: list[int]  # jobs that left RUNNING (no longer held)
    applied: int = 0
    resent: int = 0
    started: int = 0  # jobs held ahead that the launcher started (now RUNNING)


def _apply_starts(tr: Transitioner, session_id: str, starts: list[Transition], rows: dict[int, dict[str, Any]],
                  result: ReportResult, ending: set[int]) -> None:
    """RUNNING reports of jobs held ahead: each moves to RUNNING (one event) under the
    lease it already has; run_count counts the run from here. The row of a job that also
    ends in this report (`ending`) is written once, by its end (Transitioner's defer)."""
    ok: list[dict[str, Any]] = []
    by_job: dict[int, Transition] = {}
    for t in starts:
        row = rows.get(t.job_id)
        why = _fence(t, row, session_id) if t.job_id not in by_job else Aborted(
            f"job {t.job_id} was started twice in one report", reason="LEASE_LOST")
        if why is not None:
            result.rejections.append(Rejection(t.seq, t.job_id, why))
            continue
        assert row is not None
        by_job[t.job_id] = t
        ok.append(row)
    if not ok:
        return
    refused = tr.move(ok, S.RUNNING, Role.SESSION, message=f"started by session {session_id}",
                      data={"session_id": session_id},
                      values={r["id"]: {"session_id": session_id, "run_count": r["run_count"] + 1} for r in ok},
                      times={r["id"]: by_job[r["id"]].time for r in ok if by_job[r["id"]].time},
                      defer=ending)
    for row in ok:
        if row["id"] in refused:
            result.rejections.append(Rejection(by_job[row["id"]].seq, row["id"], refused[row["id"]].error()))
            continue
        row["state"] = S.RUNNING
        row["run_count"] += 1
        result.started += 1


def _fence(t: Transition, row: dict[str, Any] | None, session_id: str) -> BalsamError | None:
    """Why this transition may not be applied, or None. RUNNING starts a job held ahead
    (still in its runnable state); every other state ends a RUNNING one."""
    if t.state not in _STATE_NAMES:
        return InvalidArgument(f"job {t.job_id}: the reported state is not a job state", reason="INVALID_TRANSITION")
    if row is None:
        return Aborted(f"job {t.job_id} does not exist (deleted?); stop it", reason="LEASE_LOST")
    if (t.state == S.RUNNING and row["session_id"] == session_id and row["state"] == S.RUNNING
            and row["lease_generation"] == t.lease_generation):
        # Held and already started: RUNNING -> RUNNING is no move, but the lease stands, so
        # the launcher must not be told to stop the job (LEASE_LOST would kill its run).
        reason, message = role_refusal(Role.SESSION, S.RUNNING, S.RUNNING) or ("ILLEGAL_TRANSITION", "")
        return FailedPrecondition(f"job {t.job_id}: {message}", reason=reason)
    held_state = str(row["state"]) in _RUNNABLE_SET if t.state == S.RUNNING else row["state"] == S.RUNNING
    if row["session_id"] != session_id or not held_state:
        return Aborted(f"job {t.job_id} is no longer held by this session (now {row['state']}); stop it",
                       reason="LEASE_LOST")
    if row["lease_generation"] != t.lease_generation:
        return Aborted(f"job {t.job_id}: lease generation {t.lease_generation} is stale (current "
                       f"{row['lease_generation']}); stop it", reason="LEASE_LOST")
    return None


def apply_report(conn: Connection, owner_id: int, session_id: str, transitions: list[Transition],
                 now: datetime, *, tr: Transitioner | None = None) -> ReportResult:
    """Apply a launcher's report in seq order, in this one transaction, and advance the
    session's applied_through_seq. A resent seq is ignored; a fenced one is rejected and
    changes nothing. Starts and ends go through one Transitioner (one event insert); with
    `tr` it is the caller's, and the caller flushes it."""
    own = tr is None
    tr = tr or session_transitioner(conn, now)
    found = None
    if conn.dialect.name == "postgresql" and transitions:
        # Locked and advanced at once: the new applied_through_seq is the highest seq
        # sent (resent and fenced ones count as applied too), the old one decides which
        # are fresh. Nothing else of the session's row is read. The job rows come in
        # the same round trip, after the session's lock as on SQLite: those of every
        # transition sent, since which are fresh is known only from the old seq (a
        # resent one's row is locked to commit and not used).
        ids = sorted({t.job_id for t in transitions})
        got, found = driver_batch(conn, [
            (_driver(conn, ("lock_and_advance",), lambda: _LOCK_AND_ADVANCE),
             {"b_sid": session_id, "b_owner": owner_id, "b_now": now, "b_seq": max(t.seq for t in transitions)}),
            _item(conn, ("report_rows",), lambda: report_rows_statement("postgresql"), {"b_owner": owner_id},
                     {"b_ids": ids})], dicts=True)
        refusal = _session_refusal(session_id, got[0]["state"] if got else None)
        if refusal is not None:
            raise refusal  # the transaction rolls back, the advance with it
        session = {"applied_through_seq": got[0]["applied_through_seq"], "advanced": True}
    else:
        session = lock_active_session(conn, owner_id, session_id, before=_generic_plans(conn))
    result = _apply_report(conn, session, session_id, owner_id, transitions, now, tr, found)
    if own:
        tr.flush()
    return result


# What applying a report reads of a job: the fence's, the Transitioner's (ENGINE_COLUMNS,
# and transfers to know a job has none) and the data a report adds to; not the rest of
# the row (its JSON and times cost more to decode than the query costs to run).
_REPORT_COLUMNS = (*ENGINE_COLUMNS, jobs.c.lease_generation, jobs.c.data, jobs.c.transfers)


def report_rows_statement(dialect: str) -> Any:
    """A report's job rows by id (b_ids), the owner's only (b_owner), locked, with their
    apps' rules. On SQLite the owner term is kept out of index selection (unary +):
    without statistics (jobs created a few at a time are never analyzed) SQLite walked
    the owner's whole part of the owner and state index for every report instead of
    looking the ids up by primary key. PostgreSQL's generic plan (GENERIC_PLANS) built on a
    small table chose that index on the owner term as well, and would have kept it."""
    owner = literal_column("+jobs.owner_id")
    extra = []
    if dialect == "sqlite":  # Transitioner.know_childless: a job that ends looks for no children
        extra.append(exists().where(job_parents.c.parent_id == jobs.c.id).label("has_children"))
    return (select(*_REPORT_COLUMNS, apps.c.hooks.label("app_hooks"), apps.c.retry_policy.label("app_retry_policy"),
                   *extra)
            .join(apps, apps.c.id == jobs.c.app_id, isouter=True)
            .where(owner == bindparam("b_owner", type_=jobs.c.owner_id.type), ids_param(jobs.c.id, "b_ids", dialect))
            .order_by(jobs.c.id).with_for_update(of=jobs))


def _apply_report(conn: Connection, session: dict[str, Any], session_id: str, owner_id: int,
                  transitions: list[Transition], now: datetime, tr: Transitioner,
                  found: list[dict[str, Any]] | None = None) -> ReportResult:
    applied_through = session["applied_through_seq"]
    fresh: list[Transition] = []
    seen: set[int] = set()
    for t in sorted(transitions, key=lambda t: t.seq):
        if t.seq > applied_through and t.seq not in seen:
            seen.add(t.seq)
            fresh.append(t)
    result = ReportResult(applied_through, [], [], resent=len(transitions) - len(fresh))
    if not fresh:
        return result
    ids = sorted({t.job_id for t in fresh})
    dialect = conn.dialect.name
    # Locked in id order, as every bulk job change does, so two never deadlock.
    # With each row, its app's rules (what the Transitioner would read next, for the ends):
    # one statement less. Only the jobs' rows are locked.
    if found is None:  # else read with the session's lock (apply_report)
        found = _run(conn, ("report_rows",), lambda: report_rows_statement(dialect), {"b_owner": owner_id},
                     {"b_ids": ids})
    rows = {}
    for row in found:
        tr.know_app_rules(row["app_id"], row.pop("app_hooks"), row.pop("app_retry_policy"))
        if not row.pop("has_children", True):
            tr.know_childless(row["id"])
        rows[row["id"]] = row
    # Starts first (a job held ahead may start and end in one report: its start always
    # has the lower seq); its row is then RUNNING for the transitions after it.
    starts = [t for t in fresh if t.state == S.RUNNING]
    if starts:
        _apply_starts(tr, session_id, starts, rows, result, {t.job_id for t in fresh if t.state != S.RUNNING})
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    values: dict[int, dict[str, Any]] = {}
    for t in fresh:
        if t.state == S.RUNNING:
            continue
        row = rows.get(t.job_id)
        why = _fence(t, row, session_id)
        if why is not None:
            result.rejections.append(Rejection(t.seq, t.job_id, why))
            continue
        assert row is not None
        # Only what the report changes: rows whose values are alike (no data, the same
        # return code) are then written by one UPDATE (Transitioner._write groups them).
        changes: dict[str, Any] = {}
        if t.return_code is not None:
            changes["return_code"] = t.return_code
        if t.error_tail:
            changes["error_tail"] = t.error_tail
        if t.data:
            changes["data"] = {**(row["data"] or {}), **t.data}
        if starts:
            # The run count as it is now (a job started in this report counts its run):
            # ends with and without a deferred start then share one UPDATE.
            changes["run_count"] = row["run_count"]
        values[row["id"]] = changes
        # Event data: what the launcher sent, so the provenance log keeps it per run.
        key = (t.state, t.message, json.dumps(t.data, sort_keys=True, default=str) if t.data else "")
        groups[key].append(row)
        row["session_id"] = None  # a second transition of the same job in this report is fenced
        result.released.append(row["id"])
    if groups:
        by_job = {t.job_id: t for t in fresh}
        for (state, message, data_json), members in groups.items():
            refused = tr.move(members, S(state), Role.SESSION, message=message,
                              data=json.loads(data_json) if data_json else None,
                              values={r["id"]: values[r["id"]] for r in members},
                              times={r["id"]: by_job[r["id"]].time for r in members if by_job[r["id"]].time})
            for job_id, refusal in refused.items():
                result.rejections.append(Rejection(by_job[job_id].seq, job_id, refusal.error()))
                result.released.remove(job_id)
    # Starts whose end was fenced or refused: their RUNNING rows, before anything else
    # (an acquisition) reads the jobs table.
    tr.write_deferred()
    result.applied = len(result.released) + result.started
    result.applied_through_seq = max(applied_through, fresh[-1].seq)
    if not session.get("advanced"):
        _run(conn, ("advance_session",), lambda: _ADVANCE_SESSION,
             {"b_sid": session_id, "b_seq": result.applied_through_seq, "b_now": now})
    return result


def report_and_acquire(conn: Connection, session: SessionRef, transitions: list[Transition],
                       credit: Credit | None, now: datetime) -> tuple[ReportResult, Acquired]:
    """A launcher's report and, when it came with a credit, the leases under that credit,
    in one transaction: a finished job's slot is refilled without a second transaction
    (nor a read to check first). Jobs the report released are not leased again here: the
    report's own moves are in this transaction, and a job it sent back to a runnable state
    (RESTART_READY) may be leased like any other."""
    # One lock of the session row (in apply_report) and one Transitioner: the report's
    # events and the leases' go out in one insert, in that order.
    tr = session_transitioner(conn, now)
    result = apply_report(conn, session.owner_id, session.id, transitions, now, tr=tr)
    got = Acquired([], {}, 0.0)
    if credit is not None and not credit.exhausted:
        got = acquire(conn, session, credit, now, tr=tr)
    tr.flush()
    return result, got


# ---------------------------------------------------------------------------- release

def time_out_held(conn: Connection, owner_id: int, session_id: str, now: datetime, message: str,
                  data: dict[str, Any] | None = None) -> list[int]:
    """Every job the session holds in RUNNING goes to RUN_TIMEOUT through the Transitioner,
    which then follows the app's timeout policy (default RESTART_READY). The lease
    generation is bumped so any later report quoting the old lease is stale. `data` adds
    to the event's data (the cause, such as the pilot's batch job)."""
    release_held_ahead(conn, owner_id, session_id, now, message)
    rows = [dict(r._mapping) for r in conn.execute(
        select(jobs).where(jobs.c.owner_id == owner_id, jobs.c.session_id == session_id, jobs.c.state == S.RUNNING)
        .order_by(jobs.c.id).with_for_update())]
    if not rows:
        return []
    t = Transitioner(conn, now)
    t.move(rows, S.RUN_TIMEOUT, Role.SERVER, message=message, data={"session_id": session_id, **(data or {})},
            values={r["id"]: {"lease_generation": r["lease_generation"] + 1} for r in rows})
    t.flush()
    return [r["id"] for r in rows]


def release_held_ahead(conn: Connection, owner_id: int, session_id: str, now: datetime, message: str) -> list[int]:
    """Jobs the session held ahead and never started become leasable again: session
    cleared, lease generation bumped (a late RUNNING report is stale), state unchanged.
    Each gets an event (from and to its state), so sessions with credit look again."""
    rows = conn.execute(
        select(jobs.c.id, jobs.c.owner_id, jobs.c.site_id, jobs.c.state).where(
            jobs.c.owner_id == owner_id, jobs.c.session_id == session_id, jobs.c.state.in_(_RUNNABLE))
        .order_by(jobs.c.id).with_for_update()).all()
    if not rows:
        return []
    ids = [r.id for r in rows]
    conn.execute(update(jobs).where(jobs.c.id.in_(ids))
                 .values(session_id=None, lease_generation=jobs.c.lease_generation + 1, update_time=now))
    event_log.append(conn, [event_log.job_event(r.owner_id, r.site_id, r.id, r.state, r.state, now,
                                                data={"session_id": session_id, "released": True},
                                                message=f"released, not started: {message}"[:4000])
                            for r in rows])
    return ids


# ---------------------------------------------------------------------------- event scans
# A session learns of new events from the fanout (server/fanout.py), one row at a time,
# and tests them with the pure predicates; when the fanout could not deliver them (a gap),
# the *_since/lost_leases queries read the same from the event log.



def becomes_runnable(kind: str, to_state: str) -> bool:
    """Whether an event made its job runnable (the test of runnable_since)."""
    return kind == event_log.JOB_STATE and to_state in _RUNNABLE_SET


def may_lose_lease(kind: str, from_state: str, to_state: str) -> bool:
    """Whether an event may have taken its job from the session holding it: it left
    RUNNING (a close, a timeout, a re-lease), was killed, or a job held ahead changed
    state other than by starting (the test of lost_leases)."""
    return kind == event_log.JOB_STATE and (
        from_state == S.RUNNING or to_state == S.KILLED or (from_state in _RUNNABLE_SET and to_state != S.RUNNING))


def runnable_since(conn: Connection, owner_id: int, site_id: int, after_id: int) -> bool:
    """Did a job of this site become runnable after event `after_id`?"""
    e = events.c
    hit = conn.execute(select(e.id).where(e.owner_id == owner_id, e.id > after_id, e.site_id == site_id,
                                          e.kind == event_log.JOB_STATE, e.to_state.in_(_RUNNABLE)).limit(1)).first()
    return hit is not None


def lost_leases(conn: Connection, owner_id: int, session_id: str, held: dict[int, int],
                after_id: int) -> list[tuple[int, str]]:
    """Jobs in `held` (id -> lease generation) that left RUNNING after event `after_id` and
    are no longer this session's lease: killed by a user, timed out by a close, re-leased.
    Returns (job id, current state) pairs."""
    if not held:
        return []
    e = events.c
    moved = {r.job_id for r in conn.execute(
        select(e.job_id).distinct().where(e.owner_id == owner_id, e.id > after_id, e.kind == event_log.JOB_STATE,
                                          or_(e.from_state == S.RUNNING, e.to_state == S.KILLED,
                                              and_(e.from_state.in_(_RUNNABLE), e.to_state != S.RUNNING))))}
    return check_leases(conn, session_id, held, moved)


def check_leases(conn: Connection, session_id: str, held: dict[int, int],
                 suspects: set[int]) -> list[tuple[int, str]]:
    """Of the `suspects` among `held` (id -> lease generation), the jobs no longer this
    session's lease, as (job id, current state) pairs ("DELETED" for a job that is gone)."""
    ids = sorted(suspects & held.keys())
    if not ids:
        return []
    rows = conn.execute(select(jobs.c.id, jobs.c.state, jobs.c.session_id, jobs.c.lease_generation)
                        .where(jobs.c.id.in_(ids)))
    found = {r.id: r for r in rows}
    lost = []
    for job_id in ids:
        r = found.get(job_id)
        if r is None:
            lost.append((job_id, "DELETED"))
        elif r.session_id != session_id or r.lease_generation != held[job_id] or not (
                r.state == S.RUNNING or r.state in _RUNNABLE_SET):
            lost.append((job_id, r.state))
    return lost
