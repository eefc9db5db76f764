"""kill -9 of the server during a 10,000-job BatchCreateJobs, 20 times per database
(issue 12 item 1): a create is all or nothing. After every kill, the request's jobs are
either all there, each with its creation event and the request_id's answer beside them,
or none is; the retry with the same request_id gets the first answer (compared with what
the database holds, and with the answer itself when the killed call got one), or, when
nothing had committed, creates the jobs once.

The kills are spread over a request's course, from its first milliseconds to just after
its answer. The clock is the server process's CPU time, measured on an undisturbed
request (and on every request that finished before its kill): other load on the machine
stretches wall-clock time several-fold and unevenly, CPU time hardly, so a kill at 0.9
lands at the same phase of the request however busy the machine is. A request that
never committed is the retry of the next round, so each round costs one server start and
part of one request; the server processes are forked from one that has imported the
server already (tests/support/server_fork.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from sqlalchemy import Engine, text

from balsam_grpc.server.store.db import make_engine
from balsam_grpc.v1 import (
    app_pb2,
    app_service_pb2,
    app_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    site_pb2,
    site_service_pb2,
    site_service_pb2_grpc,
)
from tests.faults.conftest import database_url
from tests.support.server_fork import ServerForker
from tests.support.server_proc import ServerProcess

pytestmark = pytest.mark.timeout(240)

JOBS = 10_000
KILLS = 20
# Kill points as fractions of a request's server CPU time: the last ones fall after the answer.
FRACTIONS = [0.02 + 1.08 * i / (KILLS - 1) for i in range(KILLS)]


class Api:
    """Stubs on a server process with its profile token."""

    def __init__(self, server: ServerProcess) -> None:
        self.channel = grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", 64 << 20)])
        self.metadata = (("authorization", f"Bearer {server.token}"),)
        self.jobs = job_service_pb2_grpc.JobServiceStub(self.channel)
        # A server that just started may accept TCP before it serves HTTP/2.
        grpc.channel_ready_future(self.channel).result(timeout=60)

    def call(self, request: job_service_pb2.BatchCreateJobsRequest) -> job_service_pb2.BatchCreateJobsResponse:
        return self.jobs.BatchCreateJobs(request, metadata=self.metadata, timeout=120)

    def close(self) -> None:
        self.channel.close()


def make_request(app_id: int, n: int) -> job_service_pb2.BatchCreateJobsRequest:
    return job_service_pb2.BatchCreateJobsRequest(request_id=f"bulk-{n}", jobs=[
        job_pb2.Job(app_id=app_id, workdir=f"r{n}/{i}", parameters={"i": str(i)}, tags={"req": str(n)})
        for i in range(JOBS)])


def jobs_without_creation_event(engine: Engine, n: int | None = None) -> int:
    """Jobs (of request n, or all) without their creation event."""
    with engine.connect() as conn:
        return conn.execute(text(
            "SELECT count(*) FROM jobs j WHERE j.workdir LIKE :prefix AND NOT EXISTS (SELECT 1 FROM events e "
            "WHERE e.job_id = j.id AND e.kind = 'job_state' AND e.from_state = 'CREATED')"),
            {"prefix": "%" if n is None else f"r{n}/%"}).scalar_one()


def committed(engine: Engine, n: int) -> tuple[list[int], bool]:
    """(ids of request n's jobs in request order, whether its request_id has an answer)."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, workdir FROM jobs WHERE workdir LIKE :prefix"),
                            {"prefix": f"r{n}/%"}).all()
        answered = conn.execute(text("SELECT count(*) FROM idempotency_keys WHERE request_id = :rid"),
                                {"rid": f"bulk-{n}"}).scalar_one()
    order = sorted(rows, key=lambda r: int(r.workdir.split("/", 1)[1]))
    return [r.id for r in order], bool(answered)


@pytest.fixture(scope="module")
def forker() -> Iterator[ServerForker]:
    forker = ServerForker()
    yield forker
    forker.close()


@pytest.fixture
def server(backend: str, tmp_path: Path, forker: ServerForker) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path / "home", database_url(backend, tmp_path), new_session=True, forker=forker)
    proc.start()
    yield proc
    proc.stop(kill=True)


def cpu_seconds(server: ServerProcess) -> float:
    assert server.proc is not None
    times = psutil.Process(server.proc.pid).cpu_times()
    return times.user + times.system


def kill_at(server: ServerProcess, future: grpc.Future, cpu_budget: float, wall_limit: float) -> float:
    """kill -9 the server once it has spent `cpu_budget` CPU seconds more (or answered,
    or `wall_limit` seconds passed: it may be waiting on PostgreSQL); the CPU seconds it
    had spent."""
    start, base = time.perf_counter(), cpu_seconds(server)
    while not future.done() and cpu_seconds(server) - base < cpu_budget and time.perf_counter() - start < wall_limit:
        time.sleep(0.002)
    spent = cpu_seconds(server) - base
    server.stop(kill=True)
    return spent


@pytest.mark.edge("kill -9 during a 10,000-job BatchCreateJobs, 20 times",
                   "each job has its creation event; a retry gets the first answer")
def test_kill_during_bulk_create_commits_all_or_nothing(server: ServerProcess, record_property) -> None:
    engine = make_engine(server.database_url)
    api = Api(server)
    try:
        site = site_service_pb2_grpc.SiteServiceStub(api.channel).CreateSite(
            site_service_pb2.CreateSiteRequest(site=site_pb2.Site(name="kill")), metadata=api.metadata).site
        app = app_service_pb2_grpc.AppServiceStub(api.channel).CreateApp(app_service_pb2.CreateAppRequest(
            app=app_pb2.App(site_id=site.id, name="sim", command_template="/bin/true {{ i }}",
                            parameters=[app_pb2.AppParameter(name="i", type=app_pb2.PARAMETER_TYPE_INT)])),
            metadata=api.metadata).app
        request = make_request(app.id, 0)
        started, base = time.perf_counter(), cpu_seconds(server)
        first = api.call(request)
        cpu, wall = cpu_seconds(server) - base, time.perf_counter() - started
        assert len(first.jobs) == JOBS
        expected_jobs = JOBS
        n, request = 1, make_request(app.id, 1)
        outcomes = []
        for fraction in FRACTIONS:
            future = api.jobs.BatchCreateJobs.future(request, metadata=api.metadata, timeout=120)
            sent = time.perf_counter()
            spent = kill_at(server, future, cpu * fraction, 3 * wall * fraction)
            try:
                answer = future.result()
                wall, cpu = time.perf_counter() - sent, spent  # it finished before the kill: fresh measures
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                answer = None
            api.close()
            ids, answered = committed(engine, n)
            assert jobs_without_creation_event(engine, n) == 0, f"kill at {fraction:.2f} of the request"
            assert len(ids) in (0, JOBS) and answered == bool(ids), (fraction, len(ids), answered)
            assert answer is None or answered, "an answered request is not in the database"
            outcomes.append("answered" if answer is not None else "committed" if ids else "nothing")
            server.start()
            api = Api(server)
            if ids:
                retry = api.call(request)
                assert [j.id for j in retry.jobs] == ids
                if answer is not None:
                    assert retry == answer
                expected_jobs += JOBS
                n += 1
                request = make_request(app.id, n)
        record_property("observed", ", ".join(f"{outcomes.count(o)} {o}" for o in ("nothing", "committed", "answered"))
                        + " at the kill; 0 jobs without their event; every retry answered")
        retry = api.call(request)  # the last request, whatever became of it
        ids, answered = committed(engine, n)
        assert answered and [j.id for j in retry.jobs] == ids and len(ids) == JOBS
        expected_jobs += JOBS
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM jobs")).scalar_one() == expected_jobs
        assert jobs_without_creation_event(engine) == 0
        print(f"{len(outcomes)} kills: {outcomes.count('nothing')} before the commit, "
              f"{outcomes.count('committed')} after the commit, {outcomes.count('answered')} after the answer")
    finally:
        api.close()
        engine.dispose()
