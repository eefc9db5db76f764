"""One row of the caller's own, by id: the lookup every resource store starts from."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Table, select


def owned_row(conn: Connection, table: Table, owner_id: int, row_id: Any, *,
              for_update: bool = False) -> dict[str, Any] | None:
    """The row `row_id` of `table` if `owner_id` owns it (None for a missing row and for
    someone else's alike), locked for update when asked."""
    stmt = select(table).where(table.c.id == row_id, table.c.owner_id == owner_id)
    if for_update:
        stmt = stmt.with_for_update()
    row = conn.execute(stmt).first()
    return dict(row._mapping) if row else None
