#!/usr/bin/env python3
"""API throughput of a real server process, through the generated stubs.

Usage: scripts/bench_api.py [--database URL ...] [-n N] [--rounds R] [--count-at M] [--json]

Starts `python -m balsam_grpc.server` once per database (default: a temporary SQLite
file, plus PostgreSQL when BALSAM_TEST_DATABASE_URL is set) and prints, per database:
bulk create (10,000 jobs per call) jobs/s, single create p50/p95 (without a request_id,
and with one as the SDK sends: `single_create_request_id_*`), filtered list items/s and
bulk state update transitions/s. Figures, never assertions.

Each figure also comes with CPU time per item, which other load on the machine disturbs
far less than wall-clock rates (`bulk_create_load_1min` is the machine's load average
when the bulk creates ended): the server process's (`*_server_cpu_us`), the database's
(`*_database_cpu_us`: the PostgreSQL backends serving the database, read from /proc;
SQLite runs inside the server) and their sum (`*_total_cpu_us`). With `--rounds R` the
whole sequence runs R times (fresh jobs each round) and each figure is the median over
the rounds. The benchmark deletes its site at the end, so repeated runs
against one database measure the same amount of data.

`--count-at M` then fills a site with M jobs (bulk creates) and times CountJobs over
them: grouped by state (`count_by_state_p50_ms`, answered from the counts table) and
grouped by app (`count_by_app_p50_ms`, which counts the jobs themselves), p50 of 30 calls.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

import benchkit  # noqa: F401 - first: puts this checkout on sys.path

from balsam_grpc.core.settings import Profile  # noqa: E402
from balsam_grpc.sdk.service import new_request_id  # noqa: E402
from benchkit import DatabaseCpu, cpu_s, stop_process  # noqa: E402
from balsam_grpc.v1 import (  # noqa: E402
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

BATCH = 10_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(url: str, home: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = dict(os.environ, BALSAM_HOME=home, BALSAM_LOG_LEVEL="WARNING")
    proc = subprocess.Popen([sys.executable, "-m", "balsam_grpc.server", "--address", f"127.0.0.1:{port}",
                             "--database", url], env=env)
    deadline = time.time() + 60
    profile_file = Path(home) / "profile.json"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        if profile_file.exists() and Profile.load(profile_file, apply_env=False).server.endswith(f":{port}"):
            return proc, Profile.load(profile_file, apply_env=False).token
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not start within 60 s")


def bench(url: str, n: int, rounds: int = 1, count_at: int = 0) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="balsam-bench-") as home:
        proc, token = start_server(url, home)
        try:
            address = Profile.load(Path(home) / "profile.json", apply_env=False).server
            database = DatabaseCpu(url)
            try:
                results = [run(address, token, n, CpuClock(proc.pid, database), r) for r in range(rounds)]
            finally:
                database.close()
            figures = median_of(results)
            if count_at:
                figures.update(count_bench(address, token, count_at))
            return figures
        finally:
            stop_process(proc)


def median_of(results: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the rounds (not the best of each figure from different
    rounds, which would pair figures no single round produced)."""
    return {key: round(statistics.median(r[key] for r in results), 3) for key in results[0]}


class CpuClock:
    """CPU seconds (user + system) the server process and the database's backends spent
    since the last reading."""

    def __init__(self, server_pid: int, database: DatabaseCpu) -> None:
        self.server_pid = server_pid
        self.database = database
        self.last = (cpu_s(server_pid), database.reading())

    def lap(self) -> tuple[float, float]:
        now = (cpu_s(self.server_pid), self.database.reading())
        spent = (now[0] - self.last[0], DatabaseCpu.spent(self.last[1], now[1]))
        self.last = now
        return spent


def per_item(figures: dict[str, float], name: str, spent: tuple[float, float], items: int) -> None:
    """`name`_{server,database,total}_cpu_us: CPU microseconds per item."""
    items = max(items, 1)
    figures[f"{name}_server_cpu_us"] = round(spent[0] / items * 1e6, 1)
    figures[f"{name}_database_cpu_us"] = round(spent[1] / items * 1e6, 1)
    figures[f"{name}_total_cpu_us"] = round(sum(spent) / items * 1e6, 1)


def run(address: str, token: str, n: int, cpu: CpuClock, round_: int = 0) -> dict[str, float]:
    md = (("authorization", f"Bearer {token}"),)
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 256 << 20)])
    sites = site_service_pb2_grpc.SiteServiceStub(channel)
    apps = app_service_pb2_grpc.AppServiceStub(channel)
    jobs = job_service_pb2_grpc.JobServiceStub(channel)
    site = sites.CreateSite(site_service_pb2.CreateSiteRequest(site=site_pb2.Site(name=f"bench-{time.time_ns()}")),
                            metadata=md).site
    app = apps.CreateApp(app_service_pb2.CreateAppRequest(app=app_pb2.App(
        site_id=site.id, name="sim", command_template="/bin/true {{ i }}",
        parameters=[app_pb2.AppParameter(name="i", type=app_pb2.PARAMETER_TYPE_INT)])), metadata=md).app
    figures: dict[str, float] = {}

    total, elapsed, spent = 0, 0.0, (0.0, 0.0)
    for start in range(0, n, BATCH):
        count = min(BATCH, n - start)
        batch = [job_pb2.Job(app_id=app.id, workdir=f"bulk/{start + i}", parameters={"i": str(i)},
                             tags={"bench": "bulk", "shard": str(i % 8)}) for i in range(count)]
        cpu.lap()
        t0 = time.perf_counter()
        jobs.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=batch), metadata=md, timeout=600)
        elapsed += time.perf_counter() - t0
        lap = cpu.lap()
        spent = (spent[0] + lap[0], spent[1] + lap[1])
        total += count
        print(f"  round {round_ + 1}: bulk create {total}/{n} jobs", file=sys.stderr)
    figures["bulk_create_jobs_per_s"] = round(total / elapsed)
    per_item(figures, "bulk_create", spent, total)
    # Wall-clock rates on a shared machine mean little without the load they ran under.
    figures["bulk_create_load_1min"] = round(os.getloadavg()[0], 2)

    # Single creates as a stub sends them, and as the SDK does (Job.save: with a request_id,
    # which makes a retry replay the first answer instead of creating twice).
    for name, with_request_id in (("single_create", False), ("single_create_request_id", True)):
        latencies = []
        for i in range(320):
            job = job_pb2.Job(app_id=app.id, workdir=f"{name}/{i}", parameters={"i": "1"}, tags={"bench": "single"})
            request = job_service_pb2.CreateJobRequest(job=job, request_id=new_request_id() if with_request_id else "")
            if i == 20:
                cpu.lap()
            t0 = time.perf_counter()
            jobs.CreateJob(request, metadata=md)
            latencies.append((time.perf_counter() - t0) * 1000)
        spent = cpu.lap()
        latencies = latencies[20:]  # warm-up
        figures[f"{name}_p50_ms"] = round(statistics.median(latencies), 3)
        figures[f"{name}_p95_ms"] = round(statistics.quantiles(latencies, n=20)[18], 3)
        per_item(figures, name, spent, len(latencies))
    figures["single_create_load_1min"] = round(os.getloadavg()[0], 2)

    cpu.lap()
    t0, listed, token_ = time.perf_counter(), 0, ""
    while True:
        page = jobs.ListJobs(job_service_pb2.ListJobsRequest(
            filter=job_pb2.JobFilter(tags={"bench": "bulk"}, site_ids=[site.id]), page_size=5000,
            page_token=token_), metadata=md, timeout=600)
        listed += len(page.jobs)
        token_ = page.next_page_token
        if not token_:
            break
    figures["list_items_per_s"] = round(listed / (time.perf_counter() - t0))
    per_item(figures, "list", cpu.lap(), listed)

    t0 = time.perf_counter()
    result = jobs.BatchUpdateJobs(job_service_pb2.BatchUpdateJobsRequest(
        filter=job_pb2.JobFilter(tags={"bench": "bulk"}, site_ids=[site.id]),
        patch=job_pb2.Job(state=job_pb2.JOB_STATE_KILLED), update_mask={"paths": ["state"]}),
        metadata=md, timeout=600)
    # KILLED: the one bulk state change a user makes (only a lease starts a job).
    figures["bulk_update_transitions_per_s"] = round(result.updated_count / (time.perf_counter() - t0))
    per_item(figures, "bulk_update", cpu.lap(), result.updated_count)
    sites.DeleteSite(site_service_pb2.DeleteSiteRequest(id=site.id), metadata=md, timeout=600)
    channel.close()
    return figures


def count_bench(address: str, token: str, total: int) -> dict[str, float]:
    """CountJobs latency with `total` jobs at one site (see the module's docstring)."""
    md = (("authorization", f"Bearer {token}"),)
    channel = grpc.insecure_channel(address)
    sites = site_service_pb2_grpc.SiteServiceStub(channel)
    jobs = job_service_pb2_grpc.JobServiceStub(channel)
    site = sites.CreateSite(site_service_pb2.CreateSiteRequest(site=site_pb2.Site(name=f"count-{time.time_ns()}")),
                            metadata=md).site
    app = app_service_pb2_grpc.AppServiceStub(channel).CreateApp(app_service_pb2.CreateAppRequest(app=app_pb2.App(
        site_id=site.id, name="sim", command_template="/bin/true")), metadata=md).app
    for start in range(0, total, BATCH):
        jobs.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[
            job_pb2.Job(app_id=app.id, workdir=f"c/{start + i}") for i in range(min(BATCH, total - start))]),
            metadata=md, timeout=600)
        if start % 100_000 == 0:
            print(f"  count: {start + BATCH}/{total} jobs", file=sys.stderr)
    figures: dict[str, float] = {}
    for name, group in (("state", job_service_pb2.JOB_GROUP_BY_STATE), ("app", job_service_pb2.JOB_GROUP_BY_APP)):
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            answer = jobs.CountJobs(job_service_pb2.CountJobsRequest(group_by=[group]), metadata=md, timeout=600)
            times.append((time.perf_counter() - t0) * 1000)
        assert answer.total >= total, answer.total
        figures[f"count_by_{name}_p50_ms"] = round(statistics.median(times), 3)
    figures["count_jobs"] = total
    sites.DeleteSite(site_service_pb2.DeleteSiteRequest(id=site.id), metadata=md, timeout=1200)
    channel.close()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", action="append", help="database URL (repeatable)")
    parser.add_argument("-n", type=int, default=20_000, help="jobs for the bulk figures (default 20000)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the sequence; each figure is the median over rounds")
    parser.add_argument("--count-at", type=int, default=0, metavar="M",
                        help="also time CountJobs over a site of M jobs (for example 1000000)")
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    args = parser.parse_args()
    urls = args.database or []
    workdir = tempfile.TemporaryDirectory(prefix="balsam-bench-db-")  # removed at exit
    tmp = workdir.name
    if not urls:
        urls = [f"sqlite:///{tmp}/bench.db"]
        if os.environ.get("BALSAM_TEST_DATABASE_URL"):
            urls.append(os.environ["BALSAM_TEST_DATABASE_URL"])
    results = {}
    for url in urls:
        backend = url.split(":", 1)[0].split("+", 1)[0]
        print(f"benchmarking {backend} ...", file=sys.stderr)
        results[backend] = bench(url, args.n, max(1, args.rounds), args.count_at)
    if args.json:
        print(json.dumps(results))
    else:
        for backend, figures in results.items():
            print(f"{backend}:")
            for key, value in figures.items():
                print(f"  {key:32s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
