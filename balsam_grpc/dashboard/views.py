"""Pure helpers of the dashboard: query strings in, presentation data out. No I/O."""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from balsam_grpc.core import times as core_times
from balsam_grpc.core.errors import InvalidArgument
from balsam_grpc.core.validation import parse_tag
from balsam_grpc.sdk.analytics import (
    PHASES,
    Allocation,
    StateChange,
    activity,
    held_over_time,
    latency_breakdown,
    running_over_time,
    throughput,
)
from balsam_grpc.sdk.convert import enum_names, enum_number
from balsam_grpc.v1 import batch_job_pb2, job_pb2, transfer_item_pb2

JOB_STATES = enum_names(job_pb2.JobState.DESCRIPTOR)

# Colour is never the only signal: every state has a glyph and its name next to it.
# group -> css class (colour); the glyph alone distinguishes states within a group.
STATE_STYLE: dict[str, tuple[str, str]] = {
    "CREATED": ("○", "waiting"), "AWAITING_PARENTS": ("⧗", "waiting"), "READY": ("◔", "waiting"),
    "STAGED_IN": ("⇣", "waiting"), "PREPROCESSED": ("◑", "waiting"), "RESTART_READY": ("↻", "waiting"),
    "RUNNING": ("▶", "running"), "RUN_DONE": ("◕", "running"), "POSTPROCESSED": ("◕", "running"),
    "STAGED_OUT": ("⇡", "running"), "RUN_ERROR": ("⚠", "trouble"), "RUN_TIMEOUT": ("⏱", "trouble"),
    "JOB_FINISHED": ("✔", "done"), "FAILED": ("✖", "failed"), "KILLED": ("⊘", "killed"),
}
FINAL_STATES = ("JOB_FINISHED", "FAILED", "KILLED")
FAILURE_STATES = ("FAILED", "RUN_ERROR", "RUN_TIMEOUT")
BATCH_JOB_STYLE: dict[str, tuple[str, str]] = {
    "PENDING_SUBMISSION": ("○", "waiting"), "SUBMIT_FAILED": ("✖", "failed"), "QUEUED": ("⧗", "waiting"),
    "RUNNING": ("▶", "running"), "PENDING_DELETION": ("⊘", "trouble"), "FINISHED": ("✔", "done"),
}
TRANSFER_STYLE: dict[str, tuple[str, str]] = {
    "AWAITING_JOB": ("○", "waiting"), "PENDING": ("⧗", "waiting"), "ACTIVE": ("⇄", "running"),
    "DONE": ("✔", "done"), "ERROR": ("✖", "failed"),
}
BATCH_JOB_STATES = enum_names(batch_job_pb2.BatchJobState.DESCRIPTOR)
TRANSFER_STATES = enum_names(transfer_item_pb2.TransferState.DESCRIPTOR)

WINDOWS: dict[str, int] = {"15m": 900, "1h": 3600, "6h": 21600, "24h": 86400, "7d": 604800}
DEFAULT_WINDOW = "1h"
ORDER_KEYS = ("id", "create_time", "update_time", "state_time", "priority", "workdir")
PAGE_SIZES = (50, 100, 500)
DEFAULT_PAGE_SIZE = 100
MAX_TRAIL = 25  # pages one can step back through with "Previous" (keyset tokens go forward only)
_NAME = re.compile(r"^[A-Za-z0-9_.:@+-]{1,200}$")


class BadQuery(ValueError):
    """A query string the dashboard refuses; the message says what to type instead."""


def badge(state: str, styles: Mapping[str, tuple[str, str]] = STATE_STYLE) -> dict[str, str]:
    icon, group = styles.get(state, ("?", "waiting"))
    return {"state": state, "icon": icon, "group": group, "label": state.replace("_", " ").lower()}


def iso(dt: datetime | None) -> str:
    """UTC ISO 8601 for a <time datetime=...> (the browser shows it in the viewer's zone)."""
    if dt is None:
        return ""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_window(text: str | None) -> tuple[str, int]:
    key = (text or DEFAULT_WINDOW).strip()
    if key not in WINDOWS:
        raise BadQuery(f"window {key!r}: choose one of {', '.join(WINDOWS)}")
    return key, WINDOWS[key]


def parse_time(text: str, what: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (naive = UTC) or an age like 30s, 10m, 2h, 1d, 1w (that long ago)."""
    try:
        return core_times.parse_time(text, now=now, naive=UTC)
    except core_times.TimeError as err:
        raise BadQuery(f"{what} {err}") from None


def _split(values: Iterable[str]) -> list[str]:
    out: list[str] = []
    for value in values:
        out.extend(part.strip() for part in value.split(",") if part.strip())
    return out


def _refs(values: Iterable[str], what: str) -> list[str]:
    refs = _split(values)
    for ref in refs:
        if not _NAME.match(ref):
            raise BadQuery(f"{what} {ref!r}: give a name or an id")
    return refs


@dataclass(frozen=True)
class JobQuery:
    """The jobs page's selection, sort and page, as typed into its form (or a URL)."""

    states: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()
    sites: tuple[str, ...] = ()
    apps: tuple[str, ...] = ()
    since: str = ""
    until: str = ""
    order: str = "-id"
    page_size: int = DEFAULT_PAGE_SIZE
    page_token: str = ""
    trail: tuple[str, ...] = ()       # tokens of the pages before this one ("" = the first)
    _times: tuple[datetime | None, datetime | None] = field(default=(None, None), compare=False, repr=False)

    @property
    def filtered(self) -> bool:
        return bool(self.states or self.tags or self.sites or self.apps or self.since or self.until)

    @property
    def first_page(self) -> bool:
        return not self.page_token

    @property
    def page_number(self) -> int:
        return len(self.trail) + 1 if self.page_token else 1

    @property
    def newest_first(self) -> bool:
        return self.order == "-id"

    def sdk_filter(self) -> dict[str, Any]:
        """Keywords of the SDK's job filter (sdk.filters.JOB_FILTER)."""
        kwargs: dict[str, Any] = {}
        if self.states:
            kwargs["state"] = list(self.states)
        if self.tags:
            kwargs["tags"] = dict(self.tags)
        if self.sites:
            kwargs["site"] = [int(s) if s.isdigit() else s for s in self.sites]
        if self.apps:
            kwargs["app"] = [int(a) if a.isdigit() else a for a in self.apps]
        since, until = self._times
        if since is not None:
            kwargs["since"] = since
        if until is not None:
            kwargs["until"] = until
        return kwargs

    def form_params(self) -> list[tuple[str, str]]:
        """The selection and sort as query parameters (no page position)."""
        out: list[tuple[str, str]] = []
        if self.states:
            out.append(("state", ",".join(self.states)))
        if self.tags:
            out.append(("tag", ",".join(f"{k}={v}" for k, v in self.tags)))
        if self.sites:
            out.append(("site", ",".join(self.sites)))
        if self.apps:
            out.append(("app", ",".join(self.apps)))
        if self.since:
            out.append(("since", self.since))
        if self.until:
            out.append(("until", self.until))
        if self.order != "-id":
            out.append(("order", self.order))
        if self.page_size != DEFAULT_PAGE_SIZE:
            out.append(("page_size", str(self.page_size)))
        return out

    def url(self, path: str = "/jobs", **changes: Any) -> str:
        query = replace(self, **changes) if changes else self
        params = query.form_params()
        if query.page_token:
            params.append(("page_token", query.page_token))
            params += [("back", t or "-") for t in query.trail]
        return path + ("?" + urlencode(params) if params else "")

    def next_url(self, token: str) -> str:
        trail = (*self.trail, self.page_token)[-MAX_TRAIL:]
        return self.url(page_token=token, trail=trail)

    def previous_url(self) -> str | None:
        if not self.page_token or not self.trail:
            return None if not self.page_token else self.url(page_token="", trail=())
        return self.url(page_token=self.trail[-1], trail=self.trail[:-1])

    def sorted_by(self, key: str) -> str:
        """URL of the first page sorted by `key` (descending if already ascending by it)."""
        order = f"-{key}" if self.order == key else key
        return self.url(order=order, page_token="", trail=())


def parse_job_query(params: Mapping[str, Sequence[str]], now: datetime | None = None) -> JobQuery:
    """The jobs page's query string (each key with all its values), checked; BadQuery
    names the first bad field and what it accepts."""
    def values(key: str) -> list[str]:
        return [v for v in params.get(key, ()) if v is not None]

    states = []
    for name in _split(values("state")):
        try:
            number = enum_number(job_pb2.JobState.DESCRIPTOR, name, "job state")
        except ValueError:
            raise BadQuery(f"state {name!r}: choose from {', '.join(JOB_STATES)}") from None
        states.append(job_pb2.JobState.Name(number).removeprefix("JOB_STATE_"))
    tags: dict[str, str] = {}
    for text in _split(values("tag")):
        try:
            key, value = parse_tag(text)
        except InvalidArgument as err:
            raise BadQuery(f"tag {text!r}: {err.message}") from None
        tags[key] = value
    since_text = (values("since") or [""])[-1].strip()
    until_text = (values("until") or [""])[-1].strip()
    since = parse_time(since_text, "since", now) if since_text else None
    until = parse_time(until_text, "until", now) if until_text else None
    order = (values("order") or ["-id"])[-1].strip() or "-id"
    if order.removeprefix("-") not in ORDER_KEYS:
        raise BadQuery(f"order {order!r}: choose from {', '.join(ORDER_KEYS)} (prefix - for descending)")
    size_text = (values("page_size") or [str(DEFAULT_PAGE_SIZE)])[-1]
    if not size_text.isdigit() or int(size_text) not in PAGE_SIZES:
        raise BadQuery(f"page_size {size_text!r}: choose from {', '.join(map(str, PAGE_SIZES))}")
    token = (values("page_token") or [""])[-1]
    trail = tuple("" if t == "-" else t for t in values("back"))[-MAX_TRAIL:]
    return JobQuery(states=tuple(dict.fromkeys(states)), tags=tuple(sorted(tags.items())),
                    sites=tuple(_refs(values("site"), "site")), apps=tuple(_refs(values("app"), "app")),
                    since=since_text, until=until_text, order=order, page_size=int(size_text),
                    page_token=token, trail=trail if token else (), _times=(since, until))


# ------------------------------------------------------------------------------ charts

def _epoch(dt: datetime) -> float:
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def sample_steps(series: Sequence[tuple[datetime, float]], times: Sequence[float]) -> list[float]:
    """Values of a step series (0 before its first point) at the given epoch seconds."""
    xs = [_epoch(t) for t, _ in series]
    out = []
    for t in times:
        i = bisect_right(xs, t)
        out.append(series[i - 1][1] if i else 0.0)
    return out


def _clean(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(value, 3)


def charts(changes: list[StateChange], allocations: Iterable[Allocation], footprint: Mapping[int, float],
           start: datetime, end: datetime, bin_seconds: float, site_names: Mapping[int, str]) -> dict[str, Any]:
    """Series for the overview's charts (epoch-second x values, so the browser draws them
    in the viewer's zone): jobs finished per minute per site, running vs held nodes, and
    the latency breakdown of finished jobs per site."""
    allocations = list(allocations)
    bins = throughput(changes, bin_seconds)
    throughput_chart: dict[str, Any] = {"x": [], "series": []}
    if None in bins:
        overall = bins[None]
        throughput_chart["x"] = [_epoch(t) for t, _, _ in overall]
        per_minute = 60.0 / bin_seconds
        for key in sorted((k for k in bins if k is not None)):
            counts = {_epoch(t): n for t, n, _ in bins[key]}
            throughput_chart["series"].append({
                "label": site_names.get(key, f"site {key}"),
                "values": [round(counts.get(x, 0) * per_minute, 3) for x in throughput_chart["x"]]})
    steps = max(2, min(240, int((end - start).total_seconds() // max(bin_seconds / 4, 1)) + 1))
    grid = [_epoch(start) + i * (_epoch(end) - _epoch(start)) / (steps - 1) for i in range(steps)]
    running = running_over_time(changes, footprint).get(None, [])
    held = held_over_time(allocations, until=end).get(None, [])
    nodes_chart = {"x": grid, "series": [{"label": "nodes running jobs", "values": sample_steps(running, grid)},
                                         {"label": "nodes held by pilots", "values": sample_steps(held, grid)}]}
    acts = activity(changes, allocations, bin_seconds=bin_seconds, footprint=footprint) if changes else {}
    latency = latency_breakdown(changes)
    latency_rows = []
    for key in sorted(latency, key=lambda k: (k is None, k or 0)):
        phases = {phase: {"p50": _clean(p.p50), "p99": _clean(p.p99), "count": p.count}
                  for phase, p in latency[key].items()}
        latency_rows.append({"site": "all sites" if key is None else site_names.get(key, f"site {key}"),
                             "phases": phases})
    summary = {("all sites" if k is None else site_names.get(k, f"site {k}")): {
        "finished": a.finished, "throughput_per_minute": _clean(a.throughput_per_minute),
        "utilisation": _clean(a.utilisation), "mean_held_nodes": _clean(a.mean_held_nodes)}
        for k, a in sorted(acts.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))}
    return {"bin_seconds": bin_seconds, "start": _epoch(start), "end": _epoch(end),
            "throughput": throughput_chart, "nodes": nodes_chart, "phases": list(PHASES),
            "latency": latency_rows, "summary": summary, "events": len(changes)}
