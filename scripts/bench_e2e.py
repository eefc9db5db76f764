#!/usr/bin/env python3
"""The path a user runs, measured end to end: N no-op jobs through a real site.

Usage: scripts/bench_e2e.py [-n 1000] [--database URL] [--rounds K] [--latency-samples L]
                            [--lease-prefetch P] [--peers] [--json] [--profile DIR]

Everything is a real process, started the way a user starts it (tests/site/sitekit.py):
the server (`python -m balsam_grpc.server`, SQLite in a temp dir or `--database`), a site
made by `balsamctl site init --platform local` and started by `balsamctl site start`,
its local scheduler, and one pilot (a 1-node batch job) whose launcher presents the
machine's real CPUs; jobs are packed one per CPU (node_packing_count = the CPUs: the
default packing of 1 would run one job per node at a time), so the pilot has as many
slots as the machine has CPUs, like the peers' workers.

Per round:
- latency: with the pilot idle, one `/bin/true` job at a time; submit->RUNNING is the
  time between the job's creation event and its RUNNING event (server clock);
- throughput: N `/bin/true` jobs created and waited for as a user does with the SDK
  (`client.jobs.bulk_create`, then `client.jobs.wait`: one WatchEvents stream, the jobs'
  final data read when they end); jobs/s and makespan from before the create until that
  wait returns with all of them JOB_FINISHED; CPU per job of the server, the database
  (PostgreSQL: the backends serving this database, found through pg_stat_activity and
  read from /proc; SQLite runs inside the server), the launcher (its own CPU; the jobs'
  processes apart), its job watchdog and the site daemon; and, apart from that total,
  the SDK's in this process (`client_cpu_ms_per_job`); from the jobs' events, the makespan
  in three (until the first job starts on the pilot, the pilot's span, after the last
  ends) and how long the pilot sat with nothing to run in between (`starved_ms`); and
  how long after the server recorded each job's final state a final-state watch (the
  wait's filter, on a stream of its own) received it (`final_event_lag_p50_ms`, p90).
With `--rounds K` each figure is the median over the K rounds. RSS of each process at the
end. `--peers` (the `bench-peers` extra: parsl, dask[distributed]) runs the same N `/bin/true`
tasks on Parsl's HighThroughputExecutor and a Dask LocalCluster (2 workers each) in the
same run, and prints the ratios. On a shared machine prefer the CPU-per-job figures.
Figures, never assertions.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

import benchkit  # noqa: F401 - first: puts this checkout on sys.path

from balsam_grpc.v1 import (  # noqa: E402
    batch_job_pb2,
    batch_job_service_pb2,
    batch_job_service_pb2_grpc,
    event_service_pb2,
    job_pb2,
)
from balsam_grpc.core.states import FINAL_STATES  # noqa: E402
from balsam_grpc.sdk import Client, Job  # noqa: E402
from balsam_grpc.sdk.watch import EventStream  # noqa: E402
from benchkit import ROOT, DatabaseCpu, cpu_s, print_figures, rss_mb  # noqa: E402
from tests.site.sitekit import SiteKit  # noqa: E402
from tests.support.waiting import wait_until  # noqa: E402

J = job_pb2
NOOP_APPS = '''
from balsam_grpc.core.appdef import ApplicationDefinition


class Noop(ApplicationDefinition):
    """The no-op task every system in this benchmark runs."""
    command_template = "/bin/true"
'''
PEER_WORKERS = 2
SLOTS = psutil.cpu_count(logical=True) or 1  # what the launcher detects on the local platform
STARTED = time.monotonic()


# Shorter gaps with no job on the pilot are a job's own exit-to-next-start, not a wait for leases.
STARVED_MIN_MS = 2.0


def _seconds(when: Any) -> float:
    """An event time as seconds: SQLite hands back its text, PostgreSQL a datetime."""
    if isinstance(when, str):
        when = datetime.fromisoformat(when)
    return when.replace(tzinfo=when.tzinfo or UTC).timestamp()


def say(text: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f} s] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- the site

class RealPath:
    """Server, site, daemon and one idle pilot, as a user would have them."""

    def __init__(self, tmp: Path, database_url: str, lease_prefetch: int) -> None:
        self.kit = SiteKit(tmp, database_url)
        self.lease_prefetch = lease_prefetch
        self.db = DatabaseCpu(self.kit.database_url)
        self.launcher_pid = 0
        self.daemon_pid = 0
        self.last_ids: list[int] = []
        self.wall: list[float] = []  # time.time() before the last batch's create and after its wait
        self.sdk: Client | None = None

    def start(self) -> None:
        kit = self.kit
        kit.start_server()
        say(f"server up on {kit.address}")
        self.sdk = Client(kit.address, token=kit.token)
        # No elastic queue: one pilot, submitted below, that stays for the whole run.
        extra = ["--lease-prefetch", str(self.lease_prefetch)] if self.lease_prefetch >= 0 else []
        # The pilot's batch script starts the launcher with the environment's python, which
        # imports the checkout the environment was installed from (pip install -e), not
        # necessarily this one: an A/B of two checkouts sharing one environment would time
        # the same launcher twice. The preamble puts this checkout first.
        preamble = f"export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"
        kit.init_site(apps=NOOP_APPS, scheduler__poll_seconds=1, launcher__idle_timeout_s=3600,
                      launcher__extra_args=extra, launcher__preamble=preamble, elastic_queue__enabled=False)
        self.daemon_pid = kit.start_daemon()
        say(f"site {kit.site_id} made by `balsamctl site init --platform local`, its daemon started")
        kit.stub(batch_job_service_pb2_grpc.BatchJobServiceStub).CreateBatchJob(
            batch_job_service_pb2.CreateBatchJobRequest(batch_job=batch_job_pb2.BatchJob(
                site_id=kit.site_id, num_nodes=1, wall_time_min=120, queue="local", project="local")),
            metadata=kit.metadata, timeout=30)
        self.launcher_pid = wait_until(self._find_launcher, "the pilot's launcher to start", 60, interval=0.2)
        say(f"pilot submitted to the local scheduler, launcher pid {self.launcher_pid}")
        # Warm-up: the first lease, the first spawn, the app loaded in the launcher.
        self.run_batch(1, "warmup")

    def _find_launcher(self) -> int:
        site = str(self.kit.site_dir)
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = proc.info["cmdline"] or []
            if "balsam_grpc.launcher" in cmd and site in cmd:
                return int(proc.info["pid"])
        return 0

    def _watchdog(self) -> int:
        """The launcher's job watchdog (launcher/reaper.py): a process of its own, told of
        every job the launcher starts, so its CPU is the launcher's cost too."""
        try:
            for child in psutil.Process(self.launcher_pid).children():
                if "balsam_grpc.launcher.reaper" in child.cmdline():
                    return child.pid
        except psutil.Error:
            pass
        raise SystemExit(f"no job watchdog under the launcher (pid {self.launcher_pid}):\n{self.kit.debug()}")

    def stop(self) -> None:
        if self.sdk is not None:
            self.sdk.close()
        self.db.close()
        say("stopping")
        if self.launcher_pid:  # the pilot ends its session cleanly, then the daemon stops quickly
            try:
                psutil.Process(self.launcher_pid).terminate()
                psutil.Process(self.launcher_pid).wait(30)
            except (psutil.NoSuchProcess, psutil.TimeoutExpired):
                pass
        self.kit.stop()
        say("stopped")

    # -- jobs --------------------------------------------------------------------------
    def run_batch(self, n: int, tag: str) -> float:
        """Seconds from before the create until the SDK's wait returns with all n jobs
        final (the watcher streams their final events; the wait reads their final data)."""
        assert self.sdk is not None
        jobs = [Job.from_message(J.Job(app_name="Noop", site_id=self.kit.site_id, workdir=f"{tag}/{i}",
                                       tags={"bench": tag}, resources=J.JobResources(node_packing_count=SLOTS)))
                for i in range(n)]
        self.wall = [time.time()]
        t0 = time.monotonic()
        self.sdk.jobs.bulk_create(jobs)
        done, not_done = self.sdk.jobs.wait(jobs, timeout=600 + n)
        elapsed = time.monotonic() - t0
        self.wall.append(time.time())
        self.last_ids = [j.id for j in jobs]
        bad = sorted({j.state for j in done} - {"JOB_FINISHED"})
        if not_done or bad:
            raise SystemExit(f"jobs tagged {tag}: {len(not_done)} not final, states {bad}:\n{self.kit.debug()}")
        return elapsed

    def run_events(self, ids: list[int]) -> dict[str, float]:
        """From these jobs' events (read from the database after the phase):
        - session_transactions_per_job: transactions that moved them through RUNNING and
          out of it (the events of one transaction share its receive_time);
        - to_first_start_ms, pilot_span_s, last_end_to_wait_done_ms: the makespan in three:
          until the first job starts on the pilot, until the last one ends there, until the
          SDK's wait returns;
        - last_end_to_server_ms: of the last, until the server took the last job's
          final state (its receive_time: the launcher's report pace and its trip);
        - starved_ms / starved_spells: how long, in spells over STARVED_MIN_MS, no job ran
          or waited placed on the pilot between the first start and the last end: the
          slots waited for leases. The times are the launcher's (a transition's `time`);
          a follower counts from its placement, so a slot handed on directly is never idle."""
        from sqlalchemy import create_engine, text

        engine = create_engine(self.kit.database_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(text(
                    "SELECT receive_time, time, to_state = 'RUNNING' FROM events WHERE kind = 'job_state' "
                    "AND job_id >= :lo AND job_id <= :hi AND (to_state = 'RUNNING' OR from_state = 'RUNNING')"),
                    {"lo": min(ids), "hi": max(ids)}).all()
        finally:
            engine.dispose()
        running, idle_from, starved, spells = 0, None, 0.0, 0
        # At equal times an end goes before a start: a slot handed on is not counted busy twice.
        timeline = sorted((_seconds(when), bool(starts)) for _, when, starts in rows)
        for t, starts in timeline:
            if starts:
                if running == 0 and idle_from is not None and (t - idle_from) * 1000 > STARVED_MIN_MS:
                    starved += t - idle_from
                    spells += 1
                running += 1
            else:
                running -= 1
                if running == 0:
                    idle_from = t
        return {"session_transactions_per_job": len({r[0] for r in rows}) / len(ids),
                "to_first_start_ms": (timeline[0][0] - self.wall[0]) * 1000,
                "pilot_span_s": timeline[-1][0] - timeline[0][0], "starved_ms": starved * 1000,
                "starved_spells": spells, "last_end_to_wait_done_ms": (self.wall[1] - timeline[-1][0]) * 1000,
                "last_end_to_server_ms": (max(_seconds(r[0]) for r in rows) - timeline[-1][0]) * 1000}

    # -- phases ------------------------------------------------------------------------
    def latency(self, samples: int, round_: int) -> list[float]:
        out = []
        for i in range(samples):
            self.run_batch(1, f"lat-{round_}-{i}")
            out.append(self.kit.latency_to_running(self.last_ids[0]) * 1000)
            time.sleep(0.05)  # the launcher is idle again before the next one
        return out

    def delivery_lag(self) -> DeliveryLag:
        assert self.sdk is not None
        return DeliveryLag(self.sdk)

    def throughput(self, n: int, round_: int, profile: Path | None = None) -> dict[str, float]:
        procs = {"server": self.kit.server.pid, "launcher": self.launcher_pid, "watchdog": self._watchdog(),
                 "daemon": self.daemon_pid}
        spies = start_profilers(procs, profile, round_) if profile else []
        cpu0 = {k: cpu_s(p) for k, p in procs.items()}
        client0 = cpu_s(os.getpid())
        db0 = self.db.reading()
        lag = self.delivery_lag()
        makespan = self.run_batch(n, f"tp-{round_}")
        client1 = cpu_s(os.getpid())
        lags = lag.stop(self.last_ids)
        stop_profilers(spies)
        cpu1 = {k: cpu_s(p) for k, p in procs.items()}
        db_spent = self.db.spent(db0, self.db.reading())
        figures = {"jobs_per_s": n / makespan, "makespan_s": makespan}
        for k in procs:
            figures[f"{k}_cpu_ms_per_job"] = (cpu1[k] - cpu0[k]) / n * 1000
        figures["database_cpu_ms_per_job"] = db_spent / n * 1000
        figures["total_cpu_ms_per_job"] = sum(figures[f"{k}_cpu_ms_per_job"] for k in (*procs, "database"))
        # The SDK's side (this process: the create, the wait's watcher and reads), apart
        # from the total, as the peers' clients are not counted either.
        figures["client_cpu_ms_per_job"] = (client1 - client0) / n * 1000
        figures.update(self.run_events(self.last_ids))
        figures["final_event_lag_p50_ms"] = statistics.median(lags)
        figures["final_event_lag_p90_ms"] = pct(lags, 0.9)
        return figures

    def rss(self) -> dict[str, float]:
        out = {"server_rss_mb": rss_mb([self.kit.server.pid]), "launcher_rss_mb": rss_mb([self.launcher_pid]),
               "daemon_rss_mb": rss_mb([self.daemon_pid])}
        if self.db.conn is not None:
            out["database_backends_rss_mb"] = rss_mb(self.db.pids())
        return out


class DeliveryLag:
    """A second final-state watch beside the one the SDK's wait opens (the same filter as
    its JobWatcher), from before the create: how long after the server recorded each job's
    final state (the event's receive_time, the server's clock on this same machine) its
    event arrived here. The stream's own CPU is in the client's figure."""

    def __init__(self, sdk: Client) -> None:
        final = [job_pb2.JobState.Value(f"JOB_STATE_{s}") for s in sorted(FINAL_STATES)]
        self.stream = EventStream(sdk, event_service_pb2.EventFilter(
            kinds=[event_service_pb2.EVENT_KIND_JOB_STATE], to_states=final))
        self.arrived: dict[int, float] = {}  # job id -> seconds from receive_time to arrival
        self.thread = threading.Thread(target=self._read, name="bench-delivery-lag", daemon=True)
        self.thread.start()
        if not self.stream.wait_started(30):
            raise SystemExit("the delivery-lag watch did not start within 30 s")

    def _read(self) -> None:
        for event in self.stream:
            now = time.time()
            self.arrived[event.job_id] = now - event.receive_time.ToNanoseconds() / 1e9

    def stop(self, ids: list[int]) -> list[float]:
        """Milliseconds per job of `ids`, once each has arrived (its wait has returned)."""
        wait_until(lambda: all(i in self.arrived for i in ids), "the delivery-lag watch to see every job", 60,
                   interval=0.05)
        self.stream.close()
        self.thread.join(10)
        return [self.arrived[i] * 1000 for i in ids]


# ---------------------------------------------------------------------------- profiles

def start_profilers(procs: dict[str, int], folder: Path, round_: int) -> list[subprocess.Popen[bytes]]:
    """py-spy (sampling, outside the process) on each process for the throughput phase:
    collapsed stacks in `folder`/<process>-<round>.txt, for flame graphs or a sort."""
    spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if spy is None:
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    folder.mkdir(parents=True, exist_ok=True)
    spies = [subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "500", "--format", "raw", "--nonblocking", "--gil",
                               "-o", str(folder / f"{name}-{round_}.txt")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name, pid in procs.items()]
    time.sleep(1.0)  # attached before the jobs are created
    return spies


def stop_profilers(spies: list[subprocess.Popen[bytes]]) -> None:
    for spy in spies:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    for spy in spies:
        spy.wait(30)


# ---------------------------------------------------------------------------- peers

def _run_true() -> int:
    import subprocess  # inside: Parsl ships the function by value, without this module's globals

    return subprocess.run(["/bin/true"], check=False).returncode


def bench_parsl(n: int, samples: int, run_dir: Path) -> dict[str, float]:
    import parsl
    from parsl.app.app import python_app
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import LocalProvider

    # HTEX starts its interchange and workers as scripts from the environment's bin folder.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    config = Config(executors=[HighThroughputExecutor(
        label="htex", max_workers_per_node=PEER_WORKERS, provider=LocalProvider(init_blocks=1, max_blocks=1))],
        run_dir=str(run_dir), usage_tracking=0)
    dfk = parsl.load(config)
    try:
        task = python_app(_run_true)
        task().result()  # warm-up: the workers are up
        lat = []
        for _ in range(samples):
            t0 = time.perf_counter()
            task().result()
            lat.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        futures = [task() for _ in range(n)]
        failed = sum(1 for f in futures if f.result() != 0)
        makespan = time.perf_counter() - t0
    finally:
        dfk.cleanup()
        parsl.clear()
    return {"jobs_per_s": n / makespan, "makespan_s": makespan, "submit_to_result_p50_ms": statistics.median(lat),
            "failed": failed}


def bench_dask(n: int, samples: int) -> dict[str, float]:
    from dask.distributed import Client, LocalCluster

    with LocalCluster(n_workers=PEER_WORKERS, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.submit(_run_true, pure=False).result()  # warm-up
        lat = []
        for _ in range(samples):
            t0 = time.perf_counter()
            client.submit(_run_true, pure=False).result()
            lat.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        results = client.gather(client.map(lambda _i: _run_true(), range(n), pure=False))
        makespan = time.perf_counter() - t0
    return {"jobs_per_s": n / makespan, "makespan_s": makespan, "submit_to_result_p50_ms": statistics.median(lat),
            "failed": sum(1 for r in results if r != 0)}


# ---------------------------------------------------------------------------- the run

def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def median_of(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(r[key] for r in rounds), 3) for key in rounds[0]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="balsam-bench-e2e-") as tmp:
        path = RealPath(Path(tmp), args.database, args.lease_prefetch)
        try:
            path.start()
            rounds = []
            for r in range(args.rounds):
                say(f"round {r + 1}/{args.rounds}: latency ({args.latency_samples} jobs one at a time) ...")
                lat = path.latency(args.latency_samples, r)
                say(f"round {r + 1}/{args.rounds}: {args.n} jobs at once ...")
                figures = path.throughput(args.n, r, args.profile)
                figures["submit_to_running_p50_ms"] = statistics.median(lat)
                figures["submit_to_running_p99_ms"] = pct(lat, 0.99)
                rounds.append(figures)
            out: dict[str, Any] = {
                "database": path.kit.database_url.split(":", 1)[0].split("+", 1)[0], "jobs": args.n,
                "rounds": args.rounds, "latency_samples": args.latency_samples,
                "launcher_slots": SLOTS, "lease_prefetch": args.lease_prefetch, "machine_load_average_1m": round(os.getloadavg()[0], 2),
                **median_of(rounds), **path.rss()}
        finally:
            path.stop()
        if args.peers:
            peers: dict[str, dict[str, float]] = {"parsl_htex": [], "dask_local": []}  # type: ignore[dict-item]
            # Their processes' temporary folders (multiprocessing's pymp-*, Dask's scratch
            # space) go with this run's: they left them in the machine's /tmp.
            os.environ["TMPDIR"] = tempfile.tempdir = tmp
            for r in range(args.rounds):
                say(f"round {r + 1}/{args.rounds}: peers (Parsl HTEX, Dask LocalCluster) ...")
                peers["parsl_htex"].append(bench_parsl(args.n, args.latency_samples, Path(tmp) / f"parsl-{r}"))
                peers["dask_local"].append(bench_dask(args.n, args.latency_samples))
            for name, results in peers.items():
                med = median_of(results)  # type: ignore[arg-type]
                out[name] = med
                out[f"ratio_to_{name}"] = round(out["jobs_per_s"] / med["jobs_per_s"], 3)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="jobs in the throughput phase (default 1000)")
    parser.add_argument("--database", default="", help="database URL (default: SQLite in a temp dir)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat; each figure is the median over rounds")
    parser.add_argument("--latency-samples", type=int, default=30, help="jobs one at a time per round")
    parser.add_argument("--lease-prefetch", type=int, default=-1,
                        help="the pilot's launcher holds this many jobs ahead of free slots (0: off; default: the "
                             "launcher's own default)")
    parser.add_argument("--peers", action="store_true", help="also run Parsl HTEX and Dask LocalCluster")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--profile", type=Path, default=None,
                        help="py-spy the server, launcher and daemon during each throughput phase; collapsed stacks "
                             "in this folder (the sampling costs their CPU: not for the figures)")
    args = parser.parse_args()
    args.rounds = max(1, args.rounds)
    figures = run(args)
    print_figures(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
