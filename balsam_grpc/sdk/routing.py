"""Routing new jobs to sites: `best` (expected completion), `round_robin`, `fixed`.

    router = Router(client, sites=["alpha", "beta", "gamma"], strategy="best")
    site_id = router.choose()          # then app_by_site[site_id].submit(...)

`best` places a job on the site that should finish it first: the one minimising

    (backlog + placed since the last refresh + 1) / max(throughput, capacity, floor)

(throughput and capacity in jobs per minute; capacity = the site's nodes times the best
recent throughput per node among the sites, where a site's nodes are the more of those
its pilots hold now and its elastic queue's node cap) from the server's live statistics
(SiteService.ListSiteStatistics), refreshed at most every `refresh_seconds`. Before any
throughput has been seen, sites are weighed by their nodes alone, so the first burst
already splits by capacity. Counting the jobs it placed since the refresh lets a burst
spread over the sites instead of piling onto the one that looked best a moment ago.
The floor keeps a site with no recent throughput (just started, or idle) in play: a new
site takes work while the others' expected completion is above one job per 1/floor
minutes. Disconnected sites are skipped while any selected site is connected.

The decision functions are pure and take plain `SiteLoad` values, so they are tested
without a server.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from balsam_grpc.sdk.errors import InvalidArgument
from balsam_grpc.v1 import site_service_pb2

if TYPE_CHECKING:
    from balsam_grpc.sdk.client import Client

STRATEGIES = ("best", "round_robin", "fixed")
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


class Router:
    """Chooses a site for each new job. Thread-safe; one per submitting process."""

    def __init__(self, client: Client, sites: Iterable[int | str], strategy: str = "best", *,
                 window_seconds: float = 60.0, refresh_seconds: float = 1.0,
                 floor_per_min: float = DEFAULT_FLOOR_PER_MIN, clock: Callable[[], float] = time.monotonic) -> None:
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
        self._clock = clock
        self._lock = threading.Lock()
        self._loads: list[SiteLoad] = []
        self._fetched_at: float | None = None
        self._placed_since_refresh: Counter[int] = Counter()
        self._turn = 0
        self.placements: Counter[int] = Counter()  # site id -> jobs placed, over the router's life
        self.refreshes = 0

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

    def choose(self) -> int:
        """The site id for the next job (counted as placed there)."""
        with self._lock:
            if self.strategy == "fixed":
                site_id = self.site_ids[0]
            elif self.strategy == "round_robin":
                site_id = choose_round_robin(self.site_ids, self._turn)
                self._turn += 1
            else:
                self._refresh_if_stale()
                site_id = choose_best(self._loads, self._placed_since_refresh, self.floor_per_min)
            self._placed_since_refresh[site_id] += 1
            self.placements[site_id] += 1
            return site_id


__all__ = ["STRATEGIES", "Router", "SiteLoad", "choose_best", "choose_round_robin", "eligible",
           "expected_completion_min", "node_rate_per_min", "service_rate_per_min"]
