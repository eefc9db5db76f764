"""Analytics from the event log: throughput, node utilisation and latency breakdown.

Pure functions over job state-change records, per site and overall, in the terms the
published Balsam experiments use. Automatic steps the server takes in one transaction
are recorded in one event with `data.via`; they count as entered at that event's time.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from google.protobuf import struct_pb2

from balsam_grpc.v1 import event_pb2, job_pb2

# Phases of a job's life: from the (first|last) entry of the first present start state to
# the (first|last) entry of the first present end state. A retried job waits from its
# first readiness to its first run, and its run is the last (successful) one.
PHASES: dict[str, tuple[str, tuple[str, ...], str, tuple[str, ...]]] = {
    "stage_in": ("first", ("READY",), "first", ("STAGED_IN",)),
    "wait": ("first", ("PREPROCESSED", "STAGED_IN"), "first", ("RUNNING",)),
    "run": ("last", ("RUNNING",), "last", ("RUN_DONE",)),
    "stage_out": ("last", ("POSTPROCESSED",), "last", ("STAGED_OUT", "JOB_FINISHED")),
    "total": ("first", ("CREATED", "UNSPECIFIED"), "last", ("JOB_FINISHED",)),
}
FINISHED = "JOB_FINISHED"
RUNNING = "RUNNING"


@dataclass(frozen=True)
class StateChange:
    job_id: int
    site_id: int
    time: datetime
    from_state: str
    to_state: str
    via: tuple[str, ...] = ()

    @property
    def entered(self) -> tuple[str, ...]:
        """States entered by this change, in order (automatic steps included)."""
        return (*self.via, self.to_state)


def state_change(event: event_pb2.Event) -> StateChange | None:
    """The job state change an event message records, or None for other events and for
    a job's event that left its state as it was (a job held ahead for a launcher and
    released unstarted: data.released): it entered no state, so it is no transition."""
    if event.WhichOneof("change") != "job_state":
        return None
    change = event.job_state
    # Read data.via off the Struct directly: json_format.MessageToDict of every event was
    # half the time of a dashboard's or `balsamctl analytics`' pass over 10,000 events.
    via = event.data.fields.get("via") if event.HasField("data") else None
    if change.from_state == change.to_state and via is None:
        return None
    return StateChange(job_id=event.job_id, site_id=event.site_id, time=event.time.ToDatetime(),
                       from_state=_state_name(change.from_state), to_state=_state_name(change.to_state),
                       via=tuple(_text(v) for v in via.list_value.values) if via is not None else ())


def _text(value: struct_pb2.Value) -> str:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value" and value.number_value.is_integer():
        return str(int(value.number_value))
    return str(getattr(value, kind)) if kind else ""


def _state_name(number: int) -> str:
    return job_pb2.JobState.Name(number).removeprefix("JOB_STATE_")


@dataclass
class Percentiles:
    count: int
    p50: float
    p90: float
    p99: float
    mean: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> Percentiles:
        if not values:
            nan = math.nan
            return cls(0, nan, nan, nan, nan, nan)
        if len(values) == 1:  # statistics.quantiles wants two points before Python 3.13
            (v,) = values
            return cls(1, v, v, v, v, v)
        # The stdlib, not numpy (the SDK's core install has no numpy); "inclusive" is
        # numpy's default linear interpolation between closest ranks.
        cuts = statistics.quantiles(values, n=100, method="inclusive")
        return cls(len(values), cuts[49], cuts[89], cuts[98], statistics.fmean(values), max(values))


@dataclass
class JobTimeline:
    site_id: int
    first_entry: dict[str, datetime] = field(default_factory=dict)
    last_entry: dict[str, datetime] = field(default_factory=dict)


def timelines(changes: Iterable[StateChange]) -> dict[int, JobTimeline]:
    """First and last time each job entered each state."""
    out: dict[int, JobTimeline] = {}
    for ch in sorted(changes, key=lambda c: c.time):
        tl = out.setdefault(ch.job_id, JobTimeline(site_id=ch.site_id))
        if ch.from_state in ("CREATED", "UNSPECIFIED"):  # the creation event
            tl.first_entry.setdefault(ch.from_state, ch.time)
        for state in ch.entered:
            tl.first_entry.setdefault(state, ch.time)
            tl.last_entry[state] = ch.time
    return out


def phase_seconds(tl: JobTimeline, phase: str) -> float | None:
    start_which, starts, end_which, ends = PHASES[phase]
    start_entry = tl.first_entry if start_which == "first" else tl.last_entry
    end_entry = tl.first_entry if end_which == "first" else tl.last_entry
    start = next((start_entry[s] for s in starts if s in start_entry), None)
    end = next((end_entry[s] for s in ends if s in end_entry), None)
    if start is None or end is None:
        return None
    # A transaction stamps its events with the time it started, so a step that waited for
    # the write lock behind the one before it can carry a time a few ms earlier: that is
    # a zero-length phase, not a missing one.
    return max((end - start).total_seconds(), 0.0)


def latency_breakdown(changes: Iterable[StateChange]) -> dict[int | None, dict[str, Percentiles]]:
    """Per site (and overall under None): percentiles of each phase over finished jobs."""
    samples: dict[int | None, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for tl in timelines(changes).values():
        if FINISHED not in tl.first_entry:
            continue
        for phase in PHASES:
            seconds = phase_seconds(tl, phase)
            if seconds is not None:
                samples[tl.site_id][phase].append(seconds)
                samples[None][phase].append(seconds)
    return {site: {phase: Percentiles.of(values.get(phase, [])) for phase in PHASES}
            for site, values in samples.items()}


def throughput(changes: Iterable[StateChange], bin_seconds: float = 60.0) -> dict[int | None, list[tuple[datetime, int, int]]]:
    """Per site and overall: (bin start, jobs finished in the bin, cumulative finished)."""
    finished = [(c.site_id, c.time) for c in changes if FINISHED in c.entered]
    if not finished:
        return {}
    start = min(t for _, t in finished)
    bins: dict[int | None, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for site_id, t in finished:
        index = int((t - start).total_seconds() // bin_seconds)
        bins[site_id][index] += 1
        bins[None][index] += 1
    out: dict[int | None, list[tuple[datetime, int, int]]] = {}
    for site_id, counts in bins.items():
        series, total = [], 0
        for index in range(max(counts) + 1):
            total += counts.get(index, 0)
            series.append((start + timedelta(seconds=index * bin_seconds), counts.get(index, 0), total))
        out[site_id] = series
    return out


def running_over_time(changes: Iterable[StateChange], footprint: Mapping[int, float] | None = None
                      ) -> dict[int | None, list[tuple[datetime, float]]]:
    """Per site and overall: step series of the running node footprint (jobs count 1 each
    when `footprint`, job id -> num_nodes / node_packing_count, is not given). Divide by the
    nodes the site's launchers held to get utilisation."""
    deltas: list[tuple[datetime, int, float]] = []
    running: set[int] = set()
    for ch in sorted(changes, key=lambda c: c.time):
        weight = (footprint or {}).get(ch.job_id, 1.0)
        entered = ch.entered
        now_running = entered[-1] == RUNNING
        if ch.job_id in running and not now_running:
            running.discard(ch.job_id)
            deltas.append((ch.time, ch.site_id, -weight))
        elif ch.job_id not in running and now_running:
            running.add(ch.job_id)
            deltas.append((ch.time, ch.site_id, weight))
    return _step_series(deltas)



# ------------------------------------------------------------------ nodes held and utilisation

@dataclass(frozen=True)
class Allocation:
    """Nodes a site held for a while (a pilot batch job from its start to its end)."""

    site_id: int
    start: datetime
    end: datetime | None  # None: still running
    nodes: float


def allocation(batch_job: Any) -> Allocation | None:
    """The allocation of a BatchJob message, or None if it never started."""
    if not batch_job.HasField("start_time"):
        return None
    end = batch_job.end_time.ToDatetime() if batch_job.HasField("end_time") else None
    return Allocation(batch_job.site_id, batch_job.start_time.ToDatetime(), end, float(batch_job.num_nodes))


def held_over_time(allocations: Iterable[Allocation], until: datetime) -> dict[int | None, list[tuple[datetime, float]]]:
    """Per site and overall: step series of the nodes held (allocations still running
    count until `until`)."""
    deltas: list[tuple[datetime, int, float]] = []
    for a in allocations:
        end = min(a.end, until) if a.end is not None else until
        if end <= a.start:
            continue
        deltas += [(a.start, a.site_id, a.nodes), (end, a.site_id, -a.nodes)]
    deltas.sort(key=lambda d: (d[0], d[2]))  # at one instant, releases before grants
    return _step_series(deltas)


def _step_series(deltas: Iterable[tuple[datetime, int, float]]) -> dict[int | None, list[tuple[datetime, float]]]:
    """Per site and overall (key None): the running sum of time-ordered (time, site, delta)."""
    out: dict[int | None, list[tuple[datetime, float]]] = defaultdict(list)
    level: dict[int | None, float] = defaultdict(float)
    for t, site_id, delta in deltas:
        for key in (site_id, None):
            level[key] += delta
            out[key].append((t, level[key]))
    return dict(out)


def step_integral(series: list[tuple[datetime, float]], start: datetime, end: datetime) -> float:
    """Integral (value x seconds) over [start, end] of a step series that is 0 before its
    first point and holds each value until the next point."""
    total, value, t_prev = 0.0, 0.0, start
    for t, v in series:
        if t > end:
            break
        if t > t_prev:
            total += value * (t - t_prev).total_seconds()
            t_prev = t
        value = v
    if end > t_prev:
        total += value * (end - t_prev).total_seconds()
    return total


@dataclass
class SiteActivity:
    """A site's (or, under None, every site's) figures over a span of time."""

    finished: int
    span_seconds: float               # first event .. last event of the selection
    throughput_per_minute: float      # finished / span
    peak_per_minute: float            # the busiest throughput bin, per minute
    mean_running: float               # time-averaged running node footprint
    mean_held_nodes: float            # time-averaged nodes held by pilots
    utilisation: float                # running / held node-seconds (NaN without pilots)


def activity(changes: list[StateChange], allocations: Iterable[Allocation] = (), *, bin_seconds: float = 60.0,
             footprint: Mapping[int, float] | None = None) -> dict[int | None, SiteActivity]:
    """Throughput, node-time averages and utilisation per site and overall, over the span
    from the first to the last state change."""
    if not changes:
        return {}
    start = min(c.time for c in changes)
    end = max(c.time for c in changes)
    span = max((end - start).total_seconds(), 1e-9)
    bins = throughput(changes, bin_seconds)
    running = running_over_time(changes, footprint)
    held = held_over_time(allocations, until=end)
    sites: set[int | None] = {c.site_id for c in changes} | {None}
    out: dict[int | None, SiteActivity] = {}
    for site in sites:
        series = bins.get(site, [])
        finished = series[-1][2] if series else 0
        run_s = step_integral(running.get(site, []), start, end)
        held_s = step_integral(held.get(site, []), start, end)
        out[site] = SiteActivity(
            finished=finished, span_seconds=span, throughput_per_minute=finished / span * 60.0,
            peak_per_minute=max((n for _, n, _ in series), default=0) * 60.0 / bin_seconds,
            mean_running=run_s / span, mean_held_nodes=held_s / span,
            utilisation=run_s / held_s if held_s > 0 else math.nan)
    return out
