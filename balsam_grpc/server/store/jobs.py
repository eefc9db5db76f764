"""Jobs: selection, bulk creation, changes and deletion, all scoped to one owner."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from sqlalchemy import Connection, ColumnElement, delete, exists, func, insert, select, tuple_, update
from sqlalchemy.exc import IntegrityError

from balsam_grpc.server.store.bulk import insert_rows

from balsam_grpc.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from balsam_grpc.core.states import ACTIVE_STATES, JobState, StepContext, illegal_reason, settle
from balsam_grpc.server.store import events as event_log
from balsam_grpc.server.store.query import contains_substring, tags_contain, tags_exclude
from balsam_grpc.server.store.tables import apps, job_parents, jobs, transfer_items
from balsam_grpc.server.store.transitions import (
    ENGINE_COLUMNS,
    AppRules,
    Transitioner,
    _get,
    legal,
    load_app_rules,
)

S = JobState
CHUNK = 900  # stays under SQLite's bound-parameter limits for IN lists


@dataclass
class JobQuery:
    owner_id: int
    site_scope: int | None = None  # a site token sees only its site
    ids: list[int] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    exclude_states: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    exclude_tags: dict[str, str] = field(default_factory=dict)
    app_ids: list[int] = field(default_factory=list)
    app_names: list[str] = field(default_factory=list)
    site_ids: list[int] = field(default_factory=list)
    parent_ids: list[int] = field(default_factory=list)
    workdir_contains: str = ""
    create_start: datetime | None = None
    create_end: datetime | None = None
    update_start: datetime | None = None
    update_end: datetime | None = None
    batch_job_ids: list[int] = field(default_factory=list)
    session_id: str = ""

    def is_empty(self) -> bool:
        return not any((self.ids, self.states, self.exclude_states, self.tags, self.exclude_tags, self.app_ids,
                        self.app_names, self.site_ids, self.parent_ids, self.workdir_contains, self.create_start,
                        self.create_end, self.update_start, self.update_end, self.batch_job_ids, self.session_id))


def conditions(q: JobQuery) -> list[ColumnElement[bool]]:
    c = jobs.c
    conds: list[ColumnElement[bool]] = [c.owner_id == q.owner_id]
    if q.site_scope is not None:
        conds.append(c.site_id == q.site_scope)
    if q.ids:
        conds.append(c.id.in_(q.ids))
    if q.states:
        conds.append(c.state.in_(q.states))
    if q.exclude_states:
        conds.append(c.state.not_in(q.exclude_states))
    if q.tags:
        conds.append(tags_contain(c.tags, q.tags))
    if q.exclude_tags:
        conds.append(tags_exclude(c.tags, q.exclude_tags))
    if q.app_ids:
        conds.append(c.app_id.in_(q.app_ids))
    if q.app_names:
        conds.append(c.app_id.in_(select(apps.c.id).where(apps.c.owner_id == q.owner_id,
                                                            apps.c.name.in_(q.app_names))))
    if q.site_ids:
        conds.append(c.site_id.in_(q.site_ids))
    if q.parent_ids:
        conds.append(exists().where(job_parents.c.child_id == c.id, job_parents.c.parent_id.in_(q.parent_ids)))
    if q.workdir_contains:
        conds.append(contains_substring(c.workdir, q.workdir_contains))
    for col, start, end in ((c.create_time, q.create_start, q.create_end), (c.update_time, q.update_start, q.update_end)):
        if start is not None:
            conds.append(col >= start)
        if end is not None:
            conds.append(col < end)
    if q.batch_job_ids:
        conds.append(c.batch_job_id.in_(q.batch_job_ids))
    if q.session_id:
        conds.append(c.session_id == q.session_id)
    return conds


# Sort keys users may order by; ties always break on id.
ORDER_COLUMNS = {"id": jobs.c.id, "create_time": jobs.c.create_time, "update_time": jobs.c.update_time,
                 "state_time": jobs.c.state_time, "priority": jobs.c.priority, "workdir": jobs.c.workdir}


def parse_order(order_by: str) -> list[tuple[str, bool]]:
    keys: list[tuple[str, bool]] = []
    for part in filter(None, (p.strip() for p in order_by.split(","))):
        desc = part.startswith("-")
        name = part.lstrip("-+").strip()
        if name.endswith(" desc"):
            name, desc = name[:-5].strip(), True
        if name not in ORDER_COLUMNS:
            raise InvalidArgument(f"order_by: unknown key {name!r}; use {', '.join(ORDER_COLUMNS)} "
                                  "(prefix '-' for descending)", field="order_by")
        keys.append((name, desc))
    if not any(k == "id" for k, _ in keys):
        keys.append(("id", keys[-1][1] if keys else False))
    return keys


def _after(keys: list[tuple[str, bool]], last: list[Any]) -> ColumnElement[bool]:
    """Keyset condition: rows strictly after `last` in the given mixed-direction order."""
    from sqlalchemy import and_, or_

    clauses = []
    for i, (name, desc) in enumerate(keys):
        col = ORDER_COLUMNS[name]
        value = last[i]
        eqs = [ORDER_COLUMNS[keys[j][0]] == last[j] for j in range(i)]
        clauses.append(and_(*eqs, col < value if desc else col > value))
    return or_(*clauses)


def list_jobs(conn: Connection, q: JobQuery, order: list[tuple[str, bool]], after: list[Any] | None,
              limit: int, columns: tuple[Any, ...] | None = None) -> list[dict[str, Any]]:
    conds = conditions(q)
    if after is not None:
        if len(after) != len(order):
            raise InvalidArgument("page_token does not match order_by", reason="INVALID_PAGE_TOKEN", field="page_token")
        after = [_coerce(name, v) for (name, _), v in zip(order, after, strict=True)]
        conds.append(_after(order, after))
    sort = [ORDER_COLUMNS[n].desc() if d else ORDER_COLUMNS[n] for n, d in order]
    stmt = select(*(columns or (jobs,))).where(*conds).order_by(*sort).limit(limit)
    return [dict(r._mapping) for r in conn.execute(stmt)]


def _coerce(name: str, value: Any) -> Any:
    if name.endswith("_time") and isinstance(value, str):
        return datetime.fromisoformat(value)
    return value


def page_keys(row: dict[str, Any], order: list[tuple[str, bool]]) -> list[Any]:
    return [row[name].isoformat() if isinstance(row[name], datetime) else row[name] for name, _ in order]


GROUP_COLUMNS = {"state": jobs.c.state, "site": jobs.c.site_id, "app": jobs.c.app_id}


def count_jobs(conn: Connection, q: JobQuery, group_by: list[str]) -> tuple[int, list[dict[str, Any]]]:
    conds = conditions(q)
    if not group_by:
        return conn.execute(select(func.count()).select_from(jobs).where(*conds)).scalar_one(), []
    cols = [GROUP_COLUMNS[g].label(g) for g in group_by]
    rows = conn.execute(select(*cols, func.count().label("count")).where(*conds).group_by(*cols).order_by(*cols))
    groups = [dict(r._mapping) for r in rows]
    return sum(g["count"] for g in groups), groups


def get_job(conn: Connection, owner_id: int, job_id: int, site_scope: int | None = None,
            for_update: bool = False) -> dict[str, Any]:
    stmt = select(jobs).where(*conditions(JobQuery(owner_id=owner_id, site_scope=site_scope, ids=[job_id])))
    if for_update:
        stmt = stmt.with_for_update()
    row = conn.execute(stmt).first()
    if row is None:
        raise NotFound(f"job {job_id} not found")
    return dict(row._mapping)


def parents_of(conn: Connection, job_ids: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i in range(0, len(job_ids), CHUNK):
        rows = conn.execute(select(job_parents.c.child_id, job_parents.c.parent_id)
                            .where(job_parents.c.child_id.in_(job_ids[i:i + CHUNK])).order_by(job_parents.c.parent_id))
        for r in rows:
            out.setdefault(r.child_id, []).append(r.parent_id)
    return out


# ---------------------------------------------------------------------------- create

def _resolve_apps(conn: Connection, owner_id: int, site_scope: int | None, specs: list[dict[str, Any]]) -> None:
    """Fill app_id/site_id of each spec and attach the app row as spec['_app']."""
    by_id = {s["app_id"] for s in specs if s["app_id"]}
    by_name = {(s["site_id"], s["app_name"]) for s in specs if not s["app_id"]}
    found: dict[int, dict[str, Any]] = {}
    cond = [apps.c.owner_id == owner_id]
    if site_scope is not None:
        cond.append(apps.c.site_id == site_scope)
    if by_id:
        for r in conn.execute(select(apps).where(*cond, apps.c.id.in_(sorted(by_id)))):
            found[r.id] = dict(r._mapping)
    named: dict[tuple[int, str], dict[str, Any]] = {}
    if by_name:
        rows = conn.execute(select(apps).where(*cond, tuple_(apps.c.site_id, apps.c.name).in_(sorted(by_name))))
        for r in rows:
            named[(r.site_id, r.name)] = dict(r._mapping)
    for i, spec in enumerate(specs):
        app = found.get(spec["app_id"]) if spec["app_id"] else named.get((spec["site_id"], spec["app_name"]))
        if app is None:
            what = f"app {spec['app_id']}" if spec["app_id"] else f"app {spec['app_name']!r} at site {spec['site_id']}"
            raise NotFound(f"jobs[{i}]: {what} not found; register it with 'balsamctl app sync'",
                           reason="REFERENCE_NOT_FOUND", field=f"jobs[{i}].app_id")
        spec["app_id"], spec["site_id"], spec["_app"] = app["id"], app["site_id"], app


_PARSERS = {
    "INT": int, "FLOAT": float, "PATH": str, "STRING": str, "": str,
    "BOOL": lambda v: {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[v.lower()],
}


def _check_parameters(i: int, spec: dict[str, Any], app: dict[str, Any]) -> None:
    declared = {p["name"]: p for p in app.get("parameters") or []}
    params = spec["parameters"]
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise InvalidArgument(f"jobs[{i}].parameters: app {app['name']!r} has no parameter {unknown[0]!r}; "
                              f"it takes {', '.join(sorted(declared)) or 'none'}", field=f"jobs[{i}].parameters")
    for name, decl in declared.items():
        if name not in params:
            default = _get(decl, "default_value", "")
            if _get(decl, "required", False):
                raise InvalidArgument(f"jobs[{i}].parameters: app {app['name']!r} needs parameter {name!r}",
                                      field=f"jobs[{i}].parameters")
            if default:
                params[name] = default
            continue
        kind = str(_get(decl, "type", "") or "").removeprefix("PARAMETER_TYPE_")
        try:
            _PARSERS.get(kind, str)(params[name])
        except (ValueError, KeyError):
            raise InvalidArgument(f"jobs[{i}].parameters[{name!r}]: {params[name]!r} is not a valid {kind.lower()}",
                                  field=f"jobs[{i}].parameters") from None


def _transfer_rows(i: int, spec: dict[str, Any], app: dict[str, Any], now: datetime) -> list[dict[str, Any]]:
    slots = {s["name"]: s for s in app.get("transfers") or []}
    given = spec["transfers"]
    for name in given:
        if name not in slots:
            raise InvalidArgument(f"jobs[{i}].transfers: app {app['name']!r} has no transfer slot {name!r}",
                                  field=f"jobs[{i}].transfers")
    rows = []
    for name, slot in slots.items():
        if name not in given:
            if _get(slot, "required", False):
                raise InvalidArgument(f"jobs[{i}].transfers: slot {name!r} is required (\"location:/path\")",
                                      field=f"jobs[{i}].transfers")
            continue
        alias, sep, remote = given[name].partition(":")
        if not sep or not alias or not remote:
            raise InvalidArgument(f"jobs[{i}].transfers[{name!r}]: {given[name]!r} must look like location:/path",
                                  field=f"jobs[{i}].transfers")
        direction = str(_get(slot, "direction", "")).removeprefix("TRANSFER_DIRECTION_")
        rows.append({"owner_id": spec["owner_id"], "site_id": spec["site_id"], "direction": direction, "slot": name,
                     "location_alias": alias, "remote_path": remote,
                     "local_path": _get(slot, "local_path", "") or name,
                     "recursive": bool(_get(slot, "recursive", False)),
                     "state": "PENDING" if direction == "IN" else "AWAITING_JOB",
                     "create_time": now, "update_time": now})
    return rows


_NEW_JOB_DEFAULTS = {"return_code": None, "error_tail": "", "batch_job_id": None, "session_id": None,
                     "lease_generation": 0, "lease_expire_time": None, "run_count": 0}


def create_jobs(conn: Connection, owner_id: int, site_scope: int | None, specs: list[dict[str, Any]],
                now: datetime) -> list[dict[str, Any]]:
    """Create jobs atomically. Specs are validated dicts of job columns plus app_name,
    parent_ids and transfers. Returns the created rows in request order."""
    _resolve_apps(conn, owner_id, site_scope, specs)
    seen: dict[tuple[int, str], int] = {}
    for i, spec in enumerate(specs):
        key = (spec["site_id"], spec["workdir"])
        if key in seen:
            raise InvalidArgument(f"jobs[{i}].workdir {spec['workdir']!r} repeats jobs[{seen[key]}] at the same site",
                                  field=f"jobs[{i}].workdir")
        seen[key] = i
    parent_ids = sorted({p for s in specs for p in s["parent_ids"]})
    parents: dict[int, str] = {}
    for i in range(0, len(parent_ids), CHUNK):
        chunk = parent_ids[i:i + CHUNK]
        for r in conn.execute(select(jobs.c.id, jobs.c.state).where(jobs.c.owner_id == owner_id, jobs.c.id.in_(chunk))):
            parents[r.id] = r.state
    transfers: list[list[dict[str, Any]]] = []
    initial: list[tuple[str, str]] = []
    for i, spec in enumerate(specs):
        spec["owner_id"] = owner_id
        app = spec.pop("_app")
        _check_parameters(i, spec, app)
        transfers.append(_transfer_rows(i, spec, app, now))
        missing = [p for p in spec["parent_ids"] if p not in parents]
        if missing:
            raise NotFound(f"jobs[{i}].parent_ids: job {missing[0]} not found", reason="REFERENCE_NOT_FOUND",
                           field=f"jobs[{i}].parent_ids")
        states = [parents[p] for p in spec["parent_ids"]]
        broken = [s for s in states if s in (S.FAILED, S.KILLED)]
        if broken and spec["on_parent_failure"] != "IGNORE":
            initial.append((S.FAILED, "a parent job failed or was killed before this job was created"))
            spec["pending_parents"] = 0
            continue
        pending = sum(1 for s in states if s not in (S.JOB_FINISHED, S.FAILED, S.KILLED))
        spec["pending_parents"] = pending
        initial.append((S.AWAITING_PARENTS, "") if pending else (S.READY, ""))
    rows = []
    via: list[list[str]] = []
    rules = load_app_rules(conn, (s["app_id"] for s in specs))
    for spec, ts, (state, message) in zip(specs, transfers, initial, strict=True):
        # Creation is the CREATED -> initial transition; steps with no work are taken at once.
        rule = rules.get(spec["app_id"]) or AppRules({})
        ctx = StepContext(has_stage_in=any(t["direction"] == "IN" for t in ts),
                          has_stage_out=any(t["direction"] == "OUT" for t in ts),
                          has_preprocess=rule.has_preprocess)
        path = [S(state), *settle(S(state), ctx)]
        via.append([str(p) for p in path[:-1]])
        row = {k: v for k, v in spec.items() if k != "app_name"}
        row.update(state=str(path[-1]), state_message=message, create_time=now, update_time=now, state_time=now,
                   **_NEW_JOB_DEFAULTS)
        rows.append(row)
    try:
        with conn.begin_nested():
            ids = insert_rows(conn, jobs, rows)
    except (IntegrityError, psycopg.errors.UniqueViolation) as exc:
        raise _workdir_conflict(conn, specs) from exc
    links = [{"child_id": jid, "parent_id": p} for jid, s in zip(ids, specs, strict=True) for p in set(s["parent_ids"])]
    if links:
        conn.execute(insert(job_parents), links)
    items = [dict(t, job_id=jid) for jid, ts in zip(ids, transfers, strict=True) for t in ts]
    if items:
        insert_rows(conn, transfer_items, items)
    event_rows = []
    for row, jid, steps in zip(rows, ids, via, strict=True):
        row["id"] = jid
        data = {"via": steps} if steps else None
        event_rows.append(event_log.job_event(owner_id, row["site_id"], jid, S.CREATED, row["state"], now, data,
                                              row["state_message"]))
    event_log.append(conn, event_rows)
    return rows


def _workdir_conflict(conn: Connection, specs: list[dict[str, Any]]) -> Exception:
    for i, spec in enumerate(specs):
        hit = conn.execute(select(jobs.c.id).where(jobs.c.site_id == spec["site_id"],
                                                   jobs.c.workdir == spec["workdir"])).first()
        if hit:
            return AlreadyExists(f"jobs[{i}].workdir {spec['workdir']!r} is already used by job {hit.id} at this site",
                                 field=f"jobs[{i}].workdir")
    return AlreadyExists("a job with the same workdir already exists at this site", field="workdir")


# ---------------------------------------------------------------------------- update

def check_transition(row: dict[str, Any], target: JobState) -> str | None:
    """Why a user may not move this job to `target`, or None when allowed."""
    if not legal(row["state"], target):
        return illegal_reason(S(row["state"]), target)
    if row["state"] == S.RUNNING and row.get("session_id") and target is not S.KILLED:
        return (f"job {row['id']} is leased by launcher session {row['session_id']}; only its launcher reports "
                "its run, a user can only kill it")
    return None


def update_jobs(conn: Connection, rows: list[dict[str, Any]], values: dict[str, Any], tags_merge: dict[str, str] | None,
                target: JobState | None, now: datetime, *, message: str = "", data: dict[str, Any] | None = None,
                validate_only: bool = False) -> tuple[list[int], dict[int, str]]:
    """Apply a patch to `rows`; returns (changed ids, {id: refusal message})."""
    refused: dict[int, str] = {}
    ok_rows = []
    for row in rows:
        why = check_transition(row, target) if target is not None and row["state"] != target else None
        if why:
            refused[row["id"]] = why
        else:
            ok_rows.append(row)
    if validate_only or not ok_rows:
        return [r["id"] for r in ok_rows], refused
    ids = [r["id"] for r in ok_rows]
    if values or tags_merge:
        if tags_merge:
            params = [{"b_id": r["id"], "b_tags": {**(r.get("tags") or {}), **tags_merge}} for r in ok_rows]
            from sqlalchemy import bindparam

            conn.execute(update(jobs).where(jobs.c.id == bindparam("b_id"))
                         .values(tags=bindparam("b_tags"), update_time=now, **values), params)
        else:
            for i in range(0, len(ids), CHUNK):
                conn.execute(update(jobs).where(jobs.c.id.in_(ids[i:i + CHUNK])).values(update_time=now, **values))
    movers = [r for r in ok_rows if target is not None and r["state"] != target]
    if movers:
        engine = Transitioner(conn, now)
        engine.apply(movers, target, message=message, data=data)
        engine.flush()
    return ids, refused


def select_for_change(conn: Connection, q: JobQuery, with_tags: bool) -> list[dict[str, Any]]:
    cols = (*ENGINE_COLUMNS, jobs.c.tags) if with_tags else ENGINE_COLUMNS
    stmt = select(*cols).where(*conditions(q)).order_by(jobs.c.id)
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    return [dict(r._mapping) for r in conn.execute(stmt)]


# ---------------------------------------------------------------------------- delete

def delete_jobs(conn: Connection, rows: list[dict[str, Any]], validate_only: bool) -> tuple[list[int], dict[int, str]]:
    refused = {r["id"]: (f"job {r['id']} is RUNNING in launcher session {r['session_id'] or '-'}; "
                         "kill it first (state KILLED), then delete it")
               for r in rows if r["state"] in ACTIVE_STATES}
    ids = [r["id"] for r in rows if r["id"] not in refused]
    if not validate_only:
        for i in range(0, len(ids), CHUNK):
            conn.execute(delete(jobs).where(jobs.c.id.in_(ids[i:i + CHUNK])))
    return ids, refused


def require_one(rows: list[dict[str, Any]], job_id: int) -> dict[str, Any]:
    if not rows:
        raise NotFound(f"job {job_id} not found")
    return rows[0]


def refuse(message: str) -> FailedPrecondition:
    return FailedPrecondition(message, reason="ILLEGAL_TRANSITION" if "cannot move" in message else "FAILED_PRECONDITION")

