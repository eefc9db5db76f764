"""The job filters every job command shares, parsed and checked before anything is sent.

`--state` (repeatable or comma list), `--exclude-state`, `--tag k=v`, `--app` (name or
id), `--site` (name or id), `--id`, `--since` (ISO time or 10m/2h/1d ago), `--limit`.
Parsing is pure: a `JobSelection` holds checked values and turns into the SDK's query
keywords; site names are resolved to ids only when a client runs the query.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any

import typer

from balsam_grpc.cli.errors import usage
from balsam_grpc.core.errors import InvalidArgument
from balsam_grpc.core.times import TimeError, parse_time
from balsam_grpc.core.validation import parse_tag
from balsam_grpc.sdk.convert import enum_names, enum_number
from balsam_grpc.v1 import job_pb2

JOB_STATE = job_pb2.JobState.DESCRIPTOR
STATE_NAMES = enum_names(JOB_STATE)
FINAL_STATES = ("JOB_FINISHED", "FAILED", "KILLED")


def split_list(values: Iterable[str] | None) -> list[str]:
    """Repeated options and comma lists alike: ["A,B", "C"] -> ["A", "B", "C"]."""
    out: list[str] = []
    for value in values or ():
        out.extend(part.strip() for part in value.split(",") if part.strip())
    return out


def parse_states(values: Iterable[str] | None, option: str = "--state") -> list[str]:
    """Canonical short state names; an unknown one is a usage error listing the valid ones."""
    names = []
    for value in split_list(values):
        try:
            number = enum_number(JOB_STATE, value, "job state")
        except ValueError:
            usage(f"{option}: unknown job state {value!r}; valid states: {', '.join(STATE_NAMES)}")
        names.append(job_pb2.JobState.Name(number).removeprefix("JOB_STATE_"))
    return list(dict.fromkeys(names))


def parse_tags(values: Iterable[str] | None, option: str = "--tag") -> dict[str, str]:
    tags: dict[str, str] = {}
    for text in values or ():
        try:
            key, value = parse_tag(text)
        except InvalidArgument as err:
            usage(f"{option}: {err.message}")
        if key in tags and tags[key] != value:
            usage(f"{option}: tag {key!r} given twice with different values ({tags[key]!r}, {value!r})")
        tags[key] = value
    return tags


def parse_key_values(values: Iterable[str] | None, option: str) -> dict[str, str]:
    """`key=value` pairs (app parameters, scheduler options); values may contain '='."""
    out: dict[str, str] = {}
    for text in values or ():
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            usage(f"{option}: {text!r} must look like key=value")
        key = key.strip()
        if key in out and out[key] != value:
            usage(f"{option}: {key!r} given twice with different values ({out[key]!r}, {value!r})")
        out[key] = value
    return out


def parse_since(text: str | None, now: datetime | None = None) -> datetime | None:
    """An ISO 8601 time (naive = local time) or a relative age: 30s, 10m, 2h, 1d, 1w."""
    if not text:
        return None
    try:
        return parse_time(text, now=now)
    except TimeError as err:
        usage(f"--since: {err}")


MAX_ID = 2**63 - 1  # ids are int64 on the wire
# Counts, minutes and priorities are int32 on the wire: typer options taking them say
# min/max, or protobuf refuses the value with a ValueError traceback.
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _is_number(value: str) -> bool:
    # str.isdigit() also accepts "²" and other digits int() refuses: ASCII digits only.
    return value.isascii() and value.isdigit()


def _id(value: str, option: str) -> int:
    number = int(value.lstrip("0") or "0") if len(value) <= 19 else MAX_ID + 1
    if number > MAX_ID:
        usage(f"{option}: {value!r} is larger than any id")
    return number


def parse_ref(value: str, option: str = "--app/--site") -> int | str:
    """A name or a numeric id (of an app or a site) as given, whole."""
    return _id(value, option) if _is_number(value) else value


def parse_refs(values: Iterable[str] | None, option: str = "--app/--site") -> list[int | str]:
    """Names or numeric ids (of apps or sites) as given."""
    return [parse_ref(v, option) for v in split_list(values)]


def parse_ids(values: Iterable[str] | None, option: str = "--id") -> list[int]:
    ids = []
    for value in split_list(values):
        if not _is_number(value):
            usage(f"{option}: {value!r} is not a job id")
        ids.append(_id(value, option))
    return ids


@dataclass
class JobSelection:
    """Checked job filters, independent of any connection."""

    ids: list[int] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    exclude_states: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    apps: list[int | str] = field(default_factory=list)
    sites: list[int | str] = field(default_factory=list)
    since: datetime | None = None
    limit: int | None = None

    @property
    def is_empty(self) -> bool:
        """True when it selects every job of the caller (bulk changes insist on a filter)."""
        return not (self.ids or self.states or self.exclude_states or self.tags or self.apps or self.sites
                    or self.since)

    def filter_kwargs(self) -> dict[str, Any]:
        """Keywords of the SDK's `Job.objects.filter(...)`."""
        kw: dict[str, Any] = {}
        if self.ids:
            kw["id"] = self.ids
        if self.states:
            kw["state"] = self.states
        if self.tags:
            kw["tags"] = self.tags
        if self.apps:
            kw["app"] = self.apps
        if self.sites:
            kw["site"] = self.sites
        if self.since:
            kw["since"] = self.since
        return kw

    def exclude_kwargs(self) -> dict[str, Any]:
        return {"state": self.exclude_states} if self.exclude_states else {}

    def describe(self) -> str:
        """The selection as the options that made it: `--tag exp=a --state RUNNING`."""
        def text(value: Any) -> str:
            if isinstance(value, dict):
                return " --tag ".join(f"{k}={v}" for k, v in value.items())
            if isinstance(value, list):
                return ",".join(map(str, value))
            return value.isoformat(timespec="seconds") if isinstance(value, datetime) else str(value)

        options = {"tags": "tag"}
        parts = [f"--{options.get(k, k)} {text(v)}" for k, v in self.filter_kwargs().items()]
        if self.exclude_states:
            parts.append(f"--exclude-state {','.join(self.exclude_states)}")
        return " ".join(parts) or "all jobs"


def selection_from_options(*, state: list[str] | None = None, exclude_state: list[str] | None = None,
                           tag: list[str] | None = None, app: list[str] | None = None,
                           site: list[str] | None = None, id: list[str] | None = None,  # noqa: A002
                           since: str | None = None, limit: int | None = None) -> JobSelection:
    if limit is not None and limit < 1:
        usage(f"--limit must be at least 1, got {limit}")
    return JobSelection(ids=parse_ids(id), states=parse_states(state),
                        exclude_states=parse_states(exclude_state, "--exclude-state"), tags=parse_tags(tag),
                        apps=parse_refs(app), sites=parse_refs(site), since=parse_since(since), limit=limit)


# ------------------------------------------------------------------ typer options

_PANEL = "Job filters"
_FILTER_PARAMS = [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
    for name, annotation in (
        ("state", Annotated[list[str] | None, typer.Option(
            "--state", "-s", help="only jobs in these states (repeat or comma list)", rich_help_panel=_PANEL)]),
        ("exclude_state", Annotated[list[str] | None, typer.Option(
            "--exclude-state", "-S", help="no jobs in these states", rich_help_panel=_PANEL)]),
        ("tag", Annotated[list[str] | None, typer.Option(
            "--tag", "-t", help="only jobs with tag key=value (repeat: all must match)", rich_help_panel=_PANEL)]),
        ("app", Annotated[list[str] | None, typer.Option(
            "--app", "-a", help="only jobs of this app (name or id)", rich_help_panel=_PANEL)]),
        ("site", Annotated[list[str] | None, typer.Option(
            "--site", help="only jobs at this site (name or id)", rich_help_panel=_PANEL)]),
        ("id", Annotated[list[str] | None, typer.Option(
            "--id", "-i", help="only these job ids (repeat or comma list)", rich_help_panel=_PANEL)]),
        ("since", Annotated[str | None, typer.Option(
            "--since", help="created since an ISO time or an age (10m, 2h, 1d)", rich_help_panel=_PANEL)]),
        ("limit", Annotated[int | None, typer.Option(
            "--limit", "-n", help="at most this many jobs", rich_help_panel=_PANEL)]),
    )
]
_FILTER_NAMES = [p.name for p in _FILTER_PARAMS]


def job_filters(func: Callable[..., Any]) -> Callable[..., Any]:
    """Give a command the shared job filter options; it receives them parsed as
    `selection: JobSelection` (bad values end the command before it runs)."""
    sig = inspect.signature(func)
    # Real annotation objects (not the strings of `from __future__ import annotations`):
    # typer reads the options' Annotated metadata from the signature.
    hints = typing.get_type_hints(func, include_extras=True)
    own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
           if p.name != "selection"]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        raw = {name: kwargs.pop(name, None) for name in _FILTER_NAMES}
        return func(*args, selection=selection_from_options(**raw), **kwargs)

    wrapper.__signature__ = sig.replace(parameters=[*own, *_FILTER_PARAMS])  # type: ignore[attr-defined]
    annotations = {k: v for k, v in hints.items() if k != "selection"}
    annotations.update({p.name: p.annotation for p in _FILTER_PARAMS})
    wrapper.__annotations__ = annotations
    return wrapper
