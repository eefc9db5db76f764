"""Work for a site daemon, found from the database state, and the application of its
results. Pure SQL on plain values: the site stream (services/site_stream.py) turns these
into protobuf messages.

Work ids are deterministic, so after a reconnect everything unresolved is found again
without an outbox table (see notes/site_stream.md):

    submit:<batch_job_id>                batch job PENDING_SUBMISSION
    cancel:<batch_job_id>                batch job PENDING_DELETION
    hook:<job_id>:<STATE>:<run_count>    job waiting in a hook state of an app with that hook
    cleanup:<job_id>                     JOB_FINISHED job of an app with cleanup globs, not cleaned
    transfer:<item_id>                   transfer item PENDING while its job rests in READY (stage-in) or
                                         POSTPROCESSED (stage-out), or ACTIVE (store/transfers.py)

A transfer work item is answered at once with the item's state at the site (queued there,
or further); the site then reports progress with results of its own work ids
("transfer-task:<task key>:<phase>"), applied the same way.

A result is applied at most once because applying it moves its subject on: a repeated
result finds the subject elsewhere and is answered as already applied ("stale").
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Integer, and_, bindparam, case, func, literal_column, or_, select, text, union_all, update

from balsam_grpc.core.errors import BalsamError
from balsam_grpc.core.states import JobState, Role
from balsam_grpc.server.store import batch_jobs as batch_store
from balsam_grpc.server.store import jobs as job_store
from balsam_grpc.server.store import transfers as transfer_store
from balsam_grpc.server.store.db import MAX_EVENT_ID
from balsam_grpc.server.store.tables import apps, batch_jobs, events, jobs
from balsam_grpc.server.store.transitions import ENGINE_COLUMNS, AppRules, Transitioner

S = JobState

# Work kinds, and the hello capability that enables each.
SUBMIT, CANCEL, HOOK, CLEANUP, TRANSFER = "submit", "cancel", "hook", "cleanup", "transfer"
# Work ids of the site's own transfer progress reports start with this (no offered work).
TRANSFER_REPORT = "transfer-task"
CAPABILITY_KINDS = {"batch_jobs": (CANCEL, SUBMIT), "hooks": (HOOK,), "cleanup": (CLEANUP,),
                    "transfers": (TRANSFER,)}

# Which hook runs for a job waiting in each state.
HOOK_OF_STATE = {S.STAGED_IN: "preprocess", S.RUN_DONE: "postprocess", S.RUN_ERROR: "handle_error",
                 S.RUN_TIMEOUT: "handle_timeout"}
HOOK_STATES = tuple(HOOK_OF_STATE)

# Backlog buckets (notes/site_stream.md, SiteBacklog).
RUNNABLE = (S.PREPROCESSED, S.RESTART_READY)
PENDING = (S.CREATED, S.AWAITING_PARENTS, S.READY, S.STAGED_IN)

# Outcomes of applying a result.
APPLIED, STALE, REFUSED = "applied", "stale", "refused"


@dataclass
class Work:
    """One unit of work for a site: its id, kind and the rows it needs."""

    id: str
    kind: str
    batch_job: dict[str, Any] | None = None
    job: dict[str, Any] | None = None
    app: dict[str, Any] | None = None
    hook: str = ""
    globs: list[str] = field(default_factory=list)
    transfer: dict[str, Any] | None = None  # transfer item row with its job's workdir


@dataclass
class Outcome:
    """What happened to one result: applied, stale (already applied / subject moved on)
    or refused (with why; the daemon may forget it all the same)."""

    status: str
    message: str = ""
    # The server failed on it (not the daemon's fault): do not offer the work again on this
    # stream, where it would fail the same way; a reconnect offers it again.
    park: bool = False


def submit_id(batch_job_id: int) -> str:
    return f"{SUBMIT}:{batch_job_id}"


def cancel_id(batch_job_id: int) -> str:
    return f"{CANCEL}:{batch_job_id}"


def hook_id(job_id: int, state: str, run_count: int) -> str:
    return f"{HOOK}:{job_id}:{state}:{run_count}"


def cleanup_id(job_id: int) -> str:
    return f"{CLEANUP}:{job_id}"


def transfer_id(item_id: int) -> str:
    return f"{TRANSFER}:{item_id}"


def parse_work_id(work_id: str) -> tuple[str, list[str]] | None:
    """(kind, parts) of a well-formed work id, else None."""
    kind, _, rest = work_id.partition(":")
    parts = rest.split(":") if rest else []
    shapes = {SUBMIT: 1, CANCEL: 1, CLEANUP: 1, HOOK: 3, TRANSFER: 1}
    if kind not in shapes or len(parts) != shapes[kind]:
        return None
    ints = [parts[0]] + ([parts[2]] if kind == HOOK else [])
    if not all(p.isascii() and p.isdigit() for p in ints):  # isdigit() alone passes '²', which int() refuses
        return None
    if kind == HOOK and parts[1] not in {str(s) for s in HOOK_STATES}:
        return None
    return kind, parts


# ---------------------------------------------------------------------------- finding work

# find_work runs each time a site's jobs finish (CLEANUP): its statements are built once
# (a Select and its cache key cost more to build than SQLite takes to run them).
_SITE_APPS = select(apps).where(apps.c.site_id == bindparam("w_site"))
# Built once: a statement built per call costs more of the server's CPU (building the
# expression and its cache key) than running it, and this one runs after every result.
_BATCH_JOBS_IN_STATE = (select(batch_jobs).where(batch_jobs.c.site_id == bindparam("w_site"),
                                                 batch_jobs.c.owner_id == bindparam("w_owner"),
                                                 batch_jobs.c.state == bindparam("w_state"))
                        .order_by(batch_jobs.c.id).limit(bindparam("w_limit")))
# Finished jobs still to clean (this is asked each time jobs finish): the site's apps that
# have globs first (a few rows), then only their jobs, which ix_jobs_cleanup_due finds by
# (site, app); a finished job of an app without globs is never cleaned and never read, and
# a site with no such app reads no jobs at all. In one joined statement SQLite walked every
# finished job of the site (the index by site alone, then the join) whenever its statistics
# were missing or taken before the jobs finished, as after a bulk create: a cost that grew
# with the site's finished jobs, paid after every report of finished jobs.
# On SQLite the owner term is kept out of index selection (unary +): it walked every
# finished job of the site (the owner and state index, cleaned ones too) instead.
_HAS_GLOBS = {"postgresql": "jsonb_typeof(apps.cleanup_globs) = 'array' AND apps.cleanup_globs <> '[]'::jsonb",
              "sqlite": "json_array_length(apps.cleanup_globs) > 0"}
_CLEANUPS: dict[str, tuple[Any, Any]] = {}


def _cleanups_statements(dialect: str) -> tuple[Any, Any]:
    """(the site's apps with cleanup globs, their finished jobs not yet cleaned)."""
    stmts = _CLEANUPS.get(dialect)
    if stmts is None:
        stmts = _CLEANUPS[dialect] = (
            select(apps.c.id, apps.c.cleanup_globs).where(apps.c.site_id == bindparam("w_site"),
                                                          text(_HAS_GLOBS[dialect])),
            select(jobs.c.id, jobs.c.workdir, jobs.c.app_id)
            .where(jobs.c.site_id == bindparam("w_site"),
                   (literal_column("+jobs.owner_id") if dialect == "sqlite" else jobs.c.owner_id)
                   == bindparam("w_owner", type_=jobs.c.owner_id.type),
                   jobs.c.app_id.in_(bindparam("w_apps", expanding=True)),
                   # Literal, as in the index's predicate, so a prepared plan may use it.
                   text("jobs.state = 'JOB_FINISHED'"), jobs.c.cleaned_time.is_(None))
            .order_by(jobs.c.id).limit(bindparam("w_limit", type_=Integer())))
    return stmts


def _site_apps(conn: Connection, site_id: int) -> dict[int, dict[str, Any]]:
    return {r.id: dict(r._mapping) for r in conn.execute(_SITE_APPS, {"w_site": site_id})}


def _hook_apps(site_apps: dict[int, dict[str, Any]]) -> dict[JobState, list[int]]:
    """App ids per hook state, for apps that implement that state's hook."""
    out: dict[JobState, list[int]] = {s: [] for s in HOOK_STATES}
    for app_id, row in site_apps.items():
        rules = AppRules(row)
        for state, has in ((S.STAGED_IN, rules.has_preprocess), (S.RUN_DONE, rules.has_postprocess),
                           (S.RUN_ERROR, rules.has_error_hook), (S.RUN_TIMEOUT, rules.has_timeout_hook)):
            if has:
                out[state].append(app_id)
    return out


def hook_jobs_statement(dialect: str, owner_id: int, site_id: int, per_state: dict[str, list[int]],
                        limit: int) -> Any:
    """The site's oldest `limit` jobs waiting for a hook: in each state of `per_state`, of
    the apps that implement its hook. One branch per state, each walking
    ix_jobs_owner_id_state_id_site_id from (owner, state) in id order and stopping at
    `limit`, merged. With the states OR-ed and ORDER BY id, PostgreSQL walked the primary
    key past every older job of the owner (240,024 rows read for 100 behind 300,000
    finished ones) and SQLite read all of the owner's jobs and sorted them. PostgreSQL:
    the state as a range of one value ordered by (state, id), an order only that index
    gives (as store.jobs._pg_by_state); SQLite takes the index for `state = x` with the
    order by id that it gives, once the site and app terms are kept out of its index
    choice (unary +): for one app it read all of the app's jobs through ix_jobs_app_id."""
    branches = []
    for state, app_ids in per_state.items():
        if dialect == "postgresql":
            in_state, order = (jobs.c.state >= state, jobs.c.state <= state), (jobs.c.state, jobs.c.id)
            site, app = jobs.c.site_id, jobs.c.app_id
        else:
            in_state, order = (jobs.c.state == state,), (jobs.c.id,)
            site, app = literal_column("+jobs.site_id"), literal_column("+jobs.app_id")
        branches.append(select(jobs).where(jobs.c.owner_id == owner_id, *in_state, site == site_id,
                                           app.in_(app_ids)).order_by(*order).limit(limit))
    if len(branches) == 1:
        return branches[0]
    merged = union_all(*(select(b.subquery()) for b in branches)).subquery()
    return select(merged).order_by(merged.c.id).limit(limit)


def find_work(conn: Connection, owner_id: int, site_id: int, kinds: set[str], skip: set[str],
              limit: int) -> list[Work]:
    """Up to `limit` work items of the given kinds, leaving out the ids in `skip` (items
    already offered on this stream). Cancellations first, then submissions (a pilot
    decides how soon everything else runs), then hooks, transfers and cleanups, oldest first."""
    out: list[Work] = []
    if limit <= 0 or not kinds:
        return out

    def take(candidates: list[Work]) -> None:
        for w in candidates:
            if len(out) >= limit:
                return
            if w.id not in skip:
                out.append(w)

    skipped: dict[str, int] = {}
    for work_id in skip:
        kind = work_id.partition(":")[0]
        skipped[kind] = skipped.get(kind, 0) + 1

    def fetch_size(kind: str) -> int:
        # Skipped ids may come first in the order: ask for enough rows to still fill the room.
        return limit - len(out) + skipped.get(kind, 0)

    for kind, state in ((CANCEL, batch_store.PENDING_DELETION), (SUBMIT, batch_store.PENDING_SUBMISSION)):
        if kind in kinds and len(out) < limit:
            rows = conn.execute(_BATCH_JOBS_IN_STATE, {"w_site": site_id, "w_owner": owner_id, "w_state": state,
                                                       "w_limit": fetch_size(kind)})
            make = cancel_id if kind == CANCEL else submit_id
            take([Work(id=make(r.id), kind=kind, batch_job=dict(r._mapping)) for r in rows])
    if not ({HOOK, CLEANUP, TRANSFER} & kinds) or len(out) >= limit:
        return out
    site_apps = _site_apps(conn, site_id) if HOOK in kinds else {}
    if HOOK in kinds:
        per_state = {str(st): ids for st, ids in _hook_apps(site_apps).items() if ids}
        if per_state:
            rows = conn.execute(hook_jobs_statement(conn.dialect.name, owner_id, site_id, per_state, fetch_size(HOOK)))
            take([Work(id=hook_id(r.id, r.state, r.run_count), kind=HOOK, job=dict(r._mapping),
                       app=site_apps[r.app_id], hook=HOOK_OF_STATE[S(r.state)]) for r in rows])
    if TRANSFER in kinds and len(out) < limit:
        skip_items = {int(w.partition(":")[2]) for w in skip if w.startswith(TRANSFER + ":")}
        rows = transfer_store.offerable_items(conn, owner_id, site_id, skip_items, limit - len(out))
        take([Work(id=transfer_id(r["id"]), kind=TRANSFER, transfer=r) for r in rows])
    if CLEANUP in kinds and len(out) < limit:
        with_globs, due = _cleanups_statements(conn.dialect.name)
        globs = {r.id: list(r.cleanup_globs) for r in conn.execute(with_globs, {"w_site": site_id})}
        if globs:
            rows = conn.execute(due, {"w_site": site_id, "w_owner": owner_id, "w_apps": list(globs),
                                      "w_limit": fetch_size(CLEANUP)})
            take([Work(id=cleanup_id(r.id), kind=CLEANUP, job={"id": r.id, "workdir": r.workdir},
                       globs=globs[r.app_id]) for r in rows])
    return out


# Job states in which a job may wait for site work (a job event's to_state is where the
# job came to rest, after the server's automatic steps): hooks, cleanup, and transfers
# (READY waits for stage-in, POSTPROCESSED for stage-out).
_WORK_STATES = [str(s) for s in (*HOOK_STATES, S.JOB_FINISHED, S.READY, S.POSTPROCESSED)]


_WORK_STATE_SET = frozenset(_WORK_STATES)


def may_make_work(kind: str, to_state: str) -> bool:
    """Whether an event of the site may have made work for it (the test of
    site_events_after, on one event the fanout delivered): a stream does not scan for
    work on every job that merely started or stopped running."""
    if kind == batch_store.events.BATCH_JOB_STATE:
        return True
    if kind == batch_store.events.JOB_STATE:
        return to_state in _WORK_STATE_SET
    # an item released or retried by its user
    return kind == batch_store.events.TRANSFER_STATE and to_state == "PENDING"


ALL_KINDS = frozenset((SUBMIT, CANCEL, HOOK, CLEANUP, TRANSFER))
_NO_KINDS: frozenset[str] = frozenset()
_HOOK_KINDS = frozenset((HOOK,))
_BATCH_KINDS = frozenset((SUBMIT, CANCEL))
_CLEANUP_KINDS = frozenset((CLEANUP,))
_TRANSFER_KINDS = frozenset((TRANSFER,))
_KINDS_OF_STATE = {**{str(s): _HOOK_KINDS for s in HOOK_STATES}, str(S.JOB_FINISHED): _CLEANUP_KINDS,
                   str(S.READY): _TRANSFER_KINDS, str(S.POSTPROCESSED): _TRANSFER_KINDS}


def kinds_made(kind: str, to_state: str) -> frozenset[str]:
    """The work kinds an event of the site may have made (none for most job events, as
    may_make_work): find_work then asks only for those. A job resting in a hook state may
    need its hook, a finished one its cleanup, one in READY or POSTPROCESSED its
    transfers; a batch job event, submissions and cancellations."""
    if kind == batch_store.events.JOB_STATE:
        return _KINDS_OF_STATE.get(to_state, _NO_KINDS)
    if kind == batch_store.events.BATCH_JOB_STATE:
        return _BATCH_KINDS
    if kind == batch_store.events.TRANSFER_STATE and to_state == "PENDING":
        return _TRANSFER_KINDS
    return _NO_KINDS


def kinds_released(work_ids: Iterable[str]) -> set[str]:
    """The work kinds results may have released: their own (work held back on the stream
    while its item was out) and cancellations (held while a submission is in flight); an
    unsolicited batch job report, submissions and cancellations."""
    out = {CANCEL}
    for work_id in work_ids:
        kind = work_id.partition(":")[0]
        out.update(_BATCH_KINDS if not work_id or kind not in ALL_KINDS else (kind,))
    return out


def site_events_after(conn: Connection, owner_id: int, site_id: int, cursor: int) -> tuple[int | None, bool]:
    """(highest id of an event of this site after `cursor` or None, whether any of them may
    have made work, as may_make_work): tells a stream whether anything at its site changed
    when the fanout could not deliver the events themselves (a gap)."""
    c = events.c
    may_work = or_(c.kind == batch_store.events.BATCH_JOB_STATE,
                   and_(c.kind == batch_store.events.JOB_STATE, c.to_state.in_(_WORK_STATES)),
                   # an item released or retried by its user
                   and_(c.kind == batch_store.events.TRANSFER_STATE, c.to_state == "PENDING"))
    newest, work = conn.execute(
        select(func.max(c.id), func.max(case((may_work, c.id), else_=None)))
        .where(c.owner_id == owner_id, c.id > cursor, c.site_id == site_id)).one()
    return newest, work is not None


_BACKLOG_STATES = [str(s) for s in (*RUNNABLE, *PENDING, S.RUNNING)]


def _backlog_sql(p: Any) -> str:
    """site_backlog's one statement with the placeholders `p` writes: the sessions count
    joined to the jobs grouped by state (so a site without jobs still has its row). A
    runnable job held ahead by a launcher (it has a session) waits for that launcher: it
    counts with the running ones, not as backlog that needs a pilot. The grouping makes
    SQLite walk ix_jobs_owner_id_state_id_site_id even when its statistics (taken after a
    bulk create at one site) rate that index as useless; ungrouped, it scanned the whole
    table (20 ms per call at 100,000 jobs)."""
    return f"""SELECT g.state, g.n, g.nodes, g.max_nodes, g.max_wall, a.active FROM
(SELECT count(*) AS active FROM sessions WHERE owner_id = {p('w_owner')} AND site_id = {p('w_site')}
 AND state = 'ACTIVE') AS a
LEFT JOIN (SELECT CASE WHEN jobs.state IN ({_sql_list(RUNNABLE)}) AND jobs.session_id IS NOT NULL
 THEN '{S.RUNNING}' ELSE jobs.state END AS state, count(*) AS n,
 sum(CAST(jobs.num_nodes AS DOUBLE PRECISION) / jobs.node_packing_count) AS nodes,
 max(jobs.num_nodes) AS max_nodes, max(jobs.wall_time_min) AS max_wall
 FROM jobs WHERE jobs.owner_id = {p('w_owner')} AND jobs.site_id = {p('w_site')}
 AND jobs.state IN ({_sql_list(_BACKLOG_STATES)})
 GROUP BY jobs.state, 1) AS g ON true"""


def _sql_list(states: Iterable[Any]) -> str:
    return ", ".join(f"'{s}'" for s in states)  # state names of core.states: no quoting to escape


# Written once per driver: a site stream recomputes its backlog up to 5 times a second
# while its jobs move, so it runs in the driver's own terms (no SQLAlchemy per call) and,
# on PostgreSQL, on the event loop (50 busy sites made 250 hops a second to a database
# thread and back, each with two statements through SQLAlchemy).
_BACKLOG_SQL = {dialect: _backlog_sql(binding.placeholder) for dialect, binding in job_store.BINDINGS.items()}


async def site_backlog(db: Any, owner_id: int, site_id: int) -> dict[str, Any]:
    """What waits at the site, for the elastic queue (field names of SiteBacklog)."""
    params = {"w_owner": owner_id, "w_site": site_id}
    if db.is_postgres:
        rows = await db.statement_now(_BACKLOG_SQL["postgresql"], params)
    else:
        rows = await db.sqlite_statement(_BACKLOG_SQL["sqlite"], params)
    return _backlog_values([r for r in rows if r[0] is not None], rows[0][5])


def _backlog_values(grouped: list[Any], active: int) -> dict[str, Any]:
    """grouped: (state, n, nodes, max_nodes, max_wall) per state."""
    running = str(S.RUNNING)
    by_state = {r[0]: r for r in grouped if r[0] != running}
    runnable = [by_state[str(s)] for s in RUNNABLE if str(s) in by_state]
    counts = {state: int(r[1]) for state, r in by_state.items()}
    return {"runnable_jobs": sum(int(r[1]) for r in runnable),
            "runnable_node_footprint": round(sum((float(r[2] or 0.0) for r in runnable), 0.0), 6),
            "max_job_nodes": max((int(r[3] or 0) for r in runnable), default=0),
            "max_wall_time_min": max((int(r[4] or 0) for r in runnable), default=0),
            "pending_jobs": sum(int(counts.get(str(s), 0)) for s in PENDING),
            "running_jobs": sum(int(r[1]) for r in grouped if r[0] == running), "active_sessions": int(active)}


# ---------------------------------------------------------------------------- batch job results

@dataclass
class BatchJobReport:
    """A batch job's state as the daemon saw it in the scheduler."""

    batch_job_id: int
    state: str  # short BatchJobState name, "" when the daemon did not set one
    scheduler_id: str = ""
    status_info: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None


def apply_batch_job_report(conn: Connection, owner_id: int, site_id: int, work_id: str,
                           report: BatchJobReport, now: datetime) -> Outcome:
    """A submit or cancel result (work_id set) or an unsolicited state report (empty)."""
    row = batch_store.get_batch_job(conn, owner_id, report.batch_job_id, for_update=True)
    if work_id:
        parsed = parse_work_id(work_id)
        if parsed is None or parsed[0] not in (SUBMIT, CANCEL) or int(parsed[1][0]) != report.batch_job_id:
            return Outcome(REFUSED, f"{work_id}: a batch job result must answer submit:/cancel:<id> of batch job "
                                    f"{report.batch_job_id}")
        if row is None:
            return Outcome(STALE, f"batch job {report.batch_job_id} no longer exists")
        wanted = batch_store.PENDING_SUBMISSION if parsed[0] == SUBMIT else batch_store.PENDING_DELETION
        # A pilot cancelled while its submission was in flight still needs its scheduler id
        # recorded, so the cancellation can find it; site_report keeps PENDING_DELETION.
        in_flight_cancel = parsed[0] == SUBMIT and row["state"] == batch_store.PENDING_DELETION
        if row["state"] != wanted and not in_flight_cancel:
            return Outcome(STALE, f"batch job {row['id']} is already {row['state']}")
    elif row is None:
        return Outcome(REFUSED, f"batch job {report.batch_job_id} not found")
    if row["site_id"] != site_id:
        return Outcome(REFUSED, f"batch job {row['id']} belongs to site {row['site_id']}, not this site")
    if work_id.startswith(SUBMIT) and not report.state:
        # A submission must end PENDING_SUBMISSION, or the same pilot would be offered (and
        # submitted) again: with a scheduler id it is queued, without one it failed.
        report.state = batch_store.QUEUED if report.scheduler_id else batch_store.SUBMIT_FAILED
        if not report.scheduler_id:
            report.status_info = report.status_info or "the site daemon reported no state and no scheduler id"
    before = row["state"]
    try:
        status = batch_store.site_report(conn, row, report.state, scheduler_id=report.scheduler_id,
                                         status_info=report.status_info, start_time=report.start_time,
                                         end_time=report.end_time, now=now)
    except BalsamError as exc:
        return Outcome(REFUSED, exc.message)
    if before == batch_store.PENDING_DELETION and report.state in (batch_store.QUEUED, batch_store.RUNNING) \
            and not work_id:
        # An unsolicited report (a submit or cancel answer says what became of that work):
        # the scheduler id and times were recorded, which the cancellation needs; the state not.
        return Outcome(REFUSED, f"batch job {row['id']} is PENDING_DELETION: it stays so until the daemon reports "
                                f"it FINISHED; the {report.state} report only recorded its scheduler id and times")
    return Outcome(APPLIED if status else STALE, "" if status else f"batch job {row['id']} is already {row['state']}")


# ---------------------------------------------------------------------------- hook results

@dataclass
class HookOutcome:
    """A hook's result in store terms. `refusal` set means the result could not even be
    read (bad input); the job is failed with it."""

    job_id: int
    hook: str = ""  # "" when the daemon did not say
    next_state: str = ""  # "" = the step's natural next state
    message: str = ""
    changes: dict[str, Any] = field(default_factory=dict)  # data / parameters / tags
    new_jobs: list[dict[str, Any]] = field(default_factory=list)  # store.jobs.create_jobs specs
    event_data: dict[str, Any] = field(default_factory=dict)
    refusal: str = ""


def natural_next_state(state: JobState, rules: AppRules, run_count: int) -> JobState:
    """Where a hook step goes when the hook did not choose (notes/site_stream.md)."""
    if state is S.STAGED_IN:
        return S.PREPROCESSED
    if state is S.RUN_DONE:
        return S.POSTPROCESSED
    if state is S.RUN_ERROR:
        return S.RESTART_READY if rules.restart_on_error and run_count <= rules.max_retries else S.FAILED
    return S.RESTART_READY


def _lock_job(conn: Connection, owner_id: int, site_id: int, job_id: int) -> dict[str, Any] | None:
    stmt = select(*ENGINE_COLUMNS).where(jobs.c.id == job_id, jobs.c.owner_id == owner_id, jobs.c.site_id == site_id)
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    row = conn.execute(stmt).first()
    return dict(row._mapping) if row else None


def _move(conn: Connection, row: dict[str, Any], target: JobState, now: datetime, message: str,
          data: dict[str, Any], role: Role = Role.SITE) -> str:
    """Move one job as `role`; a refused move raises its error (FailedPrecondition or
    PermissionDenied), so a hook asking for a move the site may not make fails the job."""
    engine = Transitioner(conn, now)
    refused = engine.move([row], target, role, message=message, data=data or None)
    if refused:
        raise refused[row["id"]].error()
    engine.flush()
    return engine.changed[row["id"]]


def apply_hook_result(conn: Connection, owner_id: int, site_id: int, work_id: str, result: HookOutcome,
                      now: datetime) -> Outcome:
    parsed = parse_work_id(work_id)
    if parsed is None or parsed[0] != HOOK:
        return Outcome(REFUSED, f"{work_id!r}: a hook result must answer a hook:<job>:<state>:<run> work id")
    job_id, state, run_count = int(parsed[1][0]), S(parsed[1][1]), int(parsed[1][2])
    row = _lock_job(conn, owner_id, site_id, job_id)
    if row is None:
        return Outcome(STALE, f"job {job_id} no longer exists at this site")
    if row["state"] != state or row["run_count"] != run_count:
        return Outcome(STALE, f"job {job_id} already moved on ({row['state']}, run {row['run_count']})")
    hook = HOOK_OF_STATE[state]
    base = {"hook": hook, "work_id": work_id}

    def fail(why: str) -> Outcome:
        _move(conn, row, S.FAILED, now, f"{hook} hook result refused: {why}", {**base, "error": why})
        return Outcome(REFUSED, f"{work_id}: {why}; job {job_id} FAILED")

    if result.refusal:
        return fail(result.refusal)
    if result.job_id and result.job_id != job_id:
        return fail(f"the result names job {result.job_id}, the work was for job {job_id}")
    if result.hook and result.hook != hook:
        return fail(f"the result is from the {result.hook} hook, the work asked for {hook}")
    rules = AppRules(conn.execute(select(apps.c.hooks, apps.c.retry_policy).where(apps.c.id == row["app_id"]))
                     .one()._mapping)
    target = S(result.next_state) if result.next_state else natural_next_state(state, rules, row["run_count"])
    data = {**result.event_data, **base}
    if result.new_jobs:
        data["new_job_count"] = len(result.new_jobs)
    events_before = conn.info.get(MAX_EVENT_ID)
    try:
        with conn.begin_nested():
            if result.changes:
                _apply_changes(conn, row, result.changes, now)
            if result.new_jobs:
                created = job_store.create_jobs(conn, owner_id, site_id, result.new_jobs, now)
                data["new_job_ids"] = [r["id"] for r in created][:1000]
            final = _move(conn, row, target, now, result.message, data)
    except BalsamError as exc:
        rolled_back(conn, events_before)
        row["state"] = str(state)  # the savepoint rolled back whatever the engine changed
        return fail(exc.message)
    return Outcome(APPLIED, f"job {job_id} {state} -> {final}")


def rolled_back(conn: Connection, events_before: int | None) -> None:
    """After a savepoint rollback: forget the event ids it inserted, so the EventBus is not
    told of ids that do not exist (SQLite would hand them out again, and watchers that
    skipped ahead to them would miss those events)."""
    if events_before is None:
        conn.info.pop(MAX_EVENT_ID, None)
    else:
        conn.info[MAX_EVENT_ID] = events_before


def _apply_changes(conn: Connection, row: dict[str, Any], changes: dict[str, Any], now: datetime) -> None:
    if "parameters" in changes:
        app = conn.execute(select(apps).where(apps.c.id == row["app_id"])).one()._mapping
        job_store._check_parameters(0, {"parameters": dict(changes["parameters"])}, dict(app))
    conn.execute(update(jobs).where(jobs.c.id == row["id"]).values(update_time=now, **changes))


# ---------------------------------------------------------------------------- cleanup results

def apply_cleanup_result(conn: Connection, owner_id: int, site_id: int, work_id: str, job_id: int,
                         removed_files: int, error: str, now: datetime) -> Outcome:
    """Mark the workdir cleaned. A failed cleanup is recorded too and not retried: the
    globs would fail the same way, and the job's outputs are untouched either way."""
    parsed = parse_work_id(work_id)
    if parsed is None or parsed[0] != CLEANUP or (job_id and int(parsed[1][0]) != job_id):
        return Outcome(REFUSED, f"{work_id!r}: a cleanup result must answer cleanup:<job id> of its job")
    job_id = int(parsed[1][0])
    info = f"cleanup failed: {error}" if error else f"cleanup removed {removed_files} file(s)"
    done = conn.execute(
        update(jobs).where(jobs.c.id == job_id, jobs.c.owner_id == owner_id, jobs.c.site_id == site_id,
                           jobs.c.state == S.JOB_FINISHED, jobs.c.cleaned_time.is_(None))
        .values(cleaned_time=now, cleanup_info=info[:2000])).rowcount
    if not done:
        return Outcome(STALE, f"job {job_id} is gone or already cleaned")
    return Outcome(APPLIED, info)


# ---------------------------------------------------------------------------- transfer results

def apply_transfer_result(conn: Connection, owner_id: int, site_id: int, work_id: str,
                          reports: list[transfer_store.SiteReport], now: datetime) -> Outcome:
    """The answer to a transfer:<item> work item, or a progress report of the site's own
    (transfer-task:...). Each item is applied on its own; see store/transfers.py."""
    kind = work_id.partition(":")[0]
    parsed = parse_work_id(work_id)
    if kind == TRANSFER:
        if parsed is None:
            return Outcome(REFUSED, f"{work_id!r}: a transfer answer must name its item (transfer:<item id>)")
        wanted = int(parsed[1][0])
        if any(r.id != wanted for r in reports):
            return Outcome(REFUSED, f"{work_id}: the answer reports other items than transfer item {wanted}")
    elif kind != TRANSFER_REPORT:
        return Outcome(REFUSED, f"{work_id!r}: transfer updates answer transfer:<item id> or are "
                                f"{TRANSFER_REPORT}:... reports")
    if not reports:
        return Outcome(REFUSED, f"{work_id}: the transfer update names no item")
    result = transfer_store.apply_site_reports(conn, owner_id, site_id, reports, now)
    detail = f"{result.changed} item(s) changed, {result.unchanged} unchanged"
    if result.job_moves:
        detail += "; " + ", ".join(result.job_moves[:20])
    if result.refused:
        return Outcome(REFUSED, f"{work_id}: {'; '.join(result.refused[:10])} ({detail})")
    return Outcome(APPLIED if result.changed else STALE, detail)
