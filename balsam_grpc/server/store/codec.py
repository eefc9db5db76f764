"""Value encoding on the hot paths: JSON columns and PostgreSQL COPY text rows.

JSON: the jobs table carries six JSON columns per row, and the stdlib's `json.loads`
(encoding detection, whitespace regex) dominates reading a page of jobs. `loads`
short-cuts empty containers and remembers small flat objects (tags, parameters: few
distinct values across many rows); callers always get their own copy, never a shared
object. `dumps` gives json.dumps's output from an encoder built once. Both serve as
SQLAlchemy's JSON (de)serializers and psycopg's json/jsonb loader (store.db).

COPY: psycopg's `write_row` dumps each JSON value through a Python dumper; formatting a
whole batch as COPY text here, a column at a time, is cheaper, and each distinct value
of a column (the shared timestamp, default resources, shared event data) is formatted
once per batch. `column_values` fills in column defaults for missing keys, as
SQLAlchemy's insert() would.
"""

from __future__ import annotations

import functools
import itertools
import json
import operator
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, Table

_decoder = json.JSONDecoder()
_scan = _decoder.scan_once
# json.dumps builds a new C encoder on every call, a micro-second of set-up for a small
# dict; this one is built once (same settings as json.dumps; no cycle check: column
# values come from protobuf messages and cannot refer to themselves).
_iterencode = c_make_encoder(None, json.JSONEncoder().default, encode_basestring_ascii, None, ": ", ", ",
                             False, False, True) if c_make_encoder else None
_SCALAR_TYPES = frozenset((str, int, float, bool, type(None)))
# Memo of small flat JSON texts -> parsed value. Bounded: cleared when full.
_MEMO: dict[str | bytes, Any] = {}
_MEMO_MAX = 8192
_MEMO_TEXT_MAX = 512


def _flat(value: Any) -> bool:
    """A dict or list whose members are all scalars: a shallow copy is a full copy."""
    t = type(value)
    if t is dict:
        members = value.values()
    elif t is list:
        members = value
    else:
        return False
    for member in members:
        if type(member) not in _SCALAR_TYPES:
            return False
    return True


def loads(data: str | bytes | bytearray | memoryview) -> Any:
    """json.loads for trusted column text (psycopg hands bytes, SQLite str)."""
    if type(data) is not str and type(data) is not bytes:
        data = bytes(data)
    if len(data) == 2:  # most JSON columns of a job are empty
        if data == b"{}" or data == "{}":
            return {}
        if data == b"[]" or data == "[]":
            return []
    hit = _MEMO.get(data)
    if hit is not None:
        return hit.copy()
    return _parsed(data, data if type(data) is str else data.decode())


def loads_jsonb(data: bytes | bytearray | memoryview) -> Any:
    """loads for jsonb's binary form (Database.statement_now's results): a version byte
    (1), then the text. Remembered under the whole form (a text's key has no such byte)."""
    data = bytes(data)
    hit = _MEMO.get(data)
    if hit is not None:
        return hit.copy()
    if data[:1] != b"\x01":
        raise ValueError(f"unknown jsonb binary format {data[:1]!r}")
    return _parsed(data, data[1:].decode())


def _parsed(data: str | bytes, text: str) -> Any:
    """`text` parsed, remembered under `data` when small and flat."""
    try:
        value, end = _scan(text, 0)
    except StopIteration:  # leading whitespace or invalid: let json report it properly
        return json.loads(text)
    if end != len(text):
        return json.loads(text)
    if len(text) <= _MEMO_TEXT_MAX and _flat(value):
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.clear()
        _MEMO[data] = value.copy()
    return value


@functools.cache
def _loader(name: str, binary: bool, load: Callable[[Any], Any]) -> type:
    """A psycopg loader class calling `load` on the value's bytes, nothing around it. Made
    on first use: psycopg is the `postgres` extra, absent from a SQLite-only server install."""
    from psycopg.adapt import Loader
    from psycopg.pq import Format

    return type(name, (Loader,), {"format": Format.BINARY if binary else Format.TEXT, "load": staticmethod(load)})


def json_loader() -> type:
    """psycopg loader for json/jsonb text: `loads` without psycopg's extra wrapper call
    (six JSON columns per job row make the per-value overhead count)."""
    return _loader("JsonLoader", False, loads)


def jsonb_binary_loader() -> type:
    """json_loader for jsonb in binary results (Database.statement_now's)."""
    return _loader("JsonbBinaryLoader", True, loads_jsonb)


def json_binary_loader() -> type:
    """json_loader for json in binary results: the json type's binary form is its text."""
    return _loader("JsonBinaryLoader", True, loads)


def dumps(value: Any) -> str:
    if type(value) is dict and not value:
        return "{}"
    if type(value) is list and not value:
        return "[]"
    if _iterencode is None or type(value) is str:  # a bare str: json.dumps returns it encoded, not a chunk list
        return json.dumps(value)
    return "".join(_iterencode(value, 0))


# ---------------------------------------------------------------------------- array text

def _array_item(value: Any) -> str:
    if value is None:
        return "NULL"
    t = type(value)
    if t is int:
        return str(value)
    if t is bool:
        return "t" if value else "f"
    if t is float:
        return repr(value)
    if t is datetime:
        return _quoted_time(value, value.tzinfo)  # equal instants at other offsets apart
    s = value if t is str else value.isoformat() if isinstance(value, datetime) else str(value)
    if "\\" in s or '"' in s:
        s = s.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + s + '"'


@functools.lru_cache(maxsize=256)
def _quoted_time(value: datetime, _tz: Any) -> str:
    """A time as an array element. isoformat costs ~7,000 instructions (CPython builds it
    with PyUnicode_FromFormat); the events of one transaction mostly share its time, 16
    times in a launcher's report of 4 jobs, ~2 % of the report's server work."""
    return '"' + value.isoformat() + '"'


def array_text(values: Sequence[Any]) -> str:
    """A PostgreSQL array literal ('{1,NULL,"a \\"b\\""}') of str, int, bool, float, datetime
    or None values, for a parameter the statement casts (CAST(:p AS BIGINT[])). psycopg's
    list dumper formats each element through Python dumper calls: for the arrays of a
    launcher report's event insert and job update that cost a tenth of the report's
    server CPU. Every element but a number is quoted, so no text needs to be told from
    NULL or from the array's syntax. Times keep their offset (isoformat)."""
    return "{" + ",".join(map(_array_item, values)) + "}"


def array_params(params: dict[str, Any]) -> dict[str, Any]:
    """`params` (changed in place) with each list as its array_text: for the statements
    run on the driver that cast them (`= ANY(CAST(%(ids)s AS BIGINT[]))`). psycopg's list
    dumper looks for each list's element type and dumps it element by element: ~5 % of a
    GetJob's server CPU."""
    for name, value in params.items():
        if type(value) is list:
            params[name] = array_text(value)
    return params


# ---------------------------------------------------------------------------- COPY text

_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})
NULL = "\\N"


def _text(value: Any) -> str:
    s = value if type(value) is str else str(value)
    # Four scans in C cost less than translate() on the common text with nothing to escape.
    if "\\" in s or "\t" in s or "\n" in s or "\r" in s:
        return s.translate(_COPY_ESCAPES)
    return s


def _integer(value: Any) -> str:
    return str(int(value))


def _float(value: Any) -> str:
    return repr(float(value))


def _boolean(value: Any) -> str:
    return "t" if value else "f"


def _timestamp(value: datetime) -> str:
    # Always timezone-aware UTC in this store; isoformat keeps the offset so the
    # server's timezone setting cannot shift it.
    return value.isoformat()


def _json(value: Any) -> str:
    # JSON text never holds raw tabs or newlines (they are escaped), only backslashes.
    s = dumps(value)
    return s.replace("\\", "\\\\") if "\\" in s else s


def is_json(column: Any) -> bool:
    return is_json_type(column.type)


def is_json_type(t: Any) -> bool:
    return isinstance(t, JSON) or isinstance(getattr(t, "impl", None), JSON) or t.__class__.__name__ in ("JSON", "JSONB")


def sqlite_time(value: datetime) -> str:
    """A time as SQLAlchemy's SQLite DateTime stores it (UTC, always six digits of
    microseconds), so that text comparisons order as the times do."""
    tz = value.tzinfo
    if tz is not None and tz is not UTC:
        value = value.astimezone(UTC)
    return value.isoformat(" ", "microseconds")[:26]  # without the offset


def _formatter(column: Any) -> tuple[Callable[[Any], str], bool]:
    """(formatter, hashable values) for one column."""
    t = column.type
    if is_json(column):
        return _json, False
    if isinstance(t, Boolean):
        return _boolean, True
    if isinstance(t, Integer):
        return _integer, True
    if isinstance(t, Float):
        return _float, True
    if isinstance(t, DateTime):
        return _timestamp, True
    return _text, True


_FORMATTERS: dict[tuple[str, tuple[str, ...]], list[tuple[str, Callable[[Any], str], bool]]] = {}


def _formatters(table: Table, columns: Sequence[str]) -> list[tuple[str, Callable[[Any], str], bool]]:
    key = (table.name, tuple(columns))
    fmts = _FORMATTERS.get(key)
    if fmts is None:
        fmts = _FORMATTERS[key] = [(c, *_formatter(table.c[c])) for c in columns]
    return fmts


class CopyBatch:
    """Rows laid out for COPY text. `names` is the column order to COPY in: the columns
    whose values differ between rows first, then those with one value in every row
    (most of a bulk create's: owner, site, app, state, times, resources, defaults),
    formatted once for the whole batch into a shared tail of each line.

    `text(start, stop, ids)` formats rows[start:stop], the pre-drawn ids first when given.
    """

    def __init__(self, table: Table, columns: Sequence[str], rows: Sequence[dict[str, Any]],
                 with_ids: bool = False, defaults: dict[str, Any] | None = None) -> None:
        self._lay_out(table, columns, lambda name: column_values(table, name, rows), {}, len(rows), with_ids,
                      defaults)

    @classmethod
    def of_columns(cls, table: Table, columns: Sequence[str], values: dict[str, list[Any]], fixed: dict[str, Any],
                   size: int, with_ids: bool = False, defaults: dict[str, Any] | None = None) -> CopyBatch:
        """A batch of `size` rows given a column at a time: `fixed` holds the value every
        row has (formatted once, nothing looked at per row), `values` the list of each
        other column of `columns`. The layout is the one rows with those values get."""
        batch = cls.__new__(cls)
        batch._lay_out(table, columns, values.__getitem__, fixed, size, with_ids, defaults)
        return batch

    def _lay_out(self, table: Table, columns: Sequence[str], column: Callable[[str], list[Any]],
                 fixed: dict[str, Any], size: int, with_ids: bool, defaults: dict[str, Any] | None = None) -> None:
        """`defaults`: the columns' values that the table's own defaults give (None: NULL);
        a column with that value in every row is left out for the database to fill."""
        self.varying: list[tuple[list[Any], Callable[[Any], str], bool]] = []
        constant: list[tuple[str, str]] = []
        varying_names: list[str] = []
        defaults = defaults or {}
        for name, fmt, hashable in _formatters(table, columns):
            if name in fixed:
                first = fixed[name]
            else:
                values = column(name)
                if not _one_value(values, hashable):
                    varying_names.append(name)
                    self.varying.append((values, fmt, hashable))
                    continue
                first = values[0]
            formatted = NULL if first is None else fmt(first)
            if name in defaults:
                default = defaults[name]
                # Compared as COPY text: for the column's type (1 and True in an integer column).
                if formatted == (NULL if default is None else fmt(default)):
                    continue
            constant.append((name, formatted))
        self.names = ["id"] * with_ids + varying_names + [name for name, _ in constant]
        self.tail = "\t".join(text for _, text in constant) if constant else None
        self.size = size

    def text(self, start: int, stop: int, ids: Sequence[Any] = ()) -> str:
        stop = min(stop, self.size)
        formatted: list[Any] = [list(map(str, ids))] if ids else []
        for values, fmt, hashable in self.varying:
            chunk = values[start:stop]
            formatted.append(_format_hashable(chunk, fmt) if hashable else _format_objects(chunk, fmt))
        if self.tail is not None:
            formatted.append([self.tail] * (stop - start))
        lines = list(map("\t".join, zip(*formatted, strict=True)))
        lines.append("")
        return "\n".join(lines)


def _one_value(values: list[Any], hashable: bool) -> bool:
    """Every value formats as the first one does. Hashable: equal values (for the
    column's type: 1 and True in an integer column, one instant in two time zones).
    JSON: the same object, or all empty dicts or all empty lists (1 == True would make
    equal dicts {"a": 1} and {"a": true} different JSON)."""
    if not values:
        return False
    first = values[0]
    if hashable or (type(first) in (dict, list) and not first):
        return values.count(first) == len(values)
    return all(map(operator.is_, values, itertools.repeat(first)))


def copy_text(table: Table, columns: Sequence[str], rows: Sequence[dict[str, Any]],
              first: Sequence[Any] = ()) -> str:
    """Rows as PostgreSQL COPY text (tab-separated, `\\N` for NULL) for `columns`, in
    that order.

    `first` holds a leading value per row (the pre-drawn ids) written before `columns`.
    A missing key takes the column's default (see column_values). Formatted a
    column at a time: each distinct value of a column is formatted once.
    """
    formatted: list[list[str]] = [list(map(str, first))] if first else []
    for name, fmt, hashable in _formatters(table, columns):
        values = column_values(table, name, rows)
        formatted.append(_format_hashable(values, fmt) if hashable else _format_objects(values, fmt))
    lines = list(map("\t".join, zip(*formatted, strict=True)))
    lines.append("")
    return "\n".join(lines)


_NO_DEFAULT = object()


def _python_default(column: Any) -> Any:
    """A zero-argument factory for the column's Python-side default, or _NO_DEFAULT."""
    default = column.default
    if default is None or not (default.is_scalar or default.is_callable):
        return _NO_DEFAULT
    if default.is_scalar:
        value = default.arg
        return lambda: value
    return lambda: default.arg(None)  # SQLAlchemy wraps callables to take a context


_DEFAULTS: dict[tuple[str, str], Any] = {}


def column_values(table: Table, name: str, rows: Sequence[dict[str, Any]]) -> list[Any]:
    """One column of `rows`. A missing key gets the column's Python-side default, as
    SQLAlchemy's insert() would give it; without a default it is None (NULL)."""
    key = (table.name, name)
    factory = _DEFAULTS.get(key)
    if factory is None:
        factory = _DEFAULTS[key] = _python_default(table.c[name])
    try:  # every row has the key (as a create's rows do): one C-level pass
        return list(map(operator.itemgetter(name), rows))
    except KeyError:
        pass
    if factory is _NO_DEFAULT:
        return [row.get(name) for row in rows]
    return [row[name] if name in row else factory() for row in rows]


def _format_hashable(values: list[Any], fmt: Callable[[Any], str]) -> list[str]:
    if fmt is _text:  # cheap, and mostly distinct (workdirs, names): a memo costs more than it saves
        return [NULL if v is None else _text(v) for v in values]
    # Values equal for the column's type format the same way (1 and True in an
    # integer column, one instant in two time zones), so a set is a safe memo.
    memo = {v: fmt(v) for v in set(values) if v is not None}
    memo[None] = NULL
    return list(map(memo.__getitem__, values))


_SAMPLE = 64


def _format_flat_dicts(values: list[Any], fmt: Callable[[Any], str]) -> list[str] | None:
    """Distinct dicts of str -> str (a job's tags) that repeat by content: each content
    is encoded once, keyed by its items. None (the caller encodes each) when the first
    values are not such dicts or mostly differ (a job's parameters): a key costs less
    than an encoding, but not nothing."""
    sample = values[:_SAMPLE]
    if len(sample) < _SAMPLE:
        return None
    try:
        keys = {tuple(v.items()) for v in sample if type(v) is dict}
    except TypeError:
        return None
    if len(keys) * 4 > len(sample):
        return None
    memo: dict[tuple[Any, ...], str] = {}
    out = []
    append = out.append
    for v in values:
        if type(v) is not dict:
            append(NULL if v is None else fmt(v))
            continue
        try:
            key = tuple(v.items())
            s = memo.get(key)
        except TypeError:  # a nested (unhashable) value
            append(fmt(v))
            continue
        if s is None:
            s = fmt(v)
            # Only all-str contents are remembered: a str equals only a str, so a later
            # hit has the same text; 1, 1.0 and True are equal but encode differently.
            if all(type(x) is str for x in v.values()) and all(type(k) is str for k in v):
                memo[key] = s
        append(s)
    return out


def _format_flat_dict_column(values: list[Any]) -> list[str] | None:
    """_json of each value, for a column of distinct dicts of scalars (a job's
    parameters), with one call of the encoder for the whole column instead of one per
    value (half the time): the column is encoded as one JSON array and cut between its
    items. Cut only where no brace can be inside a string: the text has exactly one
    "{" and one "}" per value, the dicts' own (JSON does not escape braces, so a key or
    value holding one makes the count differ). None (the caller encodes each) for
    anything else."""
    if _iterencode is None or set(map(type, values)) != {dict}:
        return None
    text = "".join(_iterencode(values, 0))
    n = len(values)
    if text.count("{") != n or text.count("}") != n:
        return None
    if "\\" in text:
        text = text.replace("\\", "\\\\")
    # "[{a}, {b}]" -> ["a", "b"] -> ["{a}", "{b}"]
    return ["{" + item + "}" for item in text[2:-2].split("}, {")]


def _format_objects(values: list[Any], fmt: Callable[[Any], str]) -> list[str]:
    # JSON values are unhashable. Shared objects (event data shared by many rows) are
    # encoded once, keyed by id(): every value stays alive in `values` meanwhile. Objects
    # of their own per row (a job's tags) skip that memo. Empty containers, most of a
    # job's JSON columns, skip the encoder in dumps.
    if len(set(map(id, values))) * 2 > len(values):
        return (_format_flat_dicts(values, fmt) or (_format_flat_dict_column(values) if fmt is _json else None)
                or [NULL if v is None else fmt(v) for v in values])
    memo: dict[int, str] = {id(None): NULL}
    out = []
    append = out.append
    for v in values:
        s = memo.get(id(v))
        if s is None:
            s = memo[id(v)] = fmt(v)
        append(s)
    return out
