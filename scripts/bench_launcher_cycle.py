#!/usr/bin/env python3
"""The launcher's own per-job cost, without a server: its master loop, runner, spawner
threads and watchdog running N real `/bin/true` jobs in this process.

Usage: scripts/bench_launcher_cycle.py [-n 2000] [--rounds 3] [--cpus C] [--prefetch P] [--json]

The session is a stand-in (no gRPC): every 20 ms (the launcher's report pace) it leases
what the master's credit asks for, jobs held ahead as the server leases them on
bench_e2e's path, and it takes the reports, checking that each job reports RUNNING once
and one final state once. Everything else is the launcher's: Master.run with its SIGCHLD
wake-ups, the node manager, followers, LocalDispatcher/ProcessRunner, the job watchdog.
Jobs are packed one per CPU on one node of the machine's CPUs (or --cpus), as bench_e2e's.

Per round: jobs/s, this process's CPU per job (the stand-in session's share included: a
report is an append, a lease a protobuf built per 20 ms), the jobs' own CPU per job, and
per slot the time from one job's start to the next (wall / jobs x slots). Under
`valgrind --tool=callgrind` (the jobs run natively: --trace-children=no) it gives the
launcher's instructions per job for an A/B that a shared machine's load does not move.
Figures, never assertions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import benchkit  # noqa: F401 - first: puts this checkout on sys.path
from benchkit import print_figures  # noqa: E402

from balsam_grpc.launcher.config import LauncherConfig  # noqa: E402
from balsam_grpc.launcher.dispatch import LocalDispatcher  # noqa: E402
from balsam_grpc.launcher.master import Master  # noqa: E402
from balsam_grpc.launcher.nodes import NodeSpec  # noqa: E402
from balsam_grpc.launcher.outbox import Outbox  # noqa: E402
from balsam_grpc.launcher.process_spec import RunContext  # noqa: E402
from balsam_grpc.v1 import app_pb2, job_pb2, session_service_pb2  # noqa: E402

S = job_pb2
LEASE_EVERY_S = 0.02


class _Channel:
    def __getattr__(self, _name):
        return lambda *args, **kwargs: None


class StandInSession:
    """What Master needs of SessionClient, leasing `n` held-ahead jobs as the credit asks."""

    def __init__(self, master: Master, n: int, tag: str, slots: int) -> None:
        self.master = master
        app = app_pb2.App(id=1, name="Noop", command_template="/bin/true")
        res = S.JobResources(num_nodes=1, ranks_per_node=1, threads_per_rank=1, threads_per_core=1,
                             node_packing_count=slots)
        self.todo = [session_service_pb2.LeasedJob(
            job=S.Job(id=i, state=S.JOB_STATE_PREPROCESSED, workdir=f"{tag}/{i}", resources=res, app_id=1),
            app=app, lease_generation=1) for i in range(1, n + 1)]
        self.todo.reverse()
        self.n = n
        self.connected = asyncio.Event()
        self.outbox = Outbox()
        self.session_id = "stand-in"
        self.states: dict[int, list[int]] = {}
        self.final = 0
        self._closed = asyncio.Event()

    # -- what Master calls ----------------------------------------------------------------
    def report(self, tr: session_service_pb2.JobTransition) -> int:
        self.states.setdefault(tr.job_id, []).append(tr.state)
        if tr.state != S.JOB_STATE_RUNNING:
            self.final += 1
            if self.final == self.n:
                self.master.request_stop("done")
        return 0

    def wake(self) -> None:
        pass

    def close(self, reason: str = "done") -> None:
        self._closed.set()

    async def run(self) -> None:
        self.connected.set()
        while not self._closed.is_set():
            self._lease()
            try:
                await asyncio.wait_for(self._closed.wait(), LEASE_EVERY_S)
            except TimeoutError:
                pass

    def _lease(self) -> None:
        if not self.todo:
            return
        credit = self.master._credit()
        k = min(len(self.todo), credit.max_jobs + credit.reserve_jobs)
        if k > 0:
            jobs = [self.todo.pop() for _ in range(k)]
            self.master._on_leases(session_service_pb2.JobLeases(jobs=jobs))

    def check(self) -> None:
        bad = {j: s for j, s in self.states.items() if s != [S.JOB_STATE_RUNNING, S.JOB_STATE_RUN_DONE]}
        if len(self.states) != self.n or bad:
            raise SystemExit(f"reports: {len(self.states)} jobs of {self.n}; wrong: {dict(list(bad.items())[:5])}")


def one_round(n: int, tmp: Path, tag: str, cpus: int, prefetch: int) -> dict[str, float]:
    cfg = LauncherConfig(mode="mpi", site_dir=tmp, site_id=1, batch_job_id=1, lease_prefetch=prefetch,
                         progress_interval_s=3600)
    ctx = RunContext(data_dir=tmp / "data", apps_dir=tmp / "apps")
    (tmp / "data").mkdir(exist_ok=True)
    master = Master(cfg, [NodeSpec(hostname="localhost", cpus=cpus)], LocalDispatcher(local_node=0), _Channel(), (),
                    ctx)
    session = StandInSession(master, n, tag, cpus)
    master.client = session  # type: ignore[assignment]
    # Warm: the first job's run time seeds the prefetch (auto) and the follow decision.
    master.mean_run_s = 0.0005
    if prefetch < 0:
        from balsam_grpc.launcher.master import auto_prefetch

        master.prefetch = auto_prefetch(master.slots, master.mean_run_s)
    ru0, cpu0, t0 = os.times(), time.process_time(), time.perf_counter()
    rc = asyncio.run(master.run())
    wall, cpu, ru1 = time.perf_counter() - t0, time.process_time() - cpu0, os.times()
    if rc:
        raise SystemExit(f"the master ended with {rc}")
    session.check()
    children = (ru1.children_user + ru1.children_system) - (ru0.children_user + ru0.children_system)
    return {"jobs_per_s": n / wall, "launcher_cpu_ms_per_job": cpu / n * 1000,
            "jobs_cpu_ms_per_job": children / n * 1000, "slot_cycle_ms": wall / n * master.slots * 1000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--prefetch", type=int, default=-1, help="jobs held ahead (default: the launcher's own)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # warnings and progress off
    rounds = []
    with tempfile.TemporaryDirectory(prefix="balsam-bench-cycle-") as tmp:
        for r in range(args.rounds):
            rounds.append(one_round(args.n, Path(tmp), f"r{r}", args.cpus, args.prefetch))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in rounds[-1].items()), file=sys.stderr)
    out = {k: round(statistics.median(r[k] for r in rounds), 3) for k in rounds[0]}
    out.update(jobs=args.n, rounds=args.rounds, slots=args.cpus, load_average_1m=round(os.getloadavg()[0], 2))
    print_figures(out, args.json, width=28)
    return 0


if __name__ == "__main__":
    sys.exit(main())
