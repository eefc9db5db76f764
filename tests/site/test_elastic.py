"""Elastic queue and queue maintainer sizing (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from balsam_grpc.site.elastic import Backlog, Pilot, Window, plan_elastic, plan_maintainer
from balsam_grpc.site.settings import ElasticQueueSettings, QueueMaintainerSettings

NOW = datetime(2026, 1, 1, 12, tzinfo=UTC)
EQ = ElasticQueueSettings(enabled=True, queue="debug", project="p", min_nodes=1, max_nodes=8, min_wall_time_min=10,
                          max_wall_time_min=60, wall_time_margin_min=5, max_queued=2, wait_timeout_min=30)


def pilot(id, state="queued", nodes=1, age_min=0, elastic=True):
    return Pilot(id, state, nodes, 30, NOW - timedelta(minutes=age_min), elastic)


def test_empty_queue_with_backlog_creates_a_pilot_sized_to_the_footprint():
    plan = plan_elastic(Backlog(runnable_jobs=6, runnable_node_footprint=2.5, max_job_nodes=1, max_wall_time_min=20),
                        [], EQ, now=NOW)
    assert len(plan.create) == 1
    p = plan.create[0]
    assert (p.num_nodes, p.wall_time_min, p.queue, p.project) == (3, 25, "debug", "p")
    assert plan.withdraw == ()


def test_wall_time_and_nodes_are_clamped():
    plan = plan_elastic(Backlog(runnable_jobs=100, runnable_node_footprint=100, max_job_nodes=2, max_wall_time_min=500),
                        [], EQ, now=NOW)
    assert [(p.num_nodes, p.wall_time_min) for p in plan.create] == [(8, 60), (8, 60)]  # capped by max_queued
    small = plan_elastic(Backlog(runnable_jobs=1, runnable_node_footprint=0.25, max_job_nodes=1), [], EQ, now=NOW)
    assert [(p.num_nodes, p.wall_time_min) for p in small.create] == [(1, 10)]


def test_largest_job_sets_the_smallest_pilot():
    plan = plan_elastic(Backlog(runnable_jobs=1, runnable_node_footprint=4, max_job_nodes=4), [], EQ, now=NOW)
    assert plan.create[0].num_nodes == 4


def test_existing_pilots_count_as_supply():
    backlog = Backlog(runnable_jobs=4, runnable_node_footprint=4, max_job_nodes=1)
    assert plan_elastic(backlog, [pilot(1, "queued", 4)], EQ, now=NOW).create == ()
    assert plan_elastic(backlog, [pilot(1, "running", 3)], EQ, now=NOW).create[0].num_nodes == 1
    # A user's own pilot is supply too, but never withdrawn by the elastic queue.
    assert plan_elastic(backlog, [pilot(1, "queued", 4, elastic=False)], EQ, now=NOW).create == ()


def test_max_queued_caps_waiting_pilots():
    backlog = Backlog(runnable_jobs=40, runnable_node_footprint=40, max_job_nodes=1)
    pilots = [pilot(1, "queued", 8), pilot(2, "pending_submission", 8)]
    assert plan_elastic(backlog, pilots, EQ, now=NOW).create == ()


def test_no_backlog_means_no_new_pilots_and_queued_ones_are_withdrawn():
    plan = plan_elastic(Backlog(), [pilot(1, "queued"), pilot(2, "running"), pilot(3, "queued", elastic=False)],
                        EQ, now=NOW)
    assert plan.create == ()
    assert plan.withdraw == (1,)
    assert "gone" in plan.withdraw_reason
    # Jobs still on their way (staging, preprocessing) keep the pilot; so do running jobs
    # and live launchers (the 'queued' pilot may have just started).
    assert plan_elastic(Backlog(pending_jobs=3), [pilot(1, "queued")], EQ, now=NOW).withdraw == ()
    assert plan_elastic(Backlog(running_jobs=1), [pilot(1, "queued")], EQ, now=NOW).withdraw == ()
    assert plan_elastic(Backlog(active_sessions=1), [pilot(1, "queued")], EQ, now=NOW).withdraw == ()


def test_pilots_waiting_too_long_are_withdrawn_and_replaced():
    backlog = Backlog(runnable_jobs=1, runnable_node_footprint=1, max_job_nodes=1)
    plan = plan_elastic(backlog, [pilot(1, "queued", age_min=31), pilot(2, "running", age_min=90)], EQ, now=NOW)
    assert plan.withdraw == (1,)
    assert "30 min" in plan.withdraw_reason
    # The running pilot is supply for the single node of demand: nothing new.
    assert plan.create == ()
    plan = plan_elastic(backlog, [pilot(1, "queued", age_min=31)], EQ, now=NOW)
    assert plan.withdraw == (1,) and len(plan.create) == 1


def test_backfill_window_shapes_the_pilot():
    eq = ElasticQueueSettings(**{**EQ.__dict__, "use_backfill": True})
    backlog = Backlog(runnable_jobs=10, runnable_node_footprint=6, max_job_nodes=1, max_wall_time_min=10)
    plan = plan_elastic(backlog, [], eq, now=NOW, windows=[Window("debug", 3, 45), Window("debug", 1, 5)])
    first = plan.create[0]
    assert (first.num_nodes, first.wall_time_min) == (3, 45)
    assert "backfill" in first.reason
    # Without use_backfill the window is ignored.
    plain = plan_elastic(backlog, [], EQ, now=NOW, windows=[Window("debug", 3, 45)])
    assert (plain.create[0].num_nodes, plain.create[0].wall_time_min) == (6, 15)


def test_disabled_does_nothing():
    eq = ElasticQueueSettings(enabled=False)
    assert plan_elastic(Backlog(runnable_jobs=5, runnable_node_footprint=5), [], eq, now=NOW).create == ()


@given(runnable=st.integers(0, 50), footprint=st.floats(0, 200), max_job=st.integers(0, 8),
       wall=st.integers(0, 300), n_pilots=st.integers(0, 4))
def test_plans_respect_limits(runnable, footprint, max_job, wall, n_pilots):
    backlog = Backlog(runnable_jobs=runnable, runnable_node_footprint=footprint if runnable else 0,
                      max_job_nodes=max_job, max_wall_time_min=wall)
    pilots = [pilot(i, "queued") for i in range(n_pilots)]
    plan = plan_elastic(backlog, pilots, EQ, now=NOW)
    waiting_after = n_pilots - len(plan.withdraw) + len(plan.create)
    assert len(plan.create) == 0 or waiting_after <= EQ.max_queued
    for p in plan.create:
        assert EQ.min_nodes <= p.num_nodes <= EQ.max_nodes
        assert EQ.min_wall_time_min <= p.wall_time_min <= EQ.max_wall_time_min
    if runnable == 0:
        assert plan.create == ()


def test_queue_maintainer_keeps_n_queued():
    qm = QueueMaintainerSettings(enabled=True, queue="q", num_queued=3, nodes=2, wall_time_min=20)
    plan = plan_maintainer([pilot(1, "queued"), pilot(2, "running")], qm)
    assert [(p.num_nodes, p.wall_time_min, p.queue) for p in plan.create] == [(2, 20, "q"), (2, 20, "q")]
    assert plan_maintainer([pilot(i, "queued") for i in range(3)], qm).create == ()
    assert plan_maintainer([], QueueMaintainerSettings(enabled=False)).create == ()


CAPPED = ElasticQueueSettings(**{**EQ.__dict__, "max_nodes": 3, "max_queued": 5, "max_total_nodes": 4})


def test_max_total_nodes_caps_queued_and_running_pilots():
    big = Backlog(runnable_jobs=40, runnable_node_footprint=40, max_job_nodes=1)
    # Nothing held: pilots up to the cap, the last one trimmed to the room left.
    assert [p.num_nodes for p in plan_elastic(big, [], CAPPED, now=NOW).create] == [3, 1]
    # Running pilots hold nodes too (max_queued alone would let them grow without bound).
    assert [p.num_nodes for p in plan_elastic(big, [pilot(1, "running", 3)], CAPPED, now=NOW).create] == [1]
    assert plan_elastic(big, [pilot(1, "running", 3), pilot(2, "queued", 1)], CAPPED, now=NOW).create == ()
    # A user's own pilot counts against the cap.
    assert plan_elastic(big, [pilot(1, "running", 4, elastic=False)], CAPPED, now=NOW).create == ()
    # Pilots being withdrawn still count until they are gone.
    old = [pilot(1, "queued", 3, age_min=31), pilot(2, "running", 1)]
    plan = plan_elastic(big, old, CAPPED, now=NOW)
    assert plan.withdraw == (1,) and plan.create == ()
    # Ended pilots free their nodes.
    assert [p.num_nodes for p in plan_elastic(big, [pilot(1, "finished", 4)], CAPPED, now=NOW).create] == [3, 1]


def test_max_total_nodes_never_splits_a_job_that_needs_more_than_the_room():
    wide = Backlog(runnable_jobs=2, runnable_node_footprint=6, max_job_nodes=3)
    assert plan_elastic(wide, [pilot(1, "running", 2)], CAPPED, now=NOW).create == ()
    assert [p.num_nodes for p in plan_elastic(wide, [], CAPPED, now=NOW).create] == [3]


def test_max_total_nodes_zero_means_no_cap():
    big = Backlog(runnable_jobs=80, runnable_node_footprint=80, max_job_nodes=1)
    running = [pilot(i, "running", 8) for i in range(4)]  # 32 nodes held, well past any small cap
    assert [p.num_nodes for p in plan_elastic(big, running, EQ, now=NOW).create] == [8, 8]


@given(footprint=st.floats(0.5, 100), cap=st.integers(1, 12), max_job=st.integers(1, 3),
       held=st.lists(st.tuples(st.sampled_from(["queued", "running", "pending_submission"]), st.integers(1, 4)),
                     max_size=4))
def test_max_total_nodes_is_never_exceeded(footprint, cap, max_job, held):
    eq = ElasticQueueSettings(**{**EQ.__dict__, "max_nodes": 4, "max_queued": 3, "max_total_nodes": cap})
    pilots = [pilot(i, state, nodes) for i, (state, nodes) in enumerate(held)]
    backlog = Backlog(runnable_jobs=max(1, int(footprint)), runnable_node_footprint=footprint,
                      max_job_nodes=max_job)
    plan = plan_elastic(backlog, pilots, eq, now=NOW)
    before = sum(n for _, n in held)
    after = before + sum(p.num_nodes for p in plan.create)
    assert not plan.create or after <= cap
    for p in plan.create:
        assert max_job <= p.num_nodes <= eq.max_nodes
