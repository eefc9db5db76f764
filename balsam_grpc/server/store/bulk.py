"""Fast multi-row inserts that hand back the new ids in input order.

PostgreSQL: ids are drawn from the table's sequence in one query and the rows are
streamed with COPY (a multi-row INSERT of 10,000 rows spends most of its time in
client-side query parsing). SQLite: the single writer (store.db holds the write lock)
takes the next ids after MAX(id) and inserts with executemany.
"""

from __future__ import annotations

from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import JSON, Connection, Table, func, insert, select, text


def insert_rows(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> list[int]:
    if not rows:
        return []
    columns = [c.name for c in table.columns if c.name != "id"]
    if conn.dialect.name == "postgresql":
        ids = list(conn.execute(
            text(f"SELECT nextval('{table.name}_id_seq') FROM generate_series(1, :n)"), {"n": len(rows)}).scalars())
        json_cols = {c.name for c in table.columns if isinstance(c.type, JSON) or isinstance(
            getattr(c.type, "impl", None), JSON) or c.type.__class__.__name__ in ("JSON", "JSONB")}
        cursor = conn.connection.dbapi_connection.cursor()
        names = ", ".join(["id", *columns])
        with cursor.copy(f"COPY {table.name} ({names}) FROM STDIN") as copy:
            for new_id, row in zip(ids, rows, strict=True):
                copy.write_row([new_id, *(_pg_value(row.get(c), c in json_cols) for c in columns)])
        return ids
    first = conn.execute(select(func.coalesce(func.max(table.c.id), 0))).scalar_one() + 1
    ids = list(range(first, first + len(rows)))
    conn.execute(insert(table), [{**row, "id": i} for i, row in zip(ids, rows, strict=True)])
    return ids


def _pg_value(value: Any, is_json: bool) -> Any:
    if is_json and value is not None:
        return Jsonb(value)
    return value
