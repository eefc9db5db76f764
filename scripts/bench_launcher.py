#!/usr/bin/env python3
"""Launcher figures against a real server process and one local launcher process.

Usage: scripts/bench_launcher.py [-n N] [--json] [--database URL] [--lease-timeout S]
                                 [--fake-cpus C]

- submit-to-RUNNING latency p50/p99: jobs created one at a time while the launcher waits
  idle; measured between the job's creation event and its RUNNING event (server clock);
- throughput: N (default 10,000) `/bin/true` jobs created in bulk, from the first creation
  to the last JOB_FINISHED (makespan and jobs/s); the launcher presents one node with the
  machine's real CPUs and jobs are packed one per CPU (node_packing_count = the CPUs; the
  default packing of 1 would run one job per node at a time).
  `--fake-cpus C` instead presents C made-up CPUs and packs C jobs per node: a figure of
  the launcher's own overhead, not of what a user's pilot achieves on this machine (the
  output labels it `fake_cpus`). For the whole user path see scripts/bench_e2e.py;
- dead-launcher recovery: SIGKILL the launcher while up to 20 jobs run (one per slot), start another at once,
  time until all 20 are RUNNING under the new session (the server's lease timeout
  dominates; --lease-timeout, default the server's 20 s).
Figures, never assertions; with --json one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import psutil

import benchkit  # noqa: F401 - first: puts this checkout on sys.path

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

S = job_pb2
MAX_RECOVERY_JOBS = 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(url: str, home: str, lease_timeout: int) -> tuple[subprocess.Popen, Profile]:
    port = free_port()
    env = dict(os.environ, BALSAM_HOME=home, BALSAM_LOG_LEVEL="WARNING")
    proc = subprocess.Popen([sys.executable, "-m", "balsam_grpc.server", "--address", f"127.0.0.1:{port}",
                             "--database", url, "--lease-timeout", str(lease_timeout)], env=env)
    deadline = time.time() + 60
    profile_file = Path(home) / "profile.json"
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        if profile_file.exists():
            profile = Profile.load(profile_file, apply_env=False)
            if profile.server.endswith(f":{port}"):
                return proc, profile
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("server did not start within 60 s")


class Bench:
    def __init__(self, profile: Profile, site_dir: Path, home: str, fake_cpus: int) -> None:
        # 0: the launcher detects the real CPUs and jobs keep the default packing.
        self.fake_cpus = fake_cpus
        self.profile = profile
        self.md = (("authorization", f"Bearer {profile.token}"),)
        self.channel = grpc.insecure_channel(profile.server, options=[("grpc.max_receive_message_length", 256 << 20)])
        self.jobs = job_service_pb2_grpc.JobServiceStub(self.channel)
        self.events = event_service_pb2_grpc.EventServiceStub(self.channel)
        sites = site_service_pb2_grpc.SiteServiceStub(self.channel)
        apps = app_service_pb2_grpc.AppServiceStub(self.channel)
        self.site = sites.CreateSite(site_service_pb2.CreateSiteRequest(site=site_pb2.Site(
            name=f"bench-{time.time_ns()}", path=str(site_dir))), metadata=self.md).site
        self.true_app = apps.CreateApp(app_service_pb2.CreateAppRequest(app=app_pb2.App(
            site_id=self.site.id, name="true", command_template="/bin/true")), metadata=self.md).app
        self.sleep_app = apps.CreateApp(app_service_pb2.CreateAppRequest(app=app_pb2.App(
            site_id=self.site.id, name="sleep", command_template="/bin/sh -c 'echo $$ > pid; exec sleep 60'")),
            metadata=self.md).app
        self.site_dir = site_dir
        self.home = home
        self.counter = 0

    def launcher(self, *extra: str) -> subprocess.Popen:
        env = dict(os.environ, BALSAM_HOME=self.home, BALSAM_SERVER=self.profile.server,
                   BALSAM_TOKEN=self.profile.token, BALSAM_LOG_LEVEL="WARNING")
        return subprocess.Popen([sys.executable, "-m", "balsam_grpc.launcher", "--mode", "serial", "--site-dir",
                                 str(self.site_dir), "--site-id", str(self.site.id), "--cpus-per-node",
                                 str(self.fake_cpus), "--gpus-per-node", "0", *extra], env=env)

    def create(self, app: app_pb2.App, n: int) -> list[int]:
        packing = self.fake_cpus or psutil.cpu_count(logical=True) or 1
        ids: list[int] = []
        for start in range(0, n, 5000):
            batch = []
            for _ in range(min(5000, n - start)):
                self.counter += 1
                batch.append(job_pb2.Job(app_id=app.id, workdir=f"{app.name}/{self.counter}",
                                         resources=job_pb2.JobResources(node_packing_count=packing)))
            got = self.jobs.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=batch), metadata=self.md,
                                            timeout=600).jobs
            ids += [j.id for j in got]
        return ids

    def count(self, ids: list[int] | None, states: list[int], app_id: int) -> int:
        f = job_pb2.JobFilter(states=states, app_ids=[app_id])
        if ids is not None:
            f.ids.extend(ids)
        return self.jobs.CountJobs(job_service_pb2.CountJobsRequest(filter=f), metadata=self.md).total

    def wait_count(self, ids: list[int] | None, states: list[int], app_id: int, want: int, timeout: float,
                   every: float = 0.05) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count(ids, states, app_id) >= want:
                return time.monotonic()
            time.sleep(every)
        got = self.jobs.ListJobs(job_service_pb2.ListJobsRequest(filter=job_pb2.JobFilter(
            ids=ids or [], app_ids=[app_id]), page_size=20), metadata=self.md).jobs
        raise SystemExit(f"timed out waiting for {want} jobs in {[S.JobState.Name(s) for s in states]}; "
                         f"some are {[(j.id, S.JobState.Name(j.state), j.state_message[-200:]) for j in got]}")

    def event_times(self, job_id: int) -> dict[str, float]:
        got = self.events.ListEvents(event_service_pb2.ListEventsRequest(
            filter=event_service_pb2.EventFilter(job_ids=[job_id]), page_size=100), metadata=self.md).events
        out: dict[str, float] = {}
        for e in got:
            if e.WhichOneof("change") == "job_state":
                to = S.JobState.Name(e.job_state.to_state).removeprefix("JOB_STATE_")
                when = e.time.ToNanoseconds() / 1e9
                if not out:  # the first event is the job's creation (CREATED -> PREPROCESSED)
                    out["CREATED"] = when
                out.setdefault(to, when)
        return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def run(b: Bench, n: int, latency_samples: int, server_pid: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    launcher = b.launcher()
    try:
        b.create(b.true_app, 1)  # warm up: first lease, first spawn
        b.wait_count(None, [S.JOB_STATE_JOB_FINISHED], b.true_app.id, 1, 60)
        latencies = []
        for _ in range(latency_samples):
            (job_id,) = b.create(b.true_app, 1)
            b.wait_count([job_id], [S.JOB_STATE_JOB_FINISHED, S.JOB_STATE_FAILED], b.true_app.id, 1, 30, every=0.01)
            t = b.event_times(job_id)
            latencies.append((t["RUNNING"] - t["CREATED"]) * 1000)
            time.sleep(0.05)  # the launcher is idle again before the next one
        figures["submit_to_running_p50_ms"] = round(statistics.median(latencies), 2)
        figures["submit_to_running_p99_ms"] = round(pct(latencies, 0.99), 2)
        figures["latency_samples"] = latency_samples

        done_before = b.count(None, [S.JOB_STATE_JOB_FINISHED], b.true_app.id)
        cpu0 = cpu_s(launcher.pid), cpu_s(server_pid)
        t0 = time.monotonic()
        b.create(b.true_app, n)
        created = time.monotonic()
        t_end = b.wait_count(None, [S.JOB_STATE_JOB_FINISHED], b.true_app.id, done_before + n, 3600, every=0.1)
        makespan = t_end - t0
        cpu1 = cpu_s(launcher.pid), cpu_s(server_pid)
        # CPU seconds per busy second: shows which process limits throughput on 2 cores.
        figures["launcher_cpu_share"] = round((cpu1[0] - cpu0[0]) / makespan, 2)
        figures["server_cpu_share"] = round((cpu1[1] - cpu0[1]) / makespan, 2)
        figures["jobs"] = n
        figures["create_s"] = round(created - t0, 3)
        figures["makespan_s"] = round(makespan, 3)
        figures["throughput_jobs_per_s"] = round(n / makespan, 1)
        failed = b.count(None, [S.JOB_STATE_FAILED], b.true_app.id)
        figures["failed"] = failed

        recovery_jobs = min(MAX_RECOVERY_JOBS, b.fake_cpus or psutil.cpu_count(logical=True) or 1)
        ids = b.create(b.sleep_app, recovery_jobs)
        b.wait_count(ids, [S.JOB_STATE_RUNNING], b.sleep_app.id, recovery_jobs, 60)
        time.sleep(0.5)  # let the processes start
        old_session = b.jobs.GetJob(job_service_pb2.GetJobRequest(id=ids[0]), metadata=b.md).job.lease.session_id
        os.kill(launcher.pid, signal.SIGKILL)
        killed = time.monotonic()
        launcher.wait()
        launcher = b.launcher()
        deadline = killed + 300
        while time.monotonic() < deadline:
            got = b.jobs.ListJobs(job_service_pb2.ListJobsRequest(filter=job_pb2.JobFilter(ids=ids),
                                                                  page_size=100), metadata=b.md).jobs
            if all(j.state == S.JOB_STATE_RUNNING and j.lease.session_id not in ("", old_session) for j in got):
                break
            time.sleep(0.05)
        figures["recovery_s"] = round(time.monotonic() - killed, 2)
        # EXPIRED: the server waited out the lease timeout; CLOSED: it saw the dead launcher's
        # stream end cleanly and released the jobs at once.
        sessions = session_service_pb2_grpc.SessionServiceStub(b.channel)
        dead = sessions.GetSession(session_service_pb2.GetSessionRequest(id=old_session), metadata=b.md).session
        figures["dead_session_state"] = session_pb2.SessionState.Name(dead.state).removeprefix("SESSION_STATE_")
    finally:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(30)
        except subprocess.TimeoutExpired:
            launcher.kill()
        # The first launcher's orphans (it was SIGKILLed) still sleep: end them by pid.
        for pid_file in (b.site_dir / "data" / "sleep").glob("*/pid"):
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
            except (ValueError, ProcessLookupError, PermissionError):
                pass
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=10_000, help="jobs in the throughput run")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--database", default="", help="database URL (default: a temporary SQLite file)")
    p.add_argument("--lease-timeout", type=int, default=20, help="server lease timeout in seconds")
    p.add_argument("--latency-samples", type=int, default=50)
    p.add_argument("--fake-cpus", type=int, default=0,
                   help="present this many made-up CPUs and pack as many jobs per node (default: the real CPUs)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="balsam-bench-launcher-") as home:
        url = a.database or f"sqlite:///{Path(home) / 'balsam.db'}"
        server, profile = start_server(url, home, a.lease_timeout)
        try:
            site_dir = Path(home) / "site"
            site_dir.mkdir()
            cpus = {"fake_cpus": a.fake_cpus} if a.fake_cpus else {"real_cpus": psutil.cpu_count(logical=True)}
            figures = {"database": url.split(":", 1)[0], "lease_timeout_s": a.lease_timeout, **cpus,
                       **run(Bench(profile, site_dir, home, a.fake_cpus), a.n, a.latency_samples, server.pid)}
        finally:
            server.terminate()
            server.wait(30)
    if a.json:
        print(json.dumps(figures))
    else:
        for key, value in figures.items():
            print(f"{key:28s} {value}")


if __name__ == "__main__":
    main()
