"""Elastic queue and queue maintainer: pure decisions about pilot batch jobs.

`plan_elastic` looks at the backlog the server pushes (SiteBacklog), the pilots the
site has (from BatchJobService) and the scheduler's backfill windows, and says which
pilots to create and which queued pilots to withdraw. `plan_maintainer` keeps a fixed
number of pilots queued. Neither does I/O: the driver in `balsam_grpc.site.pilots`
applies the plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta

from balsam_grpc.site.settings import ElasticQueueSettings, QueueMaintainerSettings

# Pilot states as lower-case names (the BatchJobState enum without its prefix).
WAITING_STATES = ("pending_submission", "queued")
ACTIVE_STATES = ("pending_submission", "queued", "running")


@dataclass(frozen=True)
class Backlog:
    runnable_jobs: int = 0
    runnable_node_footprint: float = 0.0
    max_job_nodes: int = 0
    max_wall_time_min: int = 0
    pending_jobs: int = 0
    running_jobs: int = 0
    active_sessions: int = 0


@dataclass(frozen=True)
class Pilot:
    id: int
    state: str              # pending_submission, queued, running, ...
    num_nodes: int
    wall_time_min: int
    create_time: datetime   # when the pilot was requested (the queue wait starts there)
    elastic: bool = True    # created by the elastic queue (only those are withdrawn or capped)


@dataclass(frozen=True)
class Window:
    """A backfill window: nodes free now for `wall_time_min` minutes."""

    queue: str
    num_nodes: int
    wall_time_min: int


@dataclass(frozen=True)
class PilotRequest:
    num_nodes: int
    wall_time_min: int
    queue: str
    project: str
    job_mode: str
    reason: str


@dataclass(frozen=True)
class Plan:
    create: tuple[PilotRequest, ...] = ()
    withdraw: tuple[int, ...] = ()
    withdraw_reason: str = ""


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))


def plan_elastic(backlog: Backlog, pilots: list[Pilot], settings: ElasticQueueSettings, *,
                 now: datetime, windows: list[Window] = ()) -> Plan:  # type: ignore[assignment]
    """Pilots to create and queued pilots to withdraw.

    - Withdraw queued pilots waiting longer than `wait_timeout_min`, and every queued
      pilot once the backlog is gone (nothing runnable, on the way or running, no
      launcher up): it would start, find nothing and idle out. The driver asks the
      scheduler before withdrawing (a pilot may have started since the last poll).
    - Demand is the runnable node footprint; supply is the nodes of pilots that are
      waiting or running (a running pilot takes runnable jobs as its nodes free up).
      The shortfall is covered by pilots of max(min_nodes, largest job) .. max_nodes
      nodes and wall time longest job + margin within min .. max wall time, while fewer
      than max_queued pilots wait. With use_backfill, a pilot that fits a backfill window
      is shaped to the window (it starts now instead of waiting in the queue).
    - With max_total_nodes, the nodes of all active pilots (queued and running, the
      user's own included) never exceed it: a new pilot is trimmed to the room left,
      and none is created when the room is smaller than the largest runnable job.
    - Nothing runnable: no new pilots (scale to zero; idle launchers exit by themselves).
    """
    if not settings.enabled:
        return Plan()
    waiting = [p for p in pilots if p.state in WAITING_STATES and p.elastic]
    withdraw: list[int] = []
    reason = ""
    # Nothing runnable, nothing on the way, nothing running, no launcher up: a queued pilot
    # would start, find nothing and idle out. (With a launcher up or jobs running, a pilot
    # the server still lists as queued may in fact have just started: leave it.)
    backlog_gone = (backlog.runnable_jobs == 0 and backlog.pending_jobs == 0 and backlog.running_jobs == 0
                    and backlog.active_sessions == 0)
    if backlog_gone and waiting:
        withdraw = [p.id for p in waiting if p.state == "queued"]
        reason = "the backlog is gone"
    elif settings.wait_timeout_min > 0:
        limit = timedelta(minutes=settings.wait_timeout_min)
        withdraw = [p.id for p in waiting if p.state == "queued" and now - p.create_time > limit]
        reason = f"queued longer than {settings.wait_timeout_min} min"
    kept = [p for p in pilots if p.state in ACTIVE_STATES and p.id not in withdraw]
    if backlog.runnable_jobs == 0:
        return Plan(withdraw=tuple(withdraw), withdraw_reason=reason if withdraw else "")

    demand = math.ceil(backlog.runnable_node_footprint - 1e-9)
    supply = sum(p.num_nodes for p in kept)
    shortfall = demand - supply
    n_waiting = sum(1 for p in kept if p.state in WAITING_STATES and p.elastic)
    smallest = _clamp(max(settings.min_nodes, backlog.max_job_nodes), settings.min_nodes, settings.max_nodes)
    wanted_wall = backlog.max_wall_time_min + settings.wall_time_margin_min if backlog.max_wall_time_min else 0
    wall = _clamp(wanted_wall, settings.min_wall_time_min, settings.max_wall_time_min)
    free_windows = sorted((w for w in windows if settings.use_backfill), key=lambda w: (-w.num_nodes, -w.wall_time_min))
    # The cap counts pilots being withdrawn too: the scheduler may refuse (the pilot just
    # started), and their nodes are free for the next evaluation anyway.
    held = sum(p.num_nodes for p in pilots if p.state in ACTIVE_STATES)
    room = settings.max_total_nodes - held if settings.max_total_nodes > 0 else math.inf
    create: list[PilotRequest] = []
    while shortfall > 0 and n_waiting + len(create) < settings.max_queued and room >= smallest:
        nodes = int(min(_clamp(shortfall, smallest, settings.max_nodes), room))
        pilot = PilotRequest(nodes, wall, settings.queue, settings.project, settings.job_mode,
                             f"runnable footprint {backlog.runnable_node_footprint:g} nodes, "
                             f"{supply} nodes in pilots")
        fit = next((w for w in free_windows if w.num_nodes >= smallest and w.wall_time_min >= wall
                    and (not w.queue or not settings.queue or w.queue == settings.queue)), None)
        if fit is not None:
            free_windows.remove(fit)
            pilot = PilotRequest(min(nodes, fit.num_nodes), _clamp(fit.wall_time_min, wall, settings.max_wall_time_min),
                                 settings.queue, settings.project, settings.job_mode,
                                 f"backfill window of {fit.num_nodes} nodes for {fit.wall_time_min} min")
        create.append(pilot)
        shortfall -= pilot.num_nodes
        room -= pilot.num_nodes
    return Plan(create=tuple(create), withdraw=tuple(withdraw), withdraw_reason=reason if withdraw else "")


def plan_maintainer(pilots: list[Pilot], settings: QueueMaintainerSettings) -> Plan:
    """Keep `num_queued` pilots waiting in the queue (the pilots of the maintainer only)."""
    if not settings.enabled:
        return Plan()
    waiting = sum(1 for p in pilots if p.state in WAITING_STATES)
    missing = max(0, settings.num_queued - waiting)
    return Plan(create=tuple(
        PilotRequest(settings.nodes, settings.wall_time_min, settings.queue, settings.project, settings.job_mode,
                     f"queue maintainer keeps {settings.num_queued} queued") for _ in range(missing)))
