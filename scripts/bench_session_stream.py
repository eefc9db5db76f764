#!/usr/bin/env python3
"""Lease figures of SessionService.Connect against a real server process.

Usage: scripts/bench_session_stream.py [--database URL ...] [-n N] [--jobs M] [--json]

Per database (default: a temporary SQLite file, plus PostgreSQL when
BALSAM_TEST_DATABASE_URL is set), with a scripted launcher (no processes run):
- create-to-lease latency: an idle session with credit waits; one job is created at a
  time (BatchCreateJobs) and the time until its JobLeases arrives is taken, N times;
- lease/report throughput: M jobs are created in one call, the launcher keeps credit for
  all of them and reports RUN_DONE for each JobLeases at once; jobs/s from the create
  call to the last acknowledged transition (every job ends JOB_FINISHED);
- with 16 slots: M/5 existing jobs, credit for 16, each JobLeases reported done at once
  and the credit re-granted on its ack (the round trip a busy launcher makes);
- dead-session recovery: a session holding a job has its stream cut; seconds until a
  waiting session leases the job again (one lease timeout, the server default 20 s).
Figures, never assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import tempfile
import threading
import time
from pathlib import Path

import grpc

import benchkit  # noqa: F401 - first: puts this checkout on sys.path

from bench_api import start_server  # noqa: E402
from benchkit import bearer, site_with_app, stop_process  # noqa: E402

from balsam_grpc.core.settings import Profile  # noqa: E402
from balsam_grpc.v1 import common_pb2, job_pb2, job_service_pb2, job_service_pb2_grpc  # noqa: E402
from balsam_grpc.v1 import session_service_pb2, session_service_pb2_grpc  # noqa: E402

Req = session_service_pb2.SessionServiceConnectRequest
SLOTS = 16


class Stream:
    def __init__(self, channel: grpc.Channel, md: tuple[tuple[str, str], ...], site_id: int) -> None:
        self.out: queue.Queue[Req | None] = queue.Queue()
        self.inbox: queue.Queue[session_service_pb2.SessionServiceConnectResponse] = queue.Queue()
        stub = session_service_pb2_grpc.SessionServiceStub(channel)
        self.call = stub.Connect(iter(self.out.get, None), metadata=md)
        threading.Thread(target=self._pump, daemon=True).start()
        self.out.put(Req(open=session_service_pb2.SessionOpen(site_id=site_id, job_mode=common_pb2.JOB_MODE_MPI)))
        assert self.get().WhichOneof("message") == "opened"
        self.seq = 0

    def _pump(self) -> None:
        try:
            for msg in self.call:
                self.inbox.put(msg)
        except grpc.RpcError:
            pass

    def get(self, timeout: float = 60) -> session_service_pb2.SessionServiceConnectResponse:
        return self.inbox.get(timeout=timeout)

    def credit(self, max_jobs: int, leases_received: int | None = None) -> None:
        self.out.put(Req(credit=session_service_pb2.SessionCredit(max_jobs=max_jobs, free_nodes=float(max_jobs),
                                                                  leases_received=leases_received)))

    def finish(self, leased: list[session_service_pb2.LeasedJob]) -> None:
        transitions = []
        for lj in leased:
            self.seq += 1
            transitions.append(session_service_pb2.JobTransition(
                seq=self.seq, job_id=lj.job.id, lease_generation=lj.lease_generation,
                state=job_pb2.JOB_STATE_RUN_DONE, return_code=0))
        self.out.put(Req(report=session_service_pb2.TransitionReport(transitions=transitions)))

    def close(self) -> None:
        self.out.put(None)


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def run(address: str, token: str, n: int, m: int, recovery: bool = True) -> dict[str, float]:
    md = bearer(token)
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    jobs = job_service_pb2_grpc.JobServiceStub(channel)
    out: dict[str, float] = {}

    def world(name: str) -> tuple[int, int]:
        return site_with_app(channel, md, name)

    # Latency: one job at a time into an idle, waiting session.
    site_id, app_id = world("latency")
    stream = Stream(channel, md, site_id)
    stream.credit(n + 10)
    latencies = []
    for i in range(n):
        t0 = time.perf_counter()
        jobs.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(
            jobs=[job_pb2.Job(app_id=app_id, workdir=f"lat/{i}")]), metadata=md)
        msg = stream.get()
        latencies.append((time.perf_counter() - t0) * 1000)
        assert msg.WhichOneof("message") == "leases"
        time.sleep(0.01)  # idle again before the next one
    stream.close()
    out["create_to_lease_ms_p50"] = round(statistics.median(latencies), 2)
    out["create_to_lease_ms_p99"] = round(percentile(latencies, 0.99), 2)

    # Throughput: lease and finish M jobs.
    site_id, app_id = world("throughput")
    stream = Stream(channel, md, site_id)
    stream.credit(m)
    t0 = time.perf_counter()
    for start in range(0, m, 10_000):
        jobs.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[
            job_pb2.Job(app_id=app_id, workdir=f"thr/{i}") for i in range(start, min(m, start + 10_000))]),
            metadata=md, timeout=600)
    created = time.perf_counter()
    finished = messages = 0
    last_lease = created
    while finished < m:
        msg = stream.get()
        kind = msg.WhichOneof("message")
        if kind == "leases":
            messages += 1
            last_lease = time.perf_counter()
            stream.finish(list(msg.leases.jobs))
        elif kind == "ack":
            finished = msg.ack.applied_through_seq
    done = time.perf_counter()
    stream.close()
    out["jobs"] = m
    out["create_call_s"] = round(created - t0, 3)
    out["lease_messages"] = messages
    out["leased_all_after_create_s"] = round(last_lease - created, 3)
    out["create_to_finished_jobs_per_s"] = round(m / (done - t0), 1)
    out["lease_report_jobs_per_s"] = round(m / (done - created), 1)

    # Few slots: the launcher re-grants credit as each report is acknowledged.
    site_id, app_id = world("slots")
    k = max(1, m // 5)
    jobs.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[
        job_pb2.Job(app_id=app_id, workdir=f"slot/{i}") for i in range(k)]), metadata=md, timeout=600)
    stream = Stream(channel, md, site_id)
    t0 = time.perf_counter()
    stream.credit(SLOTS, 0)
    received = finished = 0
    while finished < k:
        msg = stream.get()
        kind = msg.WhichOneof("message")
        if kind == "leases":
            received += 1
            stream.finish(list(msg.leases.jobs))
        elif kind == "ack":
            finished = msg.ack.applied_through_seq
            # Every reported job is done, so all slots are free again.
            stream.credit(SLOTS, received)
    out[f"slots{SLOTS}_jobs_per_s"] = round(k / (time.perf_counter() - t0), 1)
    stream.close()

    if recovery:
        # A launcher dies holding a job (its stream is cut, nothing reported); another
        # session with credit is waiting. Seconds until the job is leased to it again.
        site_id, app_id = world("recovery")
        dead = Stream(channel, md, site_id)
        dead.credit(1)
        jobs.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(
            jobs=[job_pb2.Job(app_id=app_id, workdir="rec/0")]), metadata=md)
        assert dead.get().WhichOneof("message") == "leases"
        waiting = Stream(channel, md, site_id)
        waiting.credit(1)
        t0 = time.perf_counter()
        dead.call.cancel()
        msg = waiting.get(timeout=300)
        out["dead_session_recovery_s"] = round(time.perf_counter() - t0, 2)
        assert msg.WhichOneof("message") == "leases"
        waiting.close()
    channel.close()
    return out


def bench(url: str, n: int, m: int, recovery: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="balsam-bench-") as home:
        proc, token = start_server(url, home)
        try:
            return run(Profile.load(Path(home) / "profile.json", apply_env=False).server, token, n, m, recovery)
        finally:
            stop_process(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", action="append", default=[])
    parser.add_argument("-n", type=int, default=200, help="latency samples")
    parser.add_argument("--jobs", type=int, default=5000, help="jobs in the throughput run")
    parser.add_argument("--no-recovery", action="store_true",
                        help="skip the dead-session recovery figure (it takes one lease timeout, 20 s)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    urls = list(args.database)
    workdir = tempfile.TemporaryDirectory(prefix="balsam-bench-db-")  # removed at exit
    tmp = workdir.name
    if not urls:
        urls.append(f"sqlite:///{tmp}/bench.db")
        if os.environ.get("BALSAM_TEST_DATABASE_URL"):
            urls.append(os.environ["BALSAM_TEST_DATABASE_URL"])
    results = {}
    for url in urls:
        name = "postgresql" if url.startswith("postgresql") else "sqlite"
        results[name] = bench(url, args.n, args.jobs, not args.no_recovery)
    if args.json:
        print(json.dumps(results))
        return
    for name, figures in results.items():
        print(f"{name}:")
        for key, value in figures.items():
            print(f"  {key:32s} {value}")


if __name__ == "__main__":
    main()
