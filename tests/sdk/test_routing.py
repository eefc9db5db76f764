"""The SDK router: pure decisions on SiteLoad values, and the Router against a server
(statistics through SiteService.ListSiteStatistics, refresh at most every refresh_seconds,
placed jobs counted between refreshes)."""

from __future__ import annotations

import secrets
from collections import Counter

import pytest

from balsam_grpc.sdk import Client, InvalidArgument
from balsam_grpc.sdk.routing import (
    Router,
    SiteLoad,
    choose_best,
    choose_round_robin,
    expected_completion_min,
    node_rate_per_min,
    service_rate_per_min,
)


def test_expected_completion_uses_backlog_placed_and_floor():
    busy = SiteLoad(1, backlog_jobs=9, throughput_per_minute=20.0)
    assert expected_completion_min(busy) == pytest.approx(10 / 20)
    assert expected_completion_min(busy, placed=10) == pytest.approx(20 / 20)
    idle = SiteLoad(2, backlog_jobs=0, throughput_per_minute=0.0)
    assert expected_completion_min(idle, floor_per_min=2.0) == pytest.approx(0.5)


def test_best_prefers_shortest_backlog_per_throughput():
    fast = SiteLoad(1, backlog_jobs=10, throughput_per_minute=60.0)   # 11/60 min
    slow = SiteLoad(2, backlog_jobs=1, throughput_per_minute=6.0)     # 2/6 min
    assert choose_best([fast, slow]) == 1
    assert choose_best([fast, slow], placed={1: 8}) == 1              # 19/60 < 2/6
    assert choose_best([fast, slow], placed={1: 10}) == 2             # 21/60 > 2/6


def test_best_spreads_a_burst_in_proportion_to_throughput():
    loads = [SiteLoad(1, throughput_per_minute=30.0), SiteLoad(2, throughput_per_minute=20.0),
             SiteLoad(3, throughput_per_minute=10.0)]
    placed: Counter[int] = Counter()
    for _ in range(60):
        placed[choose_best(loads, placed)] += 1
    assert placed == {1: 30, 2: 20, 3: 10}


def test_capacity_breaks_the_mirror_of_unsaturated_sites():
    """Unsaturated sites show the throughput they were sent; held nodes at the best rate
    per node tell the bigger site apart, so a burst goes 6/4/2 over 3/2/1 nodes."""
    loads = [SiteLoad(1, held_nodes=3, throughput_per_minute=24.0), SiteLoad(2, held_nodes=2, throughput_per_minute=24.0),
             SiteLoad(3, held_nodes=1, throughput_per_minute=24.0)]
    assert node_rate_per_min(loads) == 24.0
    assert service_rate_per_min(loads[0], 24.0) == 72.0
    placed: Counter[int] = Counter()
    for _ in range(12):
        placed[choose_best(loads, placed)] += 1
    assert placed == {1: 6, 2: 4, 3: 2}
    # A site whose pilot has not started (no held nodes, no throughput) runs at the floor.
    assert service_rate_per_min(SiteLoad(4), 24.0, floor_per_min=1.0) == 1.0


def test_node_capacity_weighs_sites_before_any_throughput():
    """The daemons published their elastic-queue caps (4, 2, 1 nodes) and nothing has run:
    the first burst splits by capacity instead of evenly."""
    loads = [SiteLoad(1, node_capacity=4), SiteLoad(2, node_capacity=2), SiteLoad(3, node_capacity=1)]
    placed: Counter[int] = Counter()
    for _ in range(14):
        placed[choose_best(loads, placed)] += 1
    assert placed == {1: 8, 2: 4, 3: 2}
    # Once a rate per node is known, a site that scaled to zero still counts its cap.
    idle_big = SiteLoad(4, node_capacity=4)
    assert service_rate_per_min(idle_big, node_rate=10.0) == 40.0
    assert SiteLoad(5, held_nodes=3, node_capacity=2).nodes == 3


def test_best_skips_disconnected_sites_unless_all_are():
    up = SiteLoad(1, backlog_jobs=50, throughput_per_minute=1.0)
    down = SiteLoad(2, connected=False)
    assert choose_best([up, down]) == 1
    assert choose_best([SiteLoad(1, connected=False, backlog_jobs=3), SiteLoad(2, connected=False)]) == 2


def test_ties_are_deterministic_and_cold_start_spreads_evenly():
    loads = [SiteLoad(3), SiteLoad(1), SiteLoad(2)]
    placed: Counter[int] = Counter()
    order = []
    for _ in range(6):
        site = choose_best(loads, placed)
        placed[site] += 1
        order.append(site)
    assert order == [1, 2, 3, 1, 2, 3]
    with pytest.raises(InvalidArgument):
        choose_best([])


def test_round_robin():
    assert [choose_round_robin([5, 7, 9], t) for t in range(5)] == [5, 7, 9, 5, 7]


@pytest.fixture
def sites(client: Client):
    return [client.sites.create(name=f"route-{i}-{secrets.token_hex(3)}") for i in range(3)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_router_against_the_server(client, sites):
    clock = FakeClock()
    router = Router(client, [sites[0].name, sites[1].id, sites[2].id], "best", refresh_seconds=1.0, clock=clock)
    assert router.site_ids == [s.id for s in sites]
    loads = router.loads()
    assert [s.site_id for s in loads] == router.site_ids and all(not s.connected for s in loads)
    assert router.refreshes == 1
    # No daemon anywhere and no history: a burst of six spreads evenly, on one refresh.
    chosen = [router.choose() for _ in range(6)]
    assert Counter(chosen) == {s.id: 2 for s in sites}
    assert router.refreshes == 1
    clock.now += 1.5
    router.choose()
    assert router.refreshes == 2
    assert sum(router.placements.values()) == 7


def test_router_uses_published_node_capacity(client):
    from balsam_grpc.v1 import site_pb2

    caps = {}
    for cap, enabled in ((4, True), (2, True), (8, False)):
        site = client.sites.create(name=f"cap-{cap}-{secrets.token_hex(3)}")
        site.elastic_queue = site_pb2.ElasticQueueSettings(enabled=enabled, max_nodes=1, max_total_nodes=cap)
        site.save()
        caps[site.id] = cap if enabled else 0
    router = Router(client, list(caps), "best")
    assert {s.site_id: s.node_capacity for s in router.loads()} == caps
    placed = Counter(router.choose() for _ in range(7))
    ids = list(caps)
    assert placed == {ids[0]: 4, ids[1]: 2, ids[2]: 1}


def test_router_strategies_and_errors(client, sites):
    fixed = Router(client, [sites[1].id, sites[0].id], "fixed")
    assert {fixed.choose() for _ in range(4)} == {sites[1].id}
    rr = Router(client, [s.id for s in sites], "round_robin")
    assert [rr.choose() for _ in range(4)] == [sites[0].id, sites[1].id, sites[2].id, sites[0].id]
    with pytest.raises(InvalidArgument):
        Router(client, [sites[0].id], "fastest")
    with pytest.raises(InvalidArgument):
        Router(client, ["no-such-site-" + secrets.token_hex(3)])
    with pytest.raises(InvalidArgument):
        Router(client, [], "best")
