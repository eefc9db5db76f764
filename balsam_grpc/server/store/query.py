"""SQL building blocks shared by the resource stores."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    ColumnElement,
    and_,
    any_,
    bindparam,
    cast,
    column,
    func,
    literal,
    not_,
    or_,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement
from sqlalchemy.types import UserDefinedType

from balsam_grpc.server.store.codec import loads as codec_loads


class _JsonText(UserDefinedType[Any]):
    """A JSON text column read straight through codec.loads: SQLAlchemy's JSON type
    wraps the decoder in two more calls per value (SQLite; type_coerce a column to it)."""

    cache_ok = True

    def get_col_spec(self, **_kw: Any) -> str:
        return "TEXT"

    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        return codec_loads


class _NullableJsonText(_JsonText):
    cache_ok = True

    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        return _loads_or_none


def _loads_or_none(value: Any) -> Any:
    return None if value is None else codec_loads(value)


JSON_TEXT = _JsonText()
NULLABLE_JSON_TEXT = _NullableJsonText()  # for a column that may be NULL


def epoch_micros(column: Any) -> ColumnElement[Any]:
    """A timestamp column read as integer microseconds since the epoch (PostgreSQL): the
    driver makes a datetime of a timestamptz five times slower than an integer."""
    # EXTRACT(EPOCH ...) is numeric (exact) on PostgreSQL >= 14: no float rounding.
    return cast(func.extract("epoch", column) * 1_000_000, BigInteger).label(column.name)


class _TagsContain(FunctionElement[bool]):
    """`column` holds a JSON object that contains every key/value pair of `tags`.

    PostgreSQL: JSONB containment (`@>`), served by the GIN index on jobs.tags.
    SQLite: one json_extract comparison per pair.

    Every value the SQL needs is a bound literal among the element's own arguments, so
    SQLAlchemy's statement cache keys on the number of pairs and extracts the values
    per execution. (Rendering new literals from `tags` at compile time would bake the
    first query's tags into the cached SQL and reuse them for every later filter.)
    """

    type = Boolean()
    inherit_cache = True
    name = "tags_contain"

    def __init__(self, column: ColumnElement[Any], tags: dict[str, str]) -> None:
        pairs = sorted(tags.items())
        args: list[Any] = [column, literal(json.dumps(dict(pairs)))]
        for key, value in pairs:
            args += [literal(json_path(key)), literal(value)]
        super().__init__(*args)


@compiles(_TagsContain, "postgresql")
def _pg(element: _TagsContain, compiler: Any, **kw: Any) -> str:
    col, document = list(element.clauses)[:2]
    return f"({compiler.process(col, **kw)} @> CAST({compiler.process(document, **kw)} AS JSONB))"


@compiles(_TagsContain)
def _default(element: _TagsContain, compiler: Any, **kw: Any) -> str:
    col, _, *pairs = list(element.clauses)
    parts = [func.json_extract(col, pairs[i]) == pairs[i + 1] for i in range(0, len(pairs), 2)]
    return compiler.process(and_(*parts), **kw)


def json_path(key: str) -> str:
    return '$."' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def tags_contain(column: ColumnElement[Any], tags: dict[str, str]) -> ColumnElement[bool]:
    return _TagsContain(column, tags)  # type: ignore[return-value]


def tags_exclude(column: ColumnElement[Any], tags: dict[str, str]) -> ColumnElement[bool]:
    """Rows whose tags have none of the given key/value pairs (a row without the key has
    not the pair: on SQLite its json_extract is NULL, which NOT alone would not keep)."""
    return and_(*[not_(func.coalesce(tags_contain(column, {k: v}), False)) for k, v in tags.items()])


def contains_substring(column: ColumnElement[Any], needle: str) -> ColumnElement[bool]:
    escaped = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return column.like(f"%{escaped}%", escape="\\")


def id_in(col: ColumnElement[Any], ids: Sequence[int], dialect: str) -> ColumnElement[bool]:
    """`col IN ids` with the whole list as ONE bound value, whatever its length.

    An expanding IN binds one parameter per id: 20,000 ids cost more to render and
    parse than the update they select, and SQLite refuses more than 32,766 of them.
    PostgreSQL: `col = ANY(:ids::BIGINT[])`; SQLite: `col IN (SELECT value FROM
    json_each(:ids))`.
    """
    ids = list(ids)
    if dialect == "postgresql":
        return col == any_(bindparam(None, ids, type_=ARRAY(BigInteger())))
    return col.in_(select(column("value")).select_from(func.json_each(bindparam(None, json.dumps(ids)))))



def ids_param(col: ColumnElement[Any], name: str, dialect: str) -> ColumnElement[bool]:
    """id_in with a named parameter and no value: for a statement built once and run
    many times (bind `ids_value(ids, dialect)` to `name`)."""
    if dialect == "postgresql":
        return col == any_(bindparam(name, type_=ARRAY(BigInteger())))
    return col.in_(select(column("value")).select_from(func.json_each(bindparam(name))))


def ids_value(ids: Sequence[int], dialect: str) -> Any:
    return list(ids) if dialect == "postgresql" else json.dumps(list(ids))


__all__ = ["id_in", "ids_param", "ids_value", "tags_contain", "tags_exclude", "contains_substring", "or_"]
