"""Apps: declarations of applications registered at a site.

Scoped by `owner_id` everywhere. JSON columns use the proto field names as keys and the
short enum names as values, so other stores (jobs) can read them without protobuf:

- parameters: [{"name", "required", "default_value", "help", "type": "STRING"|"INT"|...}]
- transfers:  [{"name", "direction": "IN"|"OUT", "local_path", "required", "recursive",
                "description"}]
- retry_policy: {"max_retries", "quick_failure_seconds", "on_error": ""|"RESTART"|"FAIL",
                 "on_timeout": ...}   ("" = not set)
- hooks: {"preprocess", "postprocess", "handle_error", "handle_timeout"} (booleans)
- kind: "SHELL" | "PYTHON"
- shell: the command template is a bash script (core.command_template)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, func, insert, literal_column, select, update
from sqlalchemy.exc import IntegrityError

from balsam_grpc.core.errors import AlreadyExists, FailedPrecondition, NotFound
from balsam_grpc.server.store.jobs import AppDerived
from balsam_grpc.server.store.rows import owned_row
from balsam_grpc.server.store.tables import apps, jobs

MUTABLE = ("name", "description", "command_template", "shell", "parameters", "transfers", "environment",
           "preamble", "cleanup_globs", "retry_policy", "hooks", "kind", "class_path")


@dataclass
class AppQuery:
    owner_id: int
    ids: list[int] = field(default_factory=list)
    site_ids: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    # A site-scoped token sees only the apps of its own site.
    only_site_id: int | None = None


def get_app(conn: Connection, owner_id: int, app_id: int, *, for_update: bool = False) -> dict[str, Any] | None:
    return owned_row(conn, apps, owner_id, app_id, for_update=for_update)


def require_app(conn: Connection, owner_id: int, app_id: int, *, field: str = "id",
                for_update: bool = False) -> dict[str, Any]:
    row = get_app(conn, owner_id, app_id, for_update=for_update)
    if row is None:
        raise NotFound(f"{field}: app {app_id} not found", field=field)
    return row


def _duplicate(name: str, site_id: int) -> AlreadyExists:
    return AlreadyExists(f"app.name: site {site_id} already has an app named {name!r}; app names are unique per site",
                         field="app.name")


def _name_taken(conn: Connection, site_id: int, name: str, exclude_id: int | None = None) -> bool:
    stmt = select(apps.c.id).where(apps.c.site_id == site_id, apps.c.name == name)
    if exclude_id is not None:
        stmt = stmt.where(apps.c.id != exclude_id)
    return conn.execute(stmt).first() is not None


def create_app(conn: Connection, owner_id: int, site_id: int, values: dict[str, Any],
               now: datetime) -> dict[str, Any]:
    """The caller checks that `site_id` is one of the owner's sites."""
    if _name_taken(conn, site_id, values["name"]):
        raise _duplicate(values["name"], site_id)
    try:
        row = conn.execute(
            insert(apps).values(owner_id=owner_id, site_id=site_id, create_time=now, update_time=now,
                                **{k: values[k] for k in MUTABLE if k in values})
            .returning(*apps.c)
        ).one()
    except IntegrityError:
        raise _duplicate(values["name"], site_id) from None
    return dict(row._mapping)


def update_app(conn: Connection, owner_id: int, app: dict[str, Any], values: dict[str, Any],
               now: datetime) -> dict[str, Any]:
    if "name" in values and _name_taken(conn, app["site_id"], values["name"], exclude_id=app["id"]):
        raise _duplicate(values["name"], app["site_id"])
    changes = {k: v for k, v in values.items() if k in MUTABLE}
    try:
        row = conn.execute(
            update(apps).where(apps.c.id == app["id"], apps.c.owner_id == owner_id)
            .values(update_time=now, **changes).returning(*apps.c)
        ).one()
    except IntegrityError:
        raise _duplicate(values["name"], app["site_id"]) from None
    return dict(row._mapping)


def job_counts(conn: Connection, owner_id: int, app_id: int) -> tuple[int, int]:
    """(all jobs, running jobs) of the app."""
    total = func.count()
    running = func.count().filter(jobs.c.state == "RUNNING")
    row = conn.execute(
        select(total, running).select_from(jobs).where(jobs.c.owner_id == owner_id, jobs.c.app_id == app_id)
    ).one()
    return int(row[0]), int(row[1])


def delete_app(conn: Connection, owner_id: int, app_id: int, *, force: bool) -> int:
    """Delete an app; returns how many of its jobs went with it.

    Refused while the app has jobs, unless `force`; even forced, refused while any of them
    is RUNNING (a launcher holds it). Transfer items and parent links of the deleted jobs
    go with them (foreign keys cascade).
    """
    require_app(conn, owner_id, app_id, for_update=True)
    total, running = job_counts(conn, owner_id, app_id)
    if running:
        raise FailedPrecondition(
            f"app {app_id} has {running} running job(s); kill them or wait for them to end before deleting the app")
    if total and not force:
        raise FailedPrecondition(
            f"app {app_id} has {total} job(s); delete them first or pass force=true to delete them with the app")
    if total:
        conn.execute(delete(jobs).where(jobs.c.owner_id == owner_id, jobs.c.app_id == app_id,
                                        jobs.c.state != "RUNNING"))
    conn.execute(delete(apps).where(apps.c.id == app_id, apps.c.owner_id == owner_id))
    return total


def list_apps(conn: Connection, q: AppQuery, *, after_id: int | None, limit: int) -> list[dict[str, Any]]:
    c = apps.c
    conds = [c.owner_id == q.owner_id]
    if q.ids:
        conds.append(c.id.in_(q.ids))
    if q.site_ids:
        conds.append(c.site_id.in_(q.site_ids))
    if q.names:
        conds.append(c.name.in_(q.names))
    if q.only_site_id is not None:
        conds.append(c.site_id == q.only_site_id)
    if after_id is not None:
        conds.append(c.id > after_id)
    rows = conn.execute(select(apps).where(*conds).order_by(c.id).limit(limit))
    return [dict(r._mapping) for r in rows]


# ---------------------------------------------------------------------------- cached for creates

def read_versioned(conn: Connection, owner_id: int, app_id: int = 0, site_id: int = 0,
                   name: str = "") -> dict[str, Any] | None:
    """The owner's app by id, or by (site, name), with its row version (PostgreSQL's xmin,
    which every UPDATE of the row changes) under "_version"; None when missing."""
    stmt = select(apps, literal_column("apps.xmin::text").label("_version")).where(apps.c.owner_id == owner_id)
    stmt = stmt.where(apps.c.id == app_id) if app_id else stmt.where(apps.c.site_id == site_id, apps.c.name == name)
    row = conn.execute(stmt).first()
    return dict(row._mapping) if row else None


class AppCache:
    """App rows for creating jobs without reading them again, in one server process, each
    with what creating a job derives from the row alone (store.jobs.AppDerived, filled by
    the first create that uses the entry, dropped with it).

    Never trusted on its own: a create that uses an entry inserts its job only if the
    app's row version (xmin) is still the one cached, so an update or deletion through
    any replica is noticed by the very statement that would have relied on it; the
    caller then drops the entry (`forget`) and creates the slow way. Entries also expire
    after `max_age` seconds (xmin is a 32-bit counter)."""

    def __init__(self, max_entries: int = 4096, max_age: float = 300.0) -> None:
        self.max_entries = max_entries
        self.max_age = max_age
        self._by_key: dict[tuple[int, int | tuple[int, str]], tuple[float, dict[str, Any], AppDerived]] = {}

    @staticmethod
    def key(owner_id: int, app_id: int, site_id: int, name: str) -> tuple[int, int | tuple[int, str]]:
        return (owner_id, app_id) if app_id else (owner_id, (site_id, name))

    def get(self, key: tuple[int, int | tuple[int, str]], now: float) -> tuple[dict[str, Any], AppDerived] | None:
        """(app row, what is derived from it) of a live entry; None when there is none."""
        hit = self._by_key.get(key)
        if hit is None:
            return None
        if now - hit[0] > self.max_age:
            del self._by_key[key]
            return None
        return hit[1], hit[2]

    def put(self, key: tuple[int, int | tuple[int, str]], app: dict[str, Any], now: float) -> AppDerived:
        """Cache `app`; returns its (empty) AppDerived."""
        if len(self._by_key) >= self.max_entries:
            self._by_key.clear()
        derived = AppDerived()
        self._by_key[key] = (now, app, derived)
        return derived

    def forget(self, app_id: int) -> None:
        for key, (_, app, _) in list(self._by_key.items()):
            if app["id"] == app_id:
                del self._by_key[key]
