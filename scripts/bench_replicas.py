#!/usr/bin/env python3
"""Several server replicas on one PostgreSQL database: mixed-load throughput with 1, 2
and 3 replicas, and the cross-replica wake-up latency.

Usage: scripts/bench_replicas.py [--database URL] [--replicas 1,2,3] [--duration S]
                                 [--jobs N] [--clients N] [--sites N] [--sessions N]
                                 [--lease-backlog N] [--wakeups N] [--json]

For each replica count, on a fresh database of its own (created next to --database,
default BALSAM_TEST_DATABASE_URL, and dropped afterwards): starts that many
`python -m balsam_grpc.server` processes, seeds --jobs jobs, and runs the load of
scripts/bench_load.py (client threads creating, listing and updating; site streams;
launcher sessions; a batch-job producer) for --duration seconds, every client on one
channel over all replicas (gRPC round_robin, as core/channel.py configures clients).
Prints the requests/s held and the CPU the servers got.

Then, with two replicas A and B: a launcher session on B with ample credit, and
--wakeups single jobs created one at a time through A; the time from CreateJob's return
on A to the JobLeases message on B's stream is the wake-up latency (LISTEN/NOTIFY, the
fanout, the acquisition): p50/p99. Figures, never assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import secrets
import subprocess
import sys
import tempfile
import time
from queue import Empty
from typing import Any

import grpc
import psutil

import benchkit  # noqa: F401 - first: puts this checkout on sys.path

import bench_load  # noqa: E402
from benchkit import bearer, site_with_app  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from balsam_grpc.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc  # noqa: E402
from balsam_grpc.v1 import session_service_pb2, session_service_pb2_grpc  # noqa: E402

ROUND_ROBIN = ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]}))


def fresh_database(url: str, suffix: str) -> str:
    base = make_url(url)
    name = f"{base.database}_{suffix}"
    admin = create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return base.set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)'))
    admin.dispose()


class Replicas:
    """n server processes on one database, started one after the other."""

    def __init__(self, url: str, n: int) -> None:
        self.homes = [tempfile.mkdtemp(prefix=f"balsam-replica-{i}-") for i in range(n)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.addresses: list[str] = []
        self.token = ""
        for home in self.homes:
            proc, address, token = bench_load.start_server(url, home)
            self.procs.append(proc)
            self.addresses.append(address)
            self.token = self.token or token

    @property
    def target(self) -> str:
        return "ipv4:" + ",".join(self.addresses) if len(self.addresses) > 1 else self.addresses[0]

    def cpu_seconds(self) -> float:
        return sum(sum(psutil.Process(p.pid).cpu_times()[:2]) for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def run_load(url: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    replicas = Replicas(url, n)
    try:
        target, token = replicas.target, replicas.token
        print(f"{n} replica(s): seeding {args.jobs} jobs ...", file=sys.stderr)
        world = bench_load.setup(replicas.addresses[0], token, args.sites, args.jobs, args.lease_backlog)
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        ready = ctx.Event()
        streams = ctx.Process(target=streams_process, args=(target, token, world, args, ready, out))
        streams.start()
        ready.wait(120)
        procs = max(1, min(2, args.clients))
        per = [args.clients // procs + (1 if i < args.clients % procs else 0) for i in range(procs)]
        clients = [ctx.Process(target=client_process, args=(target, token, world, k, args.duration, i, out))
                   for i, k in enumerate(per)]
        t0 = time.monotonic()
        cpu0 = replicas.cpu_seconds()
        for c in clients:
            c.start()
        results: list[dict[str, Any]] = []
        deadline = time.monotonic() + args.duration + 300
        while len(results) < len(clients) + 1:
            try:
                results.append(out.get(timeout=1.0))
            except Empty:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("load processes did not finish within the duration + 300 s")
        wall = time.monotonic() - t0
        cpu = replicas.cpu_seconds() - cpu0
        for p in (*clients, streams):
            p.join(30)
    finally:
        replicas.stop()
    ns = argparse.Namespace(**{**vars(args), "burst": 0})
    figures = bench_load.report(world, results, [(0.0, 0)], 0, args.duration, True, ns)
    unary = sum(v for k, v in figures["requests_per_s"].items() if k in ("create", "list", "update"))
    return {"replicas": n, "unary_requests_per_s": round(unary, 1), "requests_per_s": figures["requests_per_s"],
            "list_p99_ms": figures["list_p99_ms"], "create_p99_ms": figures["create_p99_ms"],
            "errors_by_code": figures["errors_by_code"],
            "server_cpu_percent_of_one_core": round(100 * cpu / wall, 1)}


def client_process(target: str, token: str, world: dict[str, Any], threads: int, duration: float, index: int,
                   out: Any) -> None:
    bench_load.OPTIONS.append(ROUND_ROBIN)
    bench_load.client_process(target, token, world, threads, duration, index, out)


def streams_process(target: str, token: str, world: dict[str, Any], args: argparse.Namespace, ready: Any,
                    out: Any) -> None:
    bench_load.OPTIONS.append(ROUND_ROBIN)
    out.put(asyncio.run(bench_load.streams_main(target, token, world, args.sites, args.sessions, args.duration, 0,
                                                ready)))


# ---------------------------------------------------------------------------- wake-up latency

async def wakeups(url: str, count: int) -> dict[str, Any]:
    replicas = Replicas(url, 2)
    try:
        md = bearer(replicas.token)
        a, b = replicas.addresses
        with grpc.insecure_channel(a) as ch:
            site_id, app_id = site_with_app(ch, md, f"wake-{secrets.token_hex(3)}")
        latencies: list[float] = []
        async with grpc.aio.insecure_channel(b) as channel_b, grpc.aio.insecure_channel(a) as channel_a:
            jobs_a = job_service_pb2_grpc.JobServiceStub(channel_a)
            queue: asyncio.Queue[Any] = asyncio.Queue()
            Req = session_service_pb2.SessionServiceConnectRequest

            async def requests() -> Any:
                yield Req(open=session_service_pb2.SessionOpen(site_id=site_id, hostname="bench"))
                yield Req(credit=session_service_pb2.SessionCredit(max_jobs=count + 10, free_nodes=count + 10.0))
                await asyncio.Event().wait()  # keep the stream open

            call = session_service_pb2_grpc.SessionServiceStub(channel_b).Connect(requests(), metadata=md)

            async def read() -> None:
                async for msg in call:
                    if msg.WhichOneof("message") == "leases":
                        await queue.put(time.perf_counter())

            reader = asyncio.ensure_future(read())
            await asyncio.sleep(1.0)  # the session is open and its credit applied
            for i in range(count):
                await jobs_a.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
                    app_id=app_id, workdir=f"wake/{i}")), metadata=md, timeout=30)
                created = time.perf_counter()
                leased = await asyncio.wait_for(queue.get(), 30)
                latencies.append((leased - created) * 1000)
            call.cancel()
            reader.cancel()
    finally:
        replicas.stop()
    latencies.sort()
    return {"wakeups": count, "create_on_A_to_lease_on_B_p50_ms": round(bench_load.pct(latencies, 0.5), 2),
            "p99_ms": round(bench_load.pct(latencies, 0.99), 2), "max_ms": round(latencies[-1], 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", help="PostgreSQL URL (default: BALSAM_TEST_DATABASE_URL)")
    parser.add_argument("--replicas", default="1,2,3", help="replica counts to run (default 1,2,3)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per count (default 20)")
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs seeded per run (default 20,000)")
    parser.add_argument("--clients", type=int, default=16, help="unary client threads (default 16)")
    parser.add_argument("--sites", type=int, default=20, help="site streams (default 20)")
    parser.add_argument("--sessions", type=int, default=40, help="launcher sessions (default 40)")
    parser.add_argument("--lease-backlog", type=int, default=5_000,
                        help="runnable jobs seeded for the sessions to lease (default 5,000)")
    parser.add_argument("--wakeups", type=int, default=200, help="jobs for the wake-up latency (default 200)")
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    args = parser.parse_args()
    url = args.database or os.environ.get("BALSAM_TEST_DATABASE_URL", "")
    if not url.startswith("postgresql"):
        raise SystemExit("replicas share a PostgreSQL database: pass --database postgresql+psycopg://...")
    figures: dict[str, Any] = {"load": [], "cores": os.cpu_count()}
    for n in [int(x) for x in args.replicas.split(",") if x.strip()]:
        db = fresh_database(url, f"bench_replicas_{n}")
        try:
            figures["load"].append(run_load(db, n, args))
        finally:
            drop_database(db)
    if args.wakeups:
        db = fresh_database(url, "bench_replicas_wake")
        try:
            figures["wakeup"] = asyncio.run(wakeups(db, args.wakeups))
        finally:
            drop_database(db)
    figures["machine_load_average_1m"] = round(os.getloadavg()[0], 2)
    if args.json:
        print(json.dumps(figures))
        return 0
    print(f"{'replicas':>8} {'unary req/s':>12} {'list p99 ms':>12} {'create p99 ms':>14} {'server CPU %':>13}  "
          "per kind")
    for row in figures["load"]:
        print(f"{row['replicas']:>8} {row['unary_requests_per_s']:>12} {row['list_p99_ms']:>12} "
              f"{row['create_p99_ms']:>14} {row['server_cpu_percent_of_one_core']:>13}  {row['requests_per_s']}"
              + (f"  errors {row['errors_by_code']}" if row["errors_by_code"] else ""))
    if "wakeup" in figures:
        w = figures["wakeup"]
        print(f"cross-replica wake-up (create on A -> lease on B), {w['wakeups']} jobs: "
              f"p50 {w['create_on_A_to_lease_on_B_p50_ms']} ms, p99 {w['p99_ms']} ms, max {w['max_ms']} ms")
    print(f"cores {figures['cores']}, load average {figures['machine_load_average_1m']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
