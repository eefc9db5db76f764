#!/usr/bin/env python3
"""The experiment agent: what a beamline's control software does during an XPCS run.

    scripts/xpcs_agent.py --sites alpha,beta,gamma --datasets 200 --burst 20 --interval 7 \
        --data-dir /data/aps --results-dir /data/results

A producer thread plays the detector: every `interval` seconds it writes a burst of
synthetic datasets (each with its own, known diffusion constant) into the instrument's
folder (`--data-dir`, the sites' transfer location `aps`), then asks the router which
site should reduce each one and submits the jobs there with their transfers: the
dataset (a raw HDF5 file: frames and the detector metadata, as the beamline writes it; see
balsam_grpc/xpcs/h5io.py) is staged in from `aps:/<run>/<dataset>.h5`, the results are
staged out to `results:/<run>/<dataset>.json` (the summary) and
`results:/<run>/<dataset>_results.hdf` (the results file pyXPCSViewer opens: g2, two-time
maps); `--results-dir` is that location's folder. The main
thread collects the jobs with the SDK's futures (one WatchEvents stream, no polling of
job states), reads each staged-out results file and compares its fitted D with the
truth. It prints a progress line as things happen (submitted and finished per site, the
nodes each site's pilots hold, the fit errors so far), then the routing spread, and
writes a summary JSON (one record per dataset) for the demo and its test.
"""

from __future__ import annotations

import argparse
import json
import math
import queue
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from balsam_grpc.sdk import FIRST_COMPLETED, Client, Job, wait
from balsam_grpc.sdk.routing import STRATEGIES, Router
from balsam_grpc.xpcs.analysis import save_dataset
from balsam_grpc.xpcs.synthetic import generate

APP_NAME = "XpcsAnalysis"
# Relative error of the fitted D above which a result is reported on its own line.
TOLERANCE = 0.15
# Diffusion constants are drawn log-uniformly from this range (m^2/s): relaxation times
# that the default detector geometry and frame rate resolve well.
D_RANGE = (1.5e-14, 6e-14)


@dataclass
class Record:
    """One dataset's life, as the summary JSON holds it."""

    dataset: str
    truth: float
    site_id: int
    site_name: str
    job_id: int
    submitted: float  # seconds since the agent started
    state: str = ""
    fitted: float | None = None
    rel_error: float | None = None
    done: float | None = None
    output: str = ""     # the staged-out results file (at the results location)
    message: str = ""
    deadline_s: float | None = None      # seconds after submission the result is due
    predicted_s: float | None = None     # the router's predicted turnaround at the chosen site
    predicted_error_s: float | None = None
    predicted_miss: bool | None = None   # said at submission: no site was predicted to make the deadline
    predicted_high_s: float | None = None  # the high quantile of the predicted turnaround (the deadline's margin)
    at_risk: bool | None = None          # said at submission: that quantile is past the deadline

    @property
    def turnaround_s(self) -> float | None:
        return None if self.done is None else self.done - self.submitted

    @property
    def missed(self) -> bool | None:
        if self.deadline_s is None:
            return None
        return self.turnaround_s is None or self.state != "JOB_FINISHED" or self.turnaround_s > self.deadline_s


@dataclass
class Options:
    sites: list[str]
    datasets: int = 60
    burst: int = 12
    interval: float = 10.0
    strategy: str = "best"
    window: float = 30.0
    data_dir: Path = Path("xpcs-data")         # the folder of location `in_location`
    results_dir: Path = Path("xpcs-results")   # the folder of location `out_location`
    in_location: str = "aps"
    out_location: str = "results"
    size: int = 32
    frames: int = 1024
    rings: int = 8
    seed: int = 0
    tag: str = ""
    summary: Path | None = None
    timeout: float = 600.0
    quiet: bool = False
    each: bool = False       # a line per result, not only progress lines
    progress_every: float = 2.0
    extra_tags: dict[str, str] = field(default_factory=dict)
    deadline: float | None = None   # seconds after submission each result is due
    charges: dict[str, float] = field(default_factory=dict)  # site -> charge per node-hour
    pregenerate: bool = False       # write every dataset before the first burst


def draw_truth(rng: np.random.Generator) -> float:
    lo, hi = D_RANGE
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


class Agent:
    def __init__(self, client: Client, opts: Options) -> None:
        self.client, self.opts = client, opts
        self.run_id = opts.tag or f"xpcs-{uuid.uuid4().hex[:8]}"
        self.router = Router(client, opts.sites, opts.strategy, window_seconds=opts.window, app=APP_NAME,
                             in_location=opts.in_location, out_location=opts.out_location,
                             charges=opts.charges or None)
        self.names = {s.id: s.name for s in client.sites.filter(id=self.router.site_ids)}
        self.apps = {site_id: client.apps.get(name=APP_NAME, site_id=site_id) for site_id in self.router.site_ids}
        self.started = time.monotonic()
        self.submitted: queue.Queue[tuple[Job, Record] | None] = queue.Queue()
        self.records: list[Record] = []
        self.producer_error: BaseException | None = None
        self.submitted_by_site: Counter[int] = Counter()
        self.finished_by_site: Counter[int] = Counter()
        self.last_progress: tuple[float, tuple[Any, ...]] = (-1e9, ())
        # Held while a burst is being submitted: progress lines show whole bursts.
        self.burst_lock = threading.Lock()

    def now(self) -> float:
        return time.monotonic() - self.started

    def say(self, text: str) -> None:
        if not self.opts.quiet:
            print(f"[{self.now():6.1f}s] {text}", flush=True)

    # -- the detector: bursts of datasets, routed and submitted ---------------------
    def produce(self) -> None:
        """Each burst: the detector's datasets are written, then all of them are routed
        and submitted at once at the burst's time (the router counts its own placements,
        so a burst spreads). A burst is simulated ahead of its time, while the one before
        is reduced: the simulation stands in for the detector, which in reality does not
        share the analysis machines' cores, so it should not delay the bursts."""
        opts = self.opts
        rng = np.random.default_rng(opts.seed)
        (opts.data_dir / self.run_id).mkdir(parents=True, exist_ok=True)
        first_at: float | None = None
        try:
            # With `pregenerate`, every dataset is written before the first burst, so the
            # burst times hold on a loaded machine (policies compared on one schedule).
            bursts = [self.write_burst(rng, first) for first in range(0, opts.datasets, opts.burst)] \
                if opts.pregenerate else None
            for first in range(0, opts.datasets, opts.burst):
                burst_no = first // opts.burst
                written = bursts[burst_no] if bursts is not None else self.write_burst(rng, first)
                if first_at is None:
                    first_at = time.monotonic()
                late = time.monotonic() - (first_at + burst_no * opts.interval)
                time.sleep(max(0.0, -late))
                burst_sites: Counter[int] = Counter()
                with self.burst_lock:
                    for name, truth, nbytes in written:
                        burst_sites[self.submit(name, truth, nbytes)] += 1
                spread = ", ".join(f"{self.names[s]} {n}" for s, n in sorted(burst_sites.items()))
                self.say(f"burst {burst_no + 1}: {len(written)} datasets routed ({spread}); "
                         f"{first + len(written)}/{opts.datasets} submitted"
                         + (f" ({late:.1f} s late: the data simulation is behind)" if late > 1.0 else ""))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.producer_error = exc
        finally:
            self.submitted.put(None)

    def write_burst(self, rng: np.random.Generator, first: int) -> list[tuple[str, float, int]]:
        """The burst's datasets from index `first`, written to the instrument's folder:
        (name, true D, bytes) each."""
        opts = self.opts
        written = []
        for index in range(first, min(first + opts.burst, opts.datasets)):
            truth = draw_truth(rng)
            name = f"ds-{index:04d}"
            data = generate(rows=opts.size, cols=opts.size, n_frames=opts.frames, diffusion_m2_per_s=truth,
                            seed=opts.seed * 100_003 + index)
            path = save_dataset(data, opts.data_dir / self.run_id / f"{name}.h5", compress=False)
            written.append((name, truth, path.stat().st_size))
        return written

    def submit(self, name: str, truth: float, nbytes: int) -> int:
        """One job: stage the dataset in from the instrument, reduce it, stage the results
        out to the analysis location (`location:/path`, relative to the location's root).
        With a deadline, a job no site is predicted to finish in time is said so now."""
        opts = self.opts
        decision = self.router.decide(input_bytes=nbytes, deadline_s=opts.deadline)
        site_id, chosen = decision.site_id, decision.chosen
        if decision.at_risk and chosen is not None:
            # Said now, at submission: the typical completion is past the deadline (will
            # miss), or only the slow end of the measured spread is (at risk).
            verdict = "will miss" if decision.will_miss else "at risk"
            self.say(f"{name} -> {self.names.get(site_id, site_id)}: {verdict} its {opts.deadline:g} s deadline: "
                     f"predicted {chosen.total_s:.1f} s, {chosen.high_s:.1f} s at p{round(100 * self.router.quantile)}")
        job = self.apps[site_id].submit(
            f"{self.run_id}/{name}", rings=opts.rings,
            transfers={"dataset": f"{opts.in_location}:/{self.run_id}/{name}.h5",
                       "result": f"{opts.out_location}:/{self.run_id}/{name}.json",
                       "viewer": f"{opts.out_location}:/{self.run_id}/{name}_results.hdf"},
            tags={"exp": self.run_id, "dataset": name, **opts.extra_tags}, num_nodes=1, node_packing_count=1,
            data=decision.job_data())  # the prediction travels with the job: any router calibrates on it
        self.router.record(decision, job.id)  # its error, once finished, calibrates the margin
        output = (opts.results_dir / self.run_id / f"{name}.json").resolve()
        self.submitted.put((job, Record(dataset=name, truth=truth, site_id=site_id,
                                        site_name=self.names.get(site_id, ""), job_id=job.id,
                                        submitted=self.now(), output=str(output), deadline_s=opts.deadline,
                                        predicted_s=chosen.total_s if chosen else None,
                                        predicted_error_s=chosen.error_s if chosen else None,
                                        predicted_miss=decision.will_miss,
                                        predicted_high_s=chosen.high_s if chosen else None,
                                        at_risk=decision.at_risk)))
        self.submitted_by_site[site_id] += 1
        return site_id

    # -- results as they come --------------------------------------------------------
    def collect(self) -> list[Record]:
        producer = threading.Thread(target=self.produce, name="xpcs-detector", daemon=True)
        producer.start()
        pending: dict[int, tuple[Job, Record]] = {}
        producing = True
        deadline = time.monotonic() + self.opts.timeout
        while producing or pending:
            # New submissions join the wait set; the wait wakes on a final-state event or
            # after a short bound, so new jobs are picked up between completions.
            try:
                while True:
                    item = self.submitted.get(timeout=0 if pending or not producing else 1.0)
                    if item is None:
                        producing = False
                        break
                    pending[item[0].id] = item
            except queue.Empty:
                pass
            if self.producer_error is not None:
                raise self.producer_error
            self.progress()
            if not pending:
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} datasets not reduced after {self.opts.timeout:g} s")
            done, _ = wait([job for job, _ in pending.values()], timeout=0.5, return_when=FIRST_COMPLETED,
                           client=self.client)
            for job in sorted(done, key=lambda j: j.id):
                _, rec = pending.pop(job.id)
                self.finish(job, rec)
        self.progress(force=True)
        self.records.sort(key=lambda r: r.dataset)
        return self.records

    def finish(self, job: Job, rec: Record) -> None:
        """A job reached a final state: read the results the site staged out (JOB_FINISHED
        means they have landed at the results location)."""
        rec.state, rec.done = job.state, self.now()
        self.finished_by_site[rec.site_id] += 1
        fitted = None
        if job.state == "JOB_FINISHED":
            try:
                fitted = json.loads(Path(rec.output).read_text()).get("diffusion_m2_per_s")
            except (OSError, ValueError) as exc:
                rec.message = f"JOB_FINISHED but its staged-out results are unreadable: {exc}"
        else:
            rec.message = job.state_message or job.error_tail[-300:]
        if fitted is not None:
            rec.fitted = float(fitted)
            rec.rel_error = rec.fitted / rec.truth - 1.0
            if self.opts.each or abs(rec.rel_error) > TOLERANCE:
                self.say(f"{rec.dataset} @ {rec.site_name:<6} D = {rec.fitted:.3e}  truth {rec.truth:.3e}  "
                         f"({rec.rel_error:+.1%})  {rec.done - rec.submitted:5.1f} s after submission")
        else:
            rec.message = rec.message or "no fitted D in the results"
            self.say(f"{rec.dataset} @ {rec.site_name:<6} ended {job.state}: {rec.message}")
        self.records.append(rec)

    def progress(self, force: bool = False) -> None:
        """A line of live figures, at most every `progress_every` seconds and only when
        something changed: datasets submitted and finished per site (finished/submitted),
        nodes each site's pilots hold now, and the fit errors so far."""
        if self.opts.quiet or not self.burst_lock.acquire(blocking=False):
            return
        self.burst_lock.release()
        now = self.now()
        last_at, last_key = self.last_progress
        if not force and now - last_at < self.opts.progress_every:
            return
        try:
            held = {s.site_id: s.held_nodes for s in self.router.statistics()}
        except Exception:  # noqa: BLE001 - progress is cosmetic; the run goes on
            held = {}
        key = (sum(self.submitted_by_site.values()), sum(self.finished_by_site.values()), tuple(sorted(held.items())))
        if not force and (key == last_key or not key[0]):
            return
        self.last_progress = (now, key)
        sites = "  ".join(f"{self.names[s]} {self.finished_by_site[s]}/{self.submitted_by_site[s]} "
                          f"[{held.get(s, 0)}n]" for s in self.router.site_ids)
        errors = [abs(r.rel_error) for r in self.records if r.rel_error is not None]
        fits = f"  |D err| median {np.median(errors):.1%} max {max(errors):.1%}" if errors else ""
        self.say(f"done {key[1]:>3}/{key[0]:<3} of {self.opts.datasets}  {sites}{fits}")

    def summary(self) -> dict[str, Any]:
        by_site = Counter(r.site_name for r in self.records)
        errors = [abs(r.rel_error) for r in self.records if r.rel_error is not None]
        turnarounds = [r.turnaround_s for r in self.records if r.turnaround_s is not None]
        off = [r.turnaround_s - r.predicted_s for r in self.records
               if r.turnaround_s is not None and r.predicted_s is not None]
        return {
            "run_id": self.run_id, "strategy": self.opts.strategy, "datasets": len(self.records),
            "finished": sum(r.state == "JOB_FINISHED" for r in self.records),
            "placements": dict(sorted(by_site.items())),
            "max_rel_error": max(errors) if errors else None,
            "median_rel_error": float(np.median(errors)) if errors else None,
            "elapsed_s": self.now(), "router_refreshes": self.router.refreshes,
            "turnaround_p50_s": float(np.percentile(turnarounds, 50)) if turnarounds else None,
            "turnaround_p99_s": float(np.percentile(turnarounds, 99)) if turnarounds else None,
            "deadline_s": self.opts.deadline,
            "deadline_misses": sum(bool(r.missed) for r in self.records) if self.opts.deadline else None,
            "predicted_misses": sum(bool(r.predicted_miss) for r in self.records) if self.opts.deadline else None,
            "at_risk": sum(bool(r.at_risk) for r in self.records) if self.opts.deadline else None,
            "prediction_error_p50_s": float(np.median(np.abs(off))) if off else None,
            # Calibration of the spread: how often the turnaround beat the predicted high
            # quantile (about 1 - quantile of the jobs when the spread is right).
            "beyond_high": sum(r.turnaround_s > r.predicted_high_s for r in self.records
                               if r.turnaround_s is not None and r.predicted_high_s is not None),
            "prediction_bias_s": float(np.median(off)) if off else None,
            "records": [{**asdict(r), "turnaround_s": r.turnaround_s, "missed": r.missed} for r in self.records],
        }


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(prog="scripts/xpcs_agent.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", required=True, help="comma-separated site names or ids to route over")
    p.add_argument("--datasets", type=int, default=60)
    p.add_argument("--burst", type=int, default=12, help="datasets per burst")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between burst starts")
    p.add_argument("--strategy", choices=STRATEGIES, default="best")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds after submission each result is due (the deadline strategy needs it)")
    p.add_argument("--charges", default="", help="site=charge per node-hour, comma-separated (deadline strategy's "
                                                 "cost; default 1 everywhere)")
    p.add_argument("--pregenerate", action="store_true",
                   help="write every dataset before the first burst (burst times then hold on a loaded machine)")
    p.add_argument("--window", type=float, default=30.0, help="throughput window of the router's statistics (s)")
    p.add_argument("--data-dir", type=Path, default=Path("xpcs-data"),
                   help="the instrument's folder: datasets are written here (the sites' location --in-location)")
    p.add_argument("--results-dir", type=Path, default=Path("xpcs-results"),
                   help="the folder of the sites' location --out-location, where results are staged out to")
    p.add_argument("--in-location", default="aps", help="transfer location the datasets are staged in from")
    p.add_argument("--out-location", default="results", help="transfer location the results are staged out to")
    p.add_argument("--size", type=int, default=32, help="detector rows = cols")
    p.add_argument("--frames", type=int, default=1024)
    p.add_argument("--rings", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="run id (the exp=<tag> job tag); default a fresh one")
    p.add_argument("--summary", type=Path, default=None, help="write the summary JSON here")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--each", action="store_true", help="print every result (default: progress lines, and results "
                                                       f"off by more than {TOLERANCE:.0%})")
    a = p.parse_args(argv)
    if a.datasets < 1 or a.burst < 1 or a.interval < 0:
        p.error("--datasets and --burst must be >= 1 and --interval >= 0")
    if a.strategy == "deadline" and not a.deadline:
        p.error("--strategy deadline needs --deadline SECONDS")
    if a.deadline is not None and a.deadline <= 0:
        p.error("--deadline must be positive seconds")
    try:
        charges = {k.strip(): float(v) for k, v in (kv.split("=", 1) for kv in a.charges.split(",") if kv.strip())}
    except ValueError:
        p.error(f"--charges wants site=number pairs, got {a.charges!r}")
    sites: list[Any] = [int(s) if s.strip().isdigit() else s.strip() for s in a.sites.split(",") if s.strip()]
    return Options(sites=sites, datasets=a.datasets, burst=a.burst, interval=a.interval, strategy=a.strategy,
                   window=a.window, data_dir=a.data_dir.resolve(), results_dir=a.results_dir.resolve(),
                   in_location=a.in_location, out_location=a.out_location, size=a.size, frames=a.frames,
                   rings=a.rings, seed=a.seed, tag=a.tag, summary=a.summary, timeout=a.timeout, quiet=a.quiet,
                   each=a.each, deadline=a.deadline, charges=charges,
                   pregenerate=a.pregenerate)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    with Client() as client:
        agent = Agent(client, opts)
        agent.say(f"run {agent.run_id}: {opts.datasets} datasets of {opts.frames} frames {opts.size}x{opts.size}, "
                  f"bursts of {opts.burst} every {opts.interval:g} s, routing '{opts.strategy}' over "
                  f"{', '.join(agent.names[s] for s in agent.router.site_ids)}")
        agent.collect()
        summary = agent.summary()
    if opts.summary:
        opts.summary.write_text(json.dumps(summary, indent=1))
    spread = ", ".join(f"{k}: {v}" for k, v in summary["placements"].items())
    err = summary["max_rel_error"]
    if summary["deadline_misses"] is not None:
        print(f"deadline {opts.deadline:g} s: {summary['deadline_misses']} missed, "
              f"{summary['predicted_misses']} predicted at submission ({summary['at_risk']} at risk)", flush=True)
    print(f"reduced {summary['finished']}/{summary['datasets']} datasets in {summary['elapsed_s']:.1f} s; "
          f"routing spread {spread}; max |D error| {err:.1%}" if err is not None else "no results", flush=True)
    return 0 if summary["finished"] == summary["datasets"] else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: the demo that started us cleans up
        print("agent interrupted", flush=True)
        sys.exit(130)
