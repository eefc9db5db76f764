#!/usr/bin/env python3
"""Load on a real server process: many clients, site streams and launcher sessions at once.

Usage: scripts/bench_load.py [--database URL] [--jobs N] [--clients N] [--sites N]
                             [--sessions N] [--session-job-s S] [--duration S] [--burst N]
                             [--lease-backlog N]
                             [--only create|list|update ...] [--no-slow-consumers] [--profile FILE]
                             [--json]

1. Starts `python -m balsam_grpc.server` on loopback (default database: PostgreSQL from
   BALSAM_TEST_DATABASE_URL when set, else a temporary SQLite file).
2. Seeds N jobs (default 1,000,000 on PostgreSQL, 100,000 on SQLite) with BatchCreateJobs
   of 10,000 jobs per call at one "seed" site, and prints the seeding rate.
3. For `--duration` seconds, all at once:
   - `--clients` client threads (in two processes) creating single jobs (30 %), listing
     with a filter (40 %: tags + state, page of 100, following page tokens) over the
     seeded jobs, and updating seeded jobs' tags (30 %); `--only` runs some of them;
   - `--sites` site streams (SiteService.Connect: hello, credit, ack and answer the
     batch-job submissions a producer keeps creating);
   - `--sessions` launcher sessions (SessionService.Connect: open, credit, report
     RUN_DONE for every leased job with the freed credit on the report, as the launcher
     does) over a backlog of `--lease-backlog` runnable jobs seeded at the work sites
     (plus the jobs the clients create): the sessions are never starved, so the lease
     rate is the server's, not the create rate. By default a session reports its jobs as
     soon as it has them (closed loop: the sessions take all the server gives, and the
     unary calls get the rest); with `--session-job-s S` each batch runs S seconds first,
     as a launcher's jobs do, and the unary calls' figures are those beside sessions at
     that pace. `jobs_leased_per_s` counts the leases
     the server made in the window (jobs that left the runnable state, counted in the
     database at its start and end); `lease_backlog_left` says whether the backlog ran
     out (then the rate is bounded by it, not by the server);
   - slow consumers that never read: a WatchEvents replaying the whole event log and a
     session with a large credit at the seed site. The server must push back on them
     (HTTP/2 flow control), not buffer: its RSS is sampled every second (psutil). The
     seeded jobs that session leased before the stream stopped are printed
     (`seed_jobs_leased_by_slow_consumer`): work in the window that the lease rate leaves out.
   Sessions still ACTIVE are closed (DeleteSession) before the seeding and after the run:
   the streams end by cancelling their calls, and the sessions an earlier run left on the
   same database would otherwise expire (with their leases) inside this run's window.
4. Then a burst of `--burst` concurrent unary calls: the server's admission control
   refuses what it cannot take with RESOURCE_EXHAUSTED; nothing else fails and the
   server answers normally afterwards.

Prints unary calls/s answered within the window (in total and per kind) with their p50
and p99 latency, stream messages/s apart from them, the CPU the server, the database
(PostgreSQL: its backends serving this database) and the load generator's own processes
spent in the window, in all and per unary call (streams included; with `--sites 0
--sessions 0 --no-slow-consumers` the unary calls' own cost), server RSS over time, errors
by status code, and the load average before and after.

On a shared 2-core machine the raw rate says how much CPU the server got, not what it can
do: `unary_calls_per_server_cpu_s` (unary calls per second of the server's own CPU, the
streams' work charged to them too) is the server's capacity with a whole core, and
`generator_cpu_percent_of_one_core` says whether the generator took the server's share.
`--profile FILE` samples the server with py-spy during the window (collapsed stacks).
Figures, never assertions (the test tests/server/test_admission.py runs a small
configuration and checks that it reports).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from queue import Empty
from pathlib import Path
from typing import Any

import grpc
import psutil

import benchkit  # noqa: F401 - first: puts this checkout on sys.path

from balsam_grpc.core.settings import Profile  # noqa: E402
from benchkit import DatabaseCpu, cpu_s, start_profiler, stop_process, stop_profiler  # noqa: E402
from balsam_grpc.v1 import (  # noqa: E402
    app_pb2,
    app_service_pb2,
    app_service_pb2_grpc,
    batch_job_pb2,
    batch_job_service_pb2,
    batch_job_service_pb2_grpc,
    event_service_pb2,
    event_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    session_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
    site_pb2,
    site_service_pb2,
    site_service_pb2_grpc,
)

SEED_BATCH = 10_000
SHARDS = 16
LIST_PAGE = 100
OPTIONS = [("grpc.max_receive_message_length", 256 << 20), ("grpc.max_send_message_length", 256 << 20)]


# ---------------------------------------------------------------------------- server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(url: str, home: str) -> tuple[subprocess.Popen[bytes], str, str]:
    port = free_port()
    env = dict(os.environ, BALSAM_HOME=home, BALSAM_LOG_LEVEL="WARNING")
    log = open(Path(home) / "server.log", "wb")  # noqa: SIM115 - open for the server's lifetime
    proc = subprocess.Popen([sys.executable, "-m", "balsam_grpc.server", "--address", f"127.0.0.1:{port}",
                             "--database", url], env=env, stdout=log, stderr=log)
    profile_file = Path(home) / "profile.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {home}/server.log")
        if profile_file.exists():
            profile = Profile.load(profile_file, apply_env=False)
            if profile.server.endswith(f":{port}") and profile.token:
                return proc, profile.server, profile.token
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not start within 120 s")


def code_name(err: grpc.RpcError) -> str:
    code = err.code() if hasattr(err, "code") else None
    return code.name if code is not None else type(err).__name__


# ---------------------------------------------------------------------------- setup and seed

def retried(call: Any, attempts: int = 30) -> Any:
    """A seeding call resent on UNAVAILABLE (a database restart): the request id makes the
    resend safe (the server answers a duplicate with the first answer)."""
    for attempt in range(attempts):
        try:
            return call()
        except grpc.RpcError as err:
            if code_name(err) != "UNAVAILABLE" or attempt == attempts - 1:
                raise
            print(f"  server unavailable ({err.details()}); retrying", file=sys.stderr)
            time.sleep(min(5.0, 0.5 * 2 ** attempt))
    raise AssertionError("unreachable")


def setup(address: str, token: str, n_sites: int, n_jobs: int, lease_backlog: int) -> dict[str, Any]:
    md = (("authorization", f"Bearer {token}"),)
    channel = grpc.insecure_channel(address, options=OPTIONS)
    sites = site_service_pb2_grpc.SiteServiceStub(channel)
    apps = app_service_pb2_grpc.AppServiceStub(channel)
    jobs = job_service_pb2_grpc.JobServiceStub(channel)
    stamp = time.time_ns()

    def site_and_app(name: str) -> tuple[int, int]:
        site = sites.CreateSite(site_service_pb2.CreateSiteRequest(site=site_pb2.Site(name=name)), metadata=md).site
        app = apps.CreateApp(app_service_pb2.CreateAppRequest(app=app_pb2.App(
            site_id=site.id, name="sim", command_template="/bin/true {{ i }}",
            parameters=[app_pb2.AppParameter(name="i", type=app_pb2.PARAMETER_TYPE_INT)])), metadata=md).app
        return site.id, app.id

    seed_site, seed_app = site_and_app(f"load-seed-{stamp}")
    work = [site_and_app(f"load-work-{stamp}-{i}") for i in range(max(1, n_sites))]  # creates need one
    first_id, last_id, done = None, None, 0
    started = time.perf_counter()
    for start in range(0, n_jobs, SEED_BATCH):
        count = min(SEED_BATCH, n_jobs - start)
        batch = [job_pb2.Job(app_id=seed_app, workdir=f"seed/{start + i}", parameters={"i": str(i)},
                             tags={"load": "seed", "shard": str((start + i) % SHARDS)}) for i in range(count)]
        request = job_service_pb2.BatchCreateJobsRequest(jobs=batch, view=job_service_pb2.JOB_VIEW_BASIC,
                                                         request_id=f"seed-{stamp}-{start}")
        resp = retried(lambda r=request: jobs.BatchCreateJobs(r, metadata=md, timeout=900))
        first_id = resp.jobs[0].id if first_id is None else first_id
        last_id = resp.jobs[-1].id
        done += count
        if done % 100_000 == 0 or done == n_jobs:
            print(f"  seeded {done}/{n_jobs} jobs ({done / (time.perf_counter() - started):.0f} jobs/s)",
                  file=sys.stderr)
    elapsed = time.perf_counter() - started
    for start in range(0, lease_backlog, SEED_BATCH):
        count = min(SEED_BATCH, lease_backlog - start)
        batch = [job_pb2.Job(app_id=work[(start + i) % len(work)][1], workdir=f"backlog/{start + i}",
                             parameters={"i": str(i)}, tags={"load": "backlog"}) for i in range(count)]
        request = job_service_pb2.BatchCreateJobsRequest(jobs=batch, view=job_service_pb2.JOB_VIEW_BASIC,
                                                         request_id=f"backlog-{stamp}-{start}")
        retried(lambda r=request: jobs.BatchCreateJobs(r, metadata=md, timeout=900))
    state = jobs.GetJob(job_service_pb2.GetJobRequest(id=first_id), metadata=md).job.state if n_jobs else 0
    channel.close()
    return {"seed_site": seed_site, "seed_app": seed_app, "work": work, "first_id": first_id or 0,
            "last_id": last_id or 0, "seed_state": state, "seed_seconds": elapsed,
            "seed_jobs_per_s": round(n_jobs / elapsed) if n_jobs else 0}


# ---------------------------------------------------------------------------- unary clients

def client_process(address: str, token: str, world: dict[str, Any], threads: int, duration: float,
                   proc_index: int, out: Any, ready: Any, go: Any, start: Any, kinds: tuple[str, ...]) -> None:
    """`threads` threads, each looping create / filtered list / update (`kinds`: the ones
    to run) from the parent's start signal for `duration` seconds. Only calls that end
    within the window count."""
    md = (("authorization", f"Bearer {token}"),)
    channel = grpc.insecure_channel(address, options=OPTIONS)
    stub = job_service_pb2_grpc.JobServiceStub(channel)
    grpc.channel_ready_future(channel).result(timeout=60)
    lock = threading.Lock()
    latencies: dict[str, list[float]] = {"create": [], "list": [], "update": []}
    ok: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    mix = [(share, kind) for share, kind in ((0.3, "create"), (0.4, "list"), (0.3, "update")) if kind in kinds]
    total_share = sum(share for share, _ in mix)
    ready.set()
    go.wait()
    stop_at = start.value + duration

    def pick(roll: float) -> str:
        roll *= total_share
        for share, kind in mix:
            if roll < share:
                return kind
            roll -= share
        return mix[-1][1]

    def loop(t: int) -> None:
        rng = random.Random(proc_index * 1000 + t)
        mine: dict[str, list[float]] = {k: [] for k in latencies}
        my_ok: Counter[str] = Counter()
        my_err: Counter[str] = Counter()
        page_tokens: dict[int, str] = {}
        i = 0
        while time.monotonic() < stop_at:
            i += 1
            kind = pick(rng.random())
            t0 = time.perf_counter()
            try:
                if kind == "create":
                    _, app_id = world["work"][rng.randrange(len(world["work"]))]
                    stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
                        app_id=app_id, workdir=f"load/{proc_index}/{t}/{i}", parameters={"i": str(i)},
                        tags={"load": "work"})), metadata=md, timeout=60)
                elif kind == "list":
                    shard = rng.randrange(SHARDS)
                    page = stub.ListJobs(job_service_pb2.ListJobsRequest(
                        filter=job_pb2.JobFilter(tags={"load": "seed", "shard": str(shard)},
                                                 states=[world["seed_state"]]),
                        page_size=LIST_PAGE, page_token=page_tokens.get(shard, "")), metadata=md, timeout=60)
                    # Follow the pages half the time, start over otherwise (deep and shallow pages).
                    page_tokens[shard] = page.next_page_token if rng.random() < 0.5 else ""
                else:
                    if not world["last_id"]:
                        continue
                    job_id = rng.randint(world["first_id"], world["last_id"])
                    stub.UpdateJob(job_service_pb2.UpdateJobRequest(
                        job=job_pb2.Job(id=job_id, tags={"load": "seed", "shard": str(
                            (job_id - world["first_id"]) % SHARDS), "touched": str(i)}),
                        update_mask={"paths": ["tags"]}), metadata=md, timeout=60)
                if time.monotonic() <= stop_at:  # a call that ends after the window is not counted
                    mine[kind].append((time.perf_counter() - t0) * 1000)
                    my_ok[kind] += 1
            except grpc.RpcError as err:
                my_err[code_name(err)] += 1
            except Exception as exc:  # noqa: BLE001 - a bug in this script: counted, not hidden
                my_err[f"client {type(exc).__name__}: {exc}"[:120]] += 1
        with lock:
            for k, v in mine.items():
                latencies[k].extend(v)
            ok.update(my_ok)
            errors.update(my_err)

    workers = [threading.Thread(target=loop, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    channel.close()
    out.put({"latencies": latencies, "ok": dict(ok), "errors": dict(errors)})


# ---------------------------------------------------------------------------- streams (asyncio)

class Tally:
    def __init__(self) -> None:
        self.ok: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()


async def site_stream(stub: Any, md: Any, site_id: int, stop: asyncio.Event, tally: Tally) -> None:
    queue: asyncio.Queue[Any] = asyncio.Queue()
    Req = site_service_pb2.SiteServiceConnectRequest
    queue.put_nowait(Req(hello=site_service_pb2.SiteHello(site_id=site_id, hostname="load", daemon_version="load",
                                                         capabilities=["batch_jobs"], max_in_flight=4)))

    async def requests() -> Any:
        while True:
            msg = await queue.get()
            if msg is None:
                return
            yield msg

    call = stub.Connect(requests(), metadata=md)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        while True:
            read = asyncio.ensure_future(call.read())
            done, _ = await asyncio.wait({read, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if read not in done:
                read.cancel()
                break
            msg = read.result()
            if msg is grpc.aio.EOF:
                break
            kind = msg.WhichOneof("message")
            tally.ok[f"site_{kind}"] += 1
            if kind == "work":
                item = msg.work
                queue.put_nowait(Req(ack=site_service_pb2.WorkAck(work_ids=[item.id])))
                if item.WhichOneof("kind") == "submit_batch_job":
                    bj = item.submit_batch_job.batch_job
                    queue.put_nowait(Req(result=site_service_pb2.WorkResult(
                        work_id=item.id, batch_job=site_service_pb2.BatchJobUpdate(
                            batch_job_id=bj.id, state=batch_job_pb2.BATCH_JOB_STATE_QUEUED,
                            scheduler_id=f"load-{bj.id}"))))
                else:
                    queue.put_nowait(Req(result=site_service_pb2.WorkResult(work_id=item.id)))
                queue.put_nowait(Req(credit=site_service_pb2.SiteCredit(items=1)))
    except grpc.aio.AioRpcError as err:
        tally.errors[f"site_stream {err.code().name}"] += 1
    finally:
        stopper.cancel()
        queue.put_nowait(None)
        call.cancel()


async def session_stream(stub: Any, md: Any, site_id: int, stop: asyncio.Event, tally: Tally,
                         max_jobs: int = 4, read: bool = True, job_s: float = 0.0) -> None:
    Req = session_service_pb2.SessionServiceConnectRequest
    queue: asyncio.Queue[Any] = asyncio.Queue()
    queue.put_nowait(Req(open=session_service_pb2.SessionOpen(
        site_id=site_id, hostname="nid-load", nodes=[session_pb2.NodeInfo(hostname="nid-load", cpus=64)])))
    credit = Req(credit=session_service_pb2.SessionCredit(max_jobs=max_jobs, free_nodes=float(max_jobs)))
    queue.put_nowait(credit)

    async def requests() -> Any:
        while True:
            msg = await queue.get()
            if msg is None:
                return
            yield msg

    call = stub.Connect(requests(), metadata=md)
    if not read:  # a launcher that stopped reading: the server must not buffer for it
        await stop.wait()
        queue.put_nowait(None)
        call.cancel()
        return
    seq = 0
    stopper = asyncio.ensure_future(stop.wait())
    try:
        while True:
            reading = asyncio.ensure_future(call.read())
            done, _ = await asyncio.wait({reading, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if reading not in done:
                reading.cancel()
                queue.put_nowait(Req(close=session_service_pb2.SessionClose(reason="load done")))
                break
            msg = reading.result()
            if msg is grpc.aio.EOF:
                break
            kind = msg.WhichOneof("message")
            if kind == "leases":
                transitions = []
                for leased in msg.leases.jobs:
                    seq += 1
                    transitions.append(session_service_pb2.JobTransition(
                        seq=seq, job_id=leased.job.id, lease_generation=leased.lease_generation,
                        state=job_pb2.JOB_STATE_RUN_DONE, return_code=0))
                tally.ok["session_jobs_leased"] += len(transitions)
                # The credit the jobs freed rides on their report, as the launcher sends it
                # (launcher/session.py): the server leases in the report's transaction.
                report = Req(report=session_service_pb2.TransitionReport(transitions=transitions,
                                                                         credit=credit.credit))
                if job_s > 0:  # the jobs run that long before they are reported
                    asyncio.get_running_loop().call_later(job_s, queue.put_nowait, report)
                else:
                    queue.put_nowait(report)
            elif kind == "ack":
                tally.ok["session_reports_acked"] += 1
                if msg.ack.rejections:
                    tally.errors["session_rejections"] += len(msg.ack.rejections)
    except grpc.aio.AioRpcError as err:
        tally.errors[f"session_stream {err.code().name}"] += 1
    finally:
        stopper.cancel()
        queue.put_nowait(None)
        call.cancel()


async def batch_job_producer(stub: Any, md: Any, sites: list[int], stop: asyncio.Event, tally: Tally) -> None:
    """Keeps the site streams busy: a batch job to submit at some site every 50 ms."""
    rng = random.Random(7)
    while not stop.is_set():
        try:
            await stub.CreateBatchJob(batch_job_service_pb2.CreateBatchJobRequest(batch_job=batch_job_pb2.BatchJob(
                site_id=rng.choice(sites), num_nodes=1, wall_time_min=10)), metadata=md, timeout=60)
            tally.ok["batch_jobs_created"] += 1
        except grpc.aio.AioRpcError as err:
            tally.errors[f"CreateBatchJob {err.code().name}"] += 1
        try:
            await asyncio.wait_for(stop.wait(), 0.05)
        except TimeoutError:
            pass


async def burst(address: str, md: Any, n: int, world: dict[str, Any]) -> dict[str, Any]:
    """n unary calls at once (one channel): what is not refused must succeed."""
    codes: Counter[str] = Counter()
    async with grpc.aio.insecure_channel(address, options=OPTIONS) as channel:
        stub = job_service_pb2_grpc.JobServiceStub(channel)

        async def one(i: int) -> None:
            try:
                await stub.ListJobs(job_service_pb2.ListJobsRequest(
                    filter=job_pb2.JobFilter(tags={"load": "seed", "shard": str(i % SHARDS)}),
                    page_size=LIST_PAGE), metadata=md, timeout=120)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as err:
                codes[err.code().name] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.perf_counter() - t0
        after = "OK"
        try:
            await stub.CountJobs(job_service_pb2.CountJobsRequest(filter=job_pb2.JobFilter(ids=[world["first_id"]])),
                                 metadata=md, timeout=60)
        except grpc.aio.AioRpcError as err:
            after = err.code().name
    return {"calls": n, "codes": dict(codes), "seconds": round(elapsed, 2), "call_after_burst": after}


async def streams_main(address: str, token: str, world: dict[str, Any], n_sites: int, n_sessions: int,
                       duration: float, n_burst: int, ready: Any, go: Any, start: Any,
                       slow_consumers: bool = True, session_job_s: float = 0.0) -> dict[str, Any]:
    md = (("authorization", f"Bearer {token}"),)
    tally = Tally()
    stop = asyncio.Event()
    work_sites = [s for s, _ in world["work"]][:max(1, n_sites)]
    async with grpc.aio.insecure_channel(address, options=OPTIONS) as channel:
        sites = site_service_pb2_grpc.SiteServiceStub(channel)
        sessions = session_service_pb2_grpc.SessionServiceStub(channel)
        batch = batch_job_service_pb2_grpc.BatchJobServiceStub(channel)
        events = event_service_pb2_grpc.EventServiceStub(channel)
        tasks = [asyncio.ensure_future(site_stream(sites, md, s, stop, tally)) for s in work_sites[:n_sites]]
        tasks += [asyncio.ensure_future(session_stream(sessions, md, work_sites[i % len(work_sites)], stop, tally,
                                                       job_s=session_job_s))
                  for i in range(n_sessions)]
        if n_sites:  # batch jobs for the site streams to submit (no site stream: none to charge the calls with)
            tasks.append(asyncio.ensure_future(batch_job_producer(batch, md, work_sites, stop, tally)))
        # Slow consumers: never read.
        slow_watch = None
        if slow_consumers:
            tasks.append(asyncio.ensure_future(session_stream(sessions, md, world["seed_site"], stop, tally,
                                                              max_jobs=100_000, read=False)))
            slow_watch = events.WatchEvents(event_service_pb2.WatchEventsRequest(replay_from_start=True),
                                            metadata=md)
        ready.set()
        await asyncio.to_thread(go.wait)
        await asyncio.sleep(max(0.0, start.value + duration - time.monotonic()))
        # The clients stop at the same moment: let their last calls finish, so the burst's
        # refusals are not mixed into their figures.
        await asyncio.sleep(2.0)
        burst_result = await burst(address, md, n_burst, world) if n_burst else {}
        stop.set()
        if slow_watch is not None:
            slow_watch.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=30)
    return {"ok": dict(tally.ok), "errors": dict(tally.errors), "burst": burst_result}


def streams_process(address: str, token: str, world: dict[str, Any], n_sites: int, n_sessions: int,
                    duration: float, n_burst: int, ready: Any, go: Any, start: Any, slow_consumers: bool,
                    session_job_s: float, out: Any) -> None:
    out.put(asyncio.run(streams_main(address, token, world, n_sites, n_sessions, duration, n_burst, ready, go,
                                     start, slow_consumers, session_job_s)))


# ---------------------------------------------------------------------------- the run

def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


class Window:
    """What the server and the database spent, and the leases made, between the start of
    the load and the end of its `duration` (the clients' window): taken at both instants."""

    def __init__(self, server: psutil.Process, url: str, address: str, token: str, world: dict[str, Any],
                 generator: list[int]) -> None:
        self.server, self.address, self.token, self.world = server, address, token, world
        self.generator = generator  # the load's own processes (clients and streams)
        self.database = DatabaseCpu(url)
        self.at: list[dict[str, Any]] = []

    def take(self) -> None:
        self.at.append({"time": time.monotonic(), "server_cpu": sum(self.server.cpu_times()[:2]),
                        "database_cpu": self.database.reading(), "generator_cpu": sum(map(cpu_s, self.generator)),
                        "leasable": leasable(self.address, self.token, self.world),
                        "created": created(self.address, self.token, self.world)})

    def figures(self, unary_calls: int) -> dict[str, Any]:
        first, last = self.at[0], self.at[-1]
        seconds = last["time"] - first["time"]
        server = last["server_cpu"] - first["server_cpu"]
        database = DatabaseCpu.spent(first["database_cpu"], last["database_cpu"])
        generator = last["generator_cpu"] - first["generator_cpu"]
        leased = first["leasable"] + (last["created"] - first["created"]) - last["leasable"]
        per_call = max(1, unary_calls)
        self.database.close()
        return {
            "jobs_leased_per_s": round(leased / seconds, 1),
            # How much CPU the server got: on a shared 2-core machine the rates above are
            # bounded by this, not by the server's design.
            "server_cpu_percent_of_one_core": round(100 * server / seconds, 1),
            "database_cpu_percent_of_one_core": round(100 * database / seconds, 1) if self.database.conn else None,
            # The load generator competes with the server for the same cores: when it takes
            # as much as the server, the rates above say more about the machine than the server.
            "generator_cpu_percent_of_one_core": round(100 * generator / seconds, 1),
            # What one server process answers per second of its own CPU, the streams' work
            # (leases, reports, fanout) charged to the unary calls too: a lower bound of
            # its unary capacity with a whole core, whatever the machine gave it here.
            "unary_calls_per_server_cpu_s": round(unary_calls / server, 1) if server > 0 else None,
            # All the CPU of the window per unary call, the streams' work included; with
            # --sites 0 --sessions 0 it is the unary calls' own cost.
            "server_cpu_ms_per_unary_call": round(1000 * server / per_call, 3),
            "database_cpu_ms_per_unary_call": round(1000 * database / per_call, 3) if self.database.conn else None,
        }


def run(url: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="balsam-load-") as home:
        proc, address, token = start_server(url, home)
        server = psutil.Process(proc.pid)
        try:
            print(f"seeding {args.jobs} jobs and a lease backlog of {args.lease_backlog} ...", file=sys.stderr)
            # Sessions an earlier run on this database left ACTIVE would expire in this
            # window (with their leases: 7,400 RUNNING jobs after a default run), charging
            # that work to these unary calls: closed first.
            stale = close_sessions(address, token)
            if stale:
                print(f"  closed {stale} sessions an earlier run left active", file=sys.stderr)
            world = setup(address, token, args.sites, args.jobs, args.lease_backlog)
            rss_seeded = server.memory_info().rss
            ctx = mp.get_context("spawn")
            out = ctx.Queue()
            go = ctx.Event()
            start = ctx.Value("d", 0.0)
            ready = [ctx.Event() for _ in range(3)]
            streams = ctx.Process(target=streams_process, args=(address, token, world, args.sites, args.sessions,
                                                                args.duration, args.burst, ready[0], go, start,
                                                                not args.no_slow_consumers, args.session_job_s,
                                                                out))
            streams.start()
            procs = max(1, min(2, args.clients))
            per = [args.clients // procs + (1 if i < args.clients % procs else 0) for i in range(procs)]
            clients = [ctx.Process(target=client_process, args=(address, token, world, n, args.duration, i, out,
                                                                ready[1 + i], go, start, tuple(args.only)))
                       for i, n in enumerate(per)]
            for c in clients:
                c.start()
            for event in ready[:1 + len(clients)]:
                event.wait(120)
            print(f"load for {args.duration:g} s: {args.clients} clients ({', '.join(args.only)}), {args.sites} site "
                  f"streams, {args.sessions} sessions, {0 if args.no_slow_consumers else 2} slow consumers ...",
                  file=sys.stderr)
            window = Window(server, url, address, token, world, [p.pid for p in (*clients, streams) if p.pid])
            spy = start_profiler(proc.pid, args.profile) if args.profile else None
            window.take()
            t0 = start.value = time.monotonic()
            go.set()
            rss: list[tuple[float, int]] = []
            results: list[dict[str, Any]] = []
            deadline = t0 + args.duration + 300
            # Results are drained while waiting: a child blocks at exit until its queued
            # result has been read.
            while len(results) < len(clients) + 1:
                rss.append((round(time.monotonic() - t0, 1), server.memory_info().rss))
                if len(window.at) == 1 and time.monotonic() >= t0 + args.duration:
                    window.take()
                    if spy is not None:
                        stop_profiler(spy)
                        spy = None
                try:
                    results.append(out.get(timeout=max(0.01, min(1.0, t0 + args.duration - time.monotonic()))
                                           if len(window.at) == 1 else 1.0))
                except Empty:
                    pass
                if proc.poll() is not None:
                    raise SystemExit("the server died under load")
                if time.monotonic() > deadline:
                    raise SystemExit("load processes did not finish within the duration + 300 s")
            for p in (*clients, streams):
                p.join(30)
            alive = proc.poll() is None
            leases = leases_left(address, token, world) if alive else {}
            if alive:  # the next run on this database starts without them
                close_sessions(address, token)
        finally:
            stop_process(proc)
    figures = report(world, results, rss, rss_seeded, args.duration, alive, args)
    unary_calls = round(figures["unary_calls_per_s"] * args.duration)
    figures.update(window.figures(unary_calls))
    figures.update(leases)
    figures["stale_sessions_closed_before"] = stale
    figures["machine_load_average_1m"] = round(os.getloadavg()[0], 2)
    return figures


def _count(address: str, token: str, f: job_pb2.JobFilter) -> int:
    md = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(address, options=OPTIONS) as channel:
        return job_service_pb2_grpc.JobServiceStub(channel).CountJobs(
            job_service_pb2.CountJobsRequest(filter=f), metadata=md, timeout=600).total


def leasable(address: str, token: str, world: dict[str, Any]) -> int:
    """Jobs at the work sites still in the runnable state (never leased)."""
    return _count(address, token, job_pb2.JobFilter(app_ids=[a for _, a in world["work"]],
                                                    states=[world["seed_state"]]))


def created(address: str, token: str, world: dict[str, Any]) -> int:
    """Jobs the clients created at the work sites so far."""
    return _count(address, token, job_pb2.JobFilter(app_ids=[a for _, a in world["work"]], tags={"load": "work"}))


def leases_left(address: str, token: str, world: dict[str, Any]) -> dict[str, int]:
    """Whether the sessions could have leased more: the seeded backlog still runnable (at
    zero the lease rate was bounded by the backlog, not by the server). And the seeded
    jobs the slow-consumer session leased (batches of 1,000 until flow control stopped
    the stream): stream work in the window that jobs_leased_per_s does not count."""
    apps = [a for _, a in world["work"]]
    return {"lease_backlog_left": _count(address, token, job_pb2.JobFilter(app_ids=apps, tags={"load": "backlog"},
                                                                           states=[world["seed_state"]])),
            "seed_jobs_leased_by_slow_consumer": _count(address, token, job_pb2.JobFilter(
                app_ids=[world["seed_app"]], states=[job_pb2.JOB_STATE_RUNNING]))}


def close_sessions(address: str, token: str) -> int:
    """Close every ACTIVE session of this user (DeleteSession: their jobs are released or
    timed out); how many. The streams end the window by cancelling their calls (a slow
    consumer cannot be closed otherwise), which leaves their sessions ACTIVE."""
    md = (("authorization", f"Bearer {token}"),)
    closed = 0
    with grpc.insecure_channel(address, options=OPTIONS) as channel:
        stub = session_service_pb2_grpc.SessionServiceStub(channel)
        while True:
            page = stub.ListSessions(session_service_pb2.ListSessionsRequest(
                filter=session_service_pb2.SessionFilter(states=[session_pb2.SESSION_STATE_ACTIVE]), page_size=500),
                metadata=md, timeout=60)
            before = closed
            for session in page.sessions:
                try:
                    stub.DeleteSession(session_service_pb2.DeleteSessionRequest(id=session.id), metadata=md,
                                       timeout=600)
                    closed += 1
                except grpc.RpcError as err:  # closed meanwhile (its stream's close): not ACTIVE any more
                    if code_name(err) not in ("NOT_FOUND", "FAILED_PRECONDITION"):
                        raise
            if closed == before:  # none left (or none that would close): done
                return closed


def report(world: dict[str, Any], results: list[dict[str, Any]], rss: list[tuple[float, int]], rss_seeded: int,
           elapsed: float, alive: bool, args: argparse.Namespace) -> dict[str, Any]:
    latencies: dict[str, list[float]] = {"create": [], "list": [], "update": []}
    ok: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    burst_result: dict[str, Any] = {}
    for r in results:
        for k, v in r.get("latencies", {}).items():
            latencies[k].extend(v)
        ok.update(r.get("ok", {}))
        errors.update(r.get("errors", {}))
        burst_result = r.get("burst") or burst_result
    mb = [(t, round(v / 2**20, 1)) for t, v in rss]
    settled = [v for t, v in mb if t >= min(10.0, elapsed / 3)] or [v for _, v in mb]
    unary = {k: v for k, v in ok.items() if k in latencies}
    figures = {
        "jobs_seeded": args.jobs,
        "seed_jobs_per_s": world["seed_jobs_per_s"],
        "duration_s": elapsed,
        "clients": args.clients, "site_streams": args.sites, "sessions": args.sessions,
        "session_job_s": args.session_job_s,
        "machine_load_average_1m_before": args.load_before,
        # Unary calls answered OK within the window (a call that ends after it is not counted).
        "unary_calls_per_s": round(sum(unary.values()) / elapsed, 1),
        "requests_per_s": {k: round(v / elapsed, 1) for k, v in sorted(unary.items())},
        "stream_messages_per_s": {k: round(v / elapsed, 1) for k, v in sorted(ok.items()) if k not in latencies},
        "list_p50_ms": pct(latencies["list"], 0.5), "list_p99_ms": pct(latencies["list"], 0.99),
        "create_p50_ms": pct(latencies["create"], 0.5), "create_p99_ms": pct(latencies["create"], 0.99),
        "update_p50_ms": pct(latencies["update"], 0.5), "update_p99_ms": pct(latencies["update"], 0.99),
        "server_rss_mb_after_seed": round(rss_seeded / 2**20, 1),
        "server_rss_mb_min_max_after_warmup": [min(settled), max(settled)] if settled else [],
        "server_rss_mb_over_time": mb,
        "errors_by_code": dict(errors),
        "burst": burst_result,
        "server_alive": alive,
    }
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", help="database URL (default: BALSAM_TEST_DATABASE_URL, else SQLite)")
    parser.add_argument("--jobs", type=int, help="jobs to seed (default 1,000,000 on PostgreSQL, 100,000 SQLite)")
    parser.add_argument("--clients", type=int, default=16, help="unary client threads (default 16)")
    parser.add_argument("--sites", type=int, default=50, help="site streams (default 50)")
    parser.add_argument("--sessions", type=int, default=100, help="launcher sessions (default 100)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--burst", type=int, default=2000, help="concurrent calls in the overload burst")
    parser.add_argument("--session-job-s", type=float, default=0.0,
                        help="seconds each leased job runs before its session reports it (default 0: the "
                             "sessions lease as fast as the server answers, which measures its lease rate, and "
                             "the unary calls get what is left; 1 s is 400 leases/s from 100 sessions)")
    parser.add_argument("--lease-backlog", type=int, default=20_000,
                        help="runnable jobs seeded at the work sites for the sessions to lease (default 20,000)")
    parser.add_argument("--only", nargs="+", choices=("create", "list", "update"), default=["create", "list", "update"],
                        help="unary kinds the clients send (default all three: 30%% create, 40%% list, 30%% update)")
    parser.add_argument("--no-slow-consumers", action="store_true",
                        help="without the two streams that never read (their replay of the event log costs server "
                             "CPU that --sites 0 --sessions 0 would otherwise charge to the unary calls)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="py-spy the server during the load window: collapsed stacks (--format raw) to this file")
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    args = parser.parse_args()
    args.load_before = round(os.getloadavg()[0], 2)
    url = args.database or os.environ.get("BALSAM_TEST_DATABASE_URL") or ""
    with contextlib.ExitStack() as cleanup:
        if not url:  # removed at the end (each run left its SQLite file in /tmp)
            url = f"sqlite:///{cleanup.enter_context(tempfile.TemporaryDirectory(prefix='balsam-load-db-'))}/load.db"
        if args.jobs is None:
            args.jobs = 1_000_000 if url.startswith("postgresql") else 100_000
        figures = run(url, args)
    figures["database"] = url.split(":", 1)[0].split("+", 1)[0]
    if args.json:
        print(json.dumps(figures))
        return 0
    for key, value in figures.items():
        if key == "server_rss_mb_over_time":
            value = " ".join(f"{t:g}s:{v}" for t, v in value[:: max(1, len(value) // 20)])
        print(f"{key:36s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
