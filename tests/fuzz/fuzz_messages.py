"""Hypothesis strategies built from protobuf descriptors, and the list of every RPC of
every balsam.v1 service, found through the service descriptors (no hand-written list:
a new RPC or field is fuzzed the day it is added).

The generated values are of the right wire type but deliberately hostile: negative and
huge integers, ids of another user, empty and very long strings, NUL and lone
surrogate-free but odd unicode, huge maps, deeply nested Struct values, unknown enum
numbers, field masks naming fields that do not exist, page tokens from another query and
base64 garbage, NaN and infinities.
"""

from __future__ import annotations

import base64
import importlib
import json
import pkgutil
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message_factory, struct_pb2
from google.protobuf.message import Message
from hypothesis import strategies as st

import balsam_grpc.v1

FD = pb_descriptor.FieldDescriptor
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
HUGE_MAP_ENTRIES = 10_000
DEEP_NESTING = 120  # beyond upb's default recursion limit (100) once Struct/Value/ListValue wrap

# (backend, rpc) -> requests sent, printed by the terminal summary in conftest.py.
TYPED: Counter[tuple[str, str]] = Counter()
RAW: Counter[tuple[str, str]] = Counter()


@dataclass(frozen=True)
class Rpc:
    service: str  # full name, e.g. balsam.v1.JobService
    name: str
    request: type[Message]
    response: type[Message]
    client_streaming: bool
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    @property
    def unary(self) -> bool:
        return not (self.client_streaming or self.server_streaming)

    def __str__(self) -> str:
        return f"{self.service.rsplit('.', 1)[-1]}.{self.name}"


def all_rpcs() -> list[Rpc]:
    """Every method of every service declared in the generated balsam_grpc.v1 modules."""
    rpcs: list[Rpc] = []
    for info in pkgutil.iter_modules(balsam_grpc.v1.__path__):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"balsam_grpc.v1.{info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                rpcs.append(Rpc(service.full_name, method.name,
                                message_factory.GetMessageClass(method.input_type),
                                message_factory.GetMessageClass(method.output_type),
                                method.client_streaming, method.server_streaming))
    return sorted(rpcs, key=str)


@dataclass
class Pools:
    """Real values to mix into generated requests so some of them reach deep code paths:
    ids owned by the caller, ids owned by another user, page tokens of other queries."""

    int_ids: list[int] = field(default_factory=list)
    str_ids: list[str] = field(default_factory=list)
    page_tokens: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)


# -- scalars ---------------------------------------------------------------------------

def _ints(bounds: tuple[int, int]) -> st.SearchStrategy[int]:
    lo, hi = bounds
    return st.one_of(st.integers(-3, 40), st.sampled_from([lo, hi, lo + 1, hi - 1, -1, 2**31, 10**9]).filter(
        lambda v: lo <= v <= hi), st.integers(lo, hi))


ODD_TEXT = ["", " ", "\x00", "a\x00b", "..", "../../etc/passwd", "/abs/path", "~", "{{", "}}", "{{ x }}",
            "{% raw %}", "$(rm -rf /)", "'; DROP TABLE jobs; --", "%", "_", "\\", "\n", "\t", "é", "日本",
            "\U0001F600", "\u202e", "a" * 201, "x" * 5000]


def text() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(ODD_TEXT),
        st.text(max_size=20),
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-./", min_size=1, max_size=30),
        st.integers(1, 5).map(lambda k: "y" * (10 ** k)),  # up to 100 kB
    )


def short_text() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(ODD_TEXT[:-2]), st.text(max_size=8))


def _page_tokens(pools: Pools) -> st.SearchStrategy[str]:
    garbage = [base64.urlsafe_b64encode(raw).decode().rstrip("=") for raw in (
        b"not json", b"{}", b'{"q":"x"}', b'{"q":"abc","k":5}', b'{"q":"abc","k":[1,2]}', b"\xff\xfe",
        json.dumps({"q": "0" * 16, "k": [None, {"a": 1}, "x" * 100]}).encode())]
    numbers = ["0", "1", "²", "١٢", "-1", "9" * 19, "9" * 30, "9" * 5000, " 7"]  # cursors are numbers
    choices = [st.sampled_from(garbage + numbers + ["!!!", "====", "a", "%%%%"]), text()]
    if pools.page_tokens:
        choices.insert(0, st.sampled_from(pools.page_tokens))
    return st.one_of(*choices)


def _scalar(fd: FD, pools: Pools, *, short: bool = False) -> st.SearchStrategy[Any]:
    t = fd.type
    name = fd.name
    if t in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return _ints(INT32)
    if t in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        if (name == "id" or name.endswith(("_id", "_ids")) or name == "ids") and pools.int_ids:
            return st.one_of(st.sampled_from(pools.int_ids), _ints(INT64))
        return _ints(INT64)
    if t in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if t in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.one_of(st.sampled_from([0.0, -1.0, 1e308, -1e308, float("inf"), float("-inf"), float("nan")]),
                         st.floats(allow_nan=True, allow_infinity=True, width=64 if t == FD.TYPE_DOUBLE else 32))
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t == FD.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FD.TYPE_ENUM:
        known = [v.number for v in fd.enum_type.values]
        return st.one_of(st.sampled_from(known), st.sampled_from([-1, 99, 2**31 - 1, -(2**31)]))
    if t == FD.TYPE_STRING:
        if name in ("page_token", "cursor"):
            return _page_tokens(pools)
        if (name == "id" or name.endswith("_id") or name == "ids") and pools.str_ids:
            return st.one_of(st.sampled_from(pools.str_ids), text())
        if name in ("name", "names", "username", "app_names") and pools.names:
            return st.one_of(st.sampled_from(pools.names), text())
        return short_text() if short else text()
    raise AssertionError(f"unhandled field type {t} of {fd.full_name}")


# -- well-known messages ---------------------------------------------------------------

def json_values(max_leaves: int = 10) -> st.SearchStrategy[Any]:
    leaves = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True),
                       st.integers(-(2**60), 2**60).map(float), text())
    return st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(text(), inner, max_size=4)), max_leaves=max_leaves)


def _deep(depth: int) -> dict[str, Any]:
    value: Any = "bottom"
    for i in range(depth):
        value = {"k": value} if i % 2 else [value]
    return {"deep": value}


def structs() -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        st.dictionaries(text(), json_values(), max_size=5),
        st.integers(1, DEEP_NESTING).map(_deep),
        st.just({f"k{i}": i for i in range(HUGE_MAP_ENTRIES)}),
    )


def _timestamps() -> st.SearchStrategy[dict[str, int]]:
    # Timestamp.seconds is int64 on the wire: valid range is years 1..9999 only.
    return st.fixed_dictionaries({
        "seconds": st.one_of(st.integers(0, 2**34), st.sampled_from([-1, -62135596801, 253402300800, 2**62,
                                                                     -(2**63)])),
        "nanos": st.one_of(st.integers(0, 999_999_999), st.sampled_from([-1, 10**9, 2**31 - 1])),
    })


def _masks(target: pb_descriptor.Descriptor | None) -> st.SearchStrategy[list[str]]:
    names = [f.name for f in target.fields] if target else []
    bad = ["", "nope", "id.x", "tags.key", "..", "*", "resources.num_nodes", "resources.nope", "Name", "a" * 300]
    return st.lists(st.sampled_from(names + bad) if names else st.sampled_from(bad), max_size=6, unique=True)


# -- messages --------------------------------------------------------------------------

def _maps(fd: FD, pools: Pools, depth: int) -> st.SearchStrategy[dict[Any, Any]]:
    key_fd = fd.message_type.fields_by_name["key"]
    value_fd = fd.message_type.fields_by_name["value"]
    keys = _scalar(key_fd, pools)
    values = (_scalar(value_fd, pools) if value_fd.type != FD.TYPE_MESSAGE
              else _message_dict(value_fd.message_type, pools, depth + 1))
    small = st.dictionaries(keys, values, max_size=4)
    if key_fd.type == FD.TYPE_STRING and value_fd.type == FD.TYPE_STRING:
        huge = st.just({f"k{i}": str(i) for i in range(HUGE_MAP_ENTRIES)})
        return st.one_of(small, small, small, huge)
    return small


def _field(fd: FD, parent: pb_descriptor.Descriptor, pools: Pools, depth: int) -> st.SearchStrategy[Any]:
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        return _maps(fd, pools, depth)
    if fd.type == FD.TYPE_MESSAGE:
        single = _message_dict(fd.message_type, pools, depth + 1, sibling=parent)
    else:
        single = _scalar(fd, pools)
    if fd.is_repeated:
        if fd.type == FD.TYPE_MESSAGE:
            return st.lists(single, max_size=6)
        many = st.lists(_scalar(fd, pools, short=True), min_size=50, max_size=300)
        return st.one_of(st.lists(single, max_size=4), st.lists(single, max_size=4), many)
    return single


def _message_dict(desc: pb_descriptor.Descriptor, pools: Pools, depth: int,
                  sibling: pb_descriptor.Descriptor | None = None) -> st.SearchStrategy[Any]:
    """A strategy for a *description* of a message (a dict), turned into a message by
    build(); well-known types have dedicated shapes."""
    full = desc.full_name
    if full == "google.protobuf.Struct":
        return structs().map(lambda d: ("struct", d))
    if full == "google.protobuf.Value":
        return json_values().map(lambda v: ("value", v))
    if full == "google.protobuf.ListValue":
        return st.lists(json_values(), max_size=4).map(lambda v: ("list", v))
    if full == "google.protobuf.Timestamp":
        return _timestamps().map(lambda d: ("fields", d))
    if full == "google.protobuf.FieldMask":
        # The mask of an Update names fields of the resource next to it in the request.
        target = next((f.message_type for f in (sibling.fields if sibling else [])
                       if f.type == FD.TYPE_MESSAGE and not f.message_type.full_name.startswith("google.")), None)
        return _masks(target).map(lambda paths: ("fields", {"paths": paths}))
    if depth > 4:
        return st.just(("fields", {}))
    members = {f.name: _field(f, desc, pools, depth) for f in desc.fields}
    return st.fixed_dictionaries({}, optional=members).map(lambda d: ("fields", d))


def _fill(msg: Message, spec: tuple[str, Any]) -> None:
    kind, value = spec
    if kind == "struct":
        msg.update(value)
        return
    if kind == "value":
        holder = struct_pb2.Struct()
        holder.update({"v": value})
        msg.CopyFrom(holder.fields["v"])
        return
    if kind == "list":
        msg.extend(value)
        return
    for name, val in value.items():
        fd = msg.DESCRIPTOR.fields_by_name[name]
        target = getattr(msg, name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            value_fd = fd.message_type.fields_by_name["value"]
            for k, v in val.items():
                if value_fd.type == FD.TYPE_MESSAGE:
                    _fill(target[k], v)
                else:
                    target[k] = v
        elif fd.is_repeated:
            for item in val:
                if fd.type == FD.TYPE_MESSAGE:
                    _fill(target.add(), item)
                else:
                    target.append(item)
        elif fd.type == FD.TYPE_MESSAGE:
            target.SetInParent()
            _fill(target, val)
        else:
            setattr(msg, name, val)


def message_strategy(cls: type[Message], pools: Pools) -> st.SearchStrategy[Message]:
    """Messages of type `cls` with hostile but well-typed field values."""

    def build(spec: tuple[str, Any]) -> Message:
        msg = cls()
        _fill(msg, spec)
        return msg

    return _message_dict(cls.DESCRIPTOR, pools, 0).map(build)


# -- raw wire bytes --------------------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def raw_requests(cls: type[Message], valid: st.SearchStrategy[Message]) -> st.SearchStrategy[bytes]:
    """Serialized requests that a generated stub could never send: corrupt wire format,
    invalid UTF-8 in string fields, unknown fields, wrong wire types, truncation."""
    desc = cls.DESCRIPTOR
    strings = [f.number for f in desc.fields if f.type == FD.TYPE_STRING]
    numbers = [f.number for f in desc.fields] or [1]

    def bad_utf8(number: int, payload: bytes) -> bytes:
        return _varint(number << 3 | 2) + _varint(len(payload)) + payload

    parts: list[st.SearchStrategy[bytes]] = [
        st.binary(max_size=64),
        st.sampled_from([b"\xff", b"\x80" * 11, b"\x0a", b"\x0a\xff\xff\xff\xff\x0f", b"\x08", b"\x00",
                         b"\x07", b"\x0b", b"\x0c", b"\x0f\x01"]),
        # An unknown field (number 999) of each wire type, after a valid request: must be ignored.
        st.tuples(valid.map(lambda m: m.SerializeToString()), st.sampled_from(
            [_varint(999 << 3) + b"\x01", _varint(999 << 3 | 1) + b"\x00" * 8, _varint(999 << 3 | 2) + b"\x02hi",
             _varint(999 << 3 | 5) + b"\x00" * 4])).map(lambda t: t[0] + t[1]),
        # A known field with the wrong wire type.
        st.tuples(st.sampled_from(numbers), st.sampled_from([0, 1, 2, 5])).map(
            lambda t: _varint(t[0] << 3 | t[1]) + {0: b"\x05", 1: b"\x00" * 8, 2: b"\x01x", 5: b"\x00" * 4}[t[1]]),
    ]
    if strings:
        parts.append(st.tuples(st.sampled_from(strings), st.sampled_from(
            [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"abc\xfe", b"\xf8\x88\x80\x80\x80"])).map(lambda t: bad_utf8(*t)))
    return st.one_of(*parts)


