"""Applies job state changes: the one check of who may move a job where (core/states
RULES plus the guards that need the database), the server's automatic steps, one event
per requested change, stage-out release, retries and the cascade to child jobs, all
inside the caller's transaction. Every path that changes a job's state goes through
Transitioner.move."""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Boolean,
    Connection,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    and_,
    bindparam,
    exists,
    func,
    select,
    text,
    update,
)

from balsam_grpc.core.errors import BalsamError, FailedPrecondition, PermissionDenied
from balsam_grpc.core.states import (
    FINAL_STATES,
    RETRYABLE_STATES,
    JobState,
    Role,
    StepContext,
    is_legal,
    restart_point,
    role_refusal,
    settle,
)
from balsam_grpc.server.store import events as event_log
from balsam_grpc.server.store.codec import array_text, dumps, is_json
from balsam_grpc.server.store.driver import driver_batch, driver_executemany, driver_rows, driver_statement
from balsam_grpc.server.store.query import id_in, ids_param, ids_value
from balsam_grpc.server.store.tables import apps, events, job_parents, jobs, transfer_items

S = JobState
# Columns of a job row the engine needs.
ENGINE_COLUMNS = (jobs.c.id, jobs.c.owner_id, jobs.c.site_id, jobs.c.app_id, jobs.c.state, jobs.c.run_count,
                  jobs.c.on_parent_failure, jobs.c.pending_parents, jobs.c.session_id, jobs.c.cleaned_time,
                  jobs.c.state_time)
# How far ahead of the server's clock a reported time may be (clocks of login and compute
# nodes drift a little); later ones are recorded at the server's time plus this.
MAX_CLOCK_SKEW = timedelta(seconds=1)
_STAGE_TARGET = {S.STAGED_IN: "IN", S.STAGED_OUT: "OUT"}
_RETRY_TARGETS = frozenset({S.AWAITING_PARENTS, S.READY, S.STAGED_IN, S.POSTPROCESSED, S.RESTART_READY})


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why one job was not moved. ROLE_NOT_ALLOWED is PERMISSION_DENIED (the move exists,
    another party makes it); every other reason is FAILED_PRECONDITION."""

    job_id: int
    reason: str
    message: str

    def error(self) -> BalsamError:
        if self.reason == "ROLE_NOT_ALLOWED":
            return PermissionDenied(self.message, reason=self.reason)
        return FailedPrecondition(self.message, reason=self.reason)

    @property
    def code(self) -> int:
        return 7 if self.reason == "ROLE_NOT_ALLOWED" else 9  # PERMISSION_DENIED, FAILED_PRECONDITION
_NO_VALUES: dict[str, Any] = {}
# Parameters of a deferred RUNNING write that the job's next move sets for itself.
_DEFERRED_OWN = frozenset({"b_id", "b_message", "b_state_time", "b_session_id", "b_lease_expire_time"})


def _get(d: dict[str, Any], snake: str, default: Any = None) -> Any:
    """App JSON written by protobuf's json_format may be camelCase; accept both."""
    if snake in d:
        return d[snake]
    head, *rest = snake.split("_")
    return d.get(head + "".join(w.title() for w in rest), default)


class AppRules:
    """The parts of an app declaration that decide automatic steps."""

    def __init__(self, row: dict[str, Any]) -> None:
        hooks = row.get("hooks") or {}
        policy = row.get("retry_policy") or {}
        self.has_preprocess = bool(_get(hooks, "preprocess", False))
        self.has_postprocess = bool(_get(hooks, "postprocess", False))
        self.has_error_hook = bool(_get(hooks, "handle_error", False))
        self.has_timeout_hook = bool(_get(hooks, "handle_timeout", False))
        self.max_retries = int(_get(policy, "max_retries", 0) or 3)
        on_error = str(_get(policy, "on_error", "") or "")
        on_timeout = str(_get(policy, "on_timeout", "") or "")
        self.restart_on_error = on_error.endswith("RESTART")
        self.restart_on_timeout = not on_timeout.endswith("FAIL")


_NO_RULES = AppRules({})


def app_rules(hooks: Any, retry_policy: Any) -> AppRules:
    """AppRules of an app's hooks and retry policy (JSON values), shared when both are flat
    (AppRules is never modified): a launcher's report reads its jobs' apps with them and
    built the same rules at every report."""
    try:
        return _flat_app_rules(tuple((hooks or {}).items()), tuple((retry_policy or {}).items()))
    except (AttributeError, TypeError):  # a nested value (or not a dict): built as before
        return AppRules({"hooks": hooks, "retry_policy": retry_policy})


@functools.lru_cache(maxsize=1024)
def _flat_app_rules(hooks: tuple[tuple[str, Any], ...], retry_policy: tuple[tuple[str, Any], ...]) -> AppRules:
    return AppRules({"hooks": dict(hooks), "retry_policy": dict(retry_policy)})


# Statements of every state change (app rules, pending transfers, waiting children), built
# once per dialect with the id list as one named parameter: building a Select and its
# cache key each time costs several times what running a compiled one does (as
# store/leases._STATEMENTS). Immutable, so shared freely.
_STATEMENTS: dict[tuple[str, str], Any] = {}


def _statement(name: str, dialect: str, build: Any) -> Any:
    stmt = _STATEMENTS.get((name, dialect))
    if stmt is None:
        stmt = _STATEMENTS[(name, dialect)] = build(dialect)
    return stmt


def load_app_rules(conn: Connection, app_ids: Iterable[int]) -> dict[int, AppRules]:
    ids = sorted(set(app_ids))
    if not ids:
        return {}
    dialect = conn.dialect.name
    stmt = _statement("app_rules", dialect, lambda d: select(apps.c.id, apps.c.hooks, apps.c.retry_policy)
                      .where(ids_param(apps.c.id, "t_ids", d)))
    return {r.id: AppRules(dict(r._mapping)) for r in conn.execute(stmt, {"t_ids": ids_value(ids, dialect)})}


def _pending_transfers(conn: Connection, job_ids: list[int], direction: str) -> set[int]:
    if not job_ids:
        return set()
    return _pending_transfer_directions(conn, job_ids)[direction]


def may_have_transfers(row: dict[str, Any]) -> bool:
    """False when the row shows its job has no transfer items: they are made only when a
    job is created with transfers (store/jobs._transfer_rows), and a job's transfers never
    change. Rows read without that column may have some."""
    return row.get("transfers", True) != {}


def _pending_transfer_directions(conn: Connection, job_ids: list[int]) -> dict[str, set[int]]:
    """Jobs with unfinished stage-in / stage-out items, in one query."""
    out: dict[str, set[int]] = {"IN": set(), "OUT": set()}
    if not job_ids:
        return out
    dialect = conn.dialect.name
    stmt = _statement("pending_transfers", dialect, lambda d: select(
        transfer_items.c.job_id, transfer_items.c.direction).distinct()
        .where(ids_param(transfer_items.c.job_id, "t_ids", d), transfer_items.c.state != "DONE"))
    for r in conn.execute(stmt, {"t_ids": ids_value(job_ids, dialect)}):
        out.setdefault(r.direction, set()).add(r.job_id)
    return out


# Rows of one state change are written by one UPDATE per distinct value set only when
# every set has this many rows on average (and there are at most _MAX_GROUPS of them);
# otherwise by a single UPDATE joined to per-row arrays (PostgreSQL) or one executemany
# (SQLite). A launcher's report carries each job's own end time, so a report of a few
# jobs has as many value sets as jobs: one statement instead of one per job (a round trip
# each on PostgreSQL, SQLAlchemy's per-execution work on both).
_MAX_GROUPS = 8
_MIN_GROUP_ROWS = 4
# Column types an UPDATE ... FROM unnest(arrays) can carry (JSON values cannot be put
# in a PostgreSQL array by the driver).
_ARRAY_SAFE = (Integer, String, DateTime, Boolean, Float)
# States whose moves cascade to child jobs (_apply's finished and failed).
_CASCADING = frozenset({S.JOB_FINISHED, S.FAILED, S.KILLED})
_HAS_CHILDREN = exists().where(job_parents.c.parent_id == jobs.c.id).label("has_children")
# The grouped UPDATEs of _write, by (dialect, columns set): immutable, built once.
_UPDATES: dict[tuple[Any, ...], Any] = {}


def _driver_value(name: str, value: Any) -> Any:
    """A jobs column's value as the driver takes it (store/driver.py): JSON as its text."""
    return dumps(value) if name in _JSON_COLUMNS else value


_JSON_COLUMNS = frozenset(c.name for c in jobs.columns if is_json(c))


class Transitioner:
    """Moves a set of jobs to a requested state within one transaction."""

    def __init__(self, conn: Connection, now: datetime, *, tag: str = "") -> None:
        self.conn = conn
        self.now = now
        # Put before the text of the row writes it sends to the driver (driver_statement's
        # `tag`): a launcher session's transactions plan theirs apart (leases.GENERIC_PLANS).
        self.tag = tag
        self.event_rows: list[dict[str, Any]] = []
        self.changed: dict[int, str] = {}  # job id -> final state, for callers' responses
        # Apps' rules read in this transaction (an app row does not change inside it).
        self.rules: dict[int, AppRules] = {}
        # Row writes of moves to RUNNING held back (move's `defer`): the job's next move in
        # this transaction writes its row once, with both events (write_deferred writes
        # what no later move took).
        self.deferred: dict[int, dict[str, Any]] = {}
        # Jobs the caller saw to have no children when it locked them (see know_childless).
        self.childless: set[int] = set()
        # PostgreSQL, while flush writes the deferred rows: the statements to send with the
        # event insert in one round trip, in order (flush's `before`, then UPDATEs whose
        # rows are not read back).
        self._unsent: list[tuple[Any, dict[str, Any]]] | None = None
        self._answers: list[list[dict[str, Any]]] = []

    def know_app_rules(self, app_id: int, hooks: Any, retry_policy: Any) -> None:
        """An app's rules read by the caller in this transaction (with its jobs' rows)."""
        if app_id not in self.rules:
            self.rules[app_id] = app_rules(hooks, retry_policy)

    def know_childless(self, job_id: int) -> None:
        """A job the caller read, in this transaction, to have no child jobs: its moves
        look for none. Only where no child can be added until this transaction ends
        (SQLite's single writer): on PostgreSQL a child created concurrently may commit its
        link after a read that came before the job's row lock (its insert held a lock the
        read then waited for), and only a statement after the lock sees it (_write)."""
        self.childless.add(job_id)

    def _app_rules(self, app_ids: Iterable[int]) -> dict[int, AppRules]:
        missing = set(app_ids) - self.rules.keys()
        if missing:
            self.rules.update(load_app_rules(self.conn, missing))
        return self.rules

    def move(self, rows: list[dict[str, Any]], target: JobState, role: Role, *, message: str = "",
             data: dict[str, Any] | None = None, values: dict[int, dict[str, Any]] | None = None,
             data_by_job: dict[int, dict[str, Any]] | None = None,
             times: dict[int, datetime] | None = None, defer: frozenset[int] | set[int] = frozenset()
             ) -> dict[int, Refusal]:
        """Move the `rows` that `role` may move to `target`, then settle each one; the
        others are left as they are and returned with why.

        `defer` (moves to RUNNING only): jobs whose row is written by their next move in
        this transaction (a job held ahead that started and ended in one launcher report:
        one UPDATE, two events). Their rows in the database keep their old state until
        then, so nothing in between may read them; write_deferred writes the rest.

        The checks: the table (core/states RULES: the move exists, and `role` makes it);
        a job enters RUNNING only with a lease (`values` gives its session); STAGED_IN and
        STAGED_OUT only when every transfer item of that direction is done; a retry only
        to the job's restart point. `values` holds extra column values per job id
        (return_code, error_tail, ...); `data_by_job` event data per job, over `data`;
        `times` when each move happened by the reporter's clock (event_time bounds it).
        """
        assert not defer or target is S.RUNNING, "only a move to RUNNING is deferred"
        ok, refused, retried, values = self.check(rows, target, role, values)
        if ok:
            self._apply(ok, target, message=message, data=data, values=values, data_by_job=data_by_job,
                        times=times, defer=defer)
            if retried:
                self._after_retry(retried, target)
        return refused

    def check(self, rows: list[dict[str, Any]], target: JobState, role: Role,
              values: dict[int, dict[str, Any]] | None = None
              ) -> tuple[list[dict[str, Any]], dict[int, Refusal], list[dict[str, Any]], dict[int, dict[str, Any]] | None]:
        """move's checks alone: (rows it would move, refusals, the retried among them,
        `values` with what a retry sets)."""
        refused: dict[int, Refusal] = {}
        if not rows:
            return [], refused, [], values
        ok: list[dict[str, Any]] = []
        for row in rows:
            why = role_refusal(role, S(row["state"]), target)
            if why is not None:
                refused[row["id"]] = Refusal(row["id"], why[0], why[1])
            elif target is S.RUNNING and not (values or {}).get(row["id"], {}).get("session_id"):
                refused[row["id"]] = Refusal(row["id"], "LEASE_REQUIRED", "a job enters RUNNING only by being leased")
            else:
                ok.append(row)
        direction = _STAGE_TARGET.get(target)
        if direction and ok:
            pending = _pending_transfers(self.conn, [r["id"] for r in ok], direction)
            for row in [r for r in ok if r["id"] in pending]:
                refused[row["id"]] = Refusal(
                    row["id"], "TRANSFERS_PENDING",
                    f"{target} is reached only when every {'stage-in' if direction == 'IN' else 'stage-out'} "
                    "item of the job is done; some are not")
            ok = [r for r in ok if r["id"] not in pending]
        # A retry: the owner's, or the server's of a child its retried parent had failed.
        retried = [r for r in ok if target in _RETRY_TARGETS and S(r["state"]) in RETRYABLE_STATES
                   and (role is Role.USER or S(r["state"]) in (S.FAILED, S.KILLED))]
        if retried:
            points = self.restart_points(retried)
            for row in retried:
                point = points[row["id"]]
                if point is not target and role is Role.USER:
                    refused[row["id"]] = Refusal(
                        row["id"], "RESTART_ELSEWHERE",
                        f"a retry of this job restarts it at {point}, not {target} (RetryJobs picks it)")
            ok = [r for r in ok if r["id"] not in refused]
            retried = [r for r in retried if r["id"] not in refused]
            if retried:
                values = self._retry_values(retried, target, values)
        return ok, refused, retried, values

    def _apply(self, rows: list[dict[str, Any]], target: JobState, *, message: str = "",
               data: dict[str, Any] | None = None, values: dict[int, dict[str, Any]] | None = None,
               data_by_job: dict[int, dict[str, Any]] | None = None,
               times: dict[int, datetime] | None = None, defer: frozenset[int] | set[int] = frozenset()) -> None:
        """Move `rows` (checked by move) to `target`, then settle each one."""
        if target is S.RUNNING:
            # Nothing follows RUNNING on its own (core/states.automatic_step): neither the
            # app's hooks nor pending transfers can change the path, so neither is read.
            rules: dict[int, AppRules] = {}
            pending: dict[str, set[int]] = {"IN": set(), "OUT": set()}
        else:
            rules = self._app_rules(r["app_id"] for r in rows)
            pending = _pending_transfer_directions(self.conn, [r["id"] for r in rows if may_have_transfers(r)])
        stage_in, stage_out = pending["IN"], pending["OUT"]
        updates: dict[str, list[dict[str, Any]]] = defaultdict(list)
        finished, failed, resting_post = [], [], []
        no_rules = _NO_RULES
        # Jobs alike in app, pending transfers and run count take the same path; the
        # path and its event data are computed once and shared (events are written, never
        # modified, so sharing the data dict is safe and lets COPY encode it once).
        paths: dict[tuple[int, bool, bool, int], tuple[JobState, dict[str, Any] | None]] = {}
        event_row = event_log.job_event
        now = self.now
        for row in rows:
            job_id = row["id"]
            key = (row["app_id"], job_id in stage_in, job_id in stage_out, row["run_count"])
            settled = paths.get(key)
            if settled is None:
                rule = rules.get(row["app_id"]) or no_rules
                ctx = StepContext(
                    has_stage_in=key[1], has_stage_out=key[2],
                    has_preprocess=rule.has_preprocess, has_postprocess=rule.has_postprocess,
                    has_error_hook=rule.has_error_hook, has_timeout_hook=rule.has_timeout_hook,
                    run_count=row["run_count"], max_retries=rule.max_retries,
                    restart_on_error=rule.restart_on_error, restart_on_timeout=rule.restart_on_timeout)
                path = [target, *settle(target, ctx)]
                shared = dict(data or {})
                if len(path) > 1:
                    shared["via"] = [str(s) for s in path[:-1]]
                settled = paths[key] = (path[-1], shared or None)
            final, event_data = settled
            if data_by_job and job_id in data_by_job:
                event_data = {**(event_data or {}), **data_by_job[job_id]}
            extra = values.get(job_id, _NO_VALUES) if values else _NO_VALUES
            if extra.get("return_code") is not None:
                event_data = dict(event_data or {})
                event_data.setdefault("return_code", extra["return_code"])
            final_name = str(final)
            param = {"b_id": job_id, "b_message": message}
            when = now
            if times:  # then every row of the call carries its own state_time
                if job_id in times:
                    when = event_time(times[job_id], row.get("state_time"), now)
                param["b_state_time"] = when
            self.event_rows.append(event_row(row["owner_id"], row["site_id"], job_id, row["state"], final_name, when,
                                             event_data, message, now))
            for k, v in extra.items():
                param["b_" + k] = v
            if self.deferred:
                held = self.deferred.pop(job_id, None)
                if held is not None:
                    # The RUNNING write held back for this job: its extra columns (run_count)
                    # go with this write; what this move sets itself (state time, message,
                    # the lease's session) is this move's.
                    for k, v in held.items():
                        if k not in _DEFERRED_OWN:
                            param.setdefault(k, v)
            if job_id in defer:
                self.deferred[job_id] = param
            else:
                updates[final_name].append(param)
            self.changed[job_id] = final_name
            if final is S.JOB_FINISHED:
                finished.append(job_id)
            elif final is S.FAILED or final is S.KILLED:
                failed.append(row)
            elif final is S.POSTPROCESSED:
                resting_post.append(job_id)
            row["state"] = final_name
        for state, params in updates.items():
            self._write(state, params)
        if resting_post:
            self._release_stage_out(resting_post)
        if finished or failed:
            self._cascade(finished, failed)

    def write_deferred(self) -> None:
        """Write the RUNNING rows held back by move's `defer` that no later move took."""
        if self.deferred:
            params, self.deferred = list(self.deferred.values()), {}
            self._write(str(S.RUNNING), params)

    def _write(self, state: str, params: list[dict[str, Any]]) -> None:
        """Set `state` (and per-row message and extra columns) on the rows of `params`.

        Rows sharing the same values (the usual bulk case: one message, no extras) are
        written by one UPDATE per value set; many distinct value sets go out as one
        UPDATE ... FROM unnest(arrays) on PostgreSQL or one executemany otherwise.
        Rows with different extra columns (a deferred write's run_count) are written
        apart: a column one row sets is never set to NULL on another.
        """
        first = params[0].keys()
        if any(p.keys() != first for p in params):
            shapes: dict[frozenset[str], list[dict[str, Any]]] = defaultdict(list)
            for p in params:
                shapes[frozenset(p)].append(p)
            for same in shapes.values():
                self._write(state, same)
            return
        extra_keys = sorted({k for p in params for k in p} - {"b_id", "b_message"})
        keys = ["b_message", *extra_keys]
        groups: dict[tuple[Any, ...], list[int]] | None = defaultdict(list)
        try:
            for p in params:
                groups[tuple(p.get(k) for k in keys)].append(p["b_id"])  # type: ignore[index]
        except TypeError:  # an unhashable value (JSON): no grouping
            groups = None
        fixed: dict[str, Any] = {"state": state, "state_time": self.now, "update_time": self.now}
        if state != S.RUNNING:
            fixed["session_id"] = None
            fixed["lease_expire_time"] = None
        for key in extra_keys:  # a caller's explicit value wins over the defaults above
            fixed.pop(key[2:], None)
        dialect = self.conn.dialect.name
        # PostgreSQL, a move that may cascade: the UPDATE returns which of its jobs have
        # children, so the cascade looks for none of a childless job's (one round trip
        # less per launcher report). Its snapshot is as late as that look's would be for
        # anything that matters: the rows are locked, and a child created now waits for
        # their locks (its parent link's foreign key check) until this transaction ends.
        childless = dialect == "postgresql" and state in _CASCADING
        if groups is not None and (len(groups) == 1 or (
                len(groups) <= _MAX_GROUPS and len(params) >= _MIN_GROUP_ROWS * len(groups))):
            for group_values, ids in groups.items():
                columns = {**fixed, "state_message": group_values[0],
                           **{k[2:]: v for k, v in zip(extra_keys, group_values[1:], strict=True)}}
                names = tuple(columns)
                stmt = _UPDATES.get((dialect, (*names, "+childless" if childless else "")))
                if stmt is None:  # built once per set of columns: see store/leases._STATEMENTS
                    stmt = update(jobs).where(ids_param(jobs.c.id, "w_ids", dialect)) \
                        .values({name: bindparam("w_" + name, type_=jobs.c[name].type) for name in names})
                    if childless:
                        stmt = stmt.returning(jobs.c.id, _HAS_CHILDREN)
                    _UPDATES[(dialect, (*names, "+childless" if childless else ""))] = stmt
                driver = driver_statement(("transitions.update", *names, "+childless" if childless else ""),
                                          lambda: stmt, self.conn.dialect, tag=self.tag)
                params = {"w_" + name: _driver_value(name, value) for name, value in columns.items()}
                params["w_ids"] = array_text(ids) if dialect == "postgresql" else ids_value(ids, dialect)
                result = self._driver_rows(driver, params, childless)
                if childless:
                    self.childless.update(r[0] for r in result if not r[1])
            return
        for p in params:
            for k in extra_keys:
                p.setdefault(k, None)
        if dialect == "postgresql" and all(isinstance(jobs.c[k[2:]].type, _ARRAY_SAFE) for k in extra_keys):
            self._write_unnest(fixed, extra_keys, params, childless)
            return
        stmt = _UPDATES.get((dialect, ("*many", *fixed, *extra_keys)))
        if stmt is None:
            values: dict[str, Any] = {name: bindparam("f_" + name, type_=jobs.c[name].type) for name in fixed}
            values["state_message"] = bindparam("b_message")
            for key in extra_keys:
                values[key[2:]] = bindparam(key, type_=jobs.c[key[2:]].type)
            stmt = _UPDATES[(dialect, ("*many", *fixed, *extra_keys))] = \
                update(jobs).where(jobs.c.id == bindparam("b_id")).values(**values)
        for p in params:
            for name, value in fixed.items():
                p["f_" + name] = value
        if dialect == "sqlite":
            for key in extra_keys:
                if key[2:] in _JSON_COLUMNS:
                    for p in params:
                        p[key] = dumps(p[key])
            driver_executemany(self.conn, driver_statement(("transitions.update_many", *fixed, *extra_keys),
                                                           lambda: stmt, self.conn.dialect), params)
            return
        self._send_unsent()
        self.conn.execute(stmt, params)

    def _write_unnest(self, fixed: dict[str, Any], extra_keys: list[str], params: list[dict[str, Any]],
                      childless: bool = False) -> None:
        """One UPDATE joined to per-row arrays: `UPDATE jobs SET ... FROM unnest(:ids,
        :messages, ...) AS v WHERE jobs.id = v.id` (PostgreSQL); with `childless`, it
        returns which jobs have children (see _write)."""
        names = ["b_id", "b_message", *extra_keys]
        shape = ("*unnest", *(k if v is not None else k + "=NULL" for k, v in fixed.items()), *extra_keys,
                 "+childless" if childless else "")
        stmt = _UPDATES.get(("postgresql", shape))
        if stmt is None:  # built once per shape (see store/leases._STATEMENTS)
            dialect = self.conn.dialect
            types = [BigInteger(), Text(), *(jobs.c[k[2:]].type for k in extra_keys)]
            arrays = [f"CAST(:{n} AS {t.compile(dialect=dialect)}[])" for n, t in zip(names, types, strict=True)]
            aliases = [f"v{i}" for i in range(len(names))]
            sets = [f"{name} = :f_{name}" if value is not None else f"{name} = NULL" for name, value in fixed.items()]
            sets.append("state_message = v.v1")
            sets += [f"{k[2:]} = v.v{i + 2}" for i, k in enumerate(extra_keys)]
            # The ids twice: joined to the arrays, and as `jobs.id = ANY(ids)`, which bounds
            # the jobs side to a lookup in pk_jobs whatever the join. Without it a generic
            # plan (leases.GENERIC_PLANS; the arrays' length guessed) may join all of jobs
            # to them: a sequential scan, or with those off a full scan of pk_jobs.
            stmt = _UPDATES[("postgresql", shape)] = text(
                f"UPDATE jobs SET {', '.join(sets)} FROM unnest({', '.join(arrays)}) AS v({', '.join(aliases)}) "
                f"WHERE jobs.id = v.v0 AND jobs.id = ANY({arrays[0]})"
                + (" RETURNING jobs.id, EXISTS (SELECT 1 FROM job_parents WHERE job_parents.parent_id = jobs.id)"
                   if childless else ""))
        bind = {n: array_text([p[n] for p in params]) for n in names}
        bind.update({f"f_{k}": v for k, v in fixed.items() if v is not None})
        driver = driver_statement(("transitions.update_each", shape), lambda: stmt, self.conn.dialect, tag=self.tag)
        result = self._driver_rows(driver, bind, childless)
        if childless:
            self.childless.update(r[0] for r in result if not r[1])

    def _cascade(self, finished: list[int], failed: list[dict[str, Any]]) -> None:
        """Release children whose parents are all done; fail children of failed parents
        unless their policy ignores parent failures (the event names the parent)."""
        done_parents = list(finished)
        fail_children: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
        if failed:
            parent_state = {r["id"]: r["state"] for r in failed}
            seen: set[int] = set()
            for row in self._children(list(parent_state)):
                if row["on_parent_failure"] == "IGNORE":
                    done_parents.append(-row["id"])  # one decrement per failed parent link
                elif row["id"] not in seen:
                    seen.add(row["id"])
                    parent = row.pop("parent_id")
                    fail_children[(parent, parent_state[parent])].append(row)
        release: list[dict[str, Any]] = []
        if done_parents:
            counts: dict[int, int] = defaultdict(int)
            real_parents = [p for p in done_parents if p > 0]
            for row in self._children(real_parents):
                counts[row["id"]] += 1
            for neg in (p for p in done_parents if p < 0):
                counts[-neg] += 1
            if counts:
                dialect = self.conn.dialect.name
                by_count: dict[int, list[int]] = defaultdict(list)
                for child_id, n in counts.items():
                    by_count[n].append(child_id)
                for n, child_ids in by_count.items():
                    self.conn.execute(update(jobs).where(id_in(jobs.c.id, child_ids, dialect))
                                      .values(pending_parents=jobs.c.pending_parents - n))
                rows = self.conn.execute(
                    select(*ENGINE_COLUMNS).where(id_in(jobs.c.id, list(counts), dialect), jobs.c.pending_parents <= 0,
                                                  jobs.c.state == S.AWAITING_PARENTS))
                release = [dict(r._mapping) for r in rows]
        fail_ids = {r["id"] for rows in fail_children.values() for r in rows}
        release = [r for r in release if r["id"] not in fail_ids]
        for (parent, state), children in fail_children.items():
            self.move(children, S.FAILED, Role.SERVER, message=f"parent job {parent} is {state}",
                      data={"parent_id": parent, "parent_state": state})
        if release:
            self.move(release, S.READY, Role.SERVER, message="all parents finished")

    def parents_deleted(self, parents: list[dict[str, Any]]) -> None:
        """Children waiting on these parents, which are being deleted, follow their
        parent-failure policy (the event names the parent as DELETED)."""
        self._cascade([], [{"id": p["id"], "state": "DELETED"} for p in parents])

    def _children(self, parent_ids: list[int]) -> list[dict[str, Any]]:
        """Children still waiting, one row per (child, parent) link."""
        parent_ids = [p for p in parent_ids if p not in self.childless]
        if not parent_ids:
            return []
        dialect = self.conn.dialect.name
        stmt = _statement("children", dialect, lambda d: select(*ENGINE_COLUMNS, job_parents.c.parent_id)
                          .join(job_parents, job_parents.c.child_id == jobs.c.id)
                          .where(ids_param(job_parents.c.parent_id, "t_ids", d), jobs.c.state == S.AWAITING_PARENTS)
                          .order_by(jobs.c.id))
        return [dict(r._mapping) for r in self.conn.execute(stmt, {"t_ids": ids_value(parent_ids, dialect)})]

    def _release_stage_out(self, job_ids: list[int]) -> None:
        """AWAITING_JOB -> PENDING for the stage-out items of jobs that came to rest in
        POSTPROCESSED, one transfer_state event each, with the job's own transition."""
        c = transfer_items.c
        rows = self.conn.execute(
            update(transfer_items).where(id_in(c.job_id, job_ids, self.conn.dialect.name), c.direction == "OUT",
                                         c.state == "AWAITING_JOB")
            .values(state="PENDING", update_time=self.now).returning(c.id, c.job_id, c.owner_id, c.site_id)).all()
        self.event_rows.extend(_item_event(r, "AWAITING_JOB", "PENDING", self.now, "job POSTPROCESSED: stage-out may start")
                               for r in sorted(rows))

    # ------------------------------------------------------------------------ retry

    def restart_points(self, rows: list[dict[str, Any]]) -> dict[int, JobState]:
        """Where each retryable job restarts (core/states.restart_point), from the state
        it failed or was killed in (the last event that brought it where it is)."""
        ids = [r["id"] for r in rows]
        entered = _entry_events(self.conn, ids)
        unfinished = _unfinished_parents(self.conn, ids)
        out: dict[int, JobState] = {}
        for row in rows:
            state = S(row["state"])
            if state in (S.RUN_ERROR, S.RUN_TIMEOUT):
                failed_from = state
            else:
                failed_from = S(entered[row["id"]][0]) if row["id"] in entered else S.CREATED
            out[row["id"]] = restart_point(failed_from, inputs_gone=row.get("cleaned_time") is not None,
                                           pending_parents=unfinished.get(row["id"], 0))
        return out

    def _retry_values(self, rows: list[dict[str, Any]], target: JobState,
                      values: dict[int, dict[str, Any]] | None) -> dict[int, dict[str, Any]]:
        """Column values a retry sets: a job waiting on its parents again counts them anew."""
        out = dict(values or {})
        if target is S.AWAITING_PARENTS:
            unfinished = _unfinished_parents(self.conn, [r["id"] for r in rows])
            for row in rows:
                out[row["id"]] = {**out.get(row["id"], {}), "pending_parents": unfinished.get(row["id"], 0)}
        return out

    def _after_retry(self, rows: list[dict[str, Any]], target: JobState) -> None:
        """A retried job's transfers start again where it restarts (failed items, or all
        stage-in items when it stages in again), and the children its failure failed
        wait on it again."""
        ids = [r["id"] for r in rows]
        c = transfer_items.c
        dialect = self.conn.dialect.name
        resets: list[tuple[Any, str]] = [(and_(c.direction == "OUT", c.state == "ERROR"), "AWAITING_JOB")]
        if target is S.READY:
            resets.append((and_(c.direction == "IN", c.state != "PENDING"), "PENDING"))
        for cond, new_state in resets:
            changed = self.conn.execute(
                update(transfer_items).where(id_in(c.job_id, ids, dialect), cond)
                .values(state=new_state, error="", task_id="", update_time=self.now)
                .returning(c.id, c.job_id, c.owner_id, c.site_id, c.state)).all()
            self.event_rows.extend(_item_event(r, "", new_state, self.now, "job retried") for r in sorted(changed))
        if target is S.POSTPROCESSED:
            self._release_stage_out(ids)
        children = self._children_failed_by(ids)
        if children:
            self.move(children, S.AWAITING_PARENTS, Role.SERVER, message="a parent job was retried")

    def _children_failed_by(self, parent_ids: list[int]) -> list[dict[str, Any]]:
        """FAILED children whose failure came from one of `parent_ids` (their failure event
        names the parent)."""
        rows = self.conn.execute(
            select(*ENGINE_COLUMNS).join(job_parents, job_parents.c.child_id == jobs.c.id)
            .where(id_in(job_parents.c.parent_id, parent_ids, self.conn.dialect.name), jobs.c.state == S.FAILED)
            .order_by(jobs.c.id)).all()
        candidates = {r.id: dict(r._mapping) for r in rows}
        if not candidates:
            return []
        entered = _entry_events(self.conn, list(candidates))
        wanted = set(parent_ids)
        return [row for job_id, row in candidates.items()
                if job_id in entered and (entered[job_id][1] or {}).get("parent_id") in wanted]

    def _driver_rows(self, driver: Any, params: dict[str, Any], rows: bool) -> list[Any]:
        """PostgreSQL: run an UPDATE now, or while flush collects, add it to the statements
        sent with the event insert when its rows (`rows`) are not needed."""
        if self._unsent is not None and not rows:
            self._unsent.append((driver, params))
            return []
        self._send_unsent()
        return driver_rows(self.conn, driver, params)

    def _send_unsent(self) -> None:
        """What flush collected, sent now: a statement that runs at once comes after it."""
        if self._unsent:
            self._answers += driver_batch(self.conn, self._unsent, dicts=True)
            self._unsent = []

    def flush(self, before: list[tuple[Any, dict[str, Any]]] = ()) -> list[list[dict[str, Any]]]:
        """Write the deferred rows and insert the events. `before` (PostgreSQL): statements
        run first, in the same round trip as the rest where they can be; returns their
        rows (dicts)."""
        self._answers = []
        if self.conn.dialect.name == "postgresql":
            self._unsent = list(before)
        try:
            self.write_deferred()
            unsent = self._unsent or []
        finally:
            self._unsent = None
        self._answers += event_log.append(self.conn, self.event_rows, unsent)
        self.event_rows = []
        return self._answers[:len(before)]


def event_time(reported: datetime, previous: datetime | None, now: datetime) -> datetime:
    """A reported time, bounded: not before the job's previous event (`previous`, its
    state_time) and not later than the server's clock plus MAX_CLOCK_SKEW."""
    reported = _aware(reported)
    if previous is not None:
        reported = max(reported, _aware(previous))
    return min(reported, now + MAX_CLOCK_SKEW)


def _aware(dt: datetime) -> datetime:
    """SQLite returns naive datetimes; everything stored is UTC."""
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


def _item_event(row: Any, src: str, dst: str, now: datetime, message: str) -> dict[str, Any]:
    return {"owner_id": row.owner_id, "site_id": row.site_id, "job_id": row.job_id, "kind": event_log.TRANSFER_STATE,
            "subject_id": row.id, "from_state": src, "to_state": dst, "time": now, "message": message}


def _entry_events(conn: Connection, job_ids: list[int]) -> dict[int, tuple[str, dict[str, Any] | None]]:
    """(from_state, data) of each job's latest job_state event: how it got where it is."""
    if not job_ids:
        return {}
    e = events.c
    latest = (select(func.max(e.id)).where(id_in(e.job_id, job_ids, conn.dialect.name), e.kind == event_log.JOB_STATE)
              .group_by(e.job_id).scalar_subquery())
    rows = conn.execute(select(e.job_id, e.from_state, e.data).where(e.id.in_(latest)))
    return {r.job_id: (r.from_state, r.data) for r in rows}


def _unfinished_parents(conn: Connection, job_ids: list[int]) -> dict[int, int]:
    """How many parents of each job have not finished (JOB_FINISHED)."""
    if not job_ids:
        return {}
    parent = jobs.alias("parent")
    rows = conn.execute(
        select(job_parents.c.child_id, func.count()).join(parent, parent.c.id == job_parents.c.parent_id)
        .where(id_in(job_parents.c.child_id, job_ids, conn.dialect.name), parent.c.state != S.JOB_FINISHED)
        .group_by(job_parents.c.child_id))
    return {r[0]: r[1] for r in rows}


def legal(src: str, dst: JobState) -> bool:
    return is_legal(JobState(src), dst)


def is_final(state: str) -> bool:
    return JobState(state) in FINAL_STATES

