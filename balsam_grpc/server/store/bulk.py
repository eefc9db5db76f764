"""Fast multi-row inserts that hand back the new ids in input order.

PostgreSQL, large batches: ids are drawn from the table's sequence in one query and the
rows are streamed with COPY (a multi-row INSERT of 10,000 rows spends most of its time
in client-side query parsing), formatted as COPY text by store.codec. Small batches: one
INSERT ... RETURNING (one round trip instead of nextval + COPY). SQLite: the single
writer (store.db holds the write lock) takes the next ids after the highest the table
ever had and inserts with executemany.
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

from sqlalchemy import Connection, DateTime, Insert, Table, bindparam, insert, text
from sqlalchemy.dialects.postgresql import JSONB

from balsam_grpc.server.store.codec import CopyBatch, column_values, is_json, sqlite_time
from balsam_grpc.server.store.driver import driver_executemany, driver_rows, plain_statement

# Below this many rows a multi-row INSERT ... RETURNING beats nextval + COPY.
COPY_MIN_ROWS = 64
_COPY_CHUNK = 2000


def insert_rows(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> list[int]:
    if not rows:
        return []
    columns = _columns(table)
    if conn.dialect.name == "postgresql":
        if len(rows) < COPY_MIN_ROWS:
            return _insert_returning(conn, table, columns, rows)
        ids = draw_ids(conn, table, len(rows))
        copy_rows(conn, table, columns, rows, ids)
        return ids
    # Above every id the table ever had (AUTOINCREMENT's sqlite_sequence), not only above
    # its rows: a deleted job's id is never handed out again. The insert moves the sequence.
    # Asked and inserted on the driver's cursor: SQLAlchemy's execution costs several
    # times SQLite's work here, once per event-writing transaction.
    first = driver_rows(conn, plain_statement(
        f"SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = '{table.name}'), 0), "
        f"coalesce((SELECT max(id) FROM {table.name}), 0)) + 1"), {})[0][0]
    ids = list(range(first, first + len(rows)))
    _executemany_insert(conn, table, columns, rows, ids)
    return ids


_COLUMNS: WeakKeyDictionary[Table, list[str]] = WeakKeyDictionary()


def _columns(table: Table) -> list[str]:
    """The table's columns but its id (callers do not change the list)."""
    names = _COLUMNS.get(table)
    if names is None:
        names = _COLUMNS[table] = [c.name for c in table.columns if c.name != "id"]
    return names


def draw_ids(conn: Connection, table: Table, n: int) -> list[int]:
    """PostgreSQL: n new ids of `table`, ascending (so they follow the request order).
    One array value: 10,000 rows of one id each cost a driver fetch per row."""
    return conn.execute(text(draw_ids_sql(table)), {"n": n}).scalar_one()


def draw_ids_sql(table: Table) -> str:
    """draw_ids' query (parameter :n), for a statement that draws them itself."""
    return (f"SELECT array_agg(v ORDER BY v) FROM (SELECT nextval('{table.name}_id_seq') AS v "
            "FROM generate_series(1, CAST(:n AS INT))) AS drawn")


def _executemany_insert(conn: Connection, table: Table, columns: list[str], rows: list[dict[str, Any]],
                        ids: list[int]) -> None:
    """INSERT with the driver's executemany (store.driver), values converted by
    SQLAlchemy's own bind processors (times as store.codec.sqlite_time) a column at a
    time (each distinct value once): SQLAlchemy's per-row parameter handling costs more
    than SQLite's insert itself."""
    sql, processors = _executemany_plan(conn.dialect, table, columns)
    params_by_column: list[list[Any]] = [ids]
    for name, (process, unhashable) in zip(columns, processors, strict=True):
        values = column_values(table, name, rows)
        if process is not None:
            values = _convert_column(values, process, unhashable)
        params_by_column.append(values)
    driver_executemany(conn, plain_statement(sql), list(zip(*params_by_column, strict=True)))


# Per dialect (each engine has its own, with its JSON codec) and table: the INSERT and each
# column's bind processor and whether it is JSON. Made once: making them took longer
# than converting the handful of event rows a launcher report writes.
_PLANS: WeakKeyDictionary[Any, WeakKeyDictionary[Table, dict[tuple[str, ...], tuple[str, list[tuple[Any, bool]]]]]] = \
    WeakKeyDictionary()


def _executemany_plan(dialect: Any, table: Table, columns: list[str]) -> tuple[str, list[tuple[Any, bool]]]:
    by_table = _PLANS.get(dialect)
    if by_table is None:
        by_table = _PLANS[dialect] = WeakKeyDictionary()
    plans = by_table.get(table)
    if plans is None:
        plans = by_table[table] = {}
    key = tuple(columns)
    plan = plans.get(key)
    if plan is None:
        processors = [(_sqlite_time_or_none if isinstance(table.c[name].type, DateTime)
                       else table.c[name].type.dialect_impl(dialect).bind_processor(dialect), is_json(table.c[name]))
                      for name in columns]
        sql = (f"INSERT INTO {table.name} ({', '.join(['id', *columns])}) "
               f"VALUES ({', '.join('?' * (len(columns) + 1))})")
        plan = plans[key] = (sql, processors)
    return plan


def _sqlite_time_or_none(value: Any) -> Any:
    return None if value is None else sqlite_time(value)


def _convert_column(values: list[Any], process: Any, unhashable: bool) -> list[Any]:
    if unhashable:  # JSON: the same object (shared event data) is converted once, keyed by id()
        by_id: dict[int, Any] = {}
        out = []
        for v in values:
            key = id(v)
            if key not in by_id:
                by_id[key] = process(v)
            out.append(by_id[key])
        return out
    memo = {v: process(v) for v in set(values)}
    return list(map(memo.__getitem__, values))


def copy_rows(conn: Connection, table: Table, columns: list[str], rows: list[dict[str, Any]],
              ids: list[int] | None = None) -> None:
    """COPY `rows` into `table` (PostgreSQL), with explicit ids first when given (else
    the column's default draws them, in row order)."""
    batch = CopyBatch(table, columns, rows, with_ids=ids is not None)
    cursor = conn.connection.dbapi_connection.cursor()
    with cursor.copy(f"COPY {table.name} ({', '.join(batch.names)}) FROM STDIN") as copy:
        for start in range(0, len(rows), _COPY_CHUNK):
            stop = start + _COPY_CHUNK
            copy.write(batch.text(start, stop, ids[start:stop] if ids is not None else ()))


class CopyStream:
    """One COPY into `table` (PostgreSQL) kept open while the caller writes rows in
    chunks, so that PostgreSQL takes in one chunk while the caller makes the next. The
    layout (store.codec.CopyBatch: which columns all rows share) is the first chunk's;
    a chunk that does not fit it ends the COPY and starts another with its own."""

    def __init__(self, conn: Connection, table: Table, columns: list[str], with_ids: bool = False,
                 defaults: dict[str, Any] | None = None) -> None:
        self.cursor = conn.connection.dbapi_connection.cursor()
        self.table, self.columns, self.with_ids = table, columns, with_ids
        self.defaults = defaults  # CopyBatch's: columns left out when every row has the table's default
        self.layout: tuple[list[str], str | None] | None = None
        self.copy: Any = None
        self.opened: Any = None  # the cursor's copy() context manager: it ends the COPY

    def write(self, rows: list[dict[str, Any]], ids: list[int] | None = None) -> None:
        if rows:
            self.write_batch(CopyBatch(self.table, self.columns, rows, with_ids=self.with_ids, defaults=self.defaults),
                             ids)

    def write_batch(self, batch: CopyBatch, ids: list[int] | None = None) -> None:
        """Write a batch laid out for this stream's table and columns (CopyBatch.of_columns)."""
        layout = (batch.names, batch.tail)
        if layout != self.layout:
            self._end(None)
            self.opened = self.cursor.copy(f"COPY {self.table.name} ({', '.join(batch.names)}) FROM STDIN")
            self.copy = self.opened.__enter__()
            self.layout = layout
        for start in range(0, batch.size, _COPY_CHUNK):
            stop = start + _COPY_CHUNK
            self.copy.write(batch.text(start, stop, ids[start:stop] if ids is not None else ()))

    def _end(self, exc: BaseException | None) -> None:
        opened, self.opened, self.copy, self.layout = self.opened, None, None, None
        if opened is not None:
            opened.__exit__(type(exc) if exc else None, exc, exc.__traceback__ if exc else None)

    def __enter__(self) -> CopyStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        self._end(exc)


def append_rows(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> int:
    """Insert rows whose ids nobody needs but the highest (an event log's); returns it.
    PostgreSQL, large batches: COPY lets the id column's default draw the ids, and the
    session's currval is the last (the sequence only grows), which saves drawing them
    first (a query and ~1 us per row)."""
    if not rows:
        raise ValueError("no rows")
    if conn.dialect.name != "postgresql" or len(rows) < COPY_MIN_ROWS:
        return max(insert_rows(conn, table, rows))
    copy_rows(conn, table, [c.name for c in table.columns if c.name != "id"], rows)
    return conn.execute(text(f"SELECT currval('{table.name}_id_seq')")).scalar_one()


_RETURNING: dict[tuple[str, bool], Insert] = {}


def _returning_insert(table: Table, ordered: bool) -> Insert:
    """INSERT ... RETURNING id where a JSON column's None is SQL NULL, as COPY writes it
    (SQLAlchemy's default would store the JSON value null)."""
    stmt = _RETURNING.get((table.name, ordered))
    if stmt is None:
        nulls = {c.name: bindparam(c.name, type_=JSONB(none_as_null=True)) for c in table.columns if is_json(c)}
        stmt = insert(table).values(nulls).returning(table.c.id, sort_by_parameter_order=ordered)
        _RETURNING[(table.name, ordered)] = stmt
    return stmt


def _insert_returning(conn: Connection, table: Table, columns: list[str], rows: list[dict[str, Any]]) -> list[int]:
    # Every row gets every column (missing keys take the column default, as with COPY) so
    # one compiled statement serves all rows; sort_by_parameter_order keeps ids in order.
    by_column = [column_values(table, c, rows) for c in columns]
    params = [dict(zip(columns, values, strict=True)) for values in zip(*by_column, strict=True)]
    if len(rows) == 1:
        return [conn.execute(_returning_insert(table, False), params[0]).scalar_one()]
    return list(conn.execute(_returning_insert(table, True), params).scalars())
