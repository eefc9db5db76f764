#!/usr/bin/env python3
"""The bias of the per-pixel symmetric g2 normalisation, measured on synthetic data.

For every lag of the multi-tau schedule the same three per-pixel time averages are
taken (the product <I(t) I(t+tau)>, the past mean <I(t)> and the future mean
<I(t+tau)> over the overlapping frames) and combined two ways:

- symmetric, per pixel (what balsam_grpc.xpcs computes): the mean over the ring's
  pixels of product / (past mean * future mean);
- ring-mean (the standard estimator): the ring mean of the products divided by the
  product of the ring means of the past and future means.

Datasets from balsam_grpc.xpcs.synthetic (known D and contrast) at several run lengths,
several seeds each. Prints a Markdown table and writes the figure of docs/xpcs-normalisation.md:

    scripts/xpcs_norm_bias.py [--out docs/img/xpcs-normalisation-bias.png] [--seeds 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from balsam_grpc.xpcs.fit import fit_decay
from balsam_grpc.xpcs.geometry import ring_labels
from balsam_grpc.xpcs.multitau import lag_schedule
from balsam_grpc.xpcs.synthetic import generate


def both_estimators(frames: np.ndarray, labels: np.ndarray, n_rings: int, buffers: int = 8
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(lags in frames, overlap frames per lag, g2 symmetric, g2 ring-mean), g2 as (rings, lags)."""
    flat = labels.ravel()
    keep = (flat >= 0) & (flat < n_rings)
    rings = flat[keep]
    count = np.bincount(rings, minlength=n_rings).astype(float)
    series = frames.reshape(frames.shape[0], -1)[:, keep].astype(np.float64)
    schedule = lag_schedule(frames.shape[0], buffers)
    sym = np.zeros((n_rings, len(schedule)))
    ring = np.zeros_like(sym)
    lags, overlaps = [], []
    level_series, level = series, 0
    for i, (lvl, lag) in enumerate(schedule):
        while level < lvl:
            even = level_series.shape[0] // 2 * 2
            level_series = 0.5 * (level_series[0:even:2] + level_series[1:even:2])
            level += 1
        past, future = level_series[:-lag], level_series[lag:]
        product = (past * future).mean(axis=0)
        past_mean, future_mean = past.mean(axis=0), future.mean(axis=0)

        def ring_mean(x: np.ndarray) -> np.ndarray:
            return np.bincount(rings, weights=x, minlength=n_rings) / count
        sym[:, i] = ring_mean(product / (past_mean * future_mean))
        ring[:, i] = ring_mean(product) / (ring_mean(past_mean) * ring_mean(future_mean))
        lags.append(lag * 2**lvl)
        overlaps.append(past.shape[0] * 2**lvl)
    return np.array(lags), np.array(overlaps), sym, ring


def diffusion(tau: np.ndarray, g2: np.ndarray, q2: np.ndarray) -> float:
    gammas = np.array([fit_decay(tau, g, None).gamma_per_s for g in g2])
    ok = np.isfinite(gammas)
    return float(q2[ok] @ gammas[ok] / (q2[ok] @ q2[ok]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "xpcs-normalisation-bias.png")
    p.add_argument("--frames", default="512,1024,2048,4096")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--rings", type=int, default=8)
    p.add_argument("--diffusion", type=float, default=2.5e-14)
    a = p.parse_args(argv)
    runs = [int(x) for x in a.frames.split(",")]
    truth_d, dt = a.diffusion, 1e-3
    per_run: dict[int, dict[str, np.ndarray]] = {}
    for n in runs:
        acc: dict[str, list[np.ndarray]] = {"sym": [], "ring": [], "d_sym": [], "d_ring": []}
        for seed in range(a.seeds):
            data = generate(rows=a.size, cols=a.size, n_frames=n, diffusion_m2_per_s=truth_d, seed=1000 * n + seed)
            q_map = data.geometry.q_map()
            labels, _ = ring_labels(q_map, a.rings)
            inside = labels >= 0
            q2 = (np.bincount(labels[inside], weights=q_map[inside] ** 2, minlength=a.rings)
                  / np.bincount(labels[inside], minlength=a.rings))
            lags, overlaps, sym, ring = both_estimators(data.frames, labels, a.rings)
            tau = lags * dt
            acc["sym"].append(sym)
            acc["ring"].append(ring)
            acc["d_sym"].append(np.array(diffusion(tau, sym, q2)))
            acc["d_ring"].append(np.array(diffusion(tau, ring, q2)))
        per_run[n] = {k: np.array(v) for k, v in acc.items()} | {"tau": tau, "overlaps": overlaps, "q2": q2}
        print(f"{n} frames done", file=sys.stderr, flush=True)

    gamma = truth_d * per_run[runs[-1]]["q2"]  # per ring, the truth
    show_ring = 0
    print(f"| frames | run (s) | Γ·T, ring {show_ring} | g2−1 at the first lag: symmetric vs ring-mean | "
          "baseline at the longest lag: symmetric / ring-mean | fitted D − truth: symmetric / ring-mean |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n in runs:
        r = per_run[n]
        sym, ring = r["sym"].mean(axis=0), r["ring"].mean(axis=0)
        first = 100 * ((sym[:, 0] - 1) / (ring[:, 0] - 1) - 1)
        d_sym = 100 * (r["d_sym"].mean() / truth_d - 1)
        d_ring = 100 * (r["d_ring"].mean() / truth_d - 1)
        sem = 100 * np.std(r["d_sym"] / truth_d, ddof=1) / np.sqrt(len(r["d_sym"]))
        print(f"| {n} | {n * dt:.3g} | {gamma[show_ring] * n * dt:.0f} | {first[show_ring]:+.1f} % (rings: "
              f"{first.min():+.1f} to {first.max():+.1f} %) | {sym[show_ring, -1]:.4f} / {ring[show_ring, -1]:.4f} | "
              f"{d_sym:+.2f} % / {d_ring:+.2f} % (± {sem:.2f} %) |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(16, 4.8))
    n0 = runs[1] if len(runs) > 1 else runs[0]
    r = per_run[n0]
    tau = r["tau"]
    smooth = np.geomspace(tau[0], tau[-1], 200)
    for i, colour in ((0, "C0"), (a.rings - 1, "C2")):
        left.plot(tau, r["sym"].mean(axis=0)[i], "o", ms=4, color=colour,
                  label=f"ring {i}, symmetric per pixel")
        left.plot(tau, r["ring"].mean(axis=0)[i], "s", ms=4, mfc="none", color=colour,
                  label=f"ring {i}, ring-mean")
        left.plot(smooth, 1 + np.exp(-2 * gamma[i] * smooth), "-", color=colour, lw=1, label=f"ring {i}, truth")
    left.axhline(1, color="0.6", ls=":", lw=0.8)
    left.set_xscale("log")
    left.set(xlabel="delay τ (s)", ylabel="g₂(τ)", title=f"{n0} frames of 1 ms, mean of {a.seeds} datasets")
    left.legend(fontsize=7)
    left.grid(True, which="both", alpha=0.25)

    for n, colour in zip(runs, plt.cm.viridis(np.linspace(0, 0.85, len(runs))), strict=True):
        r = per_run[n]
        sym, ring = r["sym"].mean(axis=0)[0], r["ring"].mean(axis=0)[0]
        mid.plot(r["tau"], sym - ring, "o-", ms=3, color=colour, label=f"{n} frames")
        # First order: both means of a pixel over n frames scatter with the slow speckle;
        # their product is inflated by beta / (Gamma n dt) of the squared mean.
        eps = 1.0 / (gamma[0] * r["overlaps"] * dt)
        mid.plot(r["tau"], -eps * ring, "--", color=colour, lw=0.8,
                 label="small-lag estimate" if n == runs[-1] else None)
    mid.set_xscale("log")
    mid.set(xlabel="delay τ (s)", ylabel="g₂ symmetric − g₂ ring-mean",
            title=f"ring {show_ring} (slowest): symmetric − ring-mean\n(dashed: −g₂·β/(Γ·T_overlap), β = 1)")
    mid.legend(fontsize=8)
    mid.grid(True, which="both", alpha=0.25)

    xs = np.array([n * dt for n in runs])
    for key, label, marker in (("d_sym", "symmetric per pixel", "o"), ("d_ring", "ring-mean", "s")):
        vals = np.array([100 * (per_run[n][key] / truth_d - 1) for n in runs])
        right.errorbar(xs, vals.mean(axis=1), yerr=vals.std(axis=1, ddof=1) / np.sqrt(vals.shape[1]),
                       fmt=marker + "-", capsize=3, label=label)
    right.axhline(0, color="0.3", lw=1)
    right.set_xscale("log")
    right.set_xticks(xs, [f"{x:g}" for x in xs])
    right.minorticks_off()
    right.set(xlabel="run length T (s)", ylabel="fitted D − truth (%)",
              title=f"fitted D (8 rings, free baseline), ± s.e. over {a.seeds} datasets")
    right.legend(fontsize=8)
    right.grid(True, which="both", alpha=0.25)
    fig.tight_layout()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(f"figure: {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
