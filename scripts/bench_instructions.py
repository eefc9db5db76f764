#!/usr/bin/env python3
"""Instructions the server process executes per unary call, counted by callgrind.

Usage: scripts/bench_instructions.py --database URL [--calls N] [--warm W] [--concurrency K]
                                     [--phases health,create,create_rid,update,get,list,report,bulk]
                                     [--json]

Starts `python -m balsam_grpc.server` from this checkout under `valgrind
--tool=callgrind` with instrumentation off, warms every phase up, then for each phase
switches instrumentation on (callgrind_control), makes N sequential calls, dumps and
switches it off again, and prints thousands of instructions (kIr) per call: every
thread of the server (gRPC core, the event loop, database threads) is counted, the
kernel is not. CPU time on a shared 2-core machine moves by 10-30 % between runs of the
same code; instruction counts by about 5 % (background work that scales with wall time,
such as a token cache refresh every 5 s, is what is left of the noise). Compare two
checkouts with alternated runs (PYTHONPATH=<checkout> scripts/bench_instructions.py ...
from each) and medians. Phases: a health check (public, no token), CreateJob without and
with a request_id, UpdateJob of tags, GetJob, ListJobs of 100, and, not run unless named:
- `report`: a launcher session's turn as bench_load's sessions take it (4 jobs RUN_DONE
  with the credit they freed, answered by an ack and 4 new leases) at a site whose
  daemon stream, a second session and a final-state watch are attached: per report,
  with what the fanout, the wake-ups and the backlog cost the other streams (its setup
  creates 20,000 jobs: `--phases report --calls 200 --warm 50`; alone, as its streams
  would stay attached while other phases are counted);
- `bulk` (`--phases bulk --calls 3 --warm 2`): BatchCreateJobs of 10,000 jobs as
  bench_api makes them, per call (divide by 10,000 for a job).
Figures, never assertions. Under callgrind the server runs ~50 times slower, so work
that is coalesced in time (a site's backlog once a second) counts less often than at
full speed.

`--concurrency K` makes each phase's calls from K client threads at once. Sequential
calls pay the event loop's whole round (a wake-up, a poll) for each call; under load the
loop serves several per round, so the two regimes cost differently per call.

With --pg-callgrind DIR the database's backends are counted too (`pg_kir_per_call`): run
the PostgreSQL cluster holding the database under `valgrind --tool=callgrind
--callgrind-out-file=DIR/pg.%p` (as its own user; postgres forks its backends without
exec, so each is counted on its own, and written when it exits). Each phase runs on
backends of its own (see Backends). `pg_analyze_kir_per_call` is the part of it spent in
ANALYZE (analyze_rel: the server's background refresh of planner statistics after bulk creates,
store.jobs.refresh_planner_stats: it runs at every doubling of the table, so a phase
may or may not hold one), and `pg_no_analyze_kir_per_call` the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

import benchkit  # noqa: F401 - first: puts this checkout on sys.path
from benchkit import print_figures, stop_process  # noqa: E402

from balsam_grpc.server.store.db import IDLE_PING_SECONDS  # noqa: E402

from balsam_grpc.core.settings import Profile  # noqa: E402
from balsam_grpc.v1 import (  # noqa: E402
    app_pb2,
    app_service_pb2,
    app_service_pb2_grpc,
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

PHASES = ("health", "create", "create_rid", "update", "get", "list", "report", "bulk")
# Jobs per BatchCreateJobs of the bulk phase (bench_api's bulk create).
BULK = 10_000
# Jobs a report of the report phase ends (and leases anew): bench_load's sessions' credit.
REPORT_JOBS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def control(pid: int, *args: str) -> None:
    done = subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"callgrind_control {' '.join(args)} failed: {done.stderr.strip() or done.stdout.strip()}")


def total_instructions(path: Path) -> int:
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise SystemExit(f"no totals in {path}")


def wait_for_profile(proc: subprocess.Popen[bytes], home: Path, port: int, log: Path) -> str:
    deadline = time.time() + 600  # the server starts 20-50x slower under callgrind
    profile_file = home / "profile.json"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log}")
        if profile_file.exists():
            try:
                profile = Profile.load(profile_file, apply_env=False)
            except ValueError:  # being written
                profile = None
            if profile is not None and profile.server.endswith(f":{port}"):
                return profile.token
        time.sleep(0.3)
    raise SystemExit("server did not start within 600 s")


def calls(channel: grpc.Channel, md: tuple[tuple[str, str], ...]) -> dict[str, Callable[[], None]]:
    """One call of each phase (a site and an app of its own are made first)."""
    health = health_pb2_grpc.HealthStub(channel)
    jobs = job_service_pb2_grpc.JobServiceStub(channel)
    site = site_service_pb2_grpc.SiteServiceStub(channel).CreateSite(site_service_pb2.CreateSiteRequest(
        site=site_pb2.Site(name=f"instructions-{time.time_ns()}")), metadata=md, timeout=300).site
    app = app_service_pb2_grpc.AppServiceStub(channel).CreateApp(app_service_pb2.CreateAppRequest(app=app_pb2.App(
        site_id=site.id, name="sim", command_template="/bin/true {{ i }}",
        parameters=[app_pb2.AppParameter(name="i", type=app_pb2.PARAMETER_TYPE_INT)])), metadata=md, timeout=300).app
    made: list[int] = []
    seq = [0]

    def create(request_id: bool = False) -> None:
        seq[0] += 1
        job = job_pb2.Job(app_id=app.id, workdir=f"i/{seq[0]}", parameters={"i": "1"}, tags={"bench": "single"})
        made.append(jobs.CreateJob(job_service_pb2.CreateJobRequest(
            job=job, request_id=uuid.uuid4().hex if request_id else ""), metadata=md, timeout=300).job.id)

    def update() -> None:
        seq[0] += 1
        jobs.UpdateJob(job_service_pb2.UpdateJobRequest(
            job=job_pb2.Job(id=made[seq[0] % len(made)], tags={"k": str(seq[0])}),
            update_mask=field_mask_pb2.FieldMask(paths=["tags"])), metadata=md, timeout=300)

    def get() -> None:
        seq[0] += 1
        jobs.GetJob(job_service_pb2.GetJobRequest(id=made[seq[0] % len(made)]), metadata=md, timeout=300)

    def list_() -> None:
        jobs.ListJobs(job_service_pb2.ListJobsRequest(filter=job_pb2.JobFilter(site_ids=[site.id]), page_size=100),
                      metadata=md, timeout=300)

    def bulk() -> None:
        seq[0] += 1
        jobs.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[
            job_pb2.Job(app_id=app.id, workdir=f"b/{seq[0]}/{i}", parameters={"i": str(i)},
                        tags={"bench": "bulk", "shard": str(i % 8)}) for i in range(BULK)]), metadata=md, timeout=600)

    reporting: list[ReportingSite] = []

    def report() -> None:
        if not reporting:
            reporting.append(ReportingSite(channel, md))
        reporting[0].report()

    create()  # update and get need a job
    return {"health": lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=300), "create": create,
            "create_rid": lambda: create(True), "update": update, "get": get, "list": list_, "report": report,
            "bulk": bulk}


class ReportingSite:
    """The report phase's world: a site with a backlog of runnable jobs, watched as in
    bench_load and real use: its site stream (a daemon that answers work), a second
    launcher session with no credit (woken by the site's events like any), and a
    final-state WatchEvents (an SDK's wait). One call is one turn of a busy launcher: a
    report of REPORT_JOBS jobs RUN_DONE with the credit they freed, answered by its ack
    and the leases of the next REPORT_JOBS (bench_load's sessions); every stream's share
    of it (the fanout, the wake-ups, the site's backlog and the watch) is counted."""

    Req = session_service_pb2.SessionServiceConnectRequest
    BACKLOG = 20_000

    def __init__(self, channel: grpc.Channel, md: tuple[tuple[str, str], ...]) -> None:
        self.md = md
        site = site_service_pb2_grpc.SiteServiceStub(channel).CreateSite(site_service_pb2.CreateSiteRequest(
            site=site_pb2.Site(name=f"instructions-report-{time.time_ns()}")), metadata=md, timeout=300).site
        app = app_service_pb2_grpc.AppServiceStub(channel).CreateApp(app_service_pb2.CreateAppRequest(
            app=app_pb2.App(site_id=site.id, name="sim", command_template="/bin/true")), metadata=md, timeout=300).app
        jobs = job_service_pb2_grpc.JobServiceStub(channel)
        for start in range(0, self.BACKLOG, BULK):
            jobs.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[
                job_pb2.Job(app_id=app.id, workdir=f"r/{start + i}") for i in range(BULK)]), metadata=md, timeout=600)
        sessions = session_service_pb2_grpc.SessionServiceStub(channel)
        self.credit = session_service_pb2.SessionCredit(max_jobs=REPORT_JOBS, free_nodes=float(REPORT_JOBS))
        self.out: queue.Queue[Any] = queue.Queue()
        self.responses = sessions.Connect(iter(self.out.get, None), metadata=md)
        self._open(self.out, site.id)
        assert next(self.responses).WhichOneof("message") == "opened"
        self.out.put(self.Req(credit=self.credit))
        self.held = self._leases()
        self.seq = 0
        # The bystanders, each drained by a thread of its own.
        idle: queue.Queue[Any] = queue.Queue()
        self._open(idle, site.id)
        self._drain(sessions.Connect(iter(idle.get, None), metadata=md))
        self.site_out: queue.Queue[Any] = queue.Queue()
        self.site_out.put(site_service_pb2.SiteServiceConnectRequest(hello=site_service_pb2.SiteHello(
            site_id=site.id, hostname="instructions", daemon_version="instructions", capabilities=["batch_jobs"],
            max_in_flight=4)))
        self._drain(site_service_pb2_grpc.SiteServiceStub(channel).Connect(iter(self.site_out.get, None),
                                                                           metadata=md), self._answer)
        final = [job_pb2.JOB_STATE_JOB_FINISHED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_KILLED]
        self._drain(event_service_pb2_grpc.EventServiceStub(channel).WatchEvents(event_service_pb2.WatchEventsRequest(
            filter=event_service_pb2.EventFilter(kinds=[event_service_pb2.EVENT_KIND_JOB_STATE], to_states=final)),
            metadata=md))
        self.keep = (idle,)

    def _open(self, out: queue.Queue[Any], site_id: int) -> None:
        out.put(self.Req(open=session_service_pb2.SessionOpen(
            site_id=site_id, hostname="instructions", nodes=[session_pb2.NodeInfo(hostname="instructions", cpus=64)])))

    @staticmethod
    def _drain(stream: Any, each: Callable[[Any], None] | None = None) -> None:
        def read() -> None:
            with contextlib.suppress(grpc.RpcError):
                for msg in stream:
                    if each is not None:
                        each(msg)

        threading.Thread(target=read, daemon=True).start()

    def _answer(self, msg: Any) -> None:
        """The site daemon's part: each work item acknowledged, done, and its credit renewed."""
        if msg.WhichOneof("message") != "work":
            return
        Req = site_service_pb2.SiteServiceConnectRequest
        self.site_out.put(Req(ack=site_service_pb2.WorkAck(work_ids=[msg.work.id])))
        self.site_out.put(Req(result=site_service_pb2.WorkResult(work_id=msg.work.id)))
        self.site_out.put(Req(credit=site_service_pb2.SiteCredit(items=1)))

    def _leases(self) -> list[Any]:
        while True:
            msg = next(self.responses)
            if msg.WhichOneof("message") == "leases":
                return list(msg.leases.jobs)

    def report(self) -> None:
        transitions = []
        for leased in self.held:
            self.seq += 1
            transitions.append(session_service_pb2.JobTransition(
                seq=self.seq, job_id=leased.job.id, lease_generation=leased.lease_generation,
                state=job_pb2.JOB_STATE_RUN_DONE, return_code=0))
        self.out.put(self.Req(report=session_service_pb2.TransitionReport(transitions=transitions, credit=self.credit)))
        self.held = self._leases()  # after the ack, which comes first


class Backends:
    """The database's backends in a cluster run under callgrind (--pg-callgrind). A
    forked backend cannot be switched on and off (vgdb's pipes are not remade in it), so
    each phase runs on backends of its own: the ones before it are ended (the server's
    pool replaces a connection that idled longer than IDLE_PING_SECONDS on its next
    checkout, and its listener reconnects), and the phase's are ended after it, when
    callgrind writes their counts. A backend's own work is what PostgresMain spends
    (its setup after the fork, a few million instructions, counted with the phase)."""

    def __init__(self, database: str, out: Path) -> None:
        import psycopg
        from sqlalchemy.engine import make_url

        u = make_url(database)
        self.conn = psycopg.connect(host=u.host or "127.0.0.1", port=u.port or 5432, user=u.username,
                                    password=u.password, dbname=u.database, autocommit=True)
        self.out = out

    def _end_all(self) -> list[int]:
        pids = [int(r[0]) for r in self.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend'").fetchall()]
        for pid in pids:
            self.conn.execute("SELECT pg_terminate_backend(%s, 60000)", (pid,))
        return pids

    def start(self) -> None:
        self._end_all()
        time.sleep(IDLE_PING_SECONDS + 1)

    def stop(self) -> tuple[int, int]:
        """(instructions, of which in ANALYZE) of the phase's backends."""
        total = analyze = 0
        for pid in self._end_all():
            path = self.out / f"pg.{pid}"
            deadline = time.time() + 300
            while True:
                try:
                    total_instructions(path)  # written (at the backend's exit)
                    break
                except (OSError, SystemExit):
                    if time.time() > deadline:
                        raise SystemExit(f"no callgrind totals of backend {pid} in {path}: is the cluster run "
                                         f"under callgrind with --callgrind-out-file={self.out}/pg.%p?") from None
                    time.sleep(0.5)
            # Its own work: a forked backend's totals start from the postmaster's at the fork.
            total += inclusive(path, "PostgresMain")
            analyze += inclusive(path, "analyze_rel")
        return total, analyze


def inclusive(path: Path, function: str) -> int:
    """Inclusive instructions of `function` in a callgrind dump (0 if it never ran)."""
    done = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", str(path)],
                          capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.rstrip().endswith(f":{function}") or f":{function} " in line:
            return int(line.split()[0].replace(",", ""))
    return 0


def make_calls(call: Callable[[], None], n: int, concurrency: int) -> None:
    """`n` calls of `call`, from `concurrency` threads at once."""
    if concurrency <= 1:
        for _ in range(n):
            call()
        return
    with ThreadPoolExecutor(concurrency) as pool:
        for done in [pool.submit(lambda k: [call() for _ in range(k)], n // concurrency + (i < n % concurrency))
                     for i in range(concurrency)]:
            done.result()


def measure(database: str, phases: list[str], n: int, warm: int, out: Path,
            pg_out: Path | None = None, concurrency: int = 1) -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix="balsam-instructions-"))
    port = free_port()
    env = dict(os.environ, BALSAM_HOME=str(home), BALSAM_LOG_LEVEL="WARNING")
    log = out / "valgrind.log"
    proc = subprocess.Popen(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                             f"--callgrind-out-file={out}/callgrind.out", sys.executable, "-m", "balsam_grpc.server",
                             "--address", f"127.0.0.1:{port}", "--database", database],
                            env=env, stderr=log.open("w"))
    try:
        token = wait_for_profile(proc, home, port, log)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        call = calls(channel, (("authorization", f"Bearer {token}"),))
        for name in phases:
            make_calls(call[name], warm, concurrency)
        figures: dict[str, float] = {}
        backends = Backends(database, pg_out) if pg_out is not None else None
        for name in phases:
            if backends is not None:
                backends.start()
            control(proc.pid, "-z")
            control(proc.pid, "-i", "on")
            make_calls(call[name], n, concurrency)
            control(proc.pid, "-d", name)
            control(proc.pid, "-i", "off")
            dump = max(out.glob("callgrind.out.*"), key=lambda f: f.stat().st_mtime)
            figures[f"{name}_kir_per_call"] = round(total_instructions(dump) / n / 1000, 1)
            dump.rename(out / f"{name}.callgrind")  # callgrind_annotate reads it
            print(f"  {name}: {figures[f'{name}_kir_per_call']} kIr per call", file=sys.stderr)
            if backends is not None:
                pg, analyze = backends.stop()
                figures[f"{name}_pg_kir_per_call"] = round(pg / n / 1000, 1)
                figures[f"{name}_pg_analyze_kir_per_call"] = round(analyze / n / 1000, 1)
                figures[f"{name}_pg_no_analyze_kir_per_call"] = round((pg - analyze) / n / 1000, 1)
                print(f"  {name}: database {figures[f'{name}_pg_no_analyze_kir_per_call']} kIr per call "
                      f"besides ANALYZE's {figures[f'{name}_pg_analyze_kir_per_call']}", file=sys.stderr)
        channel.close()
        return figures
    finally:
        stop_process(proc, 120)
        shutil.rmtree(home, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", required=True, help="database URL (the server migrates it)")
    parser.add_argument("--calls", type=int, default=200, help="calls per phase (default 200)")
    parser.add_argument("--warm", type=int, default=100, help="warm-up calls per phase (default 100)")
    parser.add_argument("--concurrency", type=int, default=1, help="client threads calling at once (default 1)")
    parser.add_argument("--phases", default=",".join(PHASES[:-2]),
                        help=f"comma-separated, of {', '.join(PHASES)} (default: all but report and bulk)")
    parser.add_argument("--out", type=Path, help="keep the callgrind dumps here (default: a temporary directory)")
    parser.add_argument("--pg-callgrind", type=Path, default=None,
                        help="the dump folder of a PostgreSQL cluster run under callgrind (see the module's help): "
                             "count the database's backends too")
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("needs valgrind (apt-get install valgrind)")
    phases = [p for p in args.phases.split(",") if p]
    unknown = set(phases) - set(PHASES)
    if unknown:
        raise SystemExit(f"unknown phases: {', '.join(sorted(unknown))}")
    if "report" in phases and len(phases) > 1:
        raise SystemExit("--phases report runs alone: its streams would stay attached while the others are counted")
    with tempfile.TemporaryDirectory(prefix="balsam-callgrind-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        figures = measure(args.database, phases, args.calls, args.warm, out, args.pg_callgrind, args.concurrency)
    print_figures(figures, args.json, width=28, indent="  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
