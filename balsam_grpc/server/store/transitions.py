"""Applies job state changes: validation against the table, the server's automatic
steps, one event per requested change, and the cascade to child jobs, all inside the
caller's transaction."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, select, update

from balsam_grpc.core.states import FINAL_STATES, JobState, StepContext, is_legal, settle
from balsam_grpc.server.store import events as event_log
from balsam_grpc.server.store.tables import apps, job_parents, jobs, transfer_items

S = JobState
# Columns of a job row the engine needs.
ENGINE_COLUMNS = (jobs.c.id, jobs.c.owner_id, jobs.c.site_id, jobs.c.app_id, jobs.c.state, jobs.c.run_count,
                  jobs.c.on_parent_failure, jobs.c.pending_parents, jobs.c.session_id)
_LEAVING_STAGE_IN = (S.READY,)
_LEAVING_STAGE_OUT = (S.POSTPROCESSED,)


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


def load_app_rules(conn: Connection, app_ids: Iterable[int]) -> dict[int, AppRules]:
    ids = sorted(set(app_ids))
    if not ids:
        return {}
    rows = conn.execute(select(apps.c.id, apps.c.hooks, apps.c.retry_policy).where(apps.c.id.in_(ids)))
    return {r.id: AppRules(dict(r._mapping)) for r in rows}


def _pending_transfers(conn: Connection, job_ids: list[int], direction: str) -> set[int]:
    if not job_ids:
        return set()
    rows = conn.execute(
        select(transfer_items.c.job_id).distinct()
        .where(transfer_items.c.job_id.in_(job_ids), transfer_items.c.direction == direction,
               transfer_items.c.state != "DONE"))
    return {r.job_id for r in rows}


class Transitioner:
    """Moves a set of jobs to a requested state within one transaction."""

    def __init__(self, conn: Connection, now: datetime) -> None:
        self.conn = conn
        self.now = now
        self.event_rows: list[dict[str, Any]] = []
        self.changed: dict[int, str] = {}  # job id -> final state, for callers' responses

    def apply(self, rows: list[dict[str, Any]], target: JobState, *, message: str = "",
              data: dict[str, Any] | None = None, values: dict[int, dict[str, Any]] | None = None) -> None:
        """Move `rows` (already validated as legal) to `target`, then settle each one.

        `values` holds extra column values per job id (return_code, error_tail, ...).
        """
        if not rows:
            return
        rules = load_app_rules(self.conn, (r["app_id"] for r in rows))
        ids = [r["id"] for r in rows]
        stage_in = _pending_transfers(self.conn, ids, "IN")
        stage_out = _pending_transfers(self.conn, ids, "OUT")
        updates: dict[str, list[dict[str, Any]]] = defaultdict(list)
        finished, failed = [], []
        for row in rows:
            rule = rules.get(row["app_id"]) or AppRules({})
            ctx = StepContext(
                has_stage_in=row["id"] in stage_in, has_stage_out=row["id"] in stage_out,
                has_preprocess=rule.has_preprocess, has_postprocess=rule.has_postprocess,
                has_error_hook=rule.has_error_hook, has_timeout_hook=rule.has_timeout_hook,
                run_count=row["run_count"], max_retries=rule.max_retries,
                restart_on_error=rule.restart_on_error, restart_on_timeout=rule.restart_on_timeout)
            path = [target, *settle(target, ctx)]
            final = path[-1]
            event_data = dict(data or {})
            if len(path) > 1:
                event_data["via"] = [str(s) for s in path[:-1]]
            extra = (values or {}).get(row["id"], {})
            if "return_code" in extra and extra["return_code"] is not None:
                event_data.setdefault("return_code", extra["return_code"])
            self.event_rows.append(event_log.job_event(
                row["owner_id"], row["site_id"], row["id"], row["state"], str(final), self.now,
                event_data or None, message))
            updates[str(final)].append({"b_id": row["id"], "b_message": message, **{f"b_{k}": v for k, v in extra.items()}})
            self.changed[row["id"]] = str(final)
            if final is S.JOB_FINISHED:
                finished.append(row["id"])
            elif final in (S.FAILED, S.KILLED):
                failed.append(row["id"])
            row["state"] = str(final)
        for state, params in updates.items():
            self._write(state, params)
        if finished or failed:
            self._cascade(finished, failed)

    def _write(self, state: str, params: list[dict[str, Any]]) -> None:
        extra_keys = sorted({k for p in params for k in p} - {"b_id", "b_message"})
        for p in params:
            for k in extra_keys:
                p.setdefault(k, None)
        values: dict[str, Any] = {"state": state, "state_time": self.now, "update_time": self.now,
                                  "state_message": bindparam("b_message")}
        for key in extra_keys:
            values[key[2:]] = bindparam(key)
        if state != S.RUNNING:
            values["session_id"] = None
            values["lease_expire_time"] = None
        stmt = update(jobs).where(jobs.c.id == bindparam("b_id")).values(**values)
        self.conn.execute(stmt, params)

    def _cascade(self, finished: list[int], failed: list[int]) -> None:
        """Release children whose parents are all done; fail children of failed parents
        unless their policy ignores parent failures."""
        done_parents = list(finished)
        fail_children: list[dict[str, Any]] = []
        if failed:
            rows = self._children(failed)
            seen: set[int] = set()
            for row in rows:
                if row["on_parent_failure"] == "IGNORE":
                    done_parents.append(-row["id"])  # one decrement per failed parent link
                elif row["id"] not in seen:
                    seen.add(row["id"])
                    fail_children.append(row)
        release: list[dict[str, Any]] = []
        if done_parents:
            counts: dict[int, int] = defaultdict(int)
            real_parents = [p for p in done_parents if p > 0]
            for row in self._children(real_parents):
                counts[row["id"]] += 1
            for neg in (p for p in done_parents if p < 0):
                counts[-neg] += 1
            if counts:
                self.conn.execute(
                    update(jobs).where(jobs.c.id == bindparam("b_id"))
                    .values(pending_parents=jobs.c.pending_parents - bindparam("b_n")),
                    [{"b_id": cid, "b_n": n} for cid, n in counts.items()])
                rows = self.conn.execute(
                    select(*ENGINE_COLUMNS).where(jobs.c.id.in_(list(counts)), jobs.c.pending_parents <= 0,
                                                  jobs.c.state == S.AWAITING_PARENTS))
                release = [dict(r._mapping) for r in rows]
        fail_ids = {r["id"] for r in fail_children}
        release = [r for r in release if r["id"] not in fail_ids]
        if fail_children:
            self.apply(fail_children, S.FAILED, message="a parent job failed or was killed")
        if release:
            self.apply(release, S.READY, message="all parents finished")

    def _children(self, parent_ids: list[int]) -> list[dict[str, Any]]:
        """Children still waiting, one row per (child, parent) link."""
        if not parent_ids:
            return []
        rows = self.conn.execute(
            select(*ENGINE_COLUMNS).join(job_parents, job_parents.c.child_id == jobs.c.id)
            .where(job_parents.c.parent_id.in_(parent_ids), jobs.c.state == S.AWAITING_PARENTS))
        return [dict(r._mapping) for r in rows]

    def flush(self) -> None:
        event_log.append(self.conn, self.event_rows)
        self.event_rows = []


def legal(src: str, dst: JobState) -> bool:
    return is_legal(JobState(src), dst)


def is_final(state: str) -> bool:
    return JobState(state) in FINAL_STATES

