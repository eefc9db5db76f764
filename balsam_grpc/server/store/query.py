"""SQL building blocks shared by the resource stores."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Boolean, ColumnElement, and_, func, literal, not_, or_
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement


class _TagsContain(FunctionElement[bool]):
    """`column` holds a JSON object that contains every key/value pair of `tags`.

    PostgreSQL: JSONB containment (`@>`), served by the GIN index on jobs.tags.
    SQLite: one json_extract comparison per pair.
    """

    type = Boolean()
    inherit_cache = True
    name = "tags_contain"

    def __init__(self, column: ColumnElement[Any], tags: dict[str, str]) -> None:
        self.column = column
        self.tags = dict(sorted(tags.items()))
        super().__init__(column, literal(json.dumps(self.tags)))


@compiles(_TagsContain, "postgresql")
def _pg(element: _TagsContain, compiler: Any, **kw: Any) -> str:
    col = compiler.process(element.column, **kw)
    val = compiler.process(literal(json.dumps(element.tags)), **kw)
    return f"({col} @> CAST({val} AS JSONB))"


@compiles(_TagsContain)
def _default(element: _TagsContain, compiler: Any, **kw: Any) -> str:
    parts = [
        func.json_extract(element.column, literal(json_path(k))) == literal(v)
        for k, v in element.tags.items()
    ]
    return compiler.process(and_(*parts), **kw)


def json_path(key: str) -> str:
    return '$."' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def tags_contain(column: ColumnElement[Any], tags: dict[str, str]) -> ColumnElement[bool]:
    return _TagsContain(column, tags)  # type: ignore[return-value]


def tags_exclude(column: ColumnElement[Any], tags: dict[str, str]) -> ColumnElement[bool]:
    """Rows whose tags have none of the given key/value pairs."""
    return and_(*[not_(tags_contain(column, {k: v})) for k, v in tags.items()])


def contains_substring(column: ColumnElement[Any], needle: str) -> ColumnElement[bool]:
    escaped = needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return column.like(f"%{escaped}%", escape="\\")


__all__ = ["tags_contain", "tags_exclude", "contains_substring", "or_"]
