#!/usr/bin/env python3
"""XPCS kernel speed: multi-tau g2 of a synthetic speckle stack on one core.

Usage: scripts/bench_xpcs.py [--size 512] [--frames 1000] [--rings 16] [--json]
Prints frames per second of the reduction (g2 for every ring and lag, plus the fits);
generating the dataset is not timed. Memory: the reduction's working memory (the peak
of numpy allocations traced during one untimed run, beyond the dataset) against the
dataset's size, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import tracemalloc
from pathlib import Path

# One core, as the figure is quoted: pin BLAS/OpenMP pools before numpy loads.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from balsam_grpc.xpcs.analysis import analyze  # noqa: E402
from balsam_grpc.xpcs.synthetic import generate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="detector rows = cols")
    parser.add_argument("--frames", type=int, default=1000)
    parser.add_argument("--rings", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=2, help="timed runs; the best is reported")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    started = time.perf_counter()
    data = generate(rows=args.size, cols=args.size, n_frames=args.frames, seed=1)
    generated_s = time.perf_counter() - started
    meta = {"frame_time_s": data.frame_time_s, "geometry": data.geometry.to_dict(),
            "truth": {"diffusion_m2_per_s": data.diffusion_m2_per_s, "contrast": data.contrast}}
    tracemalloc.start()
    analyze(data.frames, meta, n_rings=args.rings)
    working_bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    best = float("inf")
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        results = analyze(data.frames, meta, n_rings=args.rings)
        best = min(best, time.perf_counter() - t0)
    errors = [abs(r["gamma_per_s"] / r["true_gamma_per_s"] - 1) for r in results["rings"]]
    figures = {
        "size": args.size, "frames": args.frames, "rings": args.rings, "lags": len(results["tau_s"]),
        "reduce_s": round(best, 3), "frames_per_s": round(args.frames / best, 1),
        "megapixel_frames_per_s": round(args.frames * args.size**2 / best / 1e6, 1),
        "generate_s": round(generated_s, 2), "median_rate_error": round(float(np.median(errors)), 4),
        "dataset_mb": round(data.frames.nbytes / 1e6, 1), "working_mb": round(working_bytes / 1e6, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"XPCS multi-tau g2, {args.size}x{args.size} x {args.frames} frames, {args.rings} rings, "
              f"{figures['lags']} lags, one core")
        print(f"  reduction: {best:.2f} s = {figures['frames_per_s']:.0f} frames/s "
              f"({figures['megapixel_frames_per_s']:.0f} Mpixel-frames/s)")
        print(f"  memory: dataset {figures['dataset_mb']:.0f} MB, reduction working memory "
              f"{figures['working_mb']:.0f} MB, process peak RSS {figures['peak_rss_mb']:.0f} MB")
        print(f"  fitted rates vs truth: median error {figures['median_rate_error']:.1%}")
        print(f"  (dataset generation, not timed: {generated_s:.1f} s)")


if __name__ == "__main__":
    main()
