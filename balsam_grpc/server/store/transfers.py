"""Transfer items: files moved for a job through one of its app's transfer slots.

Scoped by `owner_id`. Items are created with their job (jobs store) and progress through
the site daemon; here users read them and retry failed ones. States are the short names
of TransferState ("PENDING", "ERROR", ...); directions "IN" / "OUT". Every state change
appends a `transfer_state` event in the same transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select, update

from balsam_grpc.core.errors import FailedPrecondition, NotFound
from balsam_grpc.server.store import events
from balsam_grpc.server.store.tables import transfer_items

# State changes a user may request: retry a failed transfer.
USER_TRANSITIONS: dict[str, frozenset[str]] = {"ERROR": frozenset({"PENDING"})}
# Fields other than state that UpdateTransferItem may set.
MUTABLE = ("error", "task_id", "bytes", "files", "duration_seconds")


@dataclass
class TransferQuery:
    owner_id: int
    ids: list[int] = field(default_factory=list)
    job_ids: list[int] = field(default_factory=list)
    site_ids: list[int] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    direction: str = ""
    task_id: str = ""
    only_site_id: int | None = None


def get_item(conn: Connection, owner_id: int, item_id: int, *, for_update: bool = False) -> dict[str, Any] | None:
    stmt = select(transfer_items).where(transfer_items.c.id == item_id, transfer_items.c.owner_id == owner_id)
    if for_update:
        stmt = stmt.with_for_update()
    row = conn.execute(stmt).first()
    return dict(row._mapping) if row else None


def require_item(conn: Connection, owner_id: int, item_id: int, *, field: str = "id",
                 for_update: bool = False) -> dict[str, Any]:
    row = get_item(conn, owner_id, item_id, for_update=for_update)
    if row is None:
        raise NotFound(f"{field}: transfer item {item_id} not found", field=field)
    return row


def update_item(conn: Connection, row: dict[str, Any], values: dict[str, Any], new_state: str | None,
                now: datetime) -> dict[str, Any]:
    """Apply a user's change to an item read FOR UPDATE in this transaction.

    The only state change a user may make is ERROR -> PENDING (a retry, which clears the
    error and the old task id unless the same request sets them)."""
    state = row["state"]
    changes = {k: v for k, v in values.items() if k in MUTABLE}
    state_changed = new_state is not None and new_state != state
    if state_changed:
        if new_state not in USER_TRANSITIONS.get(state, frozenset()):
            raise FailedPrecondition(
                f"transfer_item.state: transfer item {row['id']} is {state}; the only state change you can request is "
                "ERROR -> PENDING (retry); the site daemon moves items otherwise",
                reason="ILLEGAL_TRANSITION", field="transfer_item.state")
        changes["state"] = new_state
        if new_state == "PENDING":
            changes.setdefault("error", "")
            changes.setdefault("task_id", "")
    if not changes:
        return row
    out = dict(conn.execute(
        update(transfer_items).where(transfer_items.c.id == row["id"], transfer_items.c.owner_id == row["owner_id"])
        .values(update_time=now, **changes).returning(*transfer_items.c)
    ).one()._mapping)
    if state_changed:
        events.append(conn, [{
            "owner_id": out["owner_id"], "site_id": out["site_id"], "job_id": out["job_id"],
            "kind": events.TRANSFER_STATE, "subject_id": out["id"], "from_state": state,
            "to_state": new_state, "time": now, "message": "retry requested" if new_state == "PENDING" else "",
        }])
    return out


def list_items(conn: Connection, q: TransferQuery, *, after_id: int | None, limit: int) -> list[dict[str, Any]]:
    c = transfer_items.c
    conds = [c.owner_id == q.owner_id]
    if q.ids:
        conds.append(c.id.in_(q.ids))
    if q.job_ids:
        conds.append(c.job_id.in_(q.job_ids))
    if q.site_ids:
        conds.append(c.site_id.in_(q.site_ids))
    if q.states:
        conds.append(c.state.in_(q.states))
    if q.direction:
        conds.append(c.direction == q.direction)
    if q.task_id:
        conds.append(c.task_id == q.task_id)
    if q.only_site_id is not None:
        conds.append(c.site_id == q.only_site_id)
    if after_id is not None:
        conds.append(c.id > after_id)
    rows = conn.execute(select(transfer_items).where(*conds).order_by(c.id).limit(limit))
    return [dict(r._mapping) for r in rows]
