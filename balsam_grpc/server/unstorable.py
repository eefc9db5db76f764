"""Request values the database refuses to store, answered as the caller's mistake.

PostgreSQL cannot hold U+0000 (NUL) in text or JSON: psycopg refuses a NUL in a text
parameter before sending it (DataError), and the server refuses `\\u0000` in JSONB
(SQLSTATE 22P05). Such a value only ever comes from a request, so the answer is
INVALID_ARGUMENT naming the field that holds it, not INTERNAL. (SQLite stores NUL; no
request is refused there for it.) The request is searched only after the failure, so
well-formed requests pay nothing.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from balsam_grpc.core.errors import InvalidArgument

_UNTRANSLATABLE_CHARACTER = "22P05"
_JSON_TYPES = ("google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue")


def is_nul_refusal(exc: BaseException) -> bool:
    from sqlalchemy import exc as sa_exc

    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    orig = exc.orig
    return "NUL (0x00)" in str(orig) or getattr(orig, "sqlstate", None) == _UNTRANSLATABLE_CHARACTER


def nul_field(msg: Message, prefix: str = "") -> str | None:
    """Path of the first string in `msg` (fields, map keys and values, Struct values)
    that contains NUL."""
    for fd, value in msg.ListFields():
        path = f"{prefix}{fd.name}"
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            value_is_msg = fd.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE
            for key, item in value.items():
                if isinstance(key, str) and "\x00" in key:
                    return path
                found = nul_field(item, f"{path}[{key!r}].") if value_is_msg else (
                    path if isinstance(item, str) and "\x00" in item else None)
                if found:
                    return found.removesuffix(".")
            continue
        items = value if fd.is_repeated else [value]
        for i, item in enumerate(items):
            here = f"{path}[{i}]" if fd.is_repeated else path
            if isinstance(item, Message):
                if item.DESCRIPTOR.full_name in _JSON_TYPES:  # name the JSON field, not its insides
                    if nul_field(item):
                        return here
                    continue
                found = nul_field(item, f"{here}.")
                if found:
                    return found.removesuffix(".")
            elif isinstance(item, str) and "\x00" in item:
                return here
    return None


def nul_refusal(exc: BaseException, request: Any) -> InvalidArgument | None:
    """INVALID_ARGUMENT for a database refusal of a NUL character, else None."""
    if not is_nul_refusal(exc):
        return None
    field = nul_field(request) if isinstance(request, Message) else None
    where = field or "a text value of the request"
    return InvalidArgument(f"{where} contains a NUL character (\\x00), which cannot be stored; remove it",
                           field=field)
