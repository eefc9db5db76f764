"""Protobuf field <-> Python value, by the field's descriptor (pure).

Enums become their short names ("RUNNING" for JOB_STATE_RUNNING), maps dicts, Struct
dicts (whole numbers as ints), Timestamps aware datetimes (None when unset), optional scalars None when unset.
Nested messages stay messages (they are already attribute-accessible) but accept dicts
on assignment.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from balsam_grpc.core.structs import struct_to_dict

TIMESTAMP = timestamp_pb2.Timestamp.DESCRIPTOR.full_name
STRUCT = struct_pb2.Struct.DESCRIPTOR.full_name


def enum_prefix(enum: EnumDescriptor) -> str:
    """"JOB_STATE_" for JobState: the zero value's name without "UNSPECIFIED"."""
    return enum.values_by_number[0].name.removesuffix("UNSPECIFIED")


def enum_names(enum: EnumDescriptor) -> list[str]:
    """Short names of every value but the zero one."""
    prefix = enum_prefix(enum)
    return [v.name.removeprefix(prefix) for v in enum.values if v.number != 0]


def enum_name(enum: EnumDescriptor, number: int) -> str:
    value = enum.values_by_number.get(number)
    return value.name.removeprefix(enum_prefix(enum)) if value else str(number)


def enum_number(enum: EnumDescriptor, value: Any, what: str) -> int:
    """The number of a short or full (case-insensitive) name; ValueError lists the valid ones."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value in enum.values_by_number and value != 0:
            return value
    elif isinstance(value, str):
        name = value.strip().upper()
        prefix = enum_prefix(enum)
        found = enum.values_by_name.get(name if name.startswith(prefix) else prefix + name)
        if found is not None and found.number != 0:
            return found.number
    raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(enum_names(enum))}")


def as_list(value: Any) -> list[Any]:
    """A scalar or an iterable (not a string or mapping) as a list."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        return [value]
    return list(value)


def to_datetime(ts: timestamp_pb2.Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def aware(value: datetime | timedelta, now: datetime | None = None) -> datetime:
    """A timezone-aware datetime; naive ones are local time, a timedelta means "that long ago"."""
    if isinstance(value, timedelta):
        return (now or datetime.now(UTC)) - value
    if not isinstance(value, datetime):
        raise TypeError(f"expected a datetime or timedelta, not {type(value).__name__}")
    return value if value.tzinfo else value.astimezone()


# google.protobuf types whose JSON form is free JSON data (numbers held as doubles).
JSON_VALUE_TYPES = frozenset(m.DESCRIPTOR.full_name for m in (struct_pb2.Struct, struct_pb2.Value,
                                                                struct_pb2.ListValue))


def get_field(msg: Message, name: str) -> Any:
    fd: FieldDescriptor = msg.DESCRIPTOR.fields_by_name[name]
    value = getattr(msg, name)
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        value_fd = fd.message_type.fields_by_name["value"]
        if value_fd.message_type is not None:
            return dict(value.items())
        return dict(value)
    if fd.is_repeated:
        if fd.enum_type is not None:
            return [enum_name(fd.enum_type, v) for v in value]
        return list(value)
    if fd.message_type is not None:
        full = fd.message_type.full_name
        if full == TIMESTAMP:
            return to_datetime(value) if msg.HasField(name) else None
        if full == STRUCT:
            return struct_to_dict(value)
        return value
    if fd.has_presence and fd.containing_oneof is None and not msg.HasField(name):
        return None
    if fd.enum_type is not None:
        return enum_name(fd.enum_type, value)
    return value


def _string_map(value: Mapping[str, Any], what: str) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a dict, not {type(value).__name__}")
    return {str(k): scalar_text(v) for k, v in value.items()}


def scalar_text(value: Any) -> str:
    """A parameter or tag value as text (booleans as true/false, like the apps expect)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def set_field(msg: Message, name: str, value: Any) -> None:
    fd: FieldDescriptor = msg.DESCRIPTOR.fields_by_name[name]
    what = f"{msg.DESCRIPTOR.name}.{name}"
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        target = getattr(msg, name)
        target.clear()
        value_fd = fd.message_type.fields_by_name["value"]
        if value_fd.message_type is None:
            target.update(_string_map(value or {}, what))
        else:
            for k, v in (value or {}).items():
                _assign_message(target[k], v, what)
        return
    if fd.is_repeated:
        target = getattr(msg, name)
        del target[:]
        items = as_list(value) if value is not None else []
        if fd.enum_type is not None:
            target.extend(enum_number(fd.enum_type, v, what) for v in items)
        elif fd.message_type is not None:
            for item in items:
                _assign_message(target.add(), item, what)
        else:
            target.extend(getattr(v, "id", v) if fd.type == FieldDescriptor.TYPE_INT64 else v for v in items)
        return
    if value is None:
        msg.ClearField(name)
        return
    if fd.message_type is not None:
        full = fd.message_type.full_name
        if full == TIMESTAMP:
            getattr(msg, name).FromDatetime(aware(value).astimezone(UTC).replace(tzinfo=None))
        elif full == STRUCT:
            if not isinstance(value, Mapping):
                raise TypeError(f"{what} must be a dict, not {type(value).__name__}")
            struct = getattr(msg, name)
            struct.Clear()
            struct.update(value)
        else:
            _assign_message(getattr(msg, name), value, what)
        return
    if fd.enum_type is not None:
        setattr(msg, name, enum_number(fd.enum_type, value, what))
        return
    setattr(msg, name, value)


def _assign_message(target: Message, value: Any, what: str) -> None:
    if isinstance(value, Message):
        target.CopyFrom(value)
    elif isinstance(value, Mapping):
        target.Clear()
        json_format.ParseDict(dict(value), target)
    else:
        raise TypeError(f"{what} must be a {target.DESCRIPTOR.name} message or a dict, not {type(value).__name__}")
