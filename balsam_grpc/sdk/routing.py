"""Routing new jobs to sites.

Strategies:

- `earliest`: the site with the least predicted completion time of the new job (below).
- `deadline`: among the sites predicted to finish the job by its deadline, the cheapest
  (node-hours times the site's charge); when none will, the earliest, and the decision
  says the job will miss its deadline (at submission, not after the fact).
- `round_robin` and `shortest_backlog` (fewest jobs queued or running, counting the ones
  placed since the last refresh): the baselines of the 2021 cross-facility experiments.
- `best`: the older throughput-following rule, kept for its users (below), and `fixed`.

Predicted completion of a job at a site, in seconds from now (`estimate`):

    stage_in  = fixed + bytes / rate      measured per (location, site) pair and direction
    wait      = dispatch + 0 with a free slot; else the sooner of a slot freed by the jobs
                ahead (running + backlog + placed, served by the held slots at the run
                time plus dispatch: the measured gap from a freed slot to the next start)
                and a new pilot: stage_in + the site's measured cold start (a job runnable
                to running in a pilot asked for after it: the elastic queue's reaction,
                the batch queue delay, the launcher's start), then the slots up to its
                node cap. An elastic queue asks for pilots for runnable jobs only, so
                the stage-in does not overlap that wait.
    run       = the app's run time at the site, linear in the input bytes when the
                history spans sizes, else its median
    stage_out = as stage_in, for the results
    total     = max(stage_in, wait) + run + stage_out   (the job stages in while it waits)

For the deadline policy each term also has a measured spread (its 90th percentile: of the
fit residuals, of the transfer tasks' seconds per byte, of the cold starts); the
completion at that quantile is `Estimate.high_s` (see `estimate`).

Those spreads miss the error of the queue model itself (a pilot that starts jobs late,
a backlog that drains slower than the run times say), so the margin is calibrated on
the router's own record, conformal style: for each job it routed (`Router.record`) that
has since finished, the excess of its actual turnaround (creation to finished, from the
job history `read_history` reads) over the completion predicted at that quantile; the
QUANTILE of those excesses (`calibrated_margin`, with the finite-sample rank of split
conformal prediction) widens every later estimate's margin (`Estimate.calibration_s`,
never negative: the margin only widens). With fewer than MIN_CALIBRATION finished
predictions the per-term spreads stand alone. A prediction also travels with its job
(`Decision.job_data()`, under ROUTING_KEY in the job's data, set at submission), so any
router, `balsamctl route` included, reads the record of every routed job that has
finished (`read_history`) and plans with the same calibrated margin.

Each term comes from a `LinearModel` fitted to history with the median absolute residual
as its error; a site without history of its own borrows the pooled history of the others
(its estimate says so). The estimation functions are pure and take plain values
(`SiteLoad`, `SiteHistory`); `read_history` is the only part that calls the server:
job state events (stage-in, run and stage-out phases), the jobs' transfer items (bytes
and durations) and the sites' pilot batch jobs (queue delay = start - creation).

`best` places a job on the site minimising

    (backlog + placed since the last refresh + 1) / max(throughput, capacity, floor)

(throughput and capacity in jobs per minute; capacity = the site's nodes times the best
recent throughput per node among the sites) from the server's live statistics
(SiteService.ListSiteStatistics). It ignores pilot queue delays, data movement and run
time, which is why `earliest` exists.

All strategies count the jobs they placed since the last statistics refresh, so a burst
spreads instead of piling onto the site that looked best a moment ago. Disconnected
sites are skipped while any selected site is connected.
"""

from __future__ import annotations

import itertools
import math
import statistics
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from google.protobuf import json_format

from balsam_grpc.sdk.analytics import phase_seconds, state_change, timelines
from balsam_grpc.sdk.errors import InvalidArgument
from balsam_grpc.v1 import (
    batch_job_service_pb2,
    common_pb2,
    event_service_pb2,
    job_service_pb2,
    site_service_pb2,
    transfer_item_pb2,
    transfer_item_service_pb2,
)

if TYPE_CHECKING:
    from balsam_grpc.sdk.client import Client

STRATEGIES = ("earliest", "deadline", "round_robin", "shortest_backlog", "best", "fixed")
DEFAULT_FLOOR_PER_MIN = 1.0


@dataclass(frozen=True)
class SiteLoad:
    """What the router knows of one site (from SiteStatistics)."""

    site_id: int
    name: str = ""
    connected: bool = True
    backlog_jobs: int = 0
    running_jobs: int = 0
    throughput_per_minute: float = 0.0
    queue_wait_p50_seconds: float = 0.0
    held_nodes: int = 0
    node_capacity: int = 0

    @property
    def nodes(self) -> int:
        """Nodes the site can bring to bear: held now, or what its elastic queue may hold."""
        return max(self.held_nodes, self.node_capacity)

    @classmethod
    def from_message(cls, s: site_service_pb2.SiteStatistics) -> SiteLoad:
        return cls(site_id=s.site_id, name=s.site_name, connected=s.connected, backlog_jobs=s.backlog_jobs,
                   running_jobs=s.running_jobs, throughput_per_minute=s.throughput_per_minute,
                   queue_wait_p50_seconds=s.queue_wait_p50_seconds, held_nodes=s.held_nodes,
                   node_capacity=s.node_capacity)


def node_rate_per_min(loads: Sequence[SiteLoad]) -> float:
    """The best recent throughput per held node among the sites (jobs per node-minute)."""
    return max((s.throughput_per_minute / s.held_nodes for s in loads if s.held_nodes > 0), default=0.0)


def service_rate_per_min(load: SiteLoad, node_rate: float = 0.0, floor_per_min: float = DEFAULT_FLOOR_PER_MIN) -> float:
    """Jobs per minute the site can be expected to deliver: its recent throughput, or
    what its nodes would deliver at the best observed rate per node, whichever is more,
    and never less than the floor.

    The capacity term matters when the sites are not saturated: their throughput then
    only mirrors what they were sent (equal sends give equal throughput), and a site
    with three idle nodes would look no better than a site with one busy node. With no
    rate per node observed yet, the floor is scaled by the nodes: sites are then
    compared by size alone."""
    if node_rate <= 0:
        return max(load.throughput_per_minute, floor_per_min * max(1, load.nodes))
    return max(load.throughput_per_minute, load.nodes * node_rate, floor_per_min)


def expected_completion_min(load: SiteLoad, placed: int = 0, floor_per_min: float = DEFAULT_FLOOR_PER_MIN,
                            node_rate: float = 0.0) -> float:
    """Minutes until a new job placed at `load`'s site would be done, by queueing:
    everything ahead of it plus itself, served at the site's expected rate."""
    return (load.backlog_jobs + placed + 1) / service_rate_per_min(load, node_rate, floor_per_min)


def eligible(loads: Sequence[SiteLoad]) -> list[SiteLoad]:
    """Connected sites, or all of them when none is connected (work waits for a daemon)."""
    connected = [s for s in loads if s.connected]
    return connected or list(loads)


def choose_best(loads: Sequence[SiteLoad], placed: dict[int, int] | None = None,
                floor_per_min: float = DEFAULT_FLOOR_PER_MIN) -> int:
    """The site id with the least expected completion; ties go to the higher
    throughput, then the lower id (deterministic)."""
    if not loads:
        raise InvalidArgument("no sites to route to")
    placed = placed or {}
    node_rate = node_rate_per_min(loads)
    best = min(eligible(loads), key=lambda s: (
        expected_completion_min(s, placed.get(s.site_id, 0), floor_per_min, node_rate),
        -service_rate_per_min(s, node_rate, floor_per_min), s.site_id))
    return best.site_id


def choose_round_robin(site_ids: Sequence[int], turn: int) -> int:
    if not site_ids:
        raise InvalidArgument("no sites to route to")
    return site_ids[turn % len(site_ids)]


def choose_shortest_backlog(loads: Sequence[SiteLoad], placed: Mapping[int, int] | None = None) -> int:
    """The site with the fewest jobs queued or running (plus those placed since the
    figures were read); ties to the lower id."""
    if not loads:
        raise InvalidArgument("no sites to route to")
    placed = placed or {}
    return min(eligible(loads), key=lambda s: (s.backlog_jobs + s.running_jobs + placed.get(s.site_id, 0),
                                               s.site_id)).site_id


# -- completion prediction: pure functions over measured history ----------------------

# The quantile the deadline policy plans for: each term's spread is measured as how far
# its QUANTILE lies above its typical value (see `LinearModel.high_seconds`).
QUANTILE = 0.9


def quantile(values: Sequence[float], q: float = QUANTILE) -> float:
    """The q-quantile of `values` (linear interpolation; with few samples it tends to
    the largest, which errs on the safe side)."""
    if not values:
        raise ValueError("quantile of no values")
    xs = sorted(values)
    pos = min(max(q, 0.0), 1.0) * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class LinearModel:
    """seconds = fixed_s + per_byte_s * bytes, fitted to `samples` observations;
    `error_s` is the median absolute residual of the fit (its typical error).

    The spread, for planning against a deadline: `upper_s` is the QUANTILE of the signed
    residuals (how far a slow occurrence lies above the fit) and `per_byte_high_s` the
    QUANTILE of the seconds per byte the transfer tasks measured (the slow rates), so
    `high_seconds` is a pessimistic but observed duration, not the mean."""

    fixed_s: float
    per_byte_s: float = 0.0
    samples: int = 0
    error_s: float = 0.0
    upper_s: float = 0.0
    per_byte_high_s: float | None = None

    def seconds(self, nbytes: float = 0.0) -> float:
        return max(0.0, self.fixed_s + self.per_byte_s * max(nbytes, 0.0))

    def high_seconds(self, nbytes: float = 0.0) -> float:
        """The duration at the model's high quantile: the slow transfer rate plus the
        residual quantile (both observed; never below `seconds`)."""
        rate = self.per_byte_s if self.per_byte_high_s is None else max(self.per_byte_s, self.per_byte_high_s)
        return max(self.seconds(nbytes), self.fixed_s + rate * max(nbytes, 0.0) + max(self.upper_s, 0.0))

    @property
    def bytes_per_s(self) -> float | None:
        return 1.0 / self.per_byte_s if self.per_byte_s > 0 else None


def fit_linear(samples: Sequence[tuple[float, float]], per_byte_s: float | None = None,
               per_byte_high_s: float | None = None, q: float = QUANTILE) -> LinearModel | None:
    """A LinearModel of (bytes, seconds) samples, robust to a handful of points.

    With `per_byte_s` given (a transfer rate measured by the transfer tasks themselves)
    only the fixed part is fitted, as the median of what the bytes do not explain. Else,
    when the sizes vary by more than 10 %, a least-squares line (slope kept >= 0);
    otherwise the median seconds, and size does not scale the estimate. The spread
    (`upper_s`) is the q-quantile of the residuals; `per_byte_high_s` (the slow rate
    of the transfer tasks) is kept as given."""
    if not samples:
        return None
    xs = [float(b) for b, _ in samples]
    ys = [float(t) for _, t in samples]
    if per_byte_s is None:
        per_byte_s = 0.0
        mean_x = statistics.fmean(xs)
        spread = max(xs) - min(xs)
        if len(samples) >= 3 and mean_x > 0 and spread > 0.1 * mean_x:
            mean_y = statistics.fmean(ys)
            sxx = sum((x - mean_x) ** 2 for x in xs)
            per_byte_s = max(0.0, sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx)
    fixed = statistics.median(y - per_byte_s * x for x, y in zip(xs, ys, strict=True))
    signed = [y - (fixed + per_byte_s * x) for x, y in zip(xs, ys, strict=True)]
    return LinearModel(fixed_s=max(fixed, 0.0), per_byte_s=per_byte_s, samples=len(samples),
                       error_s=statistics.median(abs(r) for r in signed), upper_s=max(0.0, quantile(signed, q)),
                       per_byte_high_s=per_byte_high_s)


@dataclass(frozen=True)
class SiteHistory:
    """What one site's past says about running the app there (all optional: unmeasured
    terms are borrowed from the pooled history of the sites, see `pooled`)."""

    site_id: int
    stage_in: LinearModel | None = None
    stage_out: LinearModel | None = None
    run: LinearModel | None = None
    pilot_delay_s: float | None = None
    pilot_delay_samples: int = 0
    charge_per_node_hour: float = 1.0
    pilot_delay_high_s: float | None = None  # the QUANTILE of the measured pilot queue delays
    dispatch_s: float | None = None  # a freed slot to the next waiting job's start (launcher latency)
    start_interval_s: float | None = None  # mean time between starts while jobs waited (`start_intervals`)
    turnarounds: tuple[tuple[int, float], ...] = ()  # (job id, creation to finished, s) of finished jobs
    predictions: tuple[Prediction, ...] = ()  # what a router predicted for them (`Decision.job_data`)


def pooled(histories: Iterable[SiteHistory]) -> SiteHistory:
    """A prior for sites without history: per term, the median over the sites that have it
    (and the widest spread: a borrowed term is the less certain)."""
    hs = list(histories)

    def pool(models: list[LinearModel]) -> LinearModel | None:
        if not models:
            return None
        highs = [m.per_byte_high_s for m in models if m.per_byte_high_s is not None]
        return LinearModel(statistics.median(m.fixed_s for m in models), statistics.median(m.per_byte_s for m in models),
                           0, statistics.median(m.error_s for m in models),
                           upper_s=max(m.upper_s for m in models), per_byte_high_s=max(highs) if highs else None)
    delays = [h.pilot_delay_s for h in hs if h.pilot_delay_s is not None]
    high_delays = [h.pilot_delay_high_s for h in hs if h.pilot_delay_high_s is not None]
    dispatches = [h.dispatch_s for h in hs if h.dispatch_s is not None]
    intervals = [h.start_interval_s for h in hs if h.start_interval_s is not None]
    return SiteHistory(site_id=0, stage_in=pool([h.stage_in for h in hs if h.stage_in]),
                       stage_out=pool([h.stage_out for h in hs if h.stage_out]),
                       run=pool([h.run for h in hs if h.run]),
                       pilot_delay_s=statistics.median(delays) if delays else None,
                       pilot_delay_high_s=max(high_delays) if high_delays else None,
                       dispatch_s=statistics.median(dispatches) if dispatches else None,
                       start_interval_s=statistics.median(intervals) if intervals else None)


@dataclass(frozen=True)
class Estimate:
    """A job's predicted completion at one site, in seconds from now, by term."""

    site_id: int
    stage_in_s: float
    wait_s: float
    run_s: float
    stage_out_s: float
    error_s: float            # typical error: the terms' errors added in quadrature
    cost: float               # node-hours times the site's charge
    borrowed: tuple[str, ...] = ()  # terms taken from the other sites' pooled history
    name: str = ""
    spread_s: float = 0.0     # how far the QUANTILE of the completion lies above total_s
    spreads: tuple[tuple[str, float], ...] = ()  # each term's share of it (term, seconds)
    cost_high: float = 0.0    # the cost at the run time's high quantile
    calibration_s: float = 0.0  # the margin added from the router's past prediction errors

    @property
    def total_s(self) -> float:
        return max(self.stage_in_s, self.wait_s) + self.run_s + self.stage_out_s

    @property
    def informed(self) -> bool:
        """Whether any run history stood behind it: before any site has run the app the
        estimate is a placeholder (no run time), and its error would calibrate nothing."""
        return self.run_s > 0

    @property
    def spread_high_s(self) -> float:
        """The completion at the high quantile by the per-term spreads alone (what the
        calibration measures its excesses against)."""
        return self.total_s + self.spread_s

    @property
    def high_s(self) -> float:
        """The completion the deadline policy plans for: total_s plus the spread plus
        the calibration margin."""
        return self.total_s + self.spread_s + self.calibration_s

    def as_dict(self) -> dict[str, Any]:
        return {"site_id": self.site_id, "site": self.name, "stage_in_s": self.stage_in_s, "wait_s": self.wait_s,
                "run_s": self.run_s, "stage_out_s": self.stage_out_s, "total_s": self.total_s,
                "error_s": self.error_s, "high_s": self.high_s, "spread_s": self.spread_s,
                "calibration_s": self.calibration_s,
                "spreads": dict(self.spreads), "cost": self.cost, "borrowed": list(self.borrowed)}


def slot_waits(load: SiteLoad, placed: int, run_s: float, pilot_delay_s: float,
               slots_per_node: int = 1, start_interval_s: float = 0.0) -> tuple[float, float]:
    """(by a held slot, by a new pilot): seconds until a slot is free for a job placed now
    behind the site's backlog, either way (inf when that way is closed).

    `run_s` is a slot's turnover per job (the run plus the launcher's dispatch gap).
    The held slots free one every run_s / slots; a new pilot (if the node cap leaves
    room) starts its first job `pilot_delay_s` after the job is runnable (the cold
    start: the elastic queue asking for it, the batch queue, the launcher starting),
    and from then the capped slots serve the rest. A site with no pilot and no known
    cap still gets one pilot's worth of slots.

    `start_interval_s` is the site's measured time between starts while jobs waited:
    the queue advances no faster than that, whatever the slots would allow (a pilot
    that leased jobs ahead serves them alone while another pilot idles; jobs sharing
    the site's cores run slower together than their run times alone say)."""
    held = load.held_nodes * slots_per_node
    cap = max(load.node_capacity * slots_per_node, held, slots_per_node)
    in_front = load.backlog_jobs + load.running_jobs + placed
    if in_front < held:
        return 0.0, math.inf
    run_s = max(run_s, 1e-3)
    by_held = (in_front - held + 1) * max(run_s / held, start_interval_s) if held else math.inf
    by_pilot = math.inf
    if cap > held:
        served_meanwhile = pilot_delay_s / max(run_s / held, start_interval_s) if held else 0.0
        by_pilot = pilot_delay_s + max(0.0, in_front - cap + 1 - served_meanwhile) * max(run_s / cap, start_interval_s)
    return by_held, by_pilot


def slot_wait_s(load: SiteLoad, placed: int, run_s: float, pilot_delay_s: float, slots_per_node: int = 1) -> float:
    """Seconds until a slot is free (the sooner of `slot_waits`)."""
    return min(slot_waits(load, placed, run_s, pilot_delay_s, slots_per_node))


def completion_s(load: SiteLoad, placed: int, *, stage_in_s: float, run_s: float, stage_out_s: float,
                 pilot_delay_s: float, dispatch_s: float, start_interval_s: float = 0.0) -> tuple[float, float]:
    """(wait, total) of a job placed now, from one value per term (see the module
    docstring). A held slot can be waited for while the job stages in; a new pilot is
    only asked for once the job is runnable (staged in), so that way adds the two."""
    by_held, by_pilot = slot_waits(load, placed, run_s + dispatch_s, pilot_delay_s, start_interval_s=start_interval_s)
    wait_s = min(dispatch_s + by_held, stage_in_s + by_pilot)
    return wait_s, max(stage_in_s, wait_s) + run_s + stage_out_s


def estimate(load: SiteLoad, history: SiteHistory, prior: SiteHistory | None = None, *, placed: int = 0,
             input_bytes: float = 0.0, output_bytes: float = 0.0, num_nodes: int = 1,
             calibration_s: float | None = None) -> Estimate:
    """The job's predicted completion at `load`'s site (see the module docstring).
    `calibration_s` (from `calibrated_margin`; None: too little record) widens the margin.

    The spread: each term in turn (stage-in, pilot queue delay, run time, stage-out) is
    set to its high quantile, the others kept typical, and the completion recomputed;
    the excesses over `total_s` are added in quadrature (the terms vary independently).
    A slow run also delays the jobs ahead in the queue, and a slow pilot every job that
    waits for it: recomputing through the queue model counts both."""
    prior = prior or SiteHistory(site_id=0)
    borrowed: list[str] = []

    def term(name: str, own: LinearModel | None, fallback: LinearModel | None) -> LinearModel:
        if own is not None:
            return own
        borrowed.append(name)
        return fallback or LinearModel(0.0)
    stage_in = term("stage_in", history.stage_in, prior.stage_in)
    run = term("run", history.run, prior.run)
    stage_out = term("stage_out", history.stage_out, prior.stage_out)
    delay, delay_high = history.pilot_delay_s, history.pilot_delay_high_s
    if delay is None:
        borrowed.append("pilot_delay")
        delay, delay_high = prior.pilot_delay_s or 0.0, prior.pilot_delay_high_s
    delay_high = max(delay, delay_high if delay_high is not None else delay)
    dispatch = history.dispatch_s if history.dispatch_s is not None else (prior.dispatch_s or 0.0)
    interval = history.start_interval_s if history.start_interval_s is not None else (prior.start_interval_s or 0.0)
    typical = {"stage_in_s": stage_in.seconds(input_bytes), "run_s": run.seconds(input_bytes),
               "stage_out_s": stage_out.seconds(output_bytes), "pilot_delay_s": delay}
    high = {"stage_in_s": stage_in.high_seconds(input_bytes), "run_s": run.high_seconds(input_bytes),
            "stage_out_s": stage_out.high_seconds(output_bytes), "pilot_delay_s": delay_high}
    wait_s, total = completion_s(load, placed, dispatch_s=dispatch, start_interval_s=interval, **typical)
    spreads = []
    for key in ("stage_in_s", "pilot_delay_s", "run_s", "stage_out_s"):
        _, slow = completion_s(load, placed, dispatch_s=dispatch, start_interval_s=interval,
                               **{**typical, key: high[key]})
        spreads.append((key.removesuffix("_s"), max(0.0, slow - total)))
    error = math.sqrt(stage_in.error_s**2 + run.error_s**2 + stage_out.error_s**2)
    node_hours = num_nodes * history.charge_per_node_hour / 3600.0
    return Estimate(site_id=load.site_id, name=load.name, stage_in_s=typical["stage_in_s"], wait_s=wait_s,
                    run_s=typical["run_s"], stage_out_s=typical["stage_out_s"], error_s=error,
                    cost=typical["run_s"] * node_hours, borrowed=tuple(borrowed),
                    spread_s=math.sqrt(sum(d * d for _, d in spreads)), spreads=tuple(spreads),
                    cost_high=high["run_s"] * node_hours, calibration_s=max(0.0, calibration_s or 0.0))


def estimates(loads: Sequence[SiteLoad], histories: Mapping[int, SiteHistory], placed: Mapping[int, int] | None = None,
              calibration_s: float | None = None, **job: float) -> list[Estimate]:
    """Estimates for every eligible site, each from its own history and the pooled prior."""
    placed = placed or {}
    prior = pooled(histories.values())
    return [estimate(s, histories.get(s.site_id, SiteHistory(s.site_id)), prior, placed=placed.get(s.site_id, 0),
                     calibration_s=calibration_s, **job) for s in eligible(loads)]  # type: ignore[arg-type]


# Finished predictions needed before the calibration margin replaces "no margin"; the
# newest CALIBRATION_WINDOW of them count (the queue model's error drifts with the load).
MIN_CALIBRATION = 20
CALIBRATION_WINDOW = 500


@dataclass(frozen=True)
class Prediction:
    """What the router predicted for a job it routed: its completion, typical and at
    the high quantile by the per-term spreads (`Estimate.spread_high_s`)."""

    job_id: int
    site_id: int
    total_s: float
    high_s: float


# The key of a job's data under which its routing prediction travels.
ROUTING_KEY = "routing"


def recorded_prediction(job_id: int, data: Mapping[str, Any]) -> Prediction | None:
    """The prediction a job's data holds (`Decision.job_data`), or None (not routed, or
    not by a router that says so)."""
    entry = data.get(ROUTING_KEY)
    if not isinstance(entry, Mapping):
        return None
    try:
        return Prediction(int(job_id), int(entry["site_id"]), float(entry["total_s"]), float(entry["high_s"]))
    except (KeyError, TypeError, ValueError):
        return None


def prediction_excesses(predictions: Iterable[Prediction], turnarounds: Mapping[int, float]) -> list[float]:
    """Per prediction whose job has finished (`turnarounds`: job id -> seconds from
    creation to finished), how far the actual turnaround lies above the predicted high
    quantile (negative: it came in under). In the order of `predictions`."""
    return [turnarounds[p.job_id] - p.high_s for p in predictions if p.job_id in turnarounds]


def calibrated_margin(excesses: Sequence[float], q: float = QUANTILE,
                      min_samples: int = MIN_CALIBRATION) -> float | None:
    """The margin to add to the predicted high quantile so that, were the errors to come
    as they did, a fraction q of turnarounds would land within it: the ceil((n+1) q)-th
    smallest of the n excesses (split conformal prediction's rank; the largest when that
    rank passes n), at least 0. None with fewer than `min_samples` excesses."""
    n = len(excesses)
    if n < max(min_samples, 1):
        return None
    rank = min(n, math.ceil((n + 1) * q))
    return max(0.0, sorted(excesses)[rank - 1])


@dataclass(frozen=True)
class Decision:
    """Where a job goes and why: the chosen site, every site's estimate, and whether
    the job is predicted to miss its deadline (None: no deadline given): `will_miss`
    when its typical completion is past it, `at_risk` when the high quantile is."""

    site_id: int
    strategy: str
    estimates: tuple[Estimate, ...] = ()
    deadline_s: float | None = None
    will_miss: bool | None = None

    @property
    def chosen(self) -> Estimate | None:
        return next((e for e in self.estimates if e.site_id == self.site_id), None)

    @property
    def at_risk(self) -> bool | None:
        mine = self.chosen
        if self.deadline_s is None or mine is None:
            return None
        return mine.high_s > self.deadline_s

    def job_data(self) -> dict[str, Any]:
        """What to put in the job's data at submission (`data=`) so that every router
        reading the history, in any process, calibrates on this prediction once the job
        has finished: the chosen site's typical completion and its high quantile by the
        per-term spreads. Empty when the decision has no estimate or an uninformed one
        (`Estimate.informed`)."""
        mine = self.chosen
        if mine is None or not mine.informed:
            return {}
        return {ROUTING_KEY: {"site_id": mine.site_id, "strategy": self.strategy, "total_s": round(mine.total_s, 3),
                              "high_s": round(mine.spread_high_s, 3), "deadline_s": self.deadline_s}}


def choose_earliest(ests: Sequence[Estimate]) -> Estimate:
    """The least predicted completion; ties to the cheaper, then the lower id."""
    if not ests:
        raise InvalidArgument("no sites to route to")
    return min(ests, key=lambda e: (round(e.total_s, 6), e.cost, e.site_id))


# Costs within this fraction of the cheapest count as equal (at least; see below).
COST_TOLERANCE = 0.10


def choose_for_deadline(ests: Sequence[Estimate], deadline_s: float) -> tuple[Estimate, bool]:
    """The cheapest site predicted to finish within `deadline_s` at the high quantile of
    its completion (`Estimate.high_s`: the spread of every term included, not the
    typical completion), or the earliest when none is; the flag says the chosen site's
    typical completion is past the deadline (a predicted miss).

    Costs count as equal when they differ by less than COST_TOLERANCE or by less than
    the cheapest site's own run-time spread: with one charge everywhere, run-time noise
    between sites must not pick the site (then the earliest of them wins)."""
    if not ests:
        raise InvalidArgument("no sites to route to")
    meeting = [e for e in ests if e.high_s <= deadline_s]
    if meeting:
        cheapest = min(meeting, key=lambda e: (e.cost, e.site_id))
        bound = max(cheapest.cost * (1 + COST_TOLERANCE), cheapest.cost_high)
        return choose_earliest([e for e in meeting if e.cost <= bound]), False
    best = choose_earliest(ests)
    return best, best.total_s > deadline_s


# -- gathering the history from the server (the only part here that makes calls) ------

_ID_CHUNK = 500


def _paged(client: Client, service: str, method: str, request: Any, field_name: str, limit: int) -> Iterator[Any]:
    seen = 0
    while True:
        request.page_size = min(500, limit - seen)
        response = client.call(service, method, request)
        for item in getattr(response, field_name):
            yield item
            seen += 1
        if seen >= limit or not response.next_page_token:
            return
        request.page_token = response.next_page_token


def dispatch_gaps(lives: Iterable[Any]) -> dict[int, list[float]]:
    """Per site: for each job that was runnable when another job's run ended and started
    after it, the time from that run's end (the freed slot) to its start. What a slot
    costs per job beyond the run itself: the launcher noticing, starting the process."""
    by_site: dict[int, list[tuple[Any, Any, Any]]] = defaultdict(list)  # (runnable, start, run done)
    for tl in lives:
        runnable = tl.first_entry.get("PREPROCESSED") or tl.first_entry.get("STAGED_IN")
        start, done = tl.last_entry.get("RUNNING"), tl.last_entry.get("RUN_DONE")
        if runnable and start and done:
            by_site[tl.site_id].append((runnable, start, done))
    gaps: dict[int, list[float]] = defaultdict(list)
    for site_id, jobs in by_site.items():
        ends = sorted(done for _, _, done in jobs)
        for runnable, start, _ in jobs:
            freed = [e for e in ends if e <= start]
            if freed and runnable <= freed[-1]:
                gaps[site_id].append((start - freed[-1]).total_seconds())
    return gaps


def start_intervals(lives: Mapping[int, Any], pilot_of_job: Mapping[int, int]) -> dict[int, list[float]]:
    """Per site: for each job that was runnable before the site's previous start and was
    not its pilot's first job (that one waited for the pilot: a cold start), the time
    from the previous start to its own. Their mean is how fast the site's queue
    actually advanced while jobs waited, whatever held them up. `lives` maps job id to
    its JobTimeline, `pilot_of_job` job id to batch job id."""
    by_site: dict[int, list[tuple[Any, Any, int]]] = defaultdict(list)  # (start, runnable, job id)
    for job_id, tl in lives.items():
        runnable = tl.first_entry.get("PREPROCESSED") or tl.first_entry.get("STAGED_IN")
        start = tl.first_entry.get("RUNNING")
        if runnable and start:
            by_site[tl.site_id].append((start, runnable, job_id))
    out: dict[int, list[float]] = defaultdict(list)
    for site_id, jobs in by_site.items():
        jobs.sort()
        firsts = {}
        for start, _, job_id in jobs:
            firsts.setdefault(pilot_of_job.get(job_id), job_id)
        for (before, _, _), (start, runnable, job_id) in itertools.pairwise(jobs):
            if runnable <= before and firsts.get(pilot_of_job.get(job_id)) != job_id:
                out[site_id].append((start - before).total_seconds())
    return out


def cold_starts(lives: Mapping[int, Any], pilot_of_job: Mapping[int, int],
                pilots: Iterable[Any]) -> dict[int, list[float]]:
    """Per site, for each pilot whose first job was runnable before the pilot was asked
    for (it waited for this pilot): seconds from that job being runnable to running.
    `lives` maps job id to its JobTimeline, `pilot_of_job` job id to batch job id, and
    `pilots` are BatchJob messages (id, site_id, create_time)."""
    first: dict[int, tuple[Any, Any]] = {}  # pilot id -> (running, runnable) of its first job
    for job_id, pilot_id in pilot_of_job.items():
        tl = lives.get(job_id)
        if tl is None or not pilot_id:
            continue
        runnable = tl.first_entry.get("PREPROCESSED") or tl.first_entry.get("STAGED_IN")
        running = tl.first_entry.get("RUNNING")
        if runnable is None or running is None:
            continue
        if pilot_id not in first or running < first[pilot_id][0]:
            first[pilot_id] = (running, runnable)
    out: dict[int, list[float]] = defaultdict(list)
    for b in sorted(pilots, key=lambda b: b.create_time.ToDatetime()):
        if b.id in first:
            running, runnable = first[b.id]
            if runnable <= b.create_time.ToDatetime():
                out[b.site_id].append(max(0.0, (running - runnable).total_seconds()))
    return out


@dataclass
class _Samples:
    stage_in: list[tuple[float, float]] = field(default_factory=list)
    stage_out: list[tuple[float, float]] = field(default_factory=list)
    run: list[tuple[float, float]] = field(default_factory=list)
    in_rates: list[float] = field(default_factory=list)   # seconds per byte of the transfer tasks
    out_rates: list[float] = field(default_factory=list)


def read_history(client: Client, site_ids: Sequence[int], app_ids: Mapping[int, int] | None = None, *,
                 in_location: str | None = None, out_location: str | None = None, max_events: int = 5000,
                 max_batch_jobs: int = 50, charges: Mapping[int, float] | None = None,
                 q: float = QUANTILE) -> dict[int, SiteHistory]:
    """Each site's history from the server: the last `max_events` job state events (its
    finished jobs' stage-in, run and stage-out phases; only jobs of `app_ids[site]` when
    given), their transfer items (bytes, and the tasks' own durations for the rate of
    the (location, site) pair; only `in_location`/`out_location` when given) and the
    site's last `max_batch_jobs` pilots: the cold start (`cold_starts`; where no job
    waited for a pilot, the queue delay = start - creation). Each term's
    spread is its q-quantile: of the fit residuals, the tasks' seconds per byte and the
    pilot queue delays."""
    request = event_service_pb2.ListEventsRequest(descending=True)
    request.filter.site_ids.extend(site_ids)
    request.filter.kinds.append(event_service_pb2.EVENT_KIND_JOB_STATE)
    changes = [c for c in (state_change(e) for e in _paged(client, "EventService", "ListEvents", request, "events",
                                                           max_events)) if c is not None]
    lives = {job_id: tl for job_id, tl in timelines(changes).items() if "JOB_FINISHED" in tl.first_entry}
    job_ids = sorted(lives)
    pilot_of_job: dict[int, int] = {}  # the cold starts count jobs of any app: a pilot is a pilot
    recorded: dict[int, Prediction] = {}
    kept = set()
    wanted = set(app_ids.values()) if app_ids is not None else None
    for i in range(0, len(job_ids), _ID_CHUNK):
        jr = job_service_pb2.ListJobsRequest()
        jr.filter.ids.extend(job_ids[i:i + _ID_CHUNK])
        for j in _paged(client, "JobService", "ListJobs", jr, "jobs", _ID_CHUNK):
            pilot_of_job[j.id] = j.batch_job_id
            if wanted is None or j.app_id in wanted:
                kept.add(j.id)
                routed = j.data.fields.get(ROUTING_KEY) if j.HasField("data") else None
                if routed is not None:
                    found = recorded_prediction(j.id, {ROUTING_KEY: json_format.MessageToDict(routed)})
                    if found is not None:
                        recorded[j.id] = found
    if wanted is not None:
        job_ids = [j for j in job_ids if j in kept]
    moved: dict[int, dict[int, list[Any]]] = defaultdict(lambda: defaultdict(list))  # job -> direction -> items
    for i in range(0, len(job_ids), _ID_CHUNK):
        tr = transfer_item_service_pb2.ListTransferItemsRequest()
        tr.filter.job_ids.extend(job_ids[i:i + _ID_CHUNK])
        tr.filter.states.append(transfer_item_pb2.TRANSFER_STATE_DONE)
        for item in _paged(client, "TransferService", "ListTransferItems", tr, "transfer_items", 10 * _ID_CHUNK):
            moved[item.job_id][item.direction].append(item)
    stage_in_dir, stage_out_dir = common_pb2.TRANSFER_DIRECTION_IN, common_pb2.TRANSFER_DIRECTION_OUT
    samples: dict[int, _Samples] = defaultdict(_Samples)
    for job_id in job_ids:
        tl = lives[job_id]
        got = samples[tl.site_id]
        ins = [t for t in moved[job_id][stage_in_dir] if in_location is None or t.location_alias == in_location]
        outs = [t for t in moved[job_id][stage_out_dir] if out_location is None or t.location_alias == out_location]
        in_bytes = float(sum(t.metrics.bytes for t in ins))
        out_bytes = float(sum(t.metrics.bytes for t in outs))
        for phase, nbytes, items, rates, into in (("stage_in", in_bytes, ins, got.in_rates, got.stage_in),
                                                   ("stage_out", out_bytes, outs, got.out_rates, got.stage_out)):
            seconds = phase_seconds(tl, phase)
            if seconds is not None and items:
                into.append((nbytes, seconds))
                rates += [t.metrics.duration_seconds / t.metrics.bytes for t in items if t.metrics.bytes > 0]
        run = phase_seconds(tl, "run")
        if run is not None:
            got.run.append((in_bytes, run))
    dispatch = dispatch_gaps(lives[j] for j in job_ids)
    intervals = start_intervals({j: lives[j] for j in job_ids}, pilot_of_job)
    turnarounds: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for job_id in job_ids:
        total = phase_seconds(lives[job_id], "total")
        if total is not None:
            turnarounds[lives[job_id].site_id].append((job_id, total))
    delays: dict[int, list[float]] = defaultdict(list)
    br = batch_job_service_pb2.ListBatchJobsRequest()
    br.filter.site_ids.extend(site_ids)
    pilots = [b for b in _paged(client, "BatchJobService", "ListBatchJobs", br, "batch_jobs", 10_000)
              if b.HasField("start_time")]
    pilots.sort(key=lambda b: b.create_time.ToDatetime())
    cold = cold_starts(lives, pilot_of_job, pilots)
    for b in pilots:
        delays[b.site_id].append(max(0.0, (b.start_time.ToDatetime() - b.create_time.ToDatetime()).total_seconds()))
    for site_id, seconds in cold.items():  # measured from the job's side: preferred
        delays[site_id] = seconds
    out = {}
    for site_id in site_ids:
        got = samples.get(site_id, _Samples())
        recent = delays.get(site_id, [])[-max_batch_jobs:]
        def rated(samples: list[tuple[float, float]], rates: list[float]) -> LinearModel | None:
            if not rates:
                return fit_linear(samples, q=q)
            return fit_linear(samples, statistics.median(rates), quantile(rates, q), q=q)
        out[site_id] = SiteHistory(
            site_id=site_id, stage_in=rated(got.stage_in, got.in_rates), stage_out=rated(got.stage_out, got.out_rates),
            run=fit_linear(got.run, q=q), pilot_delay_s=statistics.median(recent) if recent else None,
            pilot_delay_high_s=quantile(recent, q) if recent else None,
            pilot_delay_samples=len(recent), charge_per_node_hour=(charges or {}).get(site_id, 1.0),
            dispatch_s=statistics.median(dispatch[site_id]) if dispatch.get(site_id) else None,
            start_interval_s=statistics.fmean(intervals[site_id]) if intervals.get(site_id) else None,
            turnarounds=tuple(turnarounds.get(site_id, ())),
            predictions=tuple(recorded[j] for j, _ in turnarounds.get(site_id, ()) if j in recorded))
    return out


class Router:
    """Chooses a site for each new job. Thread-safe; one per submitting process.

    `earliest` and `deadline` need the app (`app`: its name, present at every site) to
    read run-time history; `in_location`/`out_location` select the transfer location
    pairs whose rates count. `charges` (site name or id -> charge per node-hour) set the
    cost `deadline` minimises; history is re-read at most every `history_seconds`.
    `quantile` is the high quantile of each term `deadline` plans for (0.9: a site is
    trusted with a job when it would make the deadline with every term as slow as its
    slowest tenth of the history, one term at a time, added in quadrature), widened by
    the router's own past errors: `record` each routed job's id with its decision (and
    submit the job with `data=decision.job_data()`, so other routers see it too), and
    once MIN_CALIBRATION of them have finished, their excesses over the predicted high
    quantile set the margin (`calibrated_margin`)."""

    def __init__(self, client: Client, sites: Iterable[int | str], strategy: str = "best", *,
                 window_seconds: float = 60.0, refresh_seconds: float = 1.0,
                 floor_per_min: float = DEFAULT_FLOOR_PER_MIN, clock: Callable[[], float] = time.monotonic,
                 app: str | None = None, in_location: str | None = None, out_location: str | None = None,
                 charges: Mapping[int | str, float] | None = None, history_seconds: float = 10.0,
                 quantile: float = QUANTILE, min_calibration: int = MIN_CALIBRATION) -> None:
        if strategy not in STRATEGIES:
            raise InvalidArgument(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
        wanted = list(sites)
        if not wanted:
            raise InvalidArgument("a router needs at least one site")
        self.site_ids = [self._site_id(client, s) for s in wanted]
        self.client = client
        self.strategy = strategy
        self.window_seconds = window_seconds
        self.refresh_seconds = refresh_seconds
        self.floor_per_min = floor_per_min
        self.history_seconds = history_seconds
        if not 0.5 <= quantile < 1.0:
            raise InvalidArgument(f"quantile must be in [0.5, 1), not {quantile}")
        self.quantile = quantile
        self.min_calibration = min_calibration
        self.in_location, self.out_location = in_location, out_location
        self.app_ids: dict[int, int] | None = None
        if app is not None:
            self.app_ids = {}
            for site_id in self.site_ids:
                found = client.apps.filter(name=app, site_id=site_id).first()
                if found is None:
                    raise InvalidArgument(f"no app named {app!r} at site {site_id}: register it there first")
                self.app_ids[site_id] = found.id
        self.charges = {self._site_id(client, k): float(v) for k, v in (charges or {}).items()}
        self._clock = clock
        self._lock = threading.Lock()
        self._loads: list[SiteLoad] = []
        self._fetched_at: float | None = None
        self._history: dict[int, SiteHistory] = {}
        self._history_at: float | None = None
        self._placed_since_refresh: Counter[int] = Counter()
        self._turn = 0
        self.placements: Counter[int] = Counter()  # site id -> jobs placed, over the router's life
        self.refreshes = 0
        self._predictions: deque[Prediction] = deque(maxlen=4 * CALIBRATION_WINDOW)

    @staticmethod
    def _site_id(client: Client, site: int | str) -> int:
        if not isinstance(site, str):
            return int(site)
        ids = client.resolve_names("site", [site])
        if not ids:
            raise InvalidArgument(f"no site named {site!r}")
        return ids[0]

    def statistics(self) -> list[SiteLoad]:
        """The selected sites' live figures, straight from the server."""
        resp = self.client.call("SiteService", "ListSiteStatistics", site_service_pb2.ListSiteStatisticsRequest(
            filter=site_service_pb2.SiteFilter(ids=self.site_ids), window_seconds=self.window_seconds))
        return [SiteLoad.from_message(s) for s in resp.sites]

    def loads(self) -> list[SiteLoad]:
        """The figures the last decision used (refreshed if older than refresh_seconds)."""
        with self._lock:
            self._refresh_if_stale()
            return list(self._loads)

    def history(self) -> dict[int, SiteHistory]:
        """Each site's measured history (re-read if older than history_seconds)."""
        with self._lock:
            self._history_if_stale()
            return dict(self._history)

    def _refresh_if_stale(self) -> None:
        now = self._clock()
        if self._fetched_at is not None and now - self._fetched_at < self.refresh_seconds:
            return
        loads = self.statistics()
        missing = set(self.site_ids) - {s.site_id for s in loads}
        if missing:
            raise InvalidArgument(f"sites {sorted(missing)} not found for routing")
        self._loads, self._fetched_at = loads, now
        self._placed_since_refresh.clear()  # the new figures count them in the backlog
        self.refreshes += 1

    def _history_if_stale(self) -> None:
        now = self._clock()
        if self._history_at is not None and now - self._history_at < self.history_seconds:
            return
        self._history = read_history(self.client, self.site_ids, self.app_ids, in_location=self.in_location,
                                     out_location=self.out_location, charges=self.charges, q=self.quantile)
        self._history_at = now

    def record(self, decision: Decision, job_id: int) -> None:
        """Keep what `decision` predicted for the job it placed (`job_id`), to calibrate
        the margin once the job has finished. A decision without estimates, or with an
        uninformed one, is ignored."""
        chosen = decision.chosen
        if chosen is not None and chosen.informed:
            with self._lock:
                self._predictions.append(Prediction(int(job_id), chosen.site_id, chosen.total_s, chosen.spread_high_s))

    def calibration(self) -> tuple[float | None, int]:
        """(margin, finished predictions it rests on): see `calibrated_margin`."""
        with self._lock:
            self._history_if_stale()
            return self._calibration()

    def _calibration(self) -> tuple[float | None, int]:
        done = {job_id: s for h in self._history.values() for job_id, s in h.turnarounds}
        # This router's own record and every job's, as the history carries them, in the
        # order the jobs were created.
        made = {p.job_id: p for h in self._history.values() for p in h.predictions}
        made.update((p.job_id, p) for p in self._predictions)
        excesses = prediction_excesses([made[j] for j in sorted(made)], done)[-CALIBRATION_WINDOW:]
        return calibrated_margin(excesses, self.quantile, self.min_calibration), len(excesses)

    def estimates(self, *, input_bytes: float = 0.0, output_bytes: float = 0.0) -> list[Estimate]:
        """Every eligible site's predicted completion of a job placed now."""
        with self._lock:
            self._refresh_if_stale()
            self._history_if_stale()
            return estimates(self._loads, self._history, self._placed_since_refresh, self._calibration()[0],
                             input_bytes=input_bytes, output_bytes=output_bytes)

    def decide(self, *, input_bytes: float = 0.0, output_bytes: float = 0.0,
               deadline_s: float | None = None) -> Decision:
        """The site for the next job (counted as placed there), with the estimates it
        was chosen on (for `earliest` and `deadline`; a deadline given to another
        strategy is still checked against the chosen site's estimate)."""
        with self._lock:
            ests: list[Estimate] = []
            if self.strategy == "fixed":
                site_id = self.site_ids[0]
            elif self.strategy == "round_robin":
                site_id = choose_round_robin(self.site_ids, self._turn)
                self._turn += 1
            else:
                self._refresh_if_stale()
                if self.strategy == "best":
                    site_id = choose_best(self._loads, self._placed_since_refresh, self.floor_per_min)
                elif self.strategy == "shortest_backlog":
                    site_id = choose_shortest_backlog(self._loads, self._placed_since_refresh)
            if self.strategy in ("earliest", "deadline") or deadline_s is not None:
                self._refresh_if_stale()
                self._history_if_stale()
                ests = estimates(self._loads, self._history, self._placed_since_refresh, self._calibration()[0],
                                 input_bytes=input_bytes, output_bytes=output_bytes)
            will_miss = None
            if self.strategy == "earliest":
                site_id = choose_earliest(ests).site_id
            elif self.strategy == "deadline":
                if deadline_s is None:
                    raise InvalidArgument("the deadline strategy needs a deadline for each job (deadline_s)")
                chosen, will_miss = choose_for_deadline(ests, deadline_s)
                site_id = chosen.site_id
            if deadline_s is not None and will_miss is None:
                mine = next((e for e in ests if e.site_id == site_id), None)
                will_miss = mine is not None and mine.total_s > deadline_s
            self._placed_since_refresh[site_id] += 1
            self.placements[site_id] += 1
            return Decision(site_id, self.strategy, tuple(ests), deadline_s, will_miss)

    def choose(self, **job: Any) -> int:
        """The site id for the next job (counted as placed there)."""
        return self.decide(**job).site_id


__all__ = [
    "STRATEGIES",
    "Decision",
    "Estimate",
    "LinearModel",
    "Prediction",
    "ROUTING_KEY",
    "Router",
    "SiteHistory",
    "SiteLoad",
    "calibrated_margin",
    "choose_best",
    "choose_earliest",
    "choose_for_deadline",
    "choose_round_robin",
    "choose_shortest_backlog",
    "cold_starts",
    "completion_s",
    "dispatch_gaps",
    "eligible",
    "estimate",
    "estimates",
    "expected_completion_min",
    "fit_linear",
    "node_rate_per_min",
    "pooled",
    "prediction_excesses",
    "quantile",
    "read_history",
    "recorded_prediction",
    "service_rate_per_min",
    "slot_wait_s",
    "slot_waits",
    "start_intervals",
]
