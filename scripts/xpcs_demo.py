#!/usr/bin/env python3
"""The XPCS scenario on one machine, all real processes (what `scripts/demo` runs).

1. the server (embedded default: SQLite under the demo's BALSAM_HOME, local user, token
   in the profile);
2. three sites like three facilities, made with `balsamctl site init` and started with
   `balsamctl site start`: the local scheduler with a different artificial queue delay
   each (`scheduler.options.start_delay_s`), an elastic queue capped at a different
   number of nodes each (`elastic_queue.max_total_nodes`: pilots come and go with the
   backlog, and the site scales to zero when it is gone; a pilot node runs one dataset
   at a time), two file:// transfer locations (`aps`: the instrument's folder the
   datasets are staged in from; `results`: the folder results are staged out to), and
   the XPCS analysis app in each apps folder;
3. the experiment agent (`scripts/xpcs_agent.py`): bursts of synthetic datasets, each
   routed to the site with the best expected completion; live progress per site; each
   staged-out result's fitted D checked against the generator's truth;
4. `balsamctl analytics` for the run: per-site and overall throughput, node utilisation,
   latency breakdown percentiles (stage-in, wait, run, stage-out, total), PNG plots;
5. the sites scale to zero (idle pilots exit), then everything is stopped: pilots left
   cancelled, daemons stopped, server terminated (also on Ctrl-C).

    scripts/xpcs_demo.py [--datasets 200] [--burst 25] [--interval 8] [--home DIR] [--summary FILE]

With `--compare`, step 3 runs once per routing policy (`--policies`, default round_robin,
shortest_backlog, earliest, deadline) on the same sites with the same burst schedule and
datasets (same seed), each run waiting for the sites to scale to zero first, and every
dataset due `--deadline` seconds after submission (the datasets are written before
the first burst, so the burst times hold on a loaded machine); then it prints per policy the
turnaround p50/p99, the deadline misses (and how many the router predicted at
submission), the prediction error and the split between the sites, side by side, and
writes compare.png (turnaround distributions and site split) and compare.json. The
history-based policies learn from every earlier run on these sites, as a router in
service would; the baselines use none, so they go first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
sys.path.insert(0, str(ROOT))  # the SDK, for the pilots' bookkeeping (imported where used)


@dataclass(frozen=True)
class SiteSpec:
    """A facility: its pilots hold at most `max_total_nodes` nodes at once (pilots of up to
    `pilot_nodes` nodes; one dataset per node at a time), and each pilot starts
    `queue_delay_s` after it is submitted."""

    name: str
    max_total_nodes: int
    pilot_nodes: int
    queue_delay_s: float


SITES = (SiteSpec("alpha", 4, 2, 2.0), SiteSpec("beta", 2, 2, 5.0), SiteSpec("gamma", 1, 1, 10.0))
PROCESSES = "processes.json"  # in the demo's home: what stop_leftovers may stop


def demo_env(home: Path) -> dict[str, str]:
    """The environment of every process of the demo: its own BALSAM_HOME, none of the
    user's server settings."""
    env = {**os.environ, "BALSAM_HOME": str(home), "BALSAM_LOG_FORMAT": "json",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for var in ("BALSAM_SERVER", "BALSAM_TOKEN", "BALSAM_DATABASE_URL"):
        env.pop(var, None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def say(text: str) -> None:
    print(f"== {text}", flush=True)


class Demo:
    def __init__(self, home: Path, sites: tuple[SiteSpec, ...], idle_timeout_s: int, database_url: str = "",
                 lease_prefetch: int = -1) -> None:
        self.home = home
        self.lease_prefetch = lease_prefetch
        self.database_url = database_url or f"sqlite:///{home / 'balsam.db'}"
        # The two transfer locations every site gets (file://, this machine).
        self.instrument = home / "instrument"
        self.results = home / "results"
        self.sites = sites
        self.idle_timeout_s = idle_timeout_s
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = demo_env(home)
        self.server: subprocess.Popen[bytes] | None = None
        self.dashboard: subprocess.Popen[bytes] | None = None
        self.site_dirs: dict[str, Path] = {}

    # -- processes -------------------------------------------------------------------
    def balsamctl(self, *args: str, check: bool = True, timeout: float = 120,
                  columns: int | None = None) -> subprocess.CompletedProcess[str]:
        env = self.env if columns is None else {**self.env, "COLUMNS": str(columns)}
        res = subprocess.run([PY, "-m", "balsam_grpc.cli.main", *args], env=env, text=True,
                             capture_output=True, timeout=timeout, cwd=self.home, check=False)
        if check and res.returncode != 0:
            raise RuntimeError(f"balsamctl {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def start_server(self) -> None:
        log = open(self.home / "server.log", "ab")  # noqa: SIM115 - the server's lifetime
        self.server = subprocess.Popen(
            [PY, "-m", "balsam_grpc.server", "--address", self.address,
             "--database", self.database_url],
            env=self.env, stdout=log, stderr=log, cwd=self.home, start_new_session=True)
        remember_process(self.home, self.server.pid)
        profile = self.home / "profile.json"
        deadline = time.monotonic() + 60
        while True:
            if self.server.poll() is not None:
                raise RuntimeError(f"the server exited; see {self.home / 'server.log'}")
            try:
                if json.loads(profile.read_text()).get("server") == self.address:
                    break
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start within 60 s")
            time.sleep(0.2)
        where = f"SQLite in {self.home}" if self.database_url.startswith("sqlite") else "PostgreSQL"
        say(f"server on {self.address} ({where}, log server.log)")

    def start_dashboard(self, port: int) -> None:
        """`balsamctl dashboard` as the demo's user, to watch the run live in a browser."""
        if not port:
            with socket.socket() as s:
                port = 8080 if s.connect_ex(("127.0.0.1", 8080)) else free_port()
        log = open(self.home / "dashboard.log", "ab")  # noqa: SIM115 - the dashboard's lifetime
        self.dashboard = subprocess.Popen(
            [PY, "-m", "balsam_grpc.cli.main", "dashboard", "--address", f"127.0.0.1:{port}"],
            env=self.env, stdout=log, stderr=log, cwd=self.home, start_new_session=True)
        remember_process(self.home, self.dashboard.pid)
        say(f"live dashboard: http://127.0.0.1:{port}/ (log dashboard.log)")

    def create_site(self, spec: SiteSpec) -> None:
        site_dir = self.home / "sites" / spec.name
        self.balsamctl("site", "init", str(site_dir), "--platform", "local", "--name", spec.name)
        path = site_dir / "settings.yml"
        settings: dict[str, Any] = yaml.safe_load(path.read_text())
        settings["scheduler"]["options"] = {"start_delay_s": spec.queue_delay_s}
        settings["scheduler"]["poll_seconds"] = 1
        # Idle pilots exit after this long: the site scales down between bursts and to zero
        # at the end.
        settings["launcher"]["idle_timeout_s"] = self.idle_timeout_s
        # One launcher rank per pilot node (the local platform's default is one process,
        # one node): a 2-node pilot runs two datasets at once, and its session reports
        # two held nodes.
        settings["launcher"]["mpi_prefix"] = "{mpiexec} -n {num_ranks}"
        # Jobs held ahead of a free slot: the launcher's own default (-1) holds none until
        # its jobs are seen to end and none for jobs that run longer than a quarter second,
        # so a burst is spread over a site's pilots (launcher/master.py auto_prefetch).
        if self.lease_prefetch >= 0:
            settings["launcher"]["extra_args"] = ["--lease-prefetch", str(self.lease_prefetch)]
        # The facility's capacity for this experiment is the elastic queue's cap on nodes
        # held (queued + running pilots); pilots are sized from the runnable backlog.
        settings["elastic_queue"].update({
            "enabled": True, "max_nodes": spec.pilot_nodes, "max_total_nodes": spec.max_total_nodes,
            "max_queued": spec.max_total_nodes, "min_wall_time_min": 10, "check_seconds": 1.0})
        # Stage in from the instrument's folder, stage out to the results folder.
        settings["transfer_locations"] = {"aps": f"file://{self.instrument}", "results": f"file://{self.results}"}
        settings["transfers"] = {"batch_linger_s": 0.2, "poll_seconds": 1.0}
        path.write_text("# Written by scripts/xpcs_demo.py from the `balsamctl site init` template (whose comments\n"
                        "# explain every key; see SETTINGS_TEMPLATE in balsam_grpc/site/settings.py).\n"
                        + yaml.safe_dump(settings, sort_keys=False))
        shutil.copy(ROOT / "balsam_grpc" / "xpcs" / "site_app.py", site_dir / "apps" / "xpcs.py")
        (site_dir / "apps" / "example.py").unlink(missing_ok=True)
        self.balsamctl("site", "start", str(site_dir), "--wait", "60")
        self.site_dirs[spec.name] = site_dir
        say(f"site {spec.name:<5}: elastic queue of at most {spec.max_total_nodes} node(s) in pilots of at most "
            f"{spec.pilot_nodes}, queue delay {spec.queue_delay_s:g} s ({site_dir})")

    def run_agent(self, args: list[str]) -> int:
        with subprocess.Popen([PY, str(ROOT / "scripts" / "xpcs_agent.py"), *args], env=self.env,
                              cwd=self.home) as agent:
            remember_process(self.home, agent.pid)
            try:
                return agent.wait()
            except BaseException:  # Ctrl-C, SIGTERM, SIGHUP: the demo's cleanup follows
                agent.kill()
                raise

    def analytics(self, tag: str, plots: Path, json_out: Path | None) -> None:
        # balsamctl's output is captured, so it sees no terminal: give it the real width
        # (its tables wrap at 80 columns otherwise).
        width = max(shutil.get_terminal_size((120, 40)).columns, 110)
        res = self.balsamctl("analytics", "--tag", f"exp={tag}", "--since", "1d", "--bin", "10",
                             "--plots", str(plots), check=False, columns=width)
        sys.stdout.write(res.stdout)
        if res.returncode != 0:
            sys.stderr.write(res.stderr)
        if json_out is not None:
            res = self.balsamctl("analytics", "--tag", f"exp={tag}", "--since", "1d", "--bin", "10", "-o", "json")
            json_out.write_text(res.stdout)

    def science(self, tag: str, plots: Path, rings: str = "") -> None:
        """`balsamctl results` for the run's staged-out results: fitted D against the
        truth per dataset, and the pictures (g2 with fits, D against truth)."""
        width = max(shutil.get_terminal_size((120, 40)).columns, 100)
        res = self.balsamctl("results", "--tag", f"exp={tag}", "--plots", str(plots), "--datasets-plotted", "2",
                             *(["--rings", rings] if rings else []), check=False, columns=width)
        sys.stdout.write(res.stdout)
        if res.returncode != 0:
            sys.stderr.write(res.stderr)
        if not any(plots.glob("twotime-*.png")):  # no HDF5 results (they carry the maps): from a dataset
            first = next(iter(sorted([*(self.instrument / tag).glob("*.h5"), *(self.instrument / tag).glob("*.npz")])),
                         None)
            if first is not None:
                print(f"plot: {two_time_picture(first, plots)}", flush=True)
        say(viewer_check(self.results / tag))

    # -- shutdown ---------------------------------------------------------------------
    def stop(self) -> None:
        """Kill the run's unfinished jobs (after Ctrl-C: otherwise the elastic queues would
        start new pilots for them), cancel the pilots, stop the daemons, stop the server;
        then make sure no pilot of ours is left, not even one still waiting out its queue
        delay (a daemon that died cannot cancel its pilots)."""
        if self.server is not None and self.server.poll() is None and self.site_dirs:
            try:
                self.kill_unfinished_jobs()
                self.cancel_pilots()
            except Exception as exc:  # noqa: BLE001 - shutdown goes on regardless
                print(f"(could not cancel pilots: {exc})", file=sys.stderr)
        if self.dashboard is not None and self.dashboard.poll() is None:
            self.dashboard.terminate()
            self.dashboard.wait(10)
        stop_sites(self.site_dirs.values(), self.env)
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(20)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait(5)

    def client(self) -> Any:
        os.environ["BALSAM_HOME"] = str(self.home)
        from balsam_grpc.sdk import Client

        return Client(self.address, token=json.loads((self.home / "profile.json").read_text())["token"])

    def pilots(self, client: Any) -> list[Any]:
        from balsam_grpc.v1 import batch_job_service_pb2

        return list(client.call("BatchJobService", "ListBatchJobs",
                                batch_job_service_pb2.ListBatchJobsRequest(page_size=1000)).batch_jobs)

    def wait_scale_to_zero(self, timeout: float) -> None:
        """The backlog is gone: idle pilots exit after the launcher's idle timeout and the
        elastic queues withdraw what is still queued. Wait for that (the demo cancels what
        is left afterwards), then say how many pilots each site ran."""
        from balsam_grpc.v1 import batch_job_pb2 as bj

        live = (bj.BATCH_JOB_STATE_QUEUED, bj.BATCH_JOB_STATE_RUNNING, bj.BATCH_JOB_STATE_PENDING_SUBMISSION,
                bj.BATCH_JOB_STATE_PENDING_DELETION)
        names = {}
        started = time.monotonic()
        with self.client() as client:
            names = {s.id: s.name for s in client.sites.all()}
            while True:
                jobs = self.pilots(client)
                left = [b for b in jobs if b.state in live]
                if not left or time.monotonic() - started > timeout:
                    break
                time.sleep(1.0)
        per_site: dict[str, list[Any]] = {}
        for b in jobs:
            per_site.setdefault(names.get(b.site_id, str(b.site_id)), []).append(b)
        def plural(n: int, word: str) -> str:
            return f"{n} {word}{'s' * (n != 1)}"

        counts = ", ".join(f"{name} {plural(len(bs), 'pilot')} ({plural(sum(b.num_nodes for b in bs), 'node')})"
                           for name, bs in sorted(per_site.items()))
        if left:
            say(f"{len(left)} pilot(s) still up after {timeout:g} s; they are cancelled. Pilots over the run: {counts}")
        else:
            say(f"every site scaled to zero after {time.monotonic() - started:.0f} s (idle pilots exited). "
                f"Pilots over the run: {counts}")

    def kill_unfinished_jobs(self) -> None:
        with self.client() as client:
            client.jobs.all().exclude(state=["JOB_FINISHED", "FAILED", "KILLED"]).update(state="KILLED")

    def cancel_pilots(self) -> None:
        from balsam_grpc.v1 import batch_job_pb2, batch_job_service_pb2

        bj = batch_job_pb2
        live = (bj.BATCH_JOB_STATE_QUEUED, bj.BATCH_JOB_STATE_RUNNING, bj.BATCH_JOB_STATE_PENDING_SUBMISSION)
        with self.client() as client:
            jobs = self.pilots(client)
            for b in jobs:
                if b.state in live:
                    client.call("BatchJobService", "UpdateBatchJob", batch_job_service_pb2.UpdateBatchJobRequest(
                        batch_job=bj.BatchJob(id=b.id, state=bj.BATCH_JOB_STATE_PENDING_DELETION),
                        update_mask={"paths": ["state"]}))
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # the daemons cancel them in their schedulers
                jobs = self.pilots(client)
                if not any(b.state in (*live, bj.BATCH_JOB_STATE_PENDING_DELETION) for b in jobs):
                    break
                time.sleep(0.5)


def stop_sites(site_dirs: Any, env: dict[str, str]) -> None:
    """Stop the site daemons, then any pilot of theirs still running or waiting out its
    queue delay (a daemon that died cannot cancel its pilots)."""
    for site_dir in site_dirs:
        if (site_dir / ".site.lock").exists():
            subprocess.run([PY, "-m", "balsam_grpc.cli.main", "site", "stop", str(site_dir), "--force", "--timeout",
                            "15"], env=env, cwd=site_dir.parent, capture_output=True, timeout=120, check=False)
    for site_dir in site_dirs:
        for rec in (site_dir / "state" / "local-scheduler").glob("*.json"):
            try:
                data = json.loads(rec.read_text())
            except (OSError, ValueError):
                continue
            if data.get("end_time") is None:
                kill_pilot_processes(rec, data)


def remember_process(home: Path, pid: int) -> None:
    """Note a process the demo started in a session of its own, for stop_leftovers: a
    demo killed outright (SIGKILL, the machine's OOM killer) cannot stop it itself."""
    path = home / PROCESSES
    known = json.loads(path.read_text()) if path.exists() else []
    known.append({"pid": pid, "create_time": psutil.Process(pid).create_time()})
    # Whole or not at all: a reader (or a demo killed mid-write) never sees half a file.
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(known))
    partial.replace(path)


def stop_leftovers(home: Path) -> int:
    """Stop what an earlier demo in `home` left running because it could not stop it
    itself: site daemons, pilots, and the server, dashboard and agent it noted (a pid
    counts only with the start time noted with it, since pids are reused). How many of
    the noted processes it stopped."""
    if not home.is_dir():
        return 0
    env = demo_env(home)
    stop_sites([d for d in (home / "sites").glob("*") if d.is_dir()], env)
    try:
        known = json.loads((home / PROCESSES).read_text())
    except (OSError, ValueError):
        return 0
    stopped = []
    for entry in known:
        try:
            proc = psutil.Process(int(entry["pid"]))
            if proc.create_time() != entry["create_time"]:
                continue
            proc.terminate()
            stopped.append(proc)
        except (KeyError, TypeError, ValueError, psutil.Error):
            continue
    _, alive = psutil.wait_procs(stopped, timeout=20)
    for proc in alive:
        proc.kill()
    return len(stopped)


def kill_pilot_processes(record: Path, data: dict[str, Any]) -> None:
    """A local-scheduler pilot that did not end: its batch script's process group (once
    started), and its runner process (which may still be waiting out the queue delay; it
    is ours only if its command line names this record, since pids are reused)."""
    try:
        os.killpg(int(data["pgid"]), signal.SIGKILL)
    except (KeyError, TypeError, ValueError, OSError):
        pass
    try:
        runner = psutil.Process(int(data["pid"]))
        if str(record) in runner.cmdline():
            runner.kill()
    except (KeyError, TypeError, ValueError, psutil.Error):
        pass


def viewer_check(folder: Path) -> str:
    """pyXPCSViewer's own reading code (package xpcs-viewer: `XpcsFile`) on the first
    HDF5 results file a site staged out: what it reads against the JSON summary of the
    same dataset (staged out beside it)."""
    import numpy as np

    files = sorted(folder.glob("*_results.hdf"))
    if not files:
        return f"no HDF5 results file in {folder} for pyXPCSViewer"
    try:
        from importlib.metadata import version

        from pyxpcsviewer.core.xpcs_file import XpcsFile
    except ImportError as exc:
        return f"pyXPCSViewer is not installed ({exc}); the xpcs-check extra brings it"
    path = files[0]
    ours = json.loads(path.with_name(path.name.removesuffix("_results.hdf") + ".json").read_text())
    xf = XpcsFile(str(path))
    _, t_el, g2, _, _ = xf.get_g2_data()
    mine = np.array([r["g2"] for r in ours["rings"]])
    if g2.T.shape != mine.shape:
        return f"pyXPCSViewer reads g2 of shape {g2.T.shape} from {path.name}, ours is {mine.shape}: MISMATCH"
    worst = float(np.max(np.abs(g2.T - mine)))
    lags = float(np.max(np.abs(np.asarray(t_el) / np.asarray(ours["tau_s"]) - 1)))
    return (f"pyXPCSViewer {version('xpcs-viewer')} (XpcsFile) opens {path.name} ({', '.join(xf.atype)}): g2 of "
            f"{mine.shape[0]} rings x {mine.shape[1]} lags, largest |g2 read - g2 of our JSON summary| {worst:.1e}, "
            f"lags (relative) {lags:.1e}" + ("" if worst <= 1e-12 and lags <= 1e-12 else ": MISMATCH"))


def two_time_picture(dataset: Path, plots: Path, n_rings: int = 8) -> Path:
    """The two-time map of one dataset's middle q ring (the analysis's `two_time`), for
    results that carry no map (JSON summaries only)."""
    from balsam_grpc.cli.xpcs_plots import plot_two_time
    from balsam_grpc.xpcs.analysis import load_dataset
    from balsam_grpc.xpcs.geometry import Geometry, ring_labels
    from balsam_grpc.xpcs.twotime import two_time

    frames, meta = load_dataset(dataset)
    labels, q_centres = ring_labels(Geometry(**meta["geometry"]).q_map(), n_rings)
    ring = n_rings // 2
    maps = two_time(frames, labels, n_rings, meta["frame_time_s"], rings=[ring])
    return plot_two_time(plots / f"twotime-{dataset.stem}.png", maps.maps[0], maps.bin_s,
                         title=f"{dataset.stem} ring {ring}: two-time", q_per_m=float(q_centres[ring]))


COMPARE_POLICIES = ("round_robin", "shortest_backlog", "earliest", "deadline")


def compare_rows(summaries: dict[str, dict[str, Any]], site_names: list[str]) -> list[dict[str, Any]]:
    """One row of figures per policy from the agent summaries."""
    rows = []
    for policy, s in summaries.items():
        placements = s.get("placements", {})
        total = max(sum(placements.values()), 1)
        rows.append({"policy": policy, "datasets": s["datasets"], "finished": s["finished"],
                     "p50_s": s["turnaround_p50_s"], "p99_s": s["turnaround_p99_s"],
                     "misses": s["deadline_misses"], "predicted_misses": s["predicted_misses"],
                     "at_risk": s.get("at_risk"), "beyond_high": s.get("beyond_high"), "load": s.get("load_1min"),
                     "prediction_error_p50_s": s["prediction_error_p50_s"],
                     "split": {n: placements.get(n, 0) for n in site_names},
                     "split_pct": {n: round(100 * placements.get(n, 0) / total) for n in site_names}})
    return rows


def format_compare(rows: list[dict[str, Any]], site_names: list[str], deadline: float) -> str:
    def num(v: Any, fmt: str = "{:.1f}") -> str:
        return "-" if v is None else fmt.format(v)
    head = (f"{'policy':<17}{'done':>9}{'p50 s':>8}{'p99 s':>8}{'missed':>8}{'predicted':>10}{'at risk':>9}"
            f"{'|pred err| p50':>16}{'> p90':>7}" + "".join(f"{n:>8}" for n in site_names) + f"{'load':>6}")
    lines = [f"turnaround = submission to result staged out; deadline {deadline:g} s after submission", head,
             "-" * len(head)]
    for r in rows:
        lines.append(f"{r['policy']:<17}{r['finished']:>4}/{r['datasets']:<4}{num(r['p50_s']):>8}{num(r['p99_s']):>8}"
                     f"{num(r['misses'], '{}'):>8}{num(r['predicted_misses'], '{}'):>10}{num(r['at_risk'], '{}'):>9}"
                     f"{num(r['prediction_error_p50_s']):>16}{num(r['beyond_high'], '{}'):>7}"
                     + "".join(f"{r['split'][n]:>4} {r['split_pct'][n]:>2}%" for n in site_names)
                     + f"{num(r.get('load')):>6}")
    lines.append("predicted: typical completion past the deadline at submission; at risk: its p90 past it; "
                 "> p90: turnarounds beyond the predicted p90; load: the machine's 1-minute load average at the "
                 f"end of the policy's run ({os.cpu_count()} cores)")
    return "\n".join(lines)


def plot_compare(path: Path, summaries: dict[str, dict[str, Any]], site_names: list[str], deadline: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (cdf, split) = plt.subplots(1, 2, figsize=(12, 4.5))
    for policy, s in summaries.items():
        t = np.sort([r["turnaround_s"] for r in s["records"] if r["turnaround_s"] is not None])
        cdf.step(t, np.arange(1, t.size + 1) / max(t.size, 1), where="post", label=policy)
    cdf.axvline(deadline, color="k", ls="--", lw=1, label=f"deadline {deadline:g} s")
    cdf.set(xlabel="turnaround (s)", ylabel="fraction of datasets", title="turnaround per policy")
    cdf.legend()
    bottom = np.zeros(len(summaries))
    for name in site_names:
        counts = np.array([s["placements"].get(name, 0) for s in summaries.values()], dtype=float)
        split.bar(list(summaries), counts, bottom=bottom, label=name)
        bottom += counts
    split.set(ylabel="datasets", title="split between sites")
    split.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--home", type=Path, default=ROOT / ".balsam-demo", help="demo BALSAM_HOME (recreated)")
    p.add_argument("--datasets", type=int, default=200)
    p.add_argument("--burst", type=int, default=25, help="datasets per burst")
    p.add_argument("--interval", type=float, default=8.0, help="seconds between burst starts")
    p.add_argument("--strategy", default="best",
                   help="routing: earliest, deadline, round_robin, shortest_backlog, best or fixed")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds after submission each result is due (default 25 with --compare)")
    p.add_argument("--compare", action="store_true", help="run the same schedule under each of --policies and "
                                                          "print them side by side")
    p.add_argument("--policies", default=",".join(COMPARE_POLICIES), help="policies for --compare, in run order")
    p.add_argument("--sites", type=int, default=3, choices=(1, 2, 3), help="how many of alpha, beta, gamma")
    p.add_argument("--size", type=int, default=32,
                   help="detector rows = cols (32 keeps the synthetic data generation, which runs on the same "
                        "2 cores as everything else, off the critical path)")
    p.add_argument("--frames", type=int, default=1024)
    p.add_argument("--rings", default="", help="q rings in the g2 pictures, e.g. 0,3,7 (default four from low "
                                                "to high q)")
    p.add_argument("--idle-timeout", type=int, default=8, help="seconds an idle pilot waits for work before it exits")
    p.add_argument("--lease-prefetch", type=int, default=-1,
                   help="jobs each pilot's launcher holds ahead of its free slots (the launcher's --lease-prefetch; "
                        "-1: its automatic default)")
    p.add_argument("--each", action="store_true", help="print every dataset's result as it arrives")
    p.add_argument("--database", default="", help="the server's database URL (default: SQLite in --home)")
    p.add_argument("--dashboard-port", type=int, default=0, help="port of the live dashboard (default 8080, or "
                                                                     "any free port when 8080 is taken)")
    p.add_argument("--summary", type=Path, default=None, help="also write the agent's summary JSON here")
    p.add_argument("--analytics-json", type=Path, default=None, help="also write the analytics as JSON here")
    p.add_argument("--stop-leftovers", action="store_true",
                   help="only stop what an earlier demo in --home left running (one killed outright) and exit; "
                        "every run does this first too")
    a = p.parse_args(argv)
    policies = [x.strip() for x in a.policies.split(",") if x.strip()] if a.compare else [a.strategy]
    if a.compare and a.deadline is None:
        a.deadline = 25.0
    if "deadline" in policies and not a.deadline:
        p.error("the deadline policy needs --deadline SECONDS")

    home = a.home.resolve()
    stopped = stop_leftovers(home)
    if stopped or a.stop_leftovers:
        say(f"stopped {stopped} process(es) (server, dashboard, agent) an earlier demo in {home} left running")
    if a.stop_leftovers:
        return 0
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    # matplotlib (the plots here and in the balsamctl processes, which inherit this
    # environment) would otherwise leave ~/.config/matplotlib and ~/.cache/matplotlib behind.
    os.environ.setdefault("MPLCONFIGDIR", str(home / "matplotlib"))
    demo = Demo(home, SITES[: a.sites], a.idle_timeout, a.database, a.lease_prefetch)
    tag = f"xpcs-{time.strftime('%H%M%S')}"
    summary = a.summary.resolve() if a.summary else home / "summary.json"
    plots = home / "plots"

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # SIGHUP: the terminal closed. Python's default would end the demo without its cleanup
    # and leave the server, the daemons and the pilots (in sessions of their own) running.
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    code = 1
    started = time.monotonic()
    try:
        demo.start_server()
        demo.start_dashboard(a.dashboard_port)
        demo.instrument.mkdir()
        demo.results.mkdir()
        for spec in demo.sites:
            demo.create_site(spec)
        say(f"every site stages datasets in from location aps = file://{demo.instrument} and results out to "
            f"location results = file://{demo.results}")
        summaries: dict[str, dict[str, Any]] = {}
        for policy in policies:
            run_tag = f"{tag}-{policy}" if a.compare else tag
            run_summary = home / f"summary-{policy}.json" if a.compare else summary
            say(f"agent: {a.datasets} datasets of {a.frames} frames {a.size}x{a.size}, bursts of {a.burst} every "
                f"{a.interval:g} s, routing '{policy}'"
                + (f", each due {a.deadline:g} s after submission" if a.deadline else "")
                + ". Progress lines: datasets done/submitted per site, "
                "[Nn] = N nodes held by the site's pilots right now, fit error against the truth")
            run_code = demo.run_agent([
                "--sites", ",".join(s.name for s in demo.sites), "--datasets", str(a.datasets), "--burst", str(a.burst),
                "--interval", str(a.interval), "--strategy", policy, "--tag", run_tag, "--size", str(a.size),
                "--frames", str(a.frames), "--data-dir", str(demo.instrument), "--results-dir", str(demo.results),
                "--summary", str(run_summary), *(["--each"] if a.each else []),
                *(["--deadline", str(a.deadline)] if a.deadline else []),
                *(["--pregenerate"] if a.compare else [])])
            code = run_code if policy == policies[0] else max(code, run_code)
            if a.compare:
                summaries[policy] = json.loads(run_summary.read_text())
                # The machine's load over the policy's run (1-minute average at its end):
                # the policies run one after another, and a loaded machine runs slower.
                summaries[policy]["load_1min"] = os.getloadavg()[0]
                demo.wait_scale_to_zero(timeout=a.idle_timeout + 30)
        if a.compare:
            names = [spec.name for spec in demo.sites]
            rows = compare_rows(summaries, names)
            table = format_compare(rows, names, a.deadline)
            (home / "compare.json").write_text(json.dumps({"deadline_s": a.deadline, "datasets": a.datasets,
                                                           "burst": a.burst, "interval_s": a.interval,
                                                           "rows": rows}, indent=1))
            plot_compare(home / "compare.png", summaries, names, a.deadline)
            say(f"policies compared on the same schedule ({home / 'compare.png'}, {home / 'compare.json'}):")
            print(table, flush=True)
            last = f"{tag}-{policies[-1]}"
            say(f"the science of the last run: balsamctl results --tag exp={last} --plots {plots}")
            demo.science(last, plots, a.rings)
        else:
            say(f"analytics of the run: balsamctl analytics --tag exp={tag} --bin 10 --plots {plots}")
            demo.analytics(tag, plots, a.analytics_json.resolve() if a.analytics_json else None)
            say(f"the science: balsamctl results --tag exp={tag} --plots {plots}")
            demo.science(tag, plots, a.rings)
            demo.wait_scale_to_zero(timeout=a.idle_timeout + 30)
            say(f"reduced results (staged out): {demo.results / tag}/")
            say(f"datasets: {demo.instrument / tag}/  summary: {summary}  plots: {plots}/")
    except KeyboardInterrupt:
        say("interrupted")
        code = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        say("stopping: pilots, site daemons, server")
        demo.stop()
        say(f"stopped ({time.monotonic() - started:.0f} s in all)")
    return code


if __name__ == "__main__":
    sys.exit(main())
