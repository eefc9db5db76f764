#!/usr/bin/env python3
"""The bias of the per-pixel symmetric g2 normalisation, measured on synthetic data.

The analysis's multi-tau kernel (balsam_grpc.xpcs.multitau) computes g2 with either
normalisation from the same sums:

- "pixel": symmetric, per pixel: the mean over the ring's pixels of
  <I(t) I(t+tau)> / (<I(t)> <I(t+tau)>), time averages over the overlapping frames;
- "ring" (the default, xpcs-correlator's estimator): the ring mean of the products
  divided by the product of the ring-mean intensities.

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

from balsam_grpc.xpcs.fit import fit_decay  # noqa: E402
from balsam_grpc.xpcs.geometry import ring_labels  # noqa: E402
from balsam_grpc.xpcs.multitau import lag_schedule, multitau_g2  # noqa: E402
from balsam_grpc.xpcs.synthetic import generate  # noqa: E402


def both_estimators(frames: np.ndarray, labels: np.ndarray, n_rings: int, frame_time_s: float, buffers: int = 8
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(lag times, overlap frames per lag, g2 per pixel, g2 ring-mean), g2 as (rings, lags):
    the analysis's own kernel, once with each normalisation."""
    pixel = multitau_g2(frames, labels, n_rings, frame_time_s, buffers=buffers, normalization="pixel")
    ring = multitau_g2(frames, labels, n_rings, frame_time_s, buffers=buffers, normalization="ring")
    overlaps = np.array([(frames.shape[0] // 2**level - lag) * 2**level
                         for level, lag in lag_schedule(frames.shape[0], buffers)])
    return pixel.tau_s, overlaps, pixel.g2, ring.g2


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
            tau, overlaps, sym, ring = both_estimators(data.frames, labels, a.rings, dt)
            # The truth at the level-0 lags (single frames): g2 - 1 = exp(-2 D q^2 tau) at
            # full contrast, averaged over each ring's pixels (q varies across a ring).
            lag0 = tau[:7]
            decay = np.exp(-2 * truth_d * q_map[inside][:, None] ** 2 * lag0[None, :])
            truth0 = np.stack([decay[labels[inside] == i].mean(axis=0) for i in range(a.rings)])
            acc["sym"].append(sym)
            acc["ring"].append(ring)
            acc["d_sym"].append(np.array(diffusion(tau, sym, q2)))
            acc["d_ring"].append(np.array(diffusion(tau, ring, q2)))
        per_run[n] = {k: np.array(v) for k, v in acc.items()} | {"tau": tau, "overlaps": overlaps, "q2": q2,
                                                                 "truth0": truth0}
        print(f"{n} frames done", file=sys.stderr, flush=True)

    gamma = truth_d * per_run[runs[-1]]["q2"]  # per ring, the truth
    show_ring = 0
    print("| frames | run T (s) | Γ·T, slowest ring | g2 − 1 at 1 ms against the truth, slowest ring: per pixel / "
          "ring-mean | the same, range over the rings: per pixel / ring-mean | baseline at the longest lag, slowest "
          "ring: per pixel / ring-mean | fitted D − truth: per pixel / ring-mean |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in runs:
        r = per_run[n]
        sym, ring = r["sym"].mean(axis=0), r["ring"].mean(axis=0)
        off_sym = 100 * ((sym[:, 0] - 1) / r["truth0"][:, 0] - 1)
        off_ring = 100 * ((ring[:, 0] - 1) / r["truth0"][:, 0] - 1)

        def d_off(key: str, r: dict[str, np.ndarray] = r) -> str:
            vals = 100 * (r[key] / truth_d - 1)
            return f"{vals.mean():+.2f} ± {vals.std(ddof=1) / np.sqrt(vals.size):.2f} %"
        print(f"| {n} | {n * dt:.3g} | {gamma[show_ring] * n * dt:.0f} | {off_sym[show_ring]:+.1f} % / "
              f"{off_ring[show_ring]:+.1f} % | {off_sym.min():+.1f}..{off_sym.max():+.1f} % / "
              f"{off_ring.min():+.1f}..{off_ring.max():+.1f} % | {sym[show_ring, -1]:.3f} / {ring[show_ring, -1]:.3f} | "
              f"{d_off('d_sym')} / {d_off('d_ring')} |")

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
                  label=f"ring {i}, per pixel")
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
        lag0, truth = r["tau"][:7], r["truth0"][show_ring]
        for key, style, name in (("sym", "o-", "per pixel"), ("ring", "s--", "ring-mean")):
            g2 = r[key].mean(axis=0)[show_ring, :7]
            mid.plot(lag0 * 1e3, 100 * ((g2 - 1) / truth - 1), style, ms=4, color=colour, mfc="none" if key == "ring"
                     else colour, label=f"{n} frames, {name}")
        mid.axhline(-100 * 2 / (gamma[show_ring] * n * dt), color=colour, ls=":", lw=1)
    mid.axhline(0, color="0.3", lw=1)
    mid.set(xlabel="delay τ (ms)", ylabel="(g₂ − 1) / truth − 1 (%)",
            title=f"ring {show_ring} (slowest), first 7 lags, against the truth\n"
                  "(dotted: the first-order estimate −2/(ΓT), β = 1)")
    mid.legend(fontsize=6.5, ncol=2)
    mid.grid(True, alpha=0.25)

    xs = np.array([n * dt for n in runs])
    for key, label, marker in (("d_sym", "per pixel", "o"), ("d_ring", "ring-mean", "s")):
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
