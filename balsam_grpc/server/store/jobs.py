"""Jobs: selection, bulk creation, changes and deletion, all scoped to one owner."""

from __future__ import annotations

import collections
import functools
import itertools
import json
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Connection,
    ColumnElement,
    DateTime,
    bindparam,
    delete,
    exists,
    func,
    insert,
    select,
    text,
    tuple_,
    type_coerce,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.exc import IntegrityError

from balsam_grpc.server.store.bulk import COPY_MIN_ROWS, CopyStream, draw_ids, draw_ids_sql, insert_rows
from balsam_grpc.server.store.codec import CopyBatch, array_params, column_values, is_json, sqlite_time
from balsam_grpc.server.store.codec import dumps as codec_dumps
from balsam_grpc.server.store.codec import loads as codec_loads
from balsam_grpc.server.store.driver import driver_batch, driver_rows, driver_statement, plain_statement, sent_ahead

from balsam_grpc.core.errors import AlreadyExists, BalsamError, InvalidArgument, NotFound, PermissionDenied
from balsam_grpc.core.states import (
    ACTIVE_STATES,
    FINAL_STATES,
    RETRYABLE_STATES,
    JobState,
    Role,
    StepContext,
    settle,
)
from balsam_grpc.server.convert import utcnow
from balsam_grpc.server.store import events as event_log
from balsam_grpc.server.store.query import (
    JSON_TEXT,
    contains_substring,
    epoch_micros,
    id_in,
    json_path,
    tags_contain,
    tags_exclude,
)
from balsam_grpc.server.store.tables import apps, job_parents, jobs, sites, transfer_items
from balsam_grpc.server.store.transitions import (
    ENGINE_COLUMNS,
    AppRules,
    Refusal,
    Transitioner,
    _get,
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
    keys, rows = list_job_tuples(conn, q, order, after, limit, columns)
    return [dict(zip(keys, row, strict=True)) for row in rows]


def list_job_tuples(conn: Connection, q: JobQuery, order: list[tuple[str, bool]], after: list[Any] | None,
                    limit: int, columns: tuple[Any, ...] | None = None,
                    micros_times: bool = False) -> tuple[tuple[str, ...], list[Any]]:
    """list_jobs as (column names, row tuples): building a dict per row costs a third of
    the time of reading a page of jobs, and the servicer reads fields by position.

    `micros_times`: on PostgreSQL, timestamp columns come back as integer microseconds
    since the epoch (None stays None); the driver turns a timestamptz into a datetime
    five times slower than an integer, three per job. page_keys_of_tuple accepts both.
    """
    conds = conditions(q)
    if after is not None:
        after = _keyset(order, after)
        conds.append(_after(order, after))
    sort = [ORDER_COLUMNS[n].desc() if d else ORDER_COLUMNS[n] for n, d in order]
    stmt = select(*_selected(tuple(columns or jobs.columns), conn.dialect.name, micros_times)).where(*conds) \
        .order_by(*sort).limit(limit)
    result = conn.execute(stmt)
    return tuple(result.keys()), result.all()


def _keyset(order: list[tuple[str, bool]], after: list[Any]) -> list[Any]:
    if len(after) != len(order):
        raise InvalidArgument("page_token does not match order_by", reason="INVALID_PAGE_TOKEN", field="page_token")
    return [_coerce(name, v) for (name, _), v in zip(order, after, strict=True)]


def select_statement(q: JobQuery, order: list[tuple[str, bool]], after: list[Any] | None, limit: int,
                     names: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """PostgreSQL: list_job_tuples's statement (micros_times) in the driver's terms
    (psycopg's %(name)s), for Database.statement_now on the event loop, and its
    parameters. The SQL text is built once per shape of query (which filters are given,
    the order, the columns): SQLAlchemy's statement cache key, compilation and result
    set-up cost as much server CPU as the rest of reading a page of jobs. Lists bind as one
    array each (`= ANY`), so their lengths do not make new shapes."""
    params = array_params(_by_state(q, order, _query_params(q)))
    params["limit"] = limit
    if after is not None:
        for i, value in enumerate(_keyset(order, after)):
            params[f"after{i}"] = value
    shape = ("select", tuple(params), tuple(order), names)
    sql = _SELECT_SQL.get(shape)
    if sql is None:
        sql = _remember(shape, _list_sql(_returned(names), params, order, _PG))
    return sql, params


def patch_statement(q: JobQuery, values: dict[str, Any], now: datetime, names: tuple[str, ...]
                    ) -> tuple[str, dict[str, Any]]:
    """PostgreSQL: patch_job's statement for Database.statement_now (as select_statement),
    returning the columns `names` (times as integer microseconds), and its parameters."""
    params = array_params(_query_params(q))
    for name, value in values.items():
        params[f"set_{name}"] = codec_dumps(value) if is_json(jobs.c[name]) else value
    params["set_update_time"] = now
    shape = ("patch", tuple(params), names)
    sql = _SELECT_SQL.get(shape)
    if sql is None:
        sets = ", ".join(f"{name[4:]} = CAST(%({name})s AS {_pg_type(jobs.c[name[4:]], json_as='JSONB')})"
                         for name in params if name.startswith("set_"))
        sql = _remember(shape, f"UPDATE jobs SET {sets} WHERE {_where(params, [], _PG)} RETURNING {_returned(names)}")
    return sql, params


def sqlite_select_statement(q: JobQuery, order: list[tuple[str, bool]], after: list[Any] | None, limit: int,
                            names: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """SQLite: select_statement in pysqlite's terms (:name placeholders), for
    Database.sqlite_statement, and its parameters; rows read through `sqlite_rows`. The
    SQL text is built once per shape of query, as on PostgreSQL: SQLAlchemy's cache key,
    compilation, type processing and result set-up were half of the server CPU of a list
    or get. Times come back as SQLite stores them (text) and are converted exactly where
    they are shown (convert.shared_timestamp)."""
    params = _by_state(q, order, _sqlite_params(q))
    params["limit"] = limit
    if after is not None:
        for i, ((name, _), value) in enumerate(zip(order, _keyset(order, after), strict=True)):
            params[f"after{i}"] = sqlite_time(value) if name.endswith("_time") else value
    shape = ("sqlite select", tuple(params), tuple(order), names)
    sql = _SELECT_SQL.get(shape)
    if sql is None:
        sql = _remember(shape, _list_sql(_sqlite_returned(names), params, order, _SQLITE))
    return sql, params


def sqlite_patch_statement(q: JobQuery, values: dict[str, Any], now: datetime, names: tuple[str, ...]
                           ) -> tuple[str, dict[str, Any]]:
    """SQLite: patch_job's statement for Database.sqlite_statement (as
    sqlite_select_statement), returning the columns `names`, and its parameters."""
    params = _sqlite_params(q)
    for name, value in values.items():
        params[f"set_{name}"] = codec_dumps(value) if is_json(jobs.c[name]) else value
    params["set_update_time"] = sqlite_time(now)
    shape = ("sqlite patch", tuple(params), names)
    sql = _SELECT_SQL.get(shape)
    if sql is None:
        sets = ", ".join(f"{name[4:]} = :{name}" for name in params if name.startswith("set_"))
        sql = _remember(shape, f"UPDATE jobs SET {sets} WHERE {_where(params, [], _SQLITE)} "
                               f"RETURNING {_sqlite_returned(names)}")
    return sql, params


def sqlite_rows(names: tuple[str, ...], rows: list[Any]) -> list[Any]:
    """Rows of a statement from sqlite_select_statement or sqlite_patch_statement as the
    servicer reads them: JSON columns decoded (an empty one comes as None, as on
    PostgreSQL) but the tags, left as their JSON text (as select_statement gives them),
    times left as stored text."""
    positions = [i for i, name in enumerate(names) if name in _JSON_NAMES and name != "tags"]
    if not positions:
        return rows
    out = []
    for row in rows:
        for i in positions:
            if row[i] is not None:
                values = list(row)
                for j in positions:
                    if values[j] is not None:
                        values[j] = codec_loads(values[j])
                row = tuple(values)
                break
        out.append(row)
    return out


def _sqlite_params(q: JobQuery) -> dict[str, Any]:
    """_query_params for SQLite: lists bound as one JSON array each (read through
    json_each, so their lengths do not make new shapes), times as stored text, one
    (JSON path, value) pair per tag."""
    params: dict[str, Any] = {}
    for name, value in _query_params(q).items():
        if name == "tags" or name.startswith("xtag"):
            continue
        if isinstance(value, list):
            value = json.dumps(value)
        elif isinstance(value, datetime):
            value = sqlite_time(value)
        params[name] = value
    for i, (key, value) in enumerate(sorted(q.tags.items())):
        params[f"tag_path{i}"], params[f"tag{i}"] = json_path(key), value
    for i, (key, value) in enumerate(sorted(q.exclude_tags.items())):
        params[f"xtag_path{i}"], params[f"xtag{i}"] = json_path(key), value
    return params


def _sqlite_returned(names: tuple[str, ...]) -> str:
    return ", ".join(_SQLITE_RETURNED.get(n, f"jobs.{n}") for n in names)


_JSON_NAMES = frozenset(c.name for c in jobs.columns if is_json(c))
_SQLITE_RETURNED = {c.name: f"NULLIF(jobs.{c.name}, '{codec_dumps(c.default.arg(None))}') AS {c.name}"
                    for c in jobs.columns if is_json(c)}


def _by_state(q: JobQuery, order: list[tuple[str, bool]], params: dict[str, Any]) -> dict[str, Any]:
    """`params` with a list in id order (either way) of some states taking one parameter
    per distinct state (`state0`, ...) instead of the list `states`: _list_sql reads
    each state's jobs as one branch in the order of ix_jobs_owner_id_state_id_site_id.
    Not when the list names jobs by a key of their own (ids, session, batch job,
    parents): those are few, found through that key's index, and sorted."""
    if not q.states or [name for name, _ in order] != ["id"] or q.ids or q.session_id or q.batch_job_ids \
            or q.parent_ids:
        return params
    params = {name: value for name, value in params.items() if name != "states"}
    for i, state in enumerate(dict.fromkeys(q.states)):  # a state named twice: its jobs once
        params[f"state{i}"] = state
    return params


def _list_sql(returned: str, params: dict[str, Any], order: list[tuple[str, bool]], binding: _Binding) -> str:
    """A page of the jobs `params` selects (select_statement, sqlite_select_statement).

    A list of some states in id order (params from _by_state) reads each state's jobs
    through ix_jobs_owner_id_state_id_site_id in id order from the page token on, and
    stops at the page. Compared with `state = x` (or a list) and ordered by id alone, the
    primary key gives the same order, and both planners walked it whenever they rated
    the state common, reading every older job of the owner in another state before the
    first one listed (states are not spread evenly over ids: old jobs have finished, new
    ones wait); so each driver's statement leaves that walk out (binding.by_state).
    Several states are one branch each, merged: up to a page from each, then the page."""
    p = binding.placeholder
    branches = [name for name in params if name.startswith("state") and name[5:].isdigit()]
    if not branches:
        sort = ", ".join(f"jobs.{name} DESC" if desc else f"jobs.{name}" for name, desc in order)
        return f"SELECT {returned} FROM jobs WHERE {_where(params, order, binding)} ORDER BY {sort} LIMIT {p('limit')}"
    desc = order[0][1]
    where = _where(params, order, binding, page_token=False)
    selects = []
    for name in branches:
        source, window, sort = binding.by_state(p(name), desc, "after0" in params)
        selects.append(f"SELECT {returned} FROM {source} WHERE {where} AND {window} ORDER BY {sort} LIMIT {p('limit')}")
    if len(selects) == 1:
        return selects[0]
    merged = " UNION ALL ".join(f"SELECT * FROM ({sql}) AS b{i}" for i, sql in enumerate(selects))
    return f"SELECT * FROM ({merged}) AS page ORDER BY page.id{' DESC' if desc else ''} LIMIT {p('limit')}"


def _pg_by_state(state: str, desc: bool, after: bool) -> tuple[str, str, str]:
    """PostgreSQL's branch of one state (`state`, a placeholder) for _list_sql: (FROM,
    condition, ORDER BY). The state is a range of one value, ordered by (state, id): an
    order the primary key cannot give (it could for `state = x`, constant in the branch),
    so a plan either walks the index in order or reads every job of the state (or of the
    tags, through ix_jobs_tags_gin) and sorts them; never the jobs of other states. After
    the token, the row comparison (state, id) > (x, after) positions the walk there."""
    if not after:
        return "jobs", f"jobs.state >= {state} AND jobs.state <= {state}", \
            "jobs.state DESC, jobs.id DESC" if desc else "jobs.state, jobs.id"
    return ("jobs", f"(jobs.state, jobs.id) {'<' if desc else '>'} ({state}, %(after0)s) "
                    f"AND jobs.state {'>=' if desc else '<='} {state}",
            "jobs.state DESC, jobs.id DESC" if desc else "jobs.state, jobs.id")


def _sqlite_by_state(state: str, desc: bool, after: bool) -> tuple[str, str, str]:
    """SQLite's branch of one state for _list_sql: the index named (INDEXED BY), which
    SQLite then walks from (owner, state, token). A range of one state, as on PostgreSQL,
    leaves the primary key out too, but SQLite uses neither the row comparison nor
    `id > token` after it to position the walk: every later page would read the state's
    entries from its first."""
    window = f"jobs.state = {state}" + (f" AND jobs.id {'<' if desc else '>'} :after0" if after else "")
    return f"jobs INDEXED BY {_STATE_INDEX}", window, "jobs.id DESC" if desc else "jobs.id"


_STATE_INDEX = "ix_jobs_owner_id_state_id_site_id"


def _after_page_token(order: list[tuple[str, bool]], placeholder: Callable[[str], str]) -> str:
    """Keyset pagination: the rows after the page token's keys `after0`, `after1`, ... in
    `order`, each key bound through `placeholder(name)` (the driver's parameter style)."""
    ors = []
    for i, (name, desc) in enumerate(order):
        eqs = [f"jobs.{order[j][0]} = {placeholder(f'after{j}')}" for j in range(i)]
        ors.append("(" + " AND ".join([*eqs, f"jobs.{name} {'<' if desc else '>'} {placeholder(f'after{i}')}"]) + ")")
    return "(" + " OR ".join(ors) + ")"


def _query_params(q: JobQuery) -> dict[str, Any]:
    """The parameters of the filters `q` gives (named as _where reads them; their keys,
    in this order, make the shape of the statement's WHERE)."""
    params: dict[str, Any] = {"owner_id": q.owner_id}
    for name, value in (("site_scope", q.site_scope), ("ids", q.ids), ("states", q.states),
                        ("exclude_states", q.exclude_states), ("app_ids", q.app_ids), ("app_names", q.app_names),
                        ("site_ids", q.site_ids), ("parent_ids", q.parent_ids), ("create_start", q.create_start),
                        ("create_end", q.create_end), ("update_start", q.update_start), ("update_end", q.update_end),
                        ("batch_job_ids", q.batch_job_ids), ("session_id", q.session_id or None)):
        if value is not None and (not isinstance(value, list) or value):
            params[name] = value
    if q.tags:
        params["tags"] = json.dumps(dict(sorted(q.tags.items())))
    for i, (k, v) in enumerate(sorted(q.exclude_tags.items())):
        params[f"xtag{i}"] = json.dumps({k: v})
    if q.workdir_contains:
        params["workdir_like"] = "%" + q.workdir_contains.replace("\\", "\\\\").replace("%", "\\%") \
            .replace("_", "\\_") + "%"
    return params


def _remember(shape: tuple[Any, ...], sql: str) -> str:
    if len(_SELECT_SQL) >= 1024:
        _SELECT_SQL.clear()
    _SELECT_SQL[shape] = sql
    return sql


def _returned(names: tuple[str, ...]) -> str:
    """The select list: times as integer microseconds, and a JSON column holding its empty
    default as NULL (None, which the servicer skips like an empty value): the driver
    calls no Python loader for a NULL, and most of a job's six JSON columns are empty."""
    return ", ".join(_RETURNED.get(n, f"jobs.{n}") for n in names)


_RETURNED = {
    **{c.name: f"CAST(EXTRACT(EPOCH FROM jobs.{c.name}) * 1000000 AS BIGINT) AS {c.name}"
       for c in jobs.columns if isinstance(c.type, DateTime)},
    **{c.name: f"NULLIF(jobs.{c.name}, CAST('{codec_dumps(c.default.arg(None))}' AS JSONB)) AS {c.name}"
       for c in jobs.columns if is_json(c)},
    # The tags as their JSON text (jsonb's own, canonical): the servicer keys its templates
    # on it and decodes it only to build one (most jobs listed together share their tags).
    "tags": "CAST(NULLIF(jobs.tags, CAST('{}' AS JSONB)) AS TEXT) AS tags",
}


class _Binding:
    """What differs between the drivers' statements: how a parameter is named, how a
    column is tested against a list bound as one parameter (its length makes no new
    shape), the tag filters (containment on PostgreSQL, for its GIN index; a JSON
    path per key on SQLite, as _sqlite_params binds them), and how a list in id order
    reads one state's jobs in that order (_pg_by_state, _sqlite_by_state)."""

    def __init__(self, placeholder: Callable[[str], str], in_list: Callable[[str, str, str], str],
                 tags: Callable[[dict[str, Any]], list[str]],
                 by_state: Callable[[str, bool, bool], tuple[str, str, str]]) -> None:
        self.placeholder = placeholder
        self.in_list = in_list  # (column, parameter, SQL type of the items)
        self.tags = tags
        self.by_state = by_state  # a branch of one state of a list in id order (_list_sql)


def _pg_tags(params: dict[str, Any]) -> list[str]:
    conds = ["jobs.tags @> CAST(%(tags)s AS JSONB)"] if "tags" in params else []
    return conds + [f"NOT (jobs.tags @> CAST(%({name})s AS JSONB))" for name in params if name.startswith("xtag")]


def _sqlite_tags(params: dict[str, Any]) -> list[str]:
    conds = []
    for name in params:
        if name.startswith("tag_path"):
            conds.append(f"json_extract(jobs.tags, :{name}) = :tag{name[8:]}")
        elif name.startswith("xtag_path"):  # as query.tags_exclude
            conds.append(f"NOT coalesce(json_extract(jobs.tags, :{name}) = :xtag{name[9:]}, 0)")
    return conds


_PG = _Binding(lambda name: f"%({name})s", lambda column, name, of: f"{column} = ANY(CAST(%({name})s AS {of}[]))",
               _pg_tags, _pg_by_state)
_SQLITE = _Binding(lambda name: f":{name}",
                   lambda column, name, of: f"{column} IN (SELECT value FROM json_each(:{name}))", _sqlite_tags,
                   _sqlite_by_state)
# Also job_counts' statements: one way of writing a driver's statement for the store.
BINDINGS = {"postgresql": _PG, "sqlite": _SQLITE}


def _where(params: dict[str, Any], order: list[tuple[str, bool]], binding: _Binding, page_token: bool = True) -> str:
    """The WHERE of the filters `params` gives (named by _query_params), as conditions()
    writes them, and (page_token) of the page token's keys."""
    p, in_list = binding.placeholder, binding.in_list
    conds = []
    for name in params:
        if name in _COMPARED:
            conds.append(f"{_COMPARED[name]} {p(name)}")
        elif name in _LISTED:
            column, of = _LISTED[name]
            conds.append(in_list(column, name, of))
        elif name == "exclude_states":
            conds.append(f"NOT ({in_list('jobs.state', name, 'VARCHAR')})")
        elif name == "app_names":
            conds.append(f"jobs.app_id IN (SELECT apps.id FROM apps WHERE apps.owner_id = {p('owner_id')} "
                         f"AND {in_list('apps.name', name, 'VARCHAR')})")
        elif name == "parent_ids":
            conds.append("EXISTS (SELECT 1 FROM job_parents WHERE job_parents.child_id = jobs.id "
                         f"AND {in_list('job_parents.parent_id', name, 'BIGINT')})")
        elif name == "workdir_like":
            conds.append(f"jobs.workdir LIKE {p(name)} ESCAPE '\\'")
    conds += binding.tags(params)
    if page_token and "after0" in params:
        conds.append(_after_page_token(order, p))
    return " AND ".join(conds)


# Filters that compare a column with their one value, and filters of a list of values.
_COMPARED = {"owner_id": "jobs.owner_id =", "site_scope": "jobs.site_id =", "create_start": "jobs.create_time >=",
             "create_end": "jobs.create_time <", "update_start": "jobs.update_time >=",
             "update_end": "jobs.update_time <", "session_id": "jobs.session_id ="}
_LISTED = {"ids": ("jobs.id", "BIGINT"), "states": ("jobs.state", "VARCHAR"), "app_ids": ("jobs.app_id", "BIGINT"),
           "site_ids": ("jobs.site_id", "BIGINT"), "batch_job_ids": ("jobs.batch_job_id", "BIGINT")}
_SELECT_SQL: dict[tuple[Any, ...], str] = {}


@functools.lru_cache(maxsize=64)
def _selected(columns: tuple[Any, ...], dialect: str, micros_times: bool) -> tuple[Any, ...]:
    """The select list for `columns`, built once per shape: a page of jobs built it anew
    per call (five EXTRACT expressions and their operators)."""
    if micros_times and dialect == "postgresql":
        return tuple(epoch_micros(c) if isinstance(c.type, DateTime) else c for c in columns)
    if dialect == "sqlite":
        return tuple(type_coerce(c, JSON_TEXT).label(c.name) if is_json(c) else c for c in columns)
    return columns


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _coerce(name: str, value: Any) -> Any:
    """A page token's key as the column's type; a key of another type (a token made up
    or altered: tokens are not signed) is the caller's error, not the database's."""
    if name.endswith("_time"):
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value)
            except ValueError:
                pass
    elif name == "workdir":
        if isinstance(value, str):
            return value
    elif type(value) is int and -2**63 <= value < 2**63:
        return value
    raise InvalidArgument("page_token is corrupt; pass the next_page_token of the previous response unchanged",
                          reason="INVALID_PAGE_TOKEN", field="page_token")


def page_keys(row: dict[str, Any], order: list[tuple[str, bool]]) -> list[Any]:
    return [row[name].isoformat() if isinstance(row[name], datetime) else row[name] for name, _ in order]


def page_keys_of_tuple(keys: tuple[str, ...], row: Any, order: list[tuple[str, bool]]) -> list[Any]:
    values = {}
    for name, _ in order:
        value = row[keys.index(name)]
        if name.endswith("_time") and isinstance(value, int):  # micros_times
            value = _EPOCH + timedelta(microseconds=value)
        values[name] = value
    return page_keys(values, order)


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

def _resolve_apps(specs: list[dict[str, Any]], site_scope: int | None, lookups: _Lookups, offset: int = 0) -> None:
    """Fill app_id/site_id of each spec and attach the app row as spec['_app']."""
    found, named = lookups.apps, lookups.named_apps
    for i, spec in enumerate(specs, offset):
        app = found.get(spec["app_id"]) if spec["app_id"] else named.get((spec["site_id"], spec["app_name"]))
        if app is None:
            what = f"app {spec['app_id']}" if spec["app_id"] else f"app {spec['app_name']!r} at site {spec['site_id']}"
            raise NotFound(f"jobs[{i}]: {what} not found; register it with 'balsamctl app sync'",
                           reason="REFERENCE_NOT_FOUND", field=f"jobs[{i}].app_id")
        if site_scope is not None and app["site_id"] != site_scope:
            raise PermissionDenied(f"jobs[{i}]: app {app['id']} is at site {app['site_id']}; this token is scoped "
                                   f"to site {site_scope}", field=f"jobs[{i}].app_id")
        spec["app_id"], spec["site_id"], spec["_app"] = app["id"], app["site_id"], app


_PARSERS = {
    "INT": int, "FLOAT": float, "PATH": str, "STRING": str, "": str,
    "BOOL": lambda v: {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[v.lower()],
}


def _declared_parameters(app: dict[str, Any]) -> dict[str, tuple[str, Any, bool, Callable[[str], Any]]]:
    """name -> (kind, default, required, parser), computed once per app row."""
    declared = app.get("_declared")
    if declared is None:
        declared = {}
        for decl in app.get("parameters") or []:
            kind = str(_get(decl, "type", "") or "").removeprefix("PARAMETER_TYPE_")
            declared[decl["name"]] = (kind, _get(decl, "default_value", ""), bool(_get(decl, "required", False)),
                                      _PARSERS.get(kind, str))
        app["_declared"] = declared
    return declared


def _parameters_fit(declared: dict[str, tuple[str, Any, bool, Callable[[str], Any]]], params: dict[str, str]) -> bool:
    """_check_parameters' test without its messages (it runs, and says what is wrong,
    whenever this says False): `params` has only declared names, every required one,
    and values that parse as their kind; defaults of the missing ones are added."""
    if not params.keys() <= declared.keys():
        return False
    for name, (_, default, required, parse) in declared.items():
        if name not in params:
            if required:
                return False
            if default:
                params[name] = default
        elif parse is not str:
            try:
                parse(params[name])
            except (ValueError, KeyError):
                return False
    return True


def _all_parameters_fit(declared: dict[str, tuple[str, Any, bool, Callable[[str], Any]]],
                        column: list[dict[str, str]]) -> bool:
    """_parameters_fit for each of a column of jobs' parameters; when every job names
    exactly the declared parameters (the usual create) a column at a time, each kind's
    parser mapped over its values."""
    names = declared.keys()
    if not all(map(names.__eq__, map(dict.keys, column))):
        return all(map(functools.partial(_parameters_fit, declared), column))
    try:
        for name, (_, _, _, parse) in declared.items():
            if parse is not str:
                collections.deque(map(parse, map(operator.itemgetter(name), column)), maxlen=0)
    except (ValueError, KeyError):
        return False
    return True


def _check_parameters(i: int, spec: dict[str, Any], app: dict[str, Any]) -> None:
    declared = _declared_parameters(app)
    params = spec["parameters"]
    unknown = [] if params.keys() <= declared.keys() else sorted(name for name in params if name not in declared)
    if unknown:
        raise InvalidArgument(f"jobs[{i}].parameters: app {app['name']!r} has no parameter {unknown[0]!r}; "
                              f"it takes {', '.join(sorted(declared)) or 'none'}", field=f"jobs[{i}].parameters")
    for name, (kind, default, required, parse) in declared.items():
        if name not in params:
            if required:
                raise InvalidArgument(f"jobs[{i}].parameters: app {app['name']!r} needs parameter {name!r}",
                                      field=f"jobs[{i}].parameters")
            if default:
                params[name] = default
            continue
        if parse is str:
            continue
        try:
            parse(params[name])
        except (ValueError, KeyError):
            raise InvalidArgument(f"jobs[{i}].parameters[{name!r}]: {params[name]!r} is not a valid {kind.lower()}",
                                  field=f"jobs[{i}].parameters") from None


def _transfer_rows(i: int, spec: dict[str, Any], app: dict[str, Any], now: datetime,
                   aliases: frozenset[str]) -> list[dict[str, Any]]:
    """Transfer items of a new job, checked against its app's slots and its site's
    locations (`aliases`; empty when the site has published none yet, and then the site
    daemon checks them when it moves the items). Called only when the job gives some or
    its app has slots."""
    given = spec["transfers"]
    slots = {s["name"]: s for s in app.get("transfers") or []}
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
        where = f"jobs[{i}].transfers.{name}"
        if not sep or not alias or not remote:
            raise InvalidArgument(f"{where}: {given[name]!r} must look like location:/path", field=where)
        if not remote.startswith("/"):
            raise InvalidArgument(f"{where}: the path {remote!r} must be absolute (location:/path, from the "
                                  "location's root)", field=where)
        if aliases and alias not in aliases:
            raise InvalidArgument(f"{where}: site {spec['site_id']} has no transfer location {alias!r}; it has "
                                  f"{', '.join(sorted(aliases))}", reason="UNKNOWN_LOCATION", field=where)
        direction = str(_get(slot, "direction", "")).removeprefix("TRANSFER_DIRECTION_")
        rows.append({"owner_id": spec["owner_id"], "site_id": spec["site_id"], "direction": direction, "slot": name,
                     "location_alias": alias, "remote_path": remote,
                     "local_path": _get(slot, "local_path", "") or name,
                     "recursive": bool(_get(slot, "recursive", False)),
                     "state": "PENDING" if direction == "IN" else "AWAITING_JOB",
                     # Explicit: bulk inserts (COPY, multi-row INSERT) skip column defaults.
                     "task_id": "", "error": "", "bytes": 0, "files": 0, "duration_seconds": 0.0,
                     "create_time": now, "update_time": now})
    return rows


def _location_aliases(conn: Connection, site_ids: set[int]) -> dict[int, frozenset[str]]:
    """The transfer location aliases each site published (site.transfer_locations)."""
    if not site_ids:
        return {}
    rows = conn.execute(select(sites.c.id, sites.c.transfer_locations).where(sites.c.id.in_(sorted(site_ids))))
    return {r.id: frozenset(loc.get("alias", "") for loc in r.transfer_locations or []) for r in rows}


# What a new job's columns hold unless given, as PostgreSQL's defaults of them give it
# (revision 0012; None: NULL, the columns without one): a streamed create's COPY leaves
# out a column with this value in every row, and PostgreSQL fills it without parsing it.
INSERT_DEFAULTS: dict[str, Any] = {
    "name": "", "data": {}, "transfers": {}, "num_nodes": 1, "ranks_per_node": 1, "threads_per_rank": 1,
    "threads_per_core": 1, "gpus_per_rank": 0, "node_packing_count": 1, "wall_time_min": 0, "launch_params": {},
    "priority": 0, "state_message": "", "return_code": None, "error_tail": "", "batch_job_id": None,
    "session_id": None, "lease_generation": 0, "lease_expire_time": None, "on_parent_failure": "FAIL",
    "run_count": 0, "pending_parents": 0, "parent_ids": [], "cleaned_time": None, "cleanup_info": None,
}
# PostgreSQL: the time columns whose default is the transaction's start, now() (revision
# 0017); a COPY that leaves them out gives each row that time without parsing it.
TIME_DEFAULTS = ("create_time", "update_time", "state_time")
_NOW = "SELECT now()"  # the transaction's start: what TIME_DEFAULTS give


_NO_PARENTS = (S.READY, "")
# Every column but the id (cleanup's too): a row missing one sends the COPY formatter
# down its per-row path for that column.
_NEW_JOB_DEFAULTS = {"return_code": None, "error_tail": "", "batch_job_id": None, "session_id": None,
                     "lease_generation": 0, "lease_expire_time": None, "run_count": 0, "cleaned_time": None,
                     "cleanup_info": None}


@dataclass
class JobColumns:
    """A chunk of new jobs given a column at a time (the servicer reads them from the
    request this way for the usual create: jobs of one app, no parents, transfers or
    data), each value already checked as job_spec checks it. `general` makes the same
    jobs as specs for the general way, which the store takes whenever one of them needs
    more than these columns hold or fails a check (it then says which and why).

    Once written, `ids` holds the jobs' ids and `fixed` the columns they all share
    (every column of the jobs table but these lists)."""
    workdirs: list[str]
    names: list[str]
    tags: list[dict[str, str]]
    parameters: list[dict[str, str]]
    priorities: list[int]
    policies: list[str]
    # Per job, its resource columns with launch_params (jobs with the same share one dict).
    resources: list[dict[str, Any]]
    general: Callable[[], list[dict[str, Any]]]
    ids: list[int] = field(default_factory=list)
    fixed: dict[str, Any] = field(default_factory=dict)

    def values(self) -> dict[str, list[Any]]:
        """The jobs table's columns that are not fixed, each as a list."""
        out = {"workdir": self.workdirs, "name": self.names, "tags": self.tags, "parameters": self.parameters,
               "priority": self.priorities, "on_parent_failure": self.policies}
        resources = self.resources
        for name in (*_RESOURCE_COLUMNS, "launch_params"):
            out[name] = list(map(operator.itemgetter(name), resources))
        return out

    def rows(self) -> list[dict[str, Any]]:
        """The written jobs as rows (what a full view of them shows)."""
        fixed = self.fixed
        return [{**fixed, **res, "id": jid, "workdir": w, "name": n, "tags": t, "parameters": p, "priority": pr,
                 "on_parent_failure": pol}
                for jid, w, n, t, p, pr, pol, res in zip(self.ids, self.workdirs, self.names, self.tags,
                                                         self.parameters, self.priorities, self.policies,
                                                         self.resources, strict=True)]


_RESOURCE_COLUMNS = ("num_nodes", "ranks_per_node", "threads_per_rank", "threads_per_core", "gpus_per_rank",
                     "node_packing_count", "wall_time_min")


@dataclass
class _Lookups:
    """What checking new jobs reads from the database: their apps, their parents'
    states and their sites' transfer locations."""
    apps: dict[int, dict[str, Any]] = field(default_factory=dict)
    named_apps: dict[tuple[int, str], dict[str, Any]] = field(default_factory=dict)
    parents: dict[int, str] = field(default_factory=dict)
    aliases: dict[int, frozenset[str]] = field(default_factory=dict)


@dataclass
class _Creation:
    """Jobs being created, over one or more chunks of specs: the rows (each spec becomes
    its row in place), their transfer items and creation-event data, and what the
    checks carry from one chunk to the next."""
    owner_id: int
    site_scope: int | None
    now: datetime
    lookups: _Lookups
    # False: the rows are the caller's alone once added (a streamed create of jobs with
    # no parents or transfers, which need nothing of them later): each chunk's rows are
    # freed while PostgreSQL takes in the next, not all at once after the commit.
    keep_rows: bool = True
    rows: list[dict[str, Any]] = field(default_factory=list)
    count: int = 0
    transfers: list[list[dict[str, Any]]] = field(default_factory=list)
    event_data: list[dict[str, Any] | None] = field(default_factory=list)
    seen: dict[tuple[int, str], int] = field(default_factory=dict)
    rules: dict[int, AppRules] = field(default_factory=dict)
    # (state, stage-in, stage-out, app) -> (final state, event data): the path is the
    # same for every job with the same inputs, and one shared event-data dict lets the
    # COPY formatter encode it once.
    paths: dict[tuple[str, bool, bool, int], tuple[str, dict[str, Any] | None]] = field(default_factory=dict)

    def add(self, specs: list[dict[str, Any]]) -> None:
        """Check the next specs (numbered on from those added before) and turn them into rows."""
        offset = self.count
        lookups, now = self.lookups, self.now
        _resolve_apps(specs, self.site_scope, lookups, offset)
        seen = self.seen
        for i, spec in enumerate(specs, offset):
            key = (spec["site_id"], spec["workdir"])
            if key in seen:
                raise InvalidArgument(f"jobs[{i}].workdir {spec['workdir']!r} repeats jobs[{seen[key]}] at the same "
                                      "site", field=f"jobs[{i}].workdir")
            seen[key] = i
        parents = lookups.parents
        initial: list[tuple[str, str]] = []
        for i, spec in enumerate(specs, offset):
            spec["owner_id"] = self.owner_id
            app = spec.pop("_app")
            if app["id"] not in self.rules:
                # The app rows fetched above carry the hooks the rules need: no second query.
                self.rules[app["id"]] = AppRules(app)
            _check_parameters(i, spec, app)
            # Tested here, not in a call per job: most give none and their app has no slots.
            self.transfers.append(_transfer_rows(i, spec, app, now, lookups.aliases.get(spec["site_id"], frozenset()))
                                  if spec["transfers"] or app.get("transfers") else [])
            if not spec["parent_ids"]:
                spec["pending_parents"] = 0
                initial.append(_NO_PARENTS)
                continue
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
            initial.append((S.AWAITING_PARENTS, "") if pending else _NO_PARENTS)
        paths, event_data = self.paths, self.event_data
        fixed = {"create_time": now, "update_time": now, "state_time": now, **_NEW_JOB_DEFAULTS}
        for spec, ts, (state, message) in zip(specs, self.transfers[offset:], initial, strict=True):
            has_in = any(t["direction"] == "IN" for t in ts) if ts else False
            has_out = any(t["direction"] == "OUT" for t in ts) if ts else False
            settled = paths.get((state, has_in, has_out, spec["app_id"])) or self._path(state, has_in, has_out,
                                                                                        spec["app_id"])
            event_data.append(settled[1])
            # The spec becomes the row: drop what is not a column, add the rest.
            spec.pop("app_name", None)
            spec["state"] = settled[0]
            spec["state_message"] = message
            spec.update(fixed)
        self.count += len(specs)
        if self.keep_rows:
            self.rows.extend(specs)

    def add_columns(self, columns: JobColumns, kind: _EventKind, app_id: int) -> bool:
        """add() for jobs given as columns, all of app `app_id` with the creation event
        `kind` (foreseen_event's): their checks against the app and each other, and the
        columns they share in columns.fixed. False, with nothing taken, when one of them
        needs the general way (add() of columns.general(), which says why when it fails)."""
        app = self.lookups.apps[app_id]
        if app.get("transfers"):  # slots to check, perhaps required ones
            return False
        state, message = _NO_PARENTS
        final, data = self.paths.get((state, False, False, app_id)) or self._path(state, False, False, app_id)
        site_id = app["site_id"]
        if kind[:3] != (site_id, final, message) or kind[3] is not data:  # as _CreationEvents.add checks rows
            raise RuntimeError(f"the creation events were written up front as {kind}; these jobs differ")
        if not _all_parameters_fit(_declared_parameters(app), columns.parameters):
            return False
        workdirs, seen, n = columns.workdirs, self.seen, len(columns.workdirs)
        keys = [(site_id, w) for w in workdirs]
        if len(set(workdirs)) != n or (seen and not seen.keys().isdisjoint(keys)):
            return False
        seen.update(zip(keys, range(self.count, self.count + n), strict=True))
        self.count += n
        # Kept a job each, as add() keeps them: a later chunk's add() finds its own at its offset.
        self.transfers.extend(itertools.repeat([], n))
        self.event_data.extend(itertools.repeat(data, n))
        now = self.now
        columns.fixed = {"owner_id": self.owner_id, "site_id": site_id, "app_id": app_id, "data": {}, "transfers": {},
                         "state": final, "state_message": message, "pending_parents": 0, "parent_ids": [],
                         "create_time": now, "update_time": now, "state_time": now, **_NEW_JOB_DEFAULTS}
        return True

    def site_workdirs(self) -> list[dict[str, Any]]:
        """(site_id, workdir) of every job added, in order (what a workdir conflict names)."""
        return [{"site_id": site_id, "workdir": workdir} for (site_id, workdir), _ in
                sorted(self.seen.items(), key=operator.itemgetter(1))]

    def _path(self, state: str, has_in: bool, has_out: bool, app_id: int) -> tuple[str, dict[str, Any] | None]:
        """(final state, creation event data) of a new job: creation is the CREATED ->
        initial transition, and steps with no work are taken at once."""
        ctx = StepContext(has_stage_in=has_in, has_stage_out=has_out, has_preprocess=self.rules[app_id].has_preprocess)
        path = [S(state), *settle(S(state), ctx)]
        steps = [str(p) for p in path[:-1]]
        settled = self.paths[(state, has_in, has_out, app_id)] = (str(path[-1]), {"via": steps} if steps else None)
        return settled

    def foreseen_event(self, references: tuple[set[int], set[tuple[int, str]], set[int], bool]) -> _EventKind | None:
        """The creation event every job will have, when it is known before any job is
        converted: all name one app by id, it exists (and is in the token's scope), and
        no job gives parents or transfers. None otherwise."""
        app_ids, app_names, parent_ids, transfers = references
        if len(app_ids) != 1 or app_names or parent_ids or transfers:
            return None
        app = self.lookups.apps.get(next(iter(app_ids)))
        if app is None or (self.site_scope is not None and app["site_id"] != self.site_scope):
            return None
        if app["id"] not in self.rules:
            self.rules[app["id"]] = AppRules(app)
        state, message = _NO_PARENTS
        final, data = self.paths.get((state, False, False, app["id"])) or self._path(state, False, False, app["id"])
        return app["site_id"], final, message, data


def _lookups(conn: Connection, owner_id: int, app_ids: set[int], app_names: set[tuple[int, str]],
             parent_ids: set[int], with_transfers: bool) -> _Lookups:
    """Read what creating jobs with these apps (by id, or by (site, name)) and parents
    needs; the transfer locations of the apps' sites when some job gives transfers."""
    found = _Lookups()
    # Not narrowed to a site token's site: an app of the owner elsewhere is refused in
    # _resolve_apps as PERMISSION_DENIED (sites.py's scoping rule), not reported missing.
    cond = [apps.c.owner_id == owner_id]
    if app_ids:
        for r in conn.execute(select(apps).where(*cond, apps.c.id.in_(sorted(app_ids)))):
            found.apps[r.id] = dict(r._mapping)
    if app_names:
        rows = conn.execute(select(apps).where(*cond, tuple_(apps.c.site_id, apps.c.name).in_(sorted(app_names))))
        for r in rows:
            found.named_apps[(r.site_id, r.name)] = dict(r._mapping)
    ordered = sorted(parent_ids)
    for i in range(0, len(ordered), CHUNK):
        chunk = ordered[i:i + CHUNK]
        # FOR SHARE (PostgreSQL): a parent's state change, which then looks for children,
        # either committed before this read (which sees the new state) or waits for these
        # children's links and finds them. Read unlocked, a parent seen running could fail
        # meanwhile (directly, or as the child of a failed job: a plain UPDATE, no row
        # lock before it) and leave its new child waiting for good. Creates of children
        # of one parent do not wait for each other.
        for r in conn.execute(select(jobs.c.id, jobs.c.state).where(jobs.c.owner_id == owner_id, jobs.c.id.in_(chunk))
                              .order_by(jobs.c.id).with_for_update(read=True)):
            found.parents[r.id] = r.state
    if with_transfers:
        sites_used = {a["site_id"] for a in found.apps.values()} | {a["site_id"] for a in found.named_apps.values()}
        found.aliases = _location_aliases(conn, sites_used)
    return found


def create_jobs(conn: Connection, owner_id: int, site_scope: int | None, specs: list[dict[str, Any]],
                now: datetime) -> list[dict[str, Any]]:
    """Create jobs atomically. Specs are validated dicts of job columns plus app_name,
    parent_ids and transfers. Returns the created rows in request order."""
    lookups = _lookups(conn, owner_id, {s["app_id"] for s in specs if s["app_id"]},
                       {(s["site_id"], s["app_name"]) for s in specs if not s["app_id"]},
                       {p for s in specs for p in s["parent_ids"]}, any(s["transfers"] for s in specs))
    creation = _Creation(owner_id, site_scope, now, lookups)
    creation.add(specs)
    rows, event_data = creation.rows, creation.event_data
    events_done = False
    if conn.dialect.name == "postgresql" and len(rows) < COPY_MIN_ROWS:
        # The jobs and their creation events in one statement (one round trip).
        ids = _insert_with_events(conn, owner_id, rows, event_data, now)
        events_done = True
    else:
        try:
            with conn.begin_nested():
                ids = insert_rows(conn, jobs, rows)
        except _unique_violations(conn) as exc:
            raise _workdir_conflict(conn, specs) from exc
    for row, jid in zip(rows, ids, strict=True):
        row["id"] = jid
    _write_dependents(conn, creation, events_done)
    return rows


def create_jobs_streamed(conn: Connection, owner_id: int, site_scope: int | None, count: int,
                         references: tuple[set[int], set[tuple[int, str]], set[int], bool],
                         chunks: Iterable[list[dict[str, Any]] | JobColumns],
                         on_rows: Callable[[list[dict[str, Any]] | JobColumns], None]) -> None:
    """PostgreSQL, a large create: create_jobs over `count` specs that arrive in chunks
    (made, and validated, by the caller as they are asked for), each checked, turned
    into rows and written to one open COPY while PostgreSQL takes in the chunk before:
    the server's conversion and the database's inserts overlap instead of taking turns.
    `references` are the (app ids, (site id, app name) pairs, parent ids, any transfers)
    of all the jobs, read up front (nothing else can run while the COPY is open).
    A chunk is a list of specs or JobColumns (taken the general way when they need it).
    `on_rows` gets each chunk's rows (or its JobColumns), with their ids, as soon as
    they are written.
    The jobs' times (and their events') are the transaction's start, PostgreSQL's now():
    the COPY leaves those columns to their defaults (revision 0017), which spares
    PostgreSQL parsing three timestamps per row.
    Anything raised (by the chunks, the checks or the database) leaves nothing behind:
    the transaction fails as a whole."""
    now, lookups = _streamed_start(conn, owner_id, references)
    creation = _Creation(owner_id, site_scope, now, lookups, keep_rows=bool(references[2]) or references[3])
    foreseen = creation.foreseen_event(references)
    # Foreseen: the events statement draws the ids (sent ahead, below), so the server
    # converts the first jobs at once instead of waiting for them (~5 ms for 10,000).
    ids: list[int] = [] if foreseen is not None else draw_ids(conn, jobs, count)
    events = _CreationEvents(foreseen)

    # Left out of the COPY when every row has it: the new job's usual values, and the
    # transaction's time (revision 0017's defaults).
    copy_defaults = {**INSERT_DEFAULTS, **dict.fromkeys(TIME_DEFAULTS, now)}

    # The one app of a foreseen create: chunks given as columns are checked against it.
    app_id = next(iter(references[0])) if foreseen is not None else 0

    def convert(chunk: list[dict[str, Any]] | JobColumns) -> list[dict[str, Any]] | JobColumns:
        if isinstance(chunk, JobColumns):
            if foreseen is None or not creation.add_columns(chunk, foreseen, app_id):
                chunk = chunk.general()
            elif creation.count > count:
                raise ValueError(f"more than the {count} jobs announced")
            else:
                return chunk  # of the foreseen kind by construction: nothing for events.add to check
        start = creation.count
        creation.add(chunk)
        if creation.count > count:
            raise ValueError(f"more than the {count} jobs announced")
        events.add(chunk, creation.event_data[start:])
        return chunk

    def write(stream: CopyStream, chunk: list[dict[str, Any]] | JobColumns, start: int) -> int:
        """Give the chunk its ids, hand it to on_rows and COPY it; how many jobs it has."""
        if isinstance(chunk, JobColumns):
            n = len(chunk.workdirs)
            chunk.ids = ids[start:start + n]
            on_rows(chunk)
            stream.write_batch(CopyBatch.of_columns(jobs, _JOB_COLUMNS, chunk.values(), chunk.fixed, n, with_ids=True,
                                                    defaults=copy_defaults), chunk.ids)
            return n
        chunk_ids = ids[start:start + len(chunk)]
        for row, jid in zip(chunk, chunk_ids, strict=True):
            row["id"] = jid
        on_rows(chunk)
        stream.write(chunk, chunk_ids)
        return len(chunk)

    pending = iter(chunks)
    ahead: list[list[dict[str, Any]] | JobColumns] = []
    try:
        # In _streamed_start's savepoint.
        if foreseen is not None:
            # Known up front: PostgreSQL writes the events while the server converts
            # the first jobs (a third: the events cost the database about a third of
            # what converting costs the server), instead of after the COPY.
            with sent_ahead(conn, driver_statement("jobs.creation_events_drawn", lambda: _CREATION_EVENTS_DRAWN,
                                                   conn.dialect),
                            _events_params(conn, creation, count, [foreseen], "{" + ",".join("1" * count) + "}")) \
                    as events_written:
                while creation.count < count // 3:
                    specs = next(pending, None)
                    if specs is None:
                        break
                    ahead.append(convert(specs))
                got = events_written()
            ids = got[2]
        with CopyStream(conn, jobs, _JOB_COLUMNS, with_ids=True, defaults=copy_defaults) as stream:
            start = 0
            for chunk in ahead:
                start += write(stream, chunk, start)
            ahead.clear()
            for chunk in pending:
                start += write(stream, convert(chunk), start)
            if creation.count != count:
                raise ValueError(f"{creation.count} jobs given, {count} announced")
            if foreseen is None:
                # Made while PostgreSQL still takes in the last rows (the COPY ends below).
                params = _events_params(conn, creation, ids, events.kinds, events.picks_text())
    except _unique_violations(conn) as exc:
        driver_rows(conn, plain_statement(f"ROLLBACK TO SAVEPOINT {_STREAMED_SAVEPOINT}"), {})
        raise _workdir_conflict(conn, creation.site_workdirs()) from exc
    if foreseen is None:
        got = conn.execute(_CREATION_EVENTS, params).one()
    if got[0] != count:
        raise RuntimeError(f"{got[0]} creation events written for {count} jobs")
    event_log.note_inserted(conn, got[1])
    if creation.keep_rows:  # else no job has parents or transfers: nothing depends on them
        _write_dependents(conn, creation, True)


# The savepoint a streamed create sets before it writes (store.create_jobs_streamed): a
# workdir taken fails the COPY, and _workdir_conflict then reads which job has it.
_STREAMED_SAVEPOINT = "balsam_streamed_create"


def _app_by_id() -> Any:
    return select(apps).where(apps.c.owner_id == bindparam("owner_id"), apps.c.id == bindparam("app_id"))


def _streamed_start(conn: Connection, owner_id: int, references: tuple[set[int], set[tuple[int, str]], set[int], bool]
                    ) -> tuple[datetime, _Lookups]:
    """create_jobs_streamed's first steps: the transaction's time (now()), the
    savepoint, and _lookups of `references`; for jobs of one app by id with no parents
    and no transfers (the usual large create), all three in one round trip instead of
    four (the savepoint's release was a fifth: the commit ends it). PostgreSQL has
    nothing to do until they are answered."""
    app_ids, app_names, parent_ids, transfers = references
    one_app = len(app_ids) == 1 and not app_names and not parent_ids and not transfers
    items = [(plain_statement(_NOW), {}), (plain_statement(f"SAVEPOINT {_STREAMED_SAVEPOINT}"), {})]
    if one_app:
        items.append((driver_statement("jobs.app_by_id", _app_by_id, conn.dialect),
                      {"owner_id": owner_id, "app_id": next(iter(app_ids))}))
    answers = driver_batch(conn, items, dicts=True)
    now = next(iter(answers[0][0].values())).astimezone(UTC)
    if not one_app:
        return now, _lookups(conn, owner_id, *references)
    found = _Lookups()
    for row in answers[2]:
        found.apps[row["id"]] = row
    return now, found


# The creation events of a streamed create (one per job, CREATED -> its state, ids drawn
# in job order), marked and notified as store.events.append does. Made from what the
# server already knows, not read back from the new rows (joining 10,000 jobs by id cost
# PostgreSQL a quarter of the events' time, after the COPY, while the server waits):
# each job's (site, state, message, data) is one of a few distinct ones, numbered in
# :picks into the arrays :sites, :states, :messages and :datas. :ids and :picks are
# array literals (one string each: binding 10,000 ints costs a driver call per int).
# The values are cast once, to the columns' own types (JSONB, VARCHAR(n)): cast per row
# (text to jsonb parses the data again for every event, text to VARCHAR(n) checks its
# length) they cost PostgreSQL ~1 us of the ~6 us per event.
_KIND_TYPE, _STATE_TYPE = (event_log.events.c[c].type.compile(dialect=postgresql.dialect()) for c in ("kind", "to_state"))


def _creation_events(ids: str, drawn: str = "") -> Any:
    return text(
        f"WITH {drawn}" + event_log.marked_insert_sql(
            "(SELECT CAST(:owner_id AS BIGINT) AS owner_id, (CAST(:sites AS BIGINT[]))[u.pick] AS site_id, "
            f"u.id AS job_id, CAST(:kind AS {_KIND_TYPE}) AS kind, CAST(NULL AS BIGINT) AS subject_id, "
            f"CAST(:from_state AS {_STATE_TYPE}) AS from_state, (CAST(:states AS {_STATE_TYPE}[]))[u.pick] AS to_state, "
            "CAST(:now AS TIMESTAMPTZ) AS time, CAST(:now AS TIMESTAMPTZ) AS receive_time, "
            "(CAST(:datas AS JSONB[]))[u.pick] AS data, (CAST(:messages AS TEXT[]))[u.pick] AS message "
            f"FROM unnest({ids}, CAST(CAST(:picks AS TEXT) AS INT[])) "
            "WITH ORDINALITY AS u(id, pick, ord) ORDER BY u.ord) AS v")
        + " SELECT count(*) AS n, max(id) AS top" + (", (SELECT ids FROM drawn) AS ids" if drawn else "")
        + " FROM new_events")


_CREATION_EVENTS = _creation_events("CAST(CAST(:ids AS TEXT) AS BIGINT[])")
# The same, drawing the jobs' :n ids first (store.bulk.draw_ids' query) and answering them.
_CREATION_EVENTS_DRAWN = _creation_events(
    "(SELECT ids FROM drawn)", f"drawn(ids) AS MATERIALIZED ({draw_ids_sql(jobs)}), ")


_EventKind = tuple[int, str, str, dict[str, Any] | None]  # site, state, message, event data
_SITE, _STATE, _MESSAGE = operator.itemgetter("site_id"), operator.itemgetter("state"), operator.itemgetter("state_message")


class _CreationEvents:
    """The creation events of a streamed create, gathered a chunk at a time while
    PostgreSQL takes in the jobs: each job's (site, state, message, event data) as a
    number (from 1) into the distinct ones. With `foreseen` (the events were written
    before the jobs, all of that kind) each job is only checked to be of that kind."""

    def __init__(self, foreseen: _EventKind | None = None) -> None:
        self.foreseen = foreseen
        self.numbers: dict[tuple[int, str, str, int], int] = {}
        self.kinds: list[_EventKind] = []
        self.picks: list[int] = []

    def add(self, rows: list[dict[str, Any]], event_data: list[dict[str, Any] | None]) -> None:
        if self.foreseen is not None:
            site, state, message, data = self.foreseen
            n = len(rows)
            # Whole columns at a time (C loops): a Python loop per job cost a tenth of converting it.
            if not (n == len(event_data) == sum(map(operator.is_, event_data, itertools.repeat(data)))
                    and list(map(_SITE, rows)).count(site) == n and list(map(_STATE, rows)).count(state) == n
                    and list(map(_MESSAGE, rows)).count(message) == n):
                raise RuntimeError(f"the creation events were written up front as {self.foreseen}; a job differs")
            return
        numbers, picks = self.numbers, self.picks
        for row, data in zip(rows, event_data, strict=True):
            # Event data is shared by the jobs that took the same path (_Creation.paths):
            # keyed by identity, it is encoded once.
            key = (row["site_id"], row["state"], row["state_message"], id(data))
            n = numbers.get(key)
            if n is None:
                self.kinds.append((row["site_id"], row["state"], row["state_message"], data))
                n = numbers[key] = len(self.kinds)
            picks.append(n)

    def picks_text(self) -> str:
        return "{" + ",".join(map(str, self.picks)) + "}"


def _events_params(conn: Connection, creation: _Creation, ids: list[int] | int, kinds: list[_EventKind],
                   picks: str) -> dict[str, Any]:
    """_CREATION_EVENTS's parameters: job `ids[i]` has the event kinds[picks[i] - 1];
    _CREATION_EVENTS_DRAWN's when `ids` is how many to draw."""
    pairs = {(creation.owner_id, site_id) for site_id, _, _, _ in kinds}
    return {
        "owner_id": creation.owner_id, "kind": event_log.JOB_STATE, "from_state": str(S.CREATED), "now": creation.now,
        "sites": [k[0] for k in kinds], "states": [k[1] for k in kinds], "messages": [k[2] for k in kinds],
        "datas": [None if k[3] is None else codec_dumps(k[3]) for k in kinds],
        **({"n": ids} if isinstance(ids, int) else {"ids": "{" + ",".join(map(str, ids)) + "}"}),
        "picks": picks, "channel": event_log.EVENTS_CHANNEL,
        "hint": event_log.wake_hint([{"owner_id": o, "site_id": s} for o, s in pairs], conn)}


def _write_dependents(conn: Connection, creation: _Creation, events_done: bool) -> None:
    """Parent links, transfer items and (unless written with the jobs) creation events of
    rows that have their ids."""
    rows = creation.rows
    links = [{"child_id": row["id"], "parent_id": p} for row in rows for p in set(row["parent_ids"])]
    if links:
        conn.execute(insert(job_parents), links)
    items = [dict(t, job_id=row["id"]) for row, ts in zip(rows, creation.transfers, strict=True) for t in ts]
    if items:
        insert_rows(conn, transfer_items, items)
    if events_done:
        return
    job_event = event_log.job_event
    owner_id, now = creation.owner_id, creation.now
    event_log.append(conn, [job_event(owner_id, row["site_id"], row["id"], S.CREATED, row["state"], now, data,
                                      row["state_message"])
                            for row, data in zip(rows, creation.event_data, strict=True)])


_JOB_COLUMNS = [c.name for c in jobs.columns if c.name != "id"]


_PG_DIALECT = postgresql.dialect()


def _pg_type(column: Any, json_as: str = "TEXT") -> str:
    # Without a column's COLLATE (workdir's "C"): an array type cannot have one, and the
    # values take the column's collation where they are compared with it.
    return json_as if is_json(column) else column.type.compile(dialect=_PG_DIALECT).split(" COLLATE ")[0]


_JOB_TYPES = [_pg_type(jobs.c[c]) for c in _JOB_COLUMNS]
_JSON_COLUMNS = {c for c in _JOB_COLUMNS if is_json(jobs.c[c])}
# Jobs from parameter arrays (one per column, JSON as text), a taken (site, workdir)
# skipped instead of raising (no savepoint needed to keep the transaction usable for
# the error message); then their creation events, joined to the new rows by (site,
# workdir) (unique within a create), marked and notified as store.events.append does.
# One round trip for what took two.
_INSERT_WITH_EVENTS = text(
    "WITH new_jobs AS ("
    f"INSERT INTO jobs ({', '.join(_JOB_COLUMNS)}) "
    f"SELECT {', '.join(f'j.{c}::jsonb' if c in _JSON_COLUMNS else f'j.{c}' for c in _JOB_COLUMNS)} "
    f"FROM unnest({', '.join(f'CAST(:j_{c} AS {t}[])' for c, t in zip(_JOB_COLUMNS, _JOB_TYPES, strict=True))}) "
    f"AS j({', '.join(_JOB_COLUMNS)}) "
    "ON CONFLICT (site_id, workdir) DO NOTHING RETURNING id, site_id, workdir), "
    + event_log.marked_insert_sql(
        "(SELECT e.owner_id, n.site_id, n.id AS job_id, e.kind, e.subject_id, e.from_state, e.to_state, e.time, "
        "e.receive_time, e.data, e.message FROM new_jobs AS n JOIN unnest(CAST(:e_site_id AS BIGINT[]), "
        "CAST(:e_workdir AS TEXT[]), CAST(:e_owner_id AS BIGINT[]), CAST(:e_kind AS TEXT[]), CAST(:e_subject_id AS BIGINT[]), "
        "CAST(:e_from_state AS TEXT[]), CAST(:e_to_state AS TEXT[]), CAST(:e_time AS TIMESTAMPTZ[]), "
        "CAST(:e_receive_time AS TIMESTAMPTZ[]), CAST(:e_data AS TEXT[]), CAST(:e_message AS TEXT[])) "
        "AS e(site_id, workdir, owner_id, kind, subject_id, from_state, to_state, time, receive_time, data, message) "
        "ON e.site_id = n.site_id AND e.workdir = n.workdir ORDER BY n.id) AS v")
    + " SELECT n.id, n.site_id, n.workdir, (SELECT max(id) FROM new_events) AS top FROM new_jobs AS n")


def _insert_with_events(conn: Connection, owner_id: int, rows: list[dict[str, Any]],
                        event_data: list[dict[str, Any] | None], now: datetime) -> list[int]:
    """PostgreSQL, a few jobs: insert them and their CREATED -> state events in one
    statement; their ids in row order. AlreadyExists (rolling the whole call back, the
    notification with it) when a workdir is taken."""
    params: dict[str, Any] = {}
    for c in _JOB_COLUMNS:
        values = column_values(jobs, c, rows)
        params[f"j_{c}"] = [codec_dumps(v) for v in values] if c in _JSON_COLUMNS else values
    params.update(
        e_site_id=[r["site_id"] for r in rows], e_workdir=[r["workdir"] for r in rows], e_owner_id=[owner_id] * len(rows),
        e_kind=[event_log.JOB_STATE] * len(rows), e_subject_id=[None] * len(rows),
        e_from_state=[str(S.CREATED)] * len(rows), e_to_state=[str(r["state"]) for r in rows],
        e_time=[now] * len(rows), e_receive_time=[now] * len(rows),
        e_data=[None if d is None else codec_dumps(d) for d in event_data],
        e_message=[r["state_message"] for r in rows],
        channel=event_log.EVENTS_CHANNEL,
        hint=event_log.wake_hint([{"owner_id": owner_id, "site_id": r["site_id"]} for r in rows]))
    got = conn.execute(_INSERT_WITH_EVENTS, params).all()
    by_key = {(r.site_id, r.workdir): r.id for r in got}
    for i, row in enumerate(rows):
        if (row["site_id"], row["workdir"]) not in by_key:
            # Rows inserted by this statement are not the conflict: look for another job.
            raise _workdir_conflict(conn, [row], first_index=i, exclude=list(by_key.values()))
    event_log.note_inserted(conn, max(r.top for r in got))
    return [by_key[(row["site_id"], row["workdir"])] for row in rows]


@dataclass
class AppDerived:
    """What checking and placing new jobs derives from one app row alone (_Creation's
    rules and paths), kept with a cached row (store.apps.AppCache): deriving them again
    for every single create was two thirds of new_job_row."""
    rules: dict[int, AppRules] = field(default_factory=dict)
    paths: dict[tuple[str, bool, bool, int], tuple[str, dict[str, Any] | None]] = field(default_factory=dict)


def new_job_row(owner_id: int, site_scope: int | None, spec: dict[str, Any], app: dict[str, Any],
                now: datetime, derived: AppDerived | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """create_jobs' checks and row for one job with no parents and no transfers given,
    against its app row `app` (no database read): the row and its creation event's data.
    `derived`: what earlier calls with this same row derived from it (filled here)."""
    lookups = _Lookups(apps={app["id"]: app}, named_apps={(app["site_id"], app["name"]): app})
    derived = derived or AppDerived()
    creation = _Creation(owner_id, site_scope, now, lookups, rules=derived.rules, paths=derived.paths)
    creation.add([spec])
    return creation.rows[0], creation.event_data[0]


def create_one(conn: Connection, owner_id: int, site_scope: int | None, spec: dict[str, Any],
               now: datetime) -> dict[str, Any] | None:
    """SQLite: create_jobs for one job with no parents and no transfers given, every
    statement on the driver's cursor (store.driver) in the caller's write transaction:
    the app read, the checks (new_job_row), the job row and its creation event. SQLAlchemy's
    per-statement work (and create_jobs' savepoint) cost more than SQLite's work here.
    Returns the row; None when it wrote nothing and create_jobs must run, which says
    why: the app is missing, the job is refused, the workdir is taken."""
    by_id = bool(spec["app_id"])
    found = driver_rows(conn, driver_statement(("jobs.create_one.app", by_id), lambda: select(apps).where(
        apps.c.owner_id == bindparam("owner_id"),
        *((apps.c.id == bindparam("app_id"),) if by_id else
          (apps.c.site_id == bindparam("site_id"), apps.c.name == bindparam("name")))), conn.dialect),
        {"owner_id": owner_id, "app_id": spec["app_id"], "site_id": spec["site_id"], "name": spec["app_name"]},
        dicts=True)
    if not found:
        return None
    try:
        row, event_data = new_job_row(owner_id, site_scope, spec, found[0], now)
    except BalsamError:
        return None
    try:
        (row["id"],) = insert_rows(conn, jobs, [row])
    except IntegrityError:  # the workdir is taken: the failed statement wrote nothing
        return None
    event_log.append(conn, [event_log.job_event(owner_id, row["site_id"], row["id"], S.CREATED, row["state"], now,
                                                event_data, row["state_message"])])
    return row


@dataclass(frozen=True, slots=True)
class Once:
    """The request_id record a create writes in its own statement (server/idempotency.py):
    `response` is the answer without the new job's id, completed in the statement by
    `id_tag` and the id as a 9-byte varint."""

    method: str
    request_id: str
    request_hash: str
    response: bytes
    id_tag: bytes


def _varint_sql(expr: str) -> str:
    """The bigint `expr` (>= 0) as a protobuf varint of 9 bytes (7 bits each: every
    int64 id fits; shorter values are over-long, which protobuf reads the same)."""
    out = "decode('000000000000000000', 'hex')"
    for i in range(9):
        out = f"set_byte({out}, {i}, (({expr} >> {7 * i}) & 127)::int{' | 128' if i < 8 else ''})"
    return out


_CREATION_TIMES = ("create_time", "update_time", "state_time")


# The columns in which every job the at-once statement takes has the same value (a job
# with no parents and no transfers, as new_job_row makes it): literals in the statement,
# not parameters, each of which costs its dumping and sending at every create.
_AT_ONCE_FIXED = {**_NEW_JOB_DEFAULTS, "transfers": {}, "pending_parents": 0, "parent_ids": []}
# Columns bound by the parameters the statement has anyway (its app check's).
_AT_ONCE_SHARED = {"owner_id": "owner_id", "site_id": "site_id", "app_id": "app_id"}


def _sql_literal(value: Any, json: bool) -> str:
    if value is None:
        return "NULL"
    if json:
        value = codec_dumps(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    assert type(value) is int, value
    return str(value)


def _at_once_sql(once: bool) -> Any:
    # Every column typed (INSERT ... SELECT does not coerce untyped NULLs), the times as
    # one parameter; short names keep the statement within psycopg's cache of converted
    # queries (4096 characters, 50 parameters).
    def value(i: int, c: str, t: str) -> str:
        if c in _CREATION_TIMES:
            return "CAST(:now AS TIMESTAMPTZ)"
        t = "JSONB" if c in _JSON_COLUMNS else t
        if c in _AT_ONCE_FIXED:
            return f"CAST({_sql_literal(_AT_ONCE_FIXED[c], c in _JSON_COLUMNS)} AS {t})"
        return f"CAST(:{_AT_ONCE_SHARED.get(c, f'j{i}')} AS {t})"

    values = ", ".join(value(i, c, t) for i, (c, t) in enumerate(zip(_JOB_COLUMNS, _JOB_TYPES, strict=True)))
    prior = ("once_prior AS MATERIALIZED (SELECT request_hash, response FROM idempotency_keys WHERE "
             "owner_id = :owner_id AND method = :method AND request_id = :request_id), ") if once else ""
    sql = (
        f"WITH {prior}once_app AS MATERIALIZED (SELECT 1 FROM apps WHERE id = :app_id AND owner_id = :owner_id "
        "AND site_id = :site_id AND xmin = CAST(:app_version AS xid)"
        f"{' AND NOT EXISTS (SELECT 1 FROM once_prior)' if once else ''}), "
        f"new_job AS (INSERT INTO jobs ({', '.join(_JOB_COLUMNS)}) SELECT {values} FROM once_app "
        "ON CONFLICT (site_id, workdir) DO NOTHING RETURNING id, owner_id, site_id, state, state_message, create_time), "
        + event_log.marked_insert_sql(
            f"(SELECT n.owner_id, n.site_id, n.id AS job_id, {_sql_literal(event_log.JOB_STATE, False)} AS kind, "
            f"CAST(NULL AS BIGINT) AS subject_id, {_sql_literal(str(S.CREATED), False)} AS from_state, "
            "n.state AS to_state, n.create_time AS time, n.create_time AS receive_time, "
            "CAST(:event_data AS TEXT) AS data, n.state_message AS message FROM new_job AS n) AS v"))
    if once:
        sql += (", once_key AS (INSERT INTO idempotency_keys (owner_id, method, request_id, request_hash, response, "
                "create_time) SELECT n.owner_id, :method, :request_id, :request_hash, "
                f":response || :id_tag || {_varint_sql('n.id')}, n.create_time FROM new_job AS n)")
    sql += " SELECT n.id, (SELECT max(id) FROM new_events) AS top"
    if once:
        sql += (", NULL AS request_hash, NULL AS response FROM new_job AS n "
                "UNION ALL SELECT NULL, NULL, request_hash, response FROM once_prior")
    else:
        sql += " FROM new_job AS n"
    return text(sql)


_AT_ONCE = {once: _at_once_sql(once) for once in (False, True)}
# The job's columns bound as parameters, by the parameter's name (made once: formatting
# them at every create was half of at_once_statement): those read as they are in one
# C-level step, then the JSON ones.
_AT_ONCE_BOUND = [(f"j{i}", c) for i, c in enumerate(_JOB_COLUMNS)
                  if c not in _CREATION_TIMES and c not in _AT_ONCE_FIXED and c not in _AT_ONCE_SHARED]
_AT_ONCE_PLAIN_NAMES = tuple(name for name, c in _AT_ONCE_BOUND if c not in _JSON_COLUMNS)
_AT_ONCE_PLAIN = operator.itemgetter(*(c for _, c in _AT_ONCE_BOUND if c not in _JSON_COLUMNS),
                                     "owner_id", "site_id", "app_id", "create_time")
_AT_ONCE_JSON = tuple((name, c) for name, c in _AT_ONCE_BOUND if c in _JSON_COLUMNS)
_AT_ONCE_FIXED_GET = operator.itemgetter(*_AT_ONCE_FIXED)
_AT_ONCE_FIXED_VALUES = tuple(_AT_ONCE_FIXED.values())
# The statements as the driver takes them (psycopg's %(name)s), compiled once: executed
# with exec_driver_sql, SQLAlchemy neither looks up its compiled cache nor processes each
# parameter, a tenth of the statement's server CPU.
_AT_ONCE_DRIVER: dict[bool, str] = {}


def at_once_statement(dialect: Any, row: dict[str, Any], event_data: dict[str, Any] | None, app_version: str,
                      once: Once | None) -> tuple[str, dict[str, Any]] | None:
    """PostgreSQL: the statement inserting the job of `row` (new_job_row) with its creation
    event, and its request_id record when `once`, in the driver's terms (psycopg's
    %(name)s), and its parameters. Run in autocommit (Database.statement_now, rows as
    tuples), it is the whole create in one round trip; at_once_outcome reads what it did.
    None for a row whose fixed columns (_AT_ONCE_FIXED, literals in the statement) hold
    other values: such a job is not one this statement may create."""
    if _AT_ONCE_FIXED_GET(row) != _AT_ONCE_FIXED_VALUES:
        return None
    params: dict[str, Any] = dict(zip((*_AT_ONCE_PLAIN_NAMES, "owner_id", "site_id", "app_id", "now"),
                                      _AT_ONCE_PLAIN(row), strict=True))
    for name, c in _AT_ONCE_JSON:
        params[name] = codec_dumps(row[c])
    params["app_version"] = app_version
    params["event_data"] = None if event_data is None else codec_dumps(event_data)
    # No origin mark: this replica's fanout takes the hint as another replica's
    # (Database.statement_now does not poke it).
    params["channel"] = event_log.EVENTS_CHANNEL
    params["hint"] = event_log.one_hint(row["owner_id"], row["site_id"])
    if once is not None:
        params.update(method=once.method, request_id=once.request_id, request_hash=once.request_hash,
                      response=once.response, id_tag=once.id_tag)
    sql = _AT_ONCE_DRIVER.get(once is not None)
    if sql is None:
        sql = _AT_ONCE_DRIVER[once is not None] = str(_AT_ONCE[once is not None].compile(dialect=dialect))
    return sql, params


def at_once_outcome(got: list[Any], row: dict[str, Any], once: Once | None) -> int | tuple[str, bytes] | None:
    """From at_once_statement's rows: the new job's id (`row` gets it too); or (request
    hash, answer) of an earlier request with the same request_id, and then it wrote
    nothing; or None when it wrote nothing for another reason: the app is no longer the
    version validated against (updated or deleted, here or by another replica), the
    workdir is taken, or a concurrent request with the same request_id won. The caller
    then creates through create_jobs in a transaction, which reports each of these.
    A statement that failed with IntegrityError (the app deleted, or the request_id
    taken, while it ran) wrote nothing either and means the same as None."""
    for job_id, _top, *prior in got:  # tuples: (id, top) or (id, top, request_hash, response)
        if job_id is not None:
            row["id"] = job_id
            return int(job_id)
        if once is not None:
            return prior[0], bytes(prior[1])
    return None


def refresh_planner_stats(conn: Connection, inserted: int) -> bool:
    """ANALYZE jobs when `inserted` rows are a large share of what the query planner
    believes the table holds; True when it ran.

    Right after a bulk create the planner still sees an empty table (PostgreSQL's
    autovacuum refreshes statistics only on its next pass, SQLite never on its own). It
    then pages through a site's jobs with a scan and sort of every row per page instead
    of walking the primary key: three times slower. So the table is analyzed when it
    has at least doubled since the planner last looked: a belief off by less than that
    does not change those plans, and on PostgreSQL autovacuum still refreshes it at 10%
    growth, at most once a minute. Analyzing at every 10% growth (as this did on
    PostgreSQL) cost more than the creates themselves during a run of bulk creates:
    ANALYZE jobs takes PostgreSQL 0.3-0.6 s of CPU at any size past its 30,000-row
    sample, that is every 10,000-job create of a table of 100,000 (30-60 us per job,
    against ~20 us for inserting it), about 48 times on the way to 1,000,000 jobs
    against 7 when doubling.
    """
    dialect = conn.dialect.name
    if dialect == "postgresql":
        believed = conn.execute(text("SELECT reltuples FROM pg_class WHERE oid = 'jobs'::regclass")).scalar_one()
    elif dialect == "sqlite":
        believed = _sqlite_row_estimate(conn)
    else:
        return False
    share = 1.0
    if believed >= 0 and inserted < max(ANALYZE_MIN_ROWS, share * believed):
        return False
    conn.exec_driver_sql("ANALYZE jobs")
    return True


def _sqlite_row_estimate(conn: Connection) -> int:
    """Rows of jobs per SQLite's last ANALYZE (first number of an sqlite_stat1 entry), -1 if never."""
    has_stats = conn.exec_driver_sql("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'").first()
    if has_stats is None:
        return -1
    row = conn.exec_driver_sql("SELECT stat FROM sqlite_stat1 WHERE tbl = 'jobs' LIMIT 1").first()
    return int(row[0].split()[0]) if row else -1


ANALYZE_MIN_ROWS = 1000


def _unique_violations(conn: Connection) -> tuple[type[BaseException], ...]:
    """What a duplicate key raises: COPY on PostgreSQL raises psycopg's own error, not
    SQLAlchemy's (psycopg is imported only there: it is the `postgres` extra)."""
    if conn.dialect.name != "postgresql":
        return (IntegrityError,)
    import psycopg

    return (IntegrityError, psycopg.errors.UniqueViolation)


def _workdir_conflict(conn: Connection, specs: list[dict[str, Any]], first_index: int = 0,
                      exclude: list[int] | None = None) -> Exception:
    for i, spec in enumerate(specs, start=first_index):
        stmt = select(jobs.c.id).where(jobs.c.site_id == spec["site_id"], jobs.c.workdir == spec["workdir"])
        if exclude:
            stmt = stmt.where(jobs.c.id.not_in(exclude))
        hit = conn.execute(stmt).first()
        if hit:
            return AlreadyExists(f"jobs[{i}].workdir {spec['workdir']!r} is already used by job {hit.id} at this site",
                                 field=f"jobs[{i}].workdir")
    return AlreadyExists("a job with the same workdir already exists at this site", field="workdir")


# ---------------------------------------------------------------------------- update

def update_jobs(conn: Connection, rows: list[dict[str, Any]], values: dict[str, Any], tags_merge: dict[str, str] | None,
                target: JobState | None, now: datetime, *, role: Role, message: str = "",
                data: dict[str, Any] | None = None, validate_only: bool = False,
                run_values: dict[int, dict[str, Any]] | None = None) -> tuple[list[int], dict[int, Refusal]]:
    """Apply a patch to `rows` as `role`; returns (changed ids, {id: refusal}). A job
    the state change is refused for changes in nothing else either."""
    engine = Transitioner(conn, now)
    movers = [r for r in rows if target is not None and r["state"] != target]
    refused: dict[int, Refusal] = {}
    if movers:
        assert target is not None
        _, refused, _, _ = engine.check(movers, target, role, run_values)
    ok_rows = [r for r in rows if r["id"] not in refused]
    if validate_only or not ok_rows:
        return [r["id"] for r in ok_rows], refused
    ids = [r["id"] for r in ok_rows]
    if values or tags_merge:
        dialect = conn.dialect.name
        sets: dict[str, Any] = {**values, "update_time": now}
        if tags_merge:
            sets["tags"] = _merged_tags(dialect, tags_merge)
        conn.execute(update(jobs).where(id_in(jobs.c.id, ids, dialect)).values(**sets))
    movers = [r for r in movers if r["id"] not in refused]
    if movers:
        assert target is not None
        engine.move(movers, target, role, message=message, data=data, values=run_values)
        engine.flush()
    return ids, refused


def patch_job(conn: Connection, q: JobQuery, values: dict[str, Any], now: datetime) -> dict[str, Any] | None:
    """Set plain columns (no state change) of the one job `q` selects and return its row,
    or None when there is none: one statement where select, update and re-read took three
    round trips."""
    row = conn.execute(update(jobs).where(*conditions(q)).values(**values, update_time=now)
                       .returning(*jobs.columns)).first()
    return dict(row._mapping) if row is not None else None


def _merged_tags(dialect: str, tags: dict[str, str]) -> ColumnElement[Any]:
    """The row's tags with `tags` laid over them, computed in the UPDATE itself (one
    statement for any number of rows). Tag values are strings, never null, so SQLite's
    json_patch (RFC 7396) is a plain overlay like PostgreSQL's jsonb `||`."""
    if dialect == "postgresql":
        return jobs.c.tags.op("||")(bindparam(None, tags, type_=JSONB()))
    return func.json_patch(jobs.c.tags, json.dumps(tags))


def select_for_change(conn: Connection, q: JobQuery, with_tags: bool) -> list[dict[str, Any]]:
    cols = (*ENGINE_COLUMNS, jobs.c.tags) if with_tags else ENGINE_COLUMNS
    stmt = select(*cols).where(*conditions(q)).order_by(jobs.c.id)
    if conn.dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    return [dict(r._mapping) for r in conn.execute(stmt)]


# ---------------------------------------------------------------------------- delete

def delete_jobs(conn: Connection, rows: list[dict[str, Any]], validate_only: bool, *, cascade: bool = False,
                now: datetime | None = None) -> tuple[list[int], dict[int, Refusal]]:
    """Delete `rows`, refusing running jobs and, unless `cascade`, jobs whose children
    still wait on them (the children would wait forever). With `cascade` those children
    follow their on_parent_failure policy, as if the parent had failed."""
    refused = {r["id"]: Refusal(r["id"], "JOB_RUNNING",
                                f"job {r['id']} is RUNNING in launcher session {r['session_id'] or '-'}; "
                                "kill it first (state KILLED), then delete it")
               for r in rows if r["state"] in ACTIVE_STATES}
    candidates = [r for r in rows if r["id"] not in refused]
    waiting = _waiting_children(conn, [r["id"] for r in candidates if r["state"] not in FINAL_STATES])
    deleted = {r["id"] for r in candidates}
    waited_on = [r for r in candidates if set(waiting.get(r["id"], ())) - deleted]
    if not cascade:
        for r in waited_on:
            children = sorted(set(waiting[r["id"]]) - deleted)
            shown = ", ".join(str(c) for c in children[:10]) + (f" and {len(children) - 10} more" if len(children) > 10 else "")
            refused[r["id"]] = Refusal(r["id"], "CHILDREN_WAITING",
                                       f"job {r['id']} has children waiting on it (jobs {shown}); delete them first, "
                                       "or delete with cascade to apply their parent-failure policy")
        waited_on = []
    ids = [r["id"] for r in candidates if r["id"] not in refused]
    if not validate_only and ids:
        if waited_on:
            engine = Transitioner(conn, now or utcnow())
            engine.parents_deleted(waited_on)
            engine.flush()
        conn.execute(delete(jobs).where(id_in(jobs.c.id, ids, conn.dialect.name)))
    return ids, refused


def _waiting_children(conn: Connection, parent_ids: list[int]) -> dict[int, list[int]]:
    """Children in AWAITING_PARENTS of each parent."""
    out: dict[int, list[int]] = {}
    if not parent_ids:
        return out
    rows = conn.execute(select(job_parents.c.parent_id, job_parents.c.child_id)
                        .join(jobs, jobs.c.id == job_parents.c.child_id)
                        .where(id_in(job_parents.c.parent_id, parent_ids, conn.dialect.name),
                               jobs.c.state == S.AWAITING_PARENTS).order_by(job_parents.c.child_id))
    for r in rows:
        out.setdefault(r.parent_id, []).append(r.child_id)
    return out


# ---------------------------------------------------------------------------- retry

def retry_jobs(conn: Connection, rows: list[dict[str, Any]], now: datetime, *, reset_run_count: bool,
               validate_only: bool) -> tuple[list[int], dict[int, Refusal]]:
    """Move each retryable job to its restart point (Transitioner.restart_points) as its
    owner; returns (retried ids, {id: refusal})."""
    refused = {r["id"]: Refusal(r["id"], "NOT_RETRYABLE",
                                f"job {r['id']} is {r['state']}; only {', '.join(sorted(RETRYABLE_STATES))} jobs "
                                "can be retried")
               for r in rows if r["state"] not in RETRYABLE_STATES}
    candidates = [r for r in rows if r["id"] not in refused]
    engine = Transitioner(conn, now)
    by_target: dict[JobState, list[dict[str, Any]]] = {}
    points = engine.restart_points(candidates)
    for row in candidates:
        by_target.setdefault(points[row["id"]], []).append(row)
    values = {r["id"]: {"run_count": 0} for r in candidates} if reset_run_count else None
    # Jobs waiting on parents again go first: a retried parent then finds the children it
    # failed already waiting (a child retried with its parent moves once, not twice).
    for target in sorted(by_target, key=lambda t: t is not S.AWAITING_PARENTS):
        group = by_target[target]
        if validate_only:
            refused.update(engine.check(group, target, Role.USER, values)[1])
        else:
            refused.update(engine.move(group, target, Role.USER, message="retried by its owner",
                                       data={"retry": True, "reset_run_count": reset_run_count}, values=values))
    engine.flush()
    return [r["id"] for r in candidates if r["id"] not in refused], refused


def require_one(rows: list[dict[str, Any]], job_id: int) -> dict[str, Any]:
    if not rows:
        raise NotFound(f"job {job_id} not found")
    return rows[0]



