"""Conversions between protobuf values and the store's plain Python values."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from balsam_grpc.core.errors import InvalidArgument


class EnumCodec:
    """Maps a proto enum to the short names the store keeps ("RUNNING" for
    JOB_STATE_RUNNING) and back, refusing UNSPECIFIED and unknown numbers."""

    def __init__(self, enum: EnumTypeWrapper, prefix: str) -> None:
        self.enum = enum
        self.prefix = prefix
        self.to_name: dict[int, str] = {
            v.number: v.name[len(prefix):] for v in enum.DESCRIPTOR.values if v.number != 0
        }
        self.to_number: dict[str, int] = {n: v for v, n in self.to_name.items()}

    def name(self, value: int, field: str) -> str:
        try:
            return self.to_name[value]
        except KeyError:
            allowed = ", ".join(self.to_name.values())
            raise InvalidArgument(f"{field}: {value} is not a valid {self.enum.DESCRIPTOR.name}; "
                                  f"use one of {allowed}", field=field) from None

    def names(self, values: Any, field: str) -> list[str]:
        return [self.name(v, field) for v in values]

    def number(self, name: str | None) -> int:
        return self.to_number.get(name or "", 0)


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(dt: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything stored is UTC."""
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt


def to_timestamp(dt: datetime | None) -> timestamp_pb2.Timestamp | None:
    if dt is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(aware(dt))
    return ts


def from_timestamp(ts: timestamp_pb2.Timestamp, present: bool = True) -> datetime | None:
    if not present or (ts.seconds == 0 and ts.nanos == 0):
        return None
    return ts.ToDatetime(tzinfo=UTC)


def struct_to_dict(s: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(s)


def dict_to_struct(d: dict[str, Any] | None, out: struct_pb2.Struct) -> None:
    if d:
        out.update(d)
