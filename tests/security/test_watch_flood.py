"""One user's 2,000 watch streams against everyone else (issue 12, item 4), on a real
server process: 1,900 WatchEvents streams of one user used to push every other call to
22-36 s and the server to 2.2 GB.

User A opens more WatchEvents streams than the per-user limit allows: those beyond it are
refused RESOURCE_EXHAUSTED (TOO_MANY_STREAMS, with what to do), the others are held open.
Meanwhile user B creates and lists jobs and watches its own events: every call of B
succeeds and B's watch sees B's events; A's idle watchers are not woken by them (the
fanout routes by owner), so they cost B nothing per event. B's latency and the server's
resident memory are printed in the edge table, never asserted (timings on a shared
machine are noise).
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from balsam_grpc.server.state import ServerSettings
from balsam_grpc.v1 import (
    app_pb2,
    app_service_pb2,
    app_service_pb2_grpc,
    auth_service_pb2,
    auth_service_pb2_grpc,
    event_service_pb2,
    event_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    site_pb2,
    site_service_pb2,
    site_service_pb2_grpc,
)
from tests.support.server_fork import shared_forker
from tests.support.server_proc import ServerProcess, free_port

MiB = 1024 * 1024
LIMIT = ServerSettings.max_streams_per_user  # the default: what a real server enforces
EXTRA = 50  # streams A asks for beyond the limit
CHANNELS = 8  # A's connections (each HTTP/2 connection caps its concurrent streams)
B_CALLS = 200
WAIT = 120.0


def metric(port: int, name: str) -> float:
    """A sample's value from the server's /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as answer:
        text = answer.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name.split("{")[0] and (
                    "{" not in name or all(f'{k}="{v}"' in name for k, v in sample.labels.items())):
                return float(sample.value)
    return 0.0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("watch-flood")
    proc = ServerProcess(home, f"sqlite:///{home / 'balsam.db'}", forker=shared_forker(),
                         extra_env={"BALSAM_METRICS_ADDRESS": f"127.0.0.1:{free_port()}"})
    try:
        proc.start()
        yield proc
    finally:
        proc.stop(kill=True)  # its shutdown is not what this module tests


def _login_b(channel: grpc.Channel, admin_md: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    auth = auth_service_pb2_grpc.AuthServiceStub(channel)
    auth.CreateUser(auth_service_pb2.CreateUserRequest(username="bob", password="correct horse battery"),
                    metadata=admin_md, timeout=WAIT)
    token = auth.Login(auth_service_pb2.LoginRequest(username="bob", password="correct horse battery"),
                       timeout=WAIT).token
    return (("authorization", f"Bearer {token}"),)


class Watchers:
    """User A's WatchEvents streams over CHANNELS connections, in a thread of their own
    (its own event loop), held open until `close()`."""

    def __init__(self, address: str, metadata: tuple[tuple[str, str], ...], n: int) -> None:
        self.address, self.metadata, self.n = address, metadata, n
        self.opened = 0
        self.refused: list[grpc.aio.AioRpcError] = []
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        try:
            self.loop.run_until_complete(self._run())
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc
            self.ready.set()

    async def _run(self) -> None:
        self._stop = asyncio.Event()
        channels = [grpc.aio.insecure_channel(self.address, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(CHANNELS)]
        try:
            stubs = [event_service_pb2_grpc.EventServiceStub(c) for c in channels]
            calls = [stubs[i % CHANNELS].WatchEvents(event_service_pb2.WatchEventsRequest(), metadata=self.metadata)
                     for i in range(self.n)]

            async def first(call: grpc.aio.UnaryStreamCall) -> None:
                try:
                    assert (await call.read()).cursor  # admitted: its starting cursor
                    self.opened += 1
                except grpc.aio.AioRpcError as err:
                    self.refused.append(err)

            await asyncio.wait_for(asyncio.gather(*(first(c) for c in calls)), WAIT)
            self.ready.set()
            await self._stop.wait()
            for call in calls:
                call.cancel()
        finally:
            for c in channels:
                await c.close()

    def close(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(WAIT)
        assert not self.thread.is_alive()


@pytest.mark.timeout(300)
@pytest.mark.edge("one user holds 2,000 WatchEvents streams (asks for 2,050); another user works",
                   "the 50 over the limit RESOURCE_EXHAUSTED; the other user's calls and watch unharmed")
def test_one_users_watchers_leave_other_users_alone(server: ServerProcess, record_property) -> None:
    assert server.proc is not None
    a_md = (("authorization", f"Bearer {server.token}"),)
    with grpc.insecure_channel(server.address) as channel:
        grpc.channel_ready_future(channel).result(timeout=WAIT)
        b_md = _login_b(channel, a_md)
        site = site_service_pb2_grpc.SiteServiceStub(channel).CreateSite(
            site_service_pb2.CreateSiteRequest(site=site_pb2.Site(name="b-site")), metadata=b_md, timeout=WAIT).site
        app = app_service_pb2_grpc.AppServiceStub(channel).CreateApp(app_service_pb2.CreateAppRequest(
            app=app_pb2.App(site_id=site.id, name="b-app", command_template="echo hi")), metadata=b_md,
            timeout=WAIT).app
        jobs = job_service_pb2_grpc.JobServiceStub(channel)
        metrics_port = int(server.env["BALSAM_METRICS_ADDRESS"].rsplit(":", 1)[1])
        events = event_service_pb2_grpc.EventServiceStub(channel)

        def b_works(tag: str) -> list[float]:
            """B creates and lists jobs while watching its events; each call's seconds."""
            watch = events.WatchEvents(event_service_pb2.WatchEventsRequest(), metadata=b_md, timeout=WAIT)
            assert next(watch).cursor
            created: set[int] = set()
            latencies: list[float] = []
            for i in range(B_CALLS):
                t0 = time.perf_counter()
                if i % 2 == 0:
                    job = jobs.CreateJob(job_service_pb2.CreateJobRequest(
                        job=job_pb2.Job(app_id=app.id, workdir=f"{tag}/{i}")), metadata=b_md, timeout=WAIT).job
                    created.add(job.id)
                else:
                    jobs.ListJobs(job_service_pb2.ListJobsRequest(page_size=20), metadata=b_md, timeout=WAIT)
                latencies.append(time.perf_counter() - t0)
            seen: set[int] = set()
            for msg in watch:
                seen.update(e.job_id for e in msg.events)
                if created <= seen:
                    break
            watch.cancel()
            assert created <= seen, "B's watch missed B's events"
            return latencies

        alone = b_works("alone")
        rss_start = rss_mib(server.proc.pid)
        started = time.perf_counter()
        watchers = Watchers(server.address, a_md, LIMIT + EXTRA)
        try:
            assert watchers.ready.wait(WAIT) and watchers.error is None, watchers.error
            opened_in = time.perf_counter() - started
            rss_held = rss_mib(server.proc.pid)
            assert watchers.opened == LIMIT
            assert metric(metrics_port, 'balsam_streams_open{method="Event.WatchEvents"}') == LIMIT
            assert len(watchers.refused) == EXTRA
            for err in watchers.refused:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                assert f"{LIMIT} watch streams" in err.details() and "close" in err.details(), err.details()
                assert any(k == "retry-after-ms" for k, _ in err.trailing_metadata() or ()), err
            delivered = metric(metrics_port, "balsam_events_delivered_total")
            read = metric(metrics_port, "balsam_events_read_total")
            latencies = b_works("crowded")
            delivered = metric(metrics_port, "balsam_events_delivered_total") - delivered
            read = metric(metrics_port, "balsam_events_read_total") - read
            # B's events reach B's watch alone: A's 2,000 idle watchers are not handed them.
            assert 0 < delivered <= read, (delivered, read)
            rss_end = rss_mib(server.proc.pid)
        finally:
            watchers.close()
    q = statistics.quantiles([s * 1000 for s in latencies], n=100)
    q0 = statistics.quantiles([s * 1000 for s in alone], n=100)
    observed = (f"{watchers.opened} held, {len(watchers.refused)} refused (opened in {opened_in:.1f} s); "
                f"B's {B_CALLS} calls OK and its watch saw its events; B p50/p99 {q[49]:.1f}/{q[98]:.1f} ms "
                f"(alone {q0[49]:.1f}/{q0[98]:.1f}); {delivered:.0f} event rows routed for {read:.0f} read; "
                f"server RSS {rss_start:.0f} -> {rss_held:.0f} MiB with the streams, {rss_end:.0f} after B")
    record_property("observed", observed)
    print(observed)
