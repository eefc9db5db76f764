"""Query keywords -> the one Filter message of each resource (pure).

`Job.objects.filter(state="RUNNING", tags={"k": "v"})` is checked here at once, before
anything is sent: a misspelled keyword is a TypeError naming the valid ones, an unknown
state a ValueError listing the valid states. Chained `filter()` calls combine with AND:
"in" lists intersect (an empty intersection matches nothing without asking the
server), tag maps merge, time bounds tighten, exclusion lists grow.

Names that the filter message cannot carry (site names for jobs) are resolved at run
time through a callback, so this module stays free of I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

from google.protobuf.message import Message

from balsam_grpc.sdk.convert import as_list, aware, enum_number
from balsam_grpc.v1 import (
    app_service_pb2,
    batch_job_pb2,
    batch_job_service_pb2,
    common_pb2,
    event_service_pb2,
    job_pb2,
    site_service_pb2,
    transfer_item_pb2,
    transfer_item_service_pb2,
)

IDS = "ids"            # repeated int64: ints or objects with .id
ENUMS = "enums"        # repeated enum: names
MAP = "map"            # map<string, string>
TEXT = "text"          # string
TEXTS = "texts"        # repeated string
START = "start"        # TimeRange.start (datetime or timedelta ago)
END = "end"            # TimeRange.end
ENUM = "enum"          # singular enum
BOOL = "bool"          # optional bool
REF = "ref"            # ids or names of another resource (app, site)

# Resolves names of a referenced resource ("site", ["theta"]) to ids, at run time.
Resolver = Callable[[str, list[str]], list[int]]


class MatchesNothing(Exception):
    """The combined conditions contradict each other: the answer is empty."""


@dataclass(frozen=True)
class Param:
    field: str                  # field of the filter message ("states", "create_time")
    kind: str
    enum: Any = None            # EnumDescriptor for ENUMS/ENUM
    ref: str = ""               # REF: resource name ("site", "app")
    names_field: str = ""       # REF: filter field taking names directly, if any


@dataclass(frozen=True)
class FilterSpec:
    resource: str                               # "job"
    message: type[Message]                      # JobFilter
    params: Mapping[str, Param]                 # filter() keywords
    excludes: Mapping[str, Param] = field(default_factory=dict)  # exclude() keywords
    order_keys: frozenset[str] = frozenset({"id"})
    descending_only_id: bool = False            # events: "-id" means newest first

    # -- checking (at filter()/exclude() time) --------------------------------------

    def normalize(self, kwargs: Mapping[str, Any], *, exclude: bool = False) -> tuple[tuple[str, Any], ...]:
        """The keywords checked and converted to plain values; raises TypeError/ValueError."""
        table = self.excludes if exclude else self.params
        out = []
        for key, value in kwargs.items():
            param = table.get(key)
            if param is None:
                verb = "exclude" if exclude else "filter"
                valid = ", ".join(sorted(table)) or "none"
                raise TypeError(f"{self.resource}s cannot be {verb}ed by {key!r}; valid keywords: {valid}")
            out.append((key, _normalize(param, key, value, self.resource)))
        return tuple(out)

    def check_order(self, keys: tuple[str, ...]) -> tuple[str, ...]:
        for key in keys:
            bare = key.removeprefix("-")
            if bare not in self.order_keys:
                raise ValueError(f"{self.resource}s cannot be ordered by {bare!r}; valid: "
                                 f"{', '.join(sorted(self.order_keys))}")
            if key.startswith("-") and not self.descending_only_id and self.resource != "job":
                raise ValueError(f"{self.resource}s are listed by ascending id only")
        return keys

    # -- building (at run time) -------------------------------------------------------

    def build(self, criteria: list[tuple[bool, tuple[tuple[str, Any], ...]]],
              resolve: Resolver | None = None) -> Message:
        """The filter message for all criteria (exclude flag, normalized keywords).
        Raises MatchesNothing when they contradict."""
        msg = self.message()
        merged: dict[str, Any] = {}
        params: dict[str, Param] = {}
        for exclude, items in criteria:
            table = self.excludes if exclude else self.params
            for key, value in items:
                param = table[key]
                if param.kind == REF:
                    param, value = _resolve_ref(param, value, resolve)
                slot = param.field + (".exclude" if exclude else "")
                params[slot] = param
                merged[slot] = _merge(param, merged.get(slot), value, exclude, key) if slot in merged else value
        for slot, value in merged.items():
            _apply(msg, params[slot], value)
        return msg


def parse_tags(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """["k=v", ...] (command-line style) as a dict; ValueError names a malformed item."""
    tags: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"malformed tag {item!r}: expected KEY=VALUE")
        tags[key.strip()] = value
    return tags


def _ids(value: Any, key: str) -> tuple[int, ...]:
    out = []
    for item in as_list(value):
        item = getattr(item, "id", item)
        if isinstance(item, bool) or not isinstance(item, int):
            raise TypeError(f"{key}: expected ids (int or objects with .id), got {item!r}")
        out.append(item)
    return tuple(out)


def _texts(value: Any, key: str) -> tuple[str, ...]:
    items = as_list(value)
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{key}: expected text, got {item!r}")
    return tuple(items)


def _normalize(param: Param, key: str, value: Any, resource: str) -> Any:
    kind = param.kind
    if kind == IDS:
        return _ids(value, key)
    if kind == ENUMS:
        what = key.removesuffix("__in").replace("_", " ")
        return tuple(enum_number(param.enum, v, f"{resource} {what}") for v in as_list(value))
    if kind == ENUM:
        return enum_number(param.enum, value, f"{resource} {key}")
    if kind == MAP:
        if not isinstance(value, Mapping):
            raise TypeError(f"{key}: expected a dict of text to text, got {type(value).__name__}")
        return {str(k): str(v) for k, v in value.items()}
    if kind == TEXT:
        if not isinstance(value, str):
            raise TypeError(f"{key}: expected text, got {type(value).__name__}")
        return value
    if kind == TEXTS:
        return _texts(value, key)
    if kind in (START, END):
        return aware(value).astimezone(UTC)
    if kind == BOOL:
        if not isinstance(value, bool):
            raise TypeError(f"{key}: expected True or False, got {value!r}")
        return value
    if kind == REF:
        ids, names = [], []
        for item in as_list(value):
            item = getattr(item, "id", item)
            if isinstance(item, str):
                names.append(item)
            elif isinstance(item, int) and not isinstance(item, bool):
                ids.append(item)
            else:
                raise TypeError(f"{key}: expected {param.ref} ids, names or objects, got {item!r}")
        return tuple(ids), tuple(names)
    raise AssertionError(kind)


def _resolve_ref(param: Param, value: tuple[tuple[int, ...], tuple[str, ...]],
                 resolve: Resolver | None) -> tuple[Param, Any]:
    ids, names = value
    if names and (ids or not param.names_field):
        if resolve is None:
            raise ValueError(f"{param.ref} names need a client to be resolved")
        ids = tuple(ids) + tuple(resolve(param.ref, list(names)))
        if not ids:
            raise MatchesNothing
        return Param(param.field, IDS), ids
    if names:
        return Param(param.names_field, TEXTS), names
    return Param(param.field, IDS), ids


def _merge(param: Param, old: Any, new: Any, exclude: bool, key: str) -> Any:
    kind = param.kind
    if kind in (IDS, ENUMS, TEXTS):
        if exclude:
            return tuple(dict.fromkeys((*old, *new)))
        both = tuple(x for x in old if x in set(new))
        if not both:
            raise MatchesNothing
        return both
    if kind == MAP:
        for k, v in new.items():
            if k in old and old[k] != v:
                if exclude:
                    raise ValueError(f"{key}: cannot exclude two values of tag {k!r} in one query")
                raise MatchesNothing
        return {**old, **new}
    if kind == START:
        return max(old, new)
    if kind == END:
        return min(old, new)
    if kind in (ENUM, BOOL):
        if old != new:
            raise MatchesNothing
        return old
    if kind == TEXT:
        if old != new:
            raise ValueError(f"{key} given twice with different values ({old!r}, {new!r})")
        return old
    raise AssertionError(kind)


def _apply(msg: Message, param: Param, value: Any) -> None:
    kind = param.kind
    if kind in (IDS, ENUMS, TEXTS):
        getattr(msg, param.field).extend(value)
    elif kind == MAP:
        getattr(msg, param.field).update(value)
    elif kind in (START, END):
        bound = getattr(getattr(msg, param.field), "start" if kind == START else "end")
        bound.FromDatetime(value.astimezone(UTC).replace(tzinfo=None))
    else:
        setattr(msg, param.field, value)


def _time(field_name: str, since: str = "since", until: str = "until") -> dict[str, Param]:
    return {since: Param(field_name, START), until: Param(field_name, END)}


JOB_STATE = job_pb2.JobState.DESCRIPTOR

JOB_FILTER = FilterSpec(
    resource="job", message=job_pb2.JobFilter,
    params={
        "id": Param("ids", IDS), "state": Param("states", ENUMS, JOB_STATE), "tags": Param("tags", MAP),
        "app": Param("app_ids", REF, ref="app", names_field="app_names"), "app_id": Param("app_ids", IDS),
        "site": Param("site_ids", REF, ref="site"), "site_id": Param("site_ids", IDS),
        "parent_id": Param("parent_ids", IDS), "workdir__contains": Param("workdir_contains", TEXT),
        "batch_job": Param("batch_job_ids", IDS), "batch_job_id": Param("batch_job_ids", IDS),
        "session_id": Param("session_id", TEXT),
        **_time("create_time"), **_time("update_time", "updated_since", "updated_until"),
    },
    excludes={"state": Param("exclude_states", ENUMS, JOB_STATE), "tags": Param("exclude_tags", MAP)},
    order_keys=frozenset({"id", "create_time", "update_time", "state_time", "priority", "workdir"}),
)

SITE_FILTER = FilterSpec(
    resource="site", message=site_service_pb2.SiteFilter,
    params={"id": Param("ids", IDS), "name": Param("names", TEXTS), "connected": Param("connected", BOOL)},
)

APP_FILTER = FilterSpec(
    resource="app", message=app_service_pb2.AppFilter,
    params={"id": Param("ids", IDS), "site": Param("site_ids", REF, ref="site"), "site_id": Param("site_ids", IDS),
            "name": Param("names", TEXTS)},
)

BATCH_JOB_FILTER = FilterSpec(
    resource="batch job", message=batch_job_service_pb2.BatchJobFilter,
    params={"id": Param("ids", IDS), "site": Param("site_ids", REF, ref="site"), "site_id": Param("site_ids", IDS),
            "state": Param("states", ENUMS, batch_job_pb2.BatchJobState.DESCRIPTOR),
            "queue": Param("queue", TEXT), "scheduler_id": Param("scheduler_id", TEXT), **_time("create_time")},
)

TRANSFER_ITEM_FILTER = FilterSpec(
    resource="transfer item", message=transfer_item_service_pb2.TransferItemFilter,
    params={"id": Param("ids", IDS), "job": Param("job_ids", IDS), "job_id": Param("job_ids", IDS),
            "site": Param("site_ids", REF, ref="site"), "site_id": Param("site_ids", IDS),
            "state": Param("states", ENUMS, transfer_item_pb2.TransferState.DESCRIPTOR),
            "direction": Param("direction", ENUM, common_pb2.TransferDirection.DESCRIPTOR),
            "task_id": Param("task_id", TEXT)},
)

EVENT_FILTER = FilterSpec(
    resource="event", message=event_service_pb2.EventFilter,
    params={"job": Param("job_ids", IDS), "job_id": Param("job_ids", IDS),
            "site": Param("site_ids", REF, ref="site"), "site_id": Param("site_ids", IDS),
            "kind": Param("kinds", ENUMS, event_service_pb2.EventKind.DESCRIPTOR),
            "state": Param("to_states", ENUMS, JOB_STATE),  # like jobs: "events into these states"
            "to_state": Param("to_states", ENUMS, JOB_STATE), "from_state": Param("from_states", ENUMS, JOB_STATE),
            "tags": Param("tags", MAP), "batch_job": Param("batch_job_ids", IDS),
            "batch_job_id": Param("batch_job_ids", IDS), **_time("time")},
    descending_only_id=True,
)
