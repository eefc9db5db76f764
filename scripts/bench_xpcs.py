#!/usr/bin/env python3
"""XPCS kernels on one core and on two: ours against ESRF's xpcs-correlator, on the same raw HDF5 file.

Usage: scripts/bench_xpcs.py [--size 128] [--frames 2000] [--rings 16] [--no-theirs] [--no-two-cores] [--json]

Writes a synthetic raw file (size x size x frames, and one twice as long), then runs each
kernel in its own child process pinned to one core (BLAS, OpenMP and numba pools of one
thread), reading the same file:

  ours multi-tau      multi-tau g2 streamed from the file in frame blocks (+ fits)
  ours + two-time     the same pass also keeps the two-time maps (time bins capped)
  theirs              xpcs-correlator's correlator_dense_chunked, no dask, one numba/BLAS
                      thread, given the h5py dataset (its streaming input); it computes the
                      full two-time matrix per ring and g2 at every lag from its diagonals
  theirs-in-memory    the same given the frames as an array (read before the clock starts;
                      its growth then excludes the frames)

and then on two cores (pinned to two, pools of two threads): ours + two-time with
workers=2 (threads over multi-tau pixel tiles and two-time rings) and theirs with two
numba/BLAS threads. Per CPU-second a second core can only cost; per wall-second is what
it buys.

and prints frames/s (frames / wall seconds of the reduction, the file read included;
and frames per CPU-second, which a busy machine disturbs less),
the child's peak RSS while the reduction ran (the kernel's high-water mark, reset just
before it: what imports and numba's compiler held and freed earlier is not counted, what
stays resident is), and the reduction's growth: that peak less the RSS just before,
against the dataset's size. xpcs-correlator's numba JIT is measured apart (a first call on a tiny dataset) and
left out of its timed run. Last: ours on the run twice as long, to show memory flat in
run length. Needs the `xpcs-check` extra for the comparison (else --no-theirs).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# One core (or the child's CORES): pin BLAS/OpenMP/numba pools before numpy loads.
CORES = int(os.environ.get("BENCH_XPCS_CORES", "1"))
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[var] = str(CORES)
import benchkit  # noqa: E402, F401 - first: puts this checkout on sys.path


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _hwm_mb() -> float | None:
    """The kernel's high-water mark of this process's RSS (VmHWM), or None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: "5" to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return _hwm_mb() is not None


class RssPeak:
    """The highest RSS while the reduction runs. The kernel keeps it (VmHWM, reset just
    before): exact, and nothing runs beside the kernel. Where the reset is refused, a
    thread samples the RSS every 2 ms instead; its wakeups (and its GIL hand-offs) are
    billed to the process's CPU time, a few % of a one-core run, for ours and theirs
    alike. The process's ru_maxrss would also count what imports and numba's compiler
    held before the run."""

    def __init__(self) -> None:
        self.peak = _rss_mb()
        self.sampled = not _reset_hwm()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_mb())

    def __enter__(self) -> RssPeak:
        if self.sampled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sampled:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_mb())
        else:
            self.peak = max(self.peak, _hwm_mb() or 0.0, _rss_mb())


def child(kind: str, path: Path, rings: int) -> dict:
    """One kernel on one file, in this process: seconds, peak and baseline RSS."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:CORES]))
    import h5py
    import numpy as np

    from balsam_grpc.xpcs.analysis import reduce_file
    from balsam_grpc.xpcs.geometry import Geometry, ring_labels
    from balsam_grpc.xpcs.h5io import FRAMES, open_raw

    out: dict = {"kind": kind, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1}
    with open_raw(path) as raw:
        meta, n_frames, out["dataset_mb"] = raw.meta, raw.n_frames, raw.nbytes / 1e6
    labels, _ = ring_labels(Geometry(**meta["geometry"]).q_map(), rings)
    if kind.startswith("theirs"):  # theirs, theirs-in-memory, theirs x2
        import xpcscorr

        correlate = xpcscorr.correlator_dense_chunked
        options = {"dask_cluster_type": None, "chunks_N": 1}
        tiny = np.random.default_rng(0).poisson(5.0, (32, 8, 8)).astype(np.uint16)
        started = time.perf_counter()
        correlate(tiny, np.ones((8, 8), dtype=np.int32), extra_options=options)  # numba compiles here
        out["jit_s"] = time.perf_counter() - started
        if kind == "theirs-in-memory":  # the frames read first, not timed
            with h5py.File(path, "r") as f:
                frames = f[FRAMES][()]
            out["baseline_mb"] = _rss_mb()
            with RssPeak() as rss:
                started, cpu = time.perf_counter(), time.process_time()
                res = correlate(frames, labels + 1, extra_options=options)
                out["seconds"], out["cpu_s"] = time.perf_counter() - started, time.process_time() - cpu
        else:
            out["baseline_mb"] = _rss_mb()
            with RssPeak() as rss, h5py.File(path, "r") as f:
                started, cpu = time.perf_counter(), time.process_time()
                res = correlate(f[FRAMES], labels + 1, extra_options=options)
                out["seconds"], out["cpu_s"] = time.perf_counter() - started, time.process_time() - cpu
        out["g2_lag1"] = [float(x) for x in res.g2[:, 0]]
    else:
        out["baseline_mb"] = _rss_mb()
        with RssPeak() as rss:
            started, cpu = time.perf_counter(), time.process_time()
            red = reduce_file(path, n_rings=rings, twotime=kind.startswith("ours+twotime"), workers=CORES)
            out["seconds"], out["cpu_s"] = time.perf_counter() - started, time.process_time() - cpu
        out["g2_lag1"] = [float(r["g2"][0]) for r in red.summary["rings"]]
        out["rate_error"] = float(np.median([abs(r["gamma_per_s"] / r["true_gamma_per_s"] - 1)
                                             for r in red.summary["rings"]]))
        if red.twotime is not None:
            out["twotime_bins"], out["avg_frame"] = int(red.twotime.maps.shape[1]), red.twotime.avg_frame
    out["frames"] = n_frames
    out["frames_per_s"] = n_frames / out["seconds"]
    out["frames_per_cpu_s"] = n_frames / out["cpu_s"]
    # ru_maxrss follows VmHWM's reset: the peak while the reduction ran, resident imports included.
    out["peak_mb"] = max(_peak_mb(), rss.peak)
    out["rss_from"] = "sampled" if rss.sampled else "VmHWM"
    out["growth_mb"] = rss.peak - out["baseline_mb"]  # what the reduction itself added
    return out


def run_child(kind: str, path: Path, rings: int, cores: int = 1) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", kind, "--file", str(path), "--rings", str(rings)],
                          capture_output=True, text=True, env={**os.environ, "BENCH_XPCS_CORES": str(cores)})
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="detector rows = cols")
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--rings", type=int, default=16)
    parser.add_argument("--no-theirs", action="store_true", help="skip xpcs-correlator")
    parser.add_argument("--no-two-cores", action="store_true", help="skip the runs on two cores")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.file, args.rings)))
        return

    from balsam_grpc.xpcs.h5io import write_raw
    from balsam_grpc.xpcs.synthetic import default_geometry, iter_frames

    with tempfile.TemporaryDirectory(prefix="bench-xpcs-") as tmp:
        files = {}
        started = time.perf_counter()
        for n in (args.frames, 2 * args.frames):
            files[n] = write_raw(Path(tmp) / f"raw-{n}.h5", iter_frames(rows=args.size, cols=args.size, n_frames=n, seed=1),
                                 n_frames=n, geometry=default_geometry(args.size, args.size), frame_time_s=1e-3,
                                 truth={"diffusion_m2_per_s": 3e-14, "contrast": 1.0})
        generated_s = time.perf_counter() - started
        kinds = ["ours", "ours+twotime"] + ([] if args.no_theirs else ["theirs", "theirs-in-memory"])
        runs = [run_child(kind, files[args.frames], args.rings) for kind in kinds]
        if not args.no_two_cores and len(os.sched_getaffinity(0)) >= 2:
            runs += [run_child(kind, files[args.frames], args.rings, cores=2)
                     for kind in ["ours+twotime"] + ([] if args.no_theirs else ["theirs"])]
        longer = [run_child(kind, files[2 * args.frames], args.rings) for kind in ("ours", "ours+twotime")]
    load = os.getloadavg()[0]
    if args.json:
        print(json.dumps({"size": args.size, "frames": args.frames, "rings": args.rings, "load": load,
                          "runs": runs, "twice_as_long": longer}))
        return
    ds = runs[0]["dataset_mb"]
    print(f"XPCS kernels, {args.size}x{args.size} x {args.frames} frames (uint16, {ds:.0f} MB), {args.rings} rings, "
          f"load average {load:.1f} (generation, not timed: {generated_s:.1f} s)")
    print(f"  {'kernel':18s} {'cores':>5s} {'frames/s':>9s} {'per CPU-s':>9s} {'seconds':>8s} {'peak RSS':>9s} "
          f"{'peak/dataset':>12s} {'growth':>8s} {'growth/dataset':>15s}")
    for r in runs:
        print(f"  {r['kind']:18s} {r['cores']:5d} {r['frames_per_s']:9.0f} {r['frames_per_cpu_s']:9.0f} "
              f"{r['seconds']:8.2f} {r['peak_mb']:7.0f}MB {r['peak_mb'] / ds:11.2f}x "
              f"{r['growth_mb']:6.0f}MB {r['growth_mb'] / ds:14.2f}x")
    by = {(r["kind"], r["cores"]): r for r in runs}
    ours, tt = by[("ours", 1)], by[("ours+twotime", 1)]
    if ("theirs", 1) in by:
        t, m = by[("theirs", 1)], by[("theirs-in-memory", 1)]
        print(f"  ours/theirs, one core, frames per CPU-s: multi-tau "
              f"{ours['frames_per_cpu_s'] / t['frames_per_cpu_s']:.1f}x "
              f"({ours['frames_per_cpu_s'] / m['frames_per_cpu_s']:.1f}x theirs in memory), with two-time "
              f"{tt['frames_per_cpu_s'] / t['frames_per_cpu_s']:.1f}x "
              f"({tt['frames_per_cpu_s'] / m['frames_per_cpu_s']:.1f}x theirs in memory); per wall-s with two-time "
              f"{tt['frames_per_s'] / t['frames_per_s']:.1f}x; xpcs-correlator's numba JIT (not in its time): "
              f"{t['jit_s']:.1f} s")
        worst = max(abs(a - b) for a, b in zip(ours["g2_lag1"], t["g2_lag1"], strict=True))
        print(f"  g2 at lag 1, ours vs theirs: largest difference over the rings {worst:.1e}")
    if ("ours+twotime", 2) in by:
        tt2 = by[("ours+twotime", 2)]
        line = (f"  two cores, ours with two-time (workers=2): {tt2['frames_per_s']:.0f} frames per wall-s "
                f"({tt2['frames_per_s'] / tt['frames_per_s']:.2f}x its one-core), {tt2['frames_per_cpu_s']:.0f} per CPU-s")
        if ("theirs", 2) in by:
            t2 = by[("theirs", 2)]
            line += (f"; theirs {t2['frames_per_s']:.0f} per wall-s: ours/theirs on two cores "
                     f"{tt2['frames_per_s'] / t2['frames_per_s']:.1f}x per wall-s")
        print(line)
    print(f"  ours two-time: {tt['twotime_bins']} bins of {tt['avg_frame']} frames (theirs: every frame); "
          f"fitted rates vs truth: median error {ours['rate_error']:.1%}")
    print(f"  run twice as long ({2 * args.frames} frames, {2 * ds:.0f} MB), ours on one core:")
    for short, long in zip((ours, tt), longer, strict=True):
        print(f"    {short['kind']:16s} peak RSS {short['peak_mb']:.0f} -> {long['peak_mb']:.0f} MB, growth "
              f"{short['growth_mb']:.0f} -> {long['growth_mb']:.0f} MB (growth/dataset {short['growth_mb'] / ds:.2f}x "
              f"-> {long['growth_mb'] / (2 * ds):.2f}x); {long['frames_per_cpu_s']:.0f} frames per CPU-s")


if __name__ == "__main__":
    main()
