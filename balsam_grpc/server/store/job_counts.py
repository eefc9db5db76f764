"""CountJobs from the job_counts table (revision 0010) instead of the jobs themselves.

Triggers on jobs keep job_counts exact in the transaction of every insert, state change
and delete (cascades included): the count of (owner, site, state) is the sum of n over
its shards. Reading it costs the number of its rows, not of the jobs. On PostgreSQL each
writing transaction adds a row of its own per group it changed (no writer waits on
another's counter); `compact` folds committed rows into shard 0:

    DELETE the owner's shards <> 0 RETURNING them, add their sums into shard 0

in one statement. It only ever moves counts it deleted itself, so it is exact with
writers and other compactions running: rows of transactions in flight are invisible to
it and stay, and of two compactions the second deletes (and moves) only what the first
left.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, text

from balsam_grpc.server.store.jobs import BINDINGS
from balsam_grpc.server.store.tables import job_counts

# The groups CountJobs may ask the table for; any other dimension counts the jobs.
GROUPS = {"state": job_counts.c.state, "site": job_counts.c.site_id}
# A read that met more rows than this (plus a few per group) asks for a compaction.
COMPACT_AFTER_ROWS = 64


def answers(q: Any, group_by: list[str]) -> bool:
    """Can the table answer this JobQuery: owner, site and state terms only."""
    if any(g not in GROUPS for g in group_by):
        return False
    return not any((q.ids, q.tags, q.exclude_tags, q.app_ids, q.app_names, q.parent_ids, q.workdir_contains,
                    q.create_start, q.create_end, q.update_start, q.update_end, q.batch_job_ids, q.session_id))


def _count_params(q: Any) -> dict[str, Any]:
    """The parameters of a count statement for `q` (a store.jobs.JobQuery), only those
    it filters on: their names are its shape."""
    params: dict[str, Any] = {"c_owner": q.owner_id}
    if q.site_scope is not None:
        params["c_scope"] = q.site_scope
    if q.site_ids:
        params["c_sites"] = list(q.site_ids)
    if q.states:
        params["c_states"] = list(q.states)
    if q.exclude_states:
        params["c_exclude"] = list(q.exclude_states)
    return params


def count_outcome(rows: list[Any], group_by: list[str]) -> tuple[int, list[dict[str, Any]], bool]:
    """count's answer from its statement's rows: the group_by columns, count and rows, in
    this order."""
    width = len(group_by)
    groups = [dict(zip(group_by, r[:width], strict=True)) | {"count": int(r[width])} for r in rows]
    read = sum(r[width + 1] for r in rows)
    total = sum(g["count"] for g in groups)
    return total, (groups if group_by else []), read > COMPACT_AFTER_ROWS + 4 * len(rows)


def count_statement(q: Any, group_by: list[str], dialect: str) -> tuple[str, dict[str, Any]]:
    """The statement counting the JobQuery `q` grouped by `group_by`, in the driver's terms
    (psycopg's %(name)s for Database.statement_now on the event loop; pysqlite's :name for
    Database.sqlite_statement), and its parameters: lists bind as one array each
    (PostgreSQL) or one JSON array each (SQLite). None of SQLAlchemy's per-execution work
    (a watcher polls CountJobs many times a second). Its rows go to count_outcome."""
    params = _count_params(q)
    if dialect == "sqlite":
        params = {k: json.dumps(v) if isinstance(v, list) else v for k, v in params.items()}
    shape = (dialect, tuple(params), tuple(group_by))
    sql = _DRIVER_STATEMENTS.get(shape)
    if sql is None:
        conditions = _CONDITIONS[dialect]
        conds = " AND ".join(conditions[name] for name in params)
        shown = "".join(f"{_GROUP_COLUMNS[g]} AS {g}, " for g in group_by)
        sql = f"SELECT {shown}COALESCE(sum(n), 0) AS count, count(*) AS rows FROM job_counts WHERE {conds}"
        if group_by:
            grouped = ", ".join(_GROUP_COLUMNS[g] for g in group_by)
            sql += f" GROUP BY {grouped} HAVING sum(n) <> 0 ORDER BY {grouped}"
        _DRIVER_STATEMENTS[shape] = sql
    return sql, params


_DRIVER_STATEMENTS: dict[tuple[Any, ...], str] = {}
_GROUP_COLUMNS = {"state": "state", "site": "site_id"}


def _conditions(binding: Any) -> dict[str, str]:
    """count_statement's filters in a driver's terms (store.jobs.BINDINGS)."""
    p, in_list = binding.placeholder, binding.in_list
    return {"c_owner": f"owner_id = {p('c_owner')}", "c_scope": f"site_id = {p('c_scope')}",
            "c_sites": in_list("site_id", "c_sites", "BIGINT"), "c_states": in_list("state", "c_states", "VARCHAR"),
            "c_exclude": f"NOT ({in_list('state', 'c_exclude', 'VARCHAR')})"}


_CONDITIONS = {dialect: _conditions(binding) for dialect, binding in BINDINGS.items()}


_COMPACT = text("""
WITH moved AS (
  DELETE FROM job_counts WHERE owner_id = :owner AND shard <> 0 RETURNING owner_id, site_id, state, n
), summed AS (
  SELECT owner_id, site_id, state, sum(n) AS n FROM moved GROUP BY owner_id, site_id, state
)
INSERT INTO job_counts (owner_id, site_id, state, shard, n)
SELECT owner_id, site_id, state, 0, n FROM summed ORDER BY owner_id, site_id, state
ON CONFLICT (owner_id, site_id, state, shard) DO UPDATE SET n = job_counts.n + excluded.n
""")


def compact(conn: Connection, owner_id: int) -> None:
    """Fold the owner's committed shards into shard 0 and drop groups counted at zero
    (PostgreSQL; SQLite keeps shard 0 only)."""
    if conn.dialect.name != "postgresql":
        return
    conn.execute(_COMPACT, {"owner": owner_id})
    conn.execute(text("DELETE FROM job_counts WHERE owner_id = :owner AND shard = 0 AND n = 0"), {"owner": owner_id})
