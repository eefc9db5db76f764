"""Sites: one HPC machine where a user's site daemon runs.

Every function is scoped by `owner_id`: a row of another owner does not exist for the
caller. JSON columns hold plain values with the proto field names as keys
(`transfer_locations`: [{"alias", "url"}], `elastic_queue`: {"enabled", "min_nodes", ...},
`scheduler_snapshot`: the SchedulerSnapshot as a dict with proto field names).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from balsam_grpc.core.errors import AlreadyExists, FailedPrecondition, NotFound
from balsam_grpc.server.store.rows import owned_row
from balsam_grpc.server.store.tables import jobs, sites, tokens

SCHEDULERS = ("local", "slurm", "pbs", "cobalt", "lsf")
# Columns a caller may set (everything else is output only or managed by the server).
MUTABLE = ("name", "hostname", "path", "scheduler", "allowed_queues", "allowed_projects",
           "optional_batch_job_params", "transfer_locations", "elastic_queue")


@dataclass
class SiteQuery:
    owner_id: int
    ids: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    connected: bool | None = None
    # A site-scoped token sees only its own site.
    only_site_id: int | None = None


def get_site(conn: Connection, owner_id: int, site_id: int, *, for_update: bool = False) -> dict[str, Any] | None:
    return owned_row(conn, sites, owner_id, site_id, for_update=for_update)


def require_site(conn: Connection, owner_id: int, site_id: int, *, field: str = "id",
                 reference: bool = False, for_update: bool = False) -> dict[str, Any]:
    """The caller's site, or NOT_FOUND (same answer whether it is missing or someone else's)."""
    row = get_site(conn, owner_id, site_id, for_update=for_update)
    if row is None:
        raise NotFound(f"{field}: site {site_id} not found", field=field,
                       reason="REFERENCE_NOT_FOUND" if reference else None)
    return row


def _name_taken(conn: Connection, owner_id: int, name: str, exclude_id: int | None = None) -> bool:
    stmt = select(sites.c.id).where(sites.c.owner_id == owner_id, sites.c.name == name)
    if exclude_id is not None:
        stmt = stmt.where(sites.c.id != exclude_id)
    return conn.execute(stmt).first() is not None


def _duplicate(name: str) -> AlreadyExists:
    return AlreadyExists(f"site.name: you already have a site named {name!r}; site names are unique per owner",
                         field="site.name")


def create_site(conn: Connection, owner_id: int, values: dict[str, Any], now: datetime) -> dict[str, Any]:
    if _name_taken(conn, owner_id, values["name"]):
        raise _duplicate(values["name"])
    try:
        row = conn.execute(
            insert(sites).values(owner_id=owner_id, create_time=now, update_time=now, connected=False,
                                 **{k: values[k] for k in MUTABLE if k in values})
            .returning(*sites.c)
        ).one()
    except IntegrityError:  # a concurrent create with the same name won the race
        raise _duplicate(values["name"]) from None
    return dict(row._mapping)


def update_site(conn: Connection, owner_id: int, site_id: int, values: dict[str, Any],
                now: datetime) -> dict[str, Any]:
    if "name" in values and _name_taken(conn, owner_id, values["name"], exclude_id=site_id):
        raise _duplicate(values["name"])
    changes = {k: v for k, v in values.items() if k in MUTABLE}
    try:
        row = conn.execute(
            update(sites).where(sites.c.id == site_id, sites.c.owner_id == owner_id)
            .values(update_time=now, **changes).returning(*sites.c)
        ).first()
    except IntegrityError:
        raise _duplicate(values["name"]) from None
    if row is None:
        raise NotFound(f"site.id: site {site_id} not found", field="site.id")
    return dict(row._mapping)


def count_running_jobs(conn: Connection, owner_id: int, site_id: int) -> int:
    return conn.execute(
        select(func.count()).select_from(jobs)
        .where(jobs.c.owner_id == owner_id, jobs.c.site_id == site_id, jobs.c.state == "RUNNING")
    ).scalar_one()


def delete_site(conn: Connection, owner_id: int, site_id: int) -> None:
    """Delete a site with its apps, jobs, batch jobs, transfer items and sessions (foreign
    keys cascade). Refused while any of its jobs is RUNNING."""
    require_site(conn, owner_id, site_id, for_update=True)
    n = count_running_jobs(conn, owner_id, site_id)
    if n:
        raise FailedPrecondition(
            f"site {site_id} has {n} running job(s); kill them or wait for them to end before deleting the site")
    conn.execute(delete(sites).where(sites.c.id == site_id, sites.c.owner_id == owner_id))
    # Tokens scoped to the deleted site are useless, and SQLite may reuse the id.
    conn.execute(update(tokens).where(tokens.c.user_id == owner_id, tokens.c.scope == "SITE",
                                      tokens.c.site_id == site_id).values(revoked=True))


def list_sites(conn: Connection, q: SiteQuery, *, after_id: int | None, limit: int) -> list[dict[str, Any]]:
    c = sites.c
    conds = [c.owner_id == q.owner_id]
    if q.ids:
        conds.append(c.id.in_(q.ids))
    if q.names:
        conds.append(c.name.in_(q.names))
    if q.connected is not None:
        conds.append(c.connected == q.connected)
    if q.only_site_id is not None:
        conds.append(c.id == q.only_site_id)
    if after_id is not None:
        conds.append(c.id > after_id)
    rows = conn.execute(select(sites).where(*conds).order_by(c.id).limit(limit))
    return [dict(r._mapping) for r in rows]


# ---------------------------------------------------------------------------- daemon liveness

def mark_connected(conn: Connection, owner_id: int, site_id: int, *, hostname: str, version: str,
                   now: datetime) -> dict[str, Any]:
    """A daemon holds the site's stream now: it takes the next stream_generation (the
    row's value in the result). Liveness is output only: update_time (the user's last
    change) is left alone."""
    row = conn.execute(
        update(sites).where(sites.c.id == site_id, sites.c.owner_id == owner_id)
        .values(connected=True, last_seen_time=now, daemon_hostname=hostname, daemon_version=version,
                stream_generation=sites.c.stream_generation + 1)
        .returning(*sites.c)).first()
    if row is None:
        raise NotFound(f"site {site_id} not found", field="hello.site_id")
    return dict(row._mapping)


def mark_seen(conn: Connection, owner_id: int, site_id: int, now: datetime, *, connected: bool = True,
              snapshot: dict[str, Any] | None = None) -> None:
    """Record the daemon's last message (and its scheduler snapshot, when it sent one);
    connected=False when its stream ended."""
    values: dict[str, Any] = {"last_seen_time": now, "connected": connected}
    if snapshot is not None:
        values["scheduler_snapshot"] = snapshot
    conn.execute(update(sites).where(sites.c.id == site_id, sites.c.owner_id == owner_id).values(**values))


def holds_stream(conn: Connection, site_id: int, generation: int) -> bool:
    """Is `generation` still the site's current stream? The row is share-locked to the
    end of the transaction, so a newer connection's claim waits for this transaction:
    what it writes is either before the takeover or refused."""
    query = _GENERATION_SHARE_LOCKED if conn.dialect.name == "postgresql" else _GENERATION
    return conn.execute(query, {"site_id": site_id}).scalar() == generation


# Built once: holds_stream fences every write of a site stream.
_GENERATION = select(sites.c.stream_generation).where(sites.c.id == bindparam("site_id"))
_GENERATION_SHARE_LOCKED = _GENERATION.with_for_update(read=True)


def reset_connected(conn: Connection) -> int:
    """At server start no daemon holds a stream yet: clear flags a crash left behind."""
    return conn.execute(update(sites).where(sites.c.connected.is_(True)).values(connected=False)).rowcount
