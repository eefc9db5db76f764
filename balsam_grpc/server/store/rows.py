"""One row of the caller's own, by id: the lookup every resource store starts from."""

from __future__ import annotations

from functools import cache
from typing import Any

from sqlalchemy import Connection, Select, Table, bindparam, select


@cache
def _owned_row_statement(table: Table, for_update: bool) -> Select[Any]:
    # Built once per table: building the expression and its cache key per call cost more
    # of the server's CPU than running it.
    stmt = select(table).where(table.c.id == bindparam("row_id"), table.c.owner_id == bindparam("owner_id"))
    return stmt.with_for_update() if for_update else stmt


def owned_row(conn: Connection, table: Table, owner_id: int, row_id: Any, *,
              for_update: bool = False) -> dict[str, Any] | None:
    """The row `row_id` of `table` if `owner_id` owns it (None for a missing row and for
    someone else's alike), locked for update when asked."""
    row = conn.execute(_owned_row_statement(table, for_update), {"row_id": row_id, "owner_id": owner_id}).first()
    return dict(row._mapping) if row else None
