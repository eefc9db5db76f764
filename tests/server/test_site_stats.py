"""SiteService.ListSiteStatistics on SQLite and PostgreSQL.

Jobs, sessions and events are written straight into the database with chosen times, so
every figure (backlog, footprints, held nodes, window throughput, queue waits) has an
exact expected value. Window edges are tens of seconds away from every event, so a slow
machine cannot move an event across them.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from sqlalchemy import insert, select

from balsam_grpc.server.convert import utcnow
from balsam_grpc.server.store import site_stats
from balsam_grpc.server.store.events import job_event
from balsam_grpc.server.store.tables import apps, events, jobs, sessions
from balsam_grpc.v1 import site_pb2, site_service_pb2, site_service_pb2_grpc

pb = site_service_pb2


def make_site(caller: Any, name: str | None = None) -> int:
    stub = caller.stub(site_service_pb2_grpc.SiteServiceStub)
    return stub.CreateSite(pb.CreateSiteRequest(site=site_pb2.Site(name=name or f"s-{secrets.token_hex(4)}"))).site.id


class Seeder:
    """Writes rows of one owner and site with times relative to now."""

    def __init__(self, harness: Any, owner_id: int, site_id: int) -> None:
        self.harness, self.owner_id, self.site_id = harness, owner_id, site_id
        self.now = utcnow()

        def app(conn: Any) -> int:
            return conn.execute(insert(apps).values(
                owner_id=owner_id, site_id=site_id, name=f"a-{secrets.token_hex(3)}", create_time=self.now,
                update_time=self.now).returning(apps.c.id)).scalar_one()

        self.app_id = harness.db.write_sync(app)

    def job(self, state: str, *, num_nodes: int = 1, packing: int = 1) -> int:
        def work(conn: Any) -> int:
            return conn.execute(insert(jobs).values(
                owner_id=self.owner_id, site_id=self.site_id, app_id=self.app_id, workdir=f"w/{secrets.token_hex(6)}",
                state=state, num_nodes=num_nodes, node_packing_count=packing, create_time=self.now,
                update_time=self.now, state_time=self.now).returning(jobs.c.id)).scalar_one()

        return self.harness.db.write_sync(work)

    def events(self, job_id: int, *steps: tuple[str, str, float]) -> None:
        """(from, to, seconds ago) per event, written in the given order."""
        def work(conn: Any) -> None:
            for src, dst, ago in steps:
                conn.execute(insert(events).values(**job_event(self.owner_id, self.site_id, job_id, src, dst,
                                                               self.now - timedelta(seconds=ago))))

        self.harness.db.write_sync(work)

    def session(self, state: str, nodes: int) -> None:
        def work(conn: Any) -> None:
            conn.execute(insert(sessions).values(
                id=secrets.token_hex(16), owner_id=self.owner_id, site_id=self.site_id, job_mode="SERIAL",
                nodes=[{"hostname": f"n{i}", "cpus": 4} for i in range(nodes)], state=state, hostname="n0",
                applied_through_seq=0, create_time=self.now, heartbeat_time=self.now + timedelta(hours=1),
                expire_time=self.now + timedelta(hours=1)))

        self.harness.db.write_sync(work)


def stats(caller: Any, window: float = 60.0, **flt: Any) -> pb.ListSiteStatisticsResponse:
    stub = caller.stub(site_service_pb2_grpc.SiteServiceStub)
    return stub.ListSiteStatistics(pb.ListSiteStatisticsRequest(filter=pb.SiteFilter(**flt), window_seconds=window))


def test_backlog_running_and_held_nodes(harness, alice):
    site = make_site(alice)
    seed = Seeder(harness, alice.user_id, site)
    for state in ("CREATED", "READY", "STAGED_IN"):
        seed.job(state, packing=4)
    seed.job("PREPROCESSED", num_nodes=2)          # footprint 2
    seed.job("PREPROCESSED", packing=4)            # 0.25
    seed.job("RESTART_READY", packing=2)           # 0.5
    seed.job("RUNNING", packing=4)
    seed.job("RUNNING", num_nodes=3)
    seed.job("RUN_DONE")
    seed.job("POSTPROCESSED")
    for _ in range(3):
        seed.job("JOB_FINISHED")
    seed.job("FAILED")
    seed.session("ACTIVE", 3)
    seed.session("ACTIVE", 1)
    seed.session("CLOSED", 8)

    (s,) = stats(alice, ids=[site]).sites
    assert s.site_id == site and not s.connected
    assert s.backlog_jobs == 6
    assert s.backlog_node_footprint == pytest.approx(3 * 0.25 + 2 + 0.25 + 0.5)
    assert s.runnable_jobs == 3
    assert s.running_jobs == 2 and s.running_node_footprint == pytest.approx(3.25)
    assert s.finishing_jobs == 2
    assert s.active_sessions == 2 and s.held_nodes == 4
    # No events: nothing finished or started in the window.
    assert s.finished_in_window == 0 and s.throughput_per_minute == 0 and s.started_in_window == 0


def test_window_throughput_and_queue_wait(harness, alice):
    site, other = make_site(alice), make_site(alice)
    seed = Seeder(harness, alice.user_id, site)
    # Finished long ago (outside a 60 s window) and recently (inside).
    for ago in (300, 200):
        seed.events(seed.job("JOB_FINISHED"), ("RUN_DONE", "JOB_FINISHED", ago))
    for ago in (40, 30, 20):
        seed.events(seed.job("JOB_FINISHED"), ("RUN_DONE", "JOB_FINISHED", ago))
    seed.events(seed.job("FAILED"), ("RUN_ERROR", "FAILED", 25))
    # Queue waits inside the window: 2 s and 4 s from PREPROCESSED, 1 s from RESTART_READY
    # (that job's first wait, 10 s, started before the window and is not a sample).
    a = seed.job("RUNNING")
    seed.events(a, ("CREATED", "PREPROCESSED", 50), ("PREPROCESSED", "RUNNING", 48))
    b = seed.job("RUNNING")
    seed.events(b, ("CREATED", "PREPROCESSED", 40), ("PREPROCESSED", "RUNNING", 36))
    c = seed.job("RUNNING")
    seed.events(c, ("CREATED", "PREPROCESSED", 130), ("PREPROCESSED", "RUNNING", 120),
                ("RUNNING", "RESTART_READY", 35), ("RESTART_READY", "RUNNING", 34))

    resp = stats(alice, 60.0, ids=[site, other])
    assert resp.window_seconds == 60.0 and resp.HasField("time")
    s, o = resp.sites
    assert (s.site_id, o.site_id) == (site, other)
    assert s.finished_in_window == 3 and s.failed_in_window == 1
    assert s.throughput_per_minute == pytest.approx(3.0)
    assert s.started_in_window == 3
    assert s.queue_wait_mean_seconds == pytest.approx(7 / 3, abs=1e-3)
    assert s.queue_wait_p50_seconds == pytest.approx(2.0, abs=1e-3)
    assert (o.finished_in_window, o.started_in_window, o.backlog_jobs) == (0, 0, 0)

    # A longer window takes in the older events: 5 finished in 10 minutes.
    (s,) = stats(alice, 600.0, ids=[site]).sites
    assert s.finished_in_window == 5 and s.throughput_per_minute == pytest.approx(0.5)
    assert s.started_in_window == 4  # c's first start counts now, with its 10 s wait
    assert s.queue_wait_p50_seconds == pytest.approx(3.0, abs=1e-3)


def test_a_held_ahead_jobs_release_does_not_restart_its_queue_wait(harness, alice):
    """A job runnable 50 s ago, held ahead by a launcher and released unstarted 30 s ago
    (an event from and to PREPROCESSED), started 20 s ago: it waited 30 s, not 10."""
    site = make_site(alice)
    seed = Seeder(harness, alice.user_id, site)
    job = seed.job("RUNNING")
    seed.events(job, ("CREATED", "PREPROCESSED", 50), ("PREPROCESSED", "PREPROCESSED", 30),
                ("PREPROCESSED", "RUNNING", 20))
    (s,) = stats(alice, 60.0, ids=[site]).sites
    assert s.started_in_window == 1
    assert s.queue_wait_p50_seconds == pytest.approx(30.0, abs=1e-3)


def test_scoping_and_bad_window(harness, alice, bob):
    site = make_site(alice)
    seed = Seeder(harness, alice.user_id, site)
    seed.job("READY")
    mine = {s.site_id for s in stats(alice).sites}
    assert site in mine
    assert site not in {s.site_id for s in stats(bob).sites}
    # A site-scoped token sees only its own site.
    scoped = harness.user(alice.username, scope="SITE", site_id=site)
    assert [s.site_id for s in stats(scoped).sites] == [site]
    with pytest.raises(grpc.RpcError) as err:
        stats(alice, -5.0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "window_seconds" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        stats(alice, 10 * 86400.0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_first_event_at_matches_a_scan(harness, alice):
    """The binary search over event ids agrees with a full scan, with gaps in the ids
    (events of other owners in between) and starts before, inside and after the log."""
    bob_like = harness.user()
    site = make_site(alice)
    seed = Seeder(harness, alice.user_id, site)
    job = seed.job("READY")
    noise = Seeder(harness, bob_like.user_id, make_site(bob_like))
    noise_job = noise.job("READY")
    for i in range(40):
        seed.events(job, ("READY", "READY", 400 - i * 10))
        if i % 3 == 0:
            noise.events(noise_job, ("READY", "READY", 400 - i * 10))

    def scan(conn: Any, start: Any) -> int | None:
        return conn.execute(select(events.c.id).where(events.c.owner_id == alice.user_id, events.c.time >= start)
                            .order_by(events.c.id).limit(1)).scalar()

    for ago in (1000, 400, 395, 255, 250, 15, 10, 5, 0):
        start = seed.now - timedelta(seconds=ago)
        got = harness.db.read_sync(lambda conn, s=start: site_stats.first_event_id_at(conn, alice.user_id, s))
        assert got == harness.db.read_sync(lambda conn, s=start: scan(conn, s)), ago


def test_pure_window_figures():
    now = utcnow()
    figs = {1: site_stats.SiteFigures(1, "a", True, None), 2: site_stats.SiteFigures(2, "b", False, None)}
    evs = [site_stats.WindowEvent(10, 1, 100, "RUN_DONE", "JOB_FINISHED", now),
           site_stats.WindowEvent(11, 1, 101, "PREPROCESSED", "RUNNING", now),
           site_stats.WindowEvent(12, 2, 102, "PREPROCESSED", "RUNNING", now),  # no runnable event known
           site_stats.WindowEvent(13, 3, 103, "RUN_DONE", "JOB_FINISHED", now)]  # site not selected
    site_stats.window_figures(figs, evs, {11: now - timedelta(seconds=6)}, now - timedelta(seconds=30), now)
    assert figs[1].finished_in_window == 1 and figs[1].throughput_per_minute == pytest.approx(2.0)
    assert figs[1].queue_wait_mean_seconds == pytest.approx(6.0)
    assert figs[2].started_in_window == 1 and figs[2].queue_wait_p50_seconds == 0.0
    assert site_stats.median([3.0, 1.0, 2.0, 10.0]) == 2.5 and site_stats.median([]) == 0.0


NOON = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def run_of(site_id: int, first_job: int, starts_ago: list[float], finishes_ago: list[float],
           now: datetime = NOON) -> list[site_stats.WindowEvent]:
    """Events of jobs first_job.. that started and (the first len(finishes_ago)) finished
    the given seconds before `now`, in id (= time) order."""
    evs = [(now - timedelta(seconds=ago), job, "PREPROCESSED", "RUNNING")
           for job, ago in enumerate(starts_ago, first_job)]
    evs += [(now - timedelta(seconds=ago), job, "RUN_DONE", "JOB_FINISHED")
            for job, ago in enumerate(finishes_ago, first_job)]
    return [site_stats.WindowEvent(i, site_id, job, src, dst, t)
            for i, (t, job, src, dst) in enumerate(sorted(evs), first_job * 1000)]


def throughputs(window_seconds: float, *runs: list[site_stats.WindowEvent]) -> dict[int, float]:
    site_ids = {ev.site_id for run in runs for ev in run}
    figs = {i: site_stats.SiteFigures(i, f"s{i}", True, None) for i in site_ids}
    events = sorted((ev for run in runs for ev in run), key=lambda ev: ev.id)
    site_stats.window_figures(figs, events, {}, NOON - timedelta(seconds=window_seconds), NOON)
    return {i: fig.throughput_per_minute for i, fig in figs.items()}


def test_throughput_divides_by_the_part_of_the_window_at_work():
    """A run 40 s old in a one-hour window: 48 finished over 40 s is 72 a minute, not the
    0.8 of 48 over 60 minutes."""
    young = run_of(1, 1, [40 - i * 0.5 for i in range(80)], [30 - i * 0.5 for i in range(48)])
    # Site 2 was already at work when the window opened: a job that started before it
    # finished in it, so the whole window counts (6 finished in 60 minutes).
    old = run_of(2, 200, [1800.0 - i for i in range(5)], [1700.0 - i for i in range(5)])
    old.append(site_stats.WindowEvent(300_000, 2, 299, "RUN_DONE", "JOB_FINISHED", NOON - timedelta(seconds=10)))
    # Site 3 started 3 s ago: two jobs done read as 12 a minute (10 s at the least), not 40.
    fresh = run_of(3, 400, [3.0, 2.0], [2.0, 1.0])
    got = throughputs(3600.0, young, old, fresh)
    assert got[1] == pytest.approx(72.0)
    assert got[2] == pytest.approx(0.1)
    assert got[3] == pytest.approx(12.0)
    # A window shorter than that least time is still the most a figure divides by.
    assert throughputs(5.0, run_of(4, 500, [3.0], [2.0]))[4] == pytest.approx(12.0)


def test_a_young_run_reads_its_own_rate_through_the_rpc(harness, alice):
    site = make_site(alice)
    seed = Seeder(harness, alice.user_id, site)
    for i in range(6):
        seed.events(seed.job("JOB_FINISHED"), ("PREPROCESSED", "RUNNING", 40 - i), ("RUN_DONE", "JOB_FINISHED", 30 - i))
    (s,) = stats(alice, 3600.0, ids=[site]).sites
    slowest = (utcnow() - seed.now).total_seconds()  # the server's clock read falls within
    assert s.finished_in_window == 6
    assert 6 / ((40 + slowest) / 60) <= s.throughput_per_minute <= 6 / (40 / 60)
