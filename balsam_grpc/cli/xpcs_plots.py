"""Pictures of XPCS results for a beamline scientist (matplotlib, Agg backend: no display).

Plotting only: everything drawn comes from the results files the analysis wrote (or, for
the two-time map, a plain 2-D array), so the CLI can draw without the analysis code.

- `plot_g2`: g2(tau) of chosen q rings with their fitted decays, on a log tau axis, and
  the decay rates Gamma against q^2 with the fitted and the true diffusion coefficient;
- `plot_two_time`: the two-time correlation map C(t1, t2) of one ring;
- `plot_diffusion`: the fitted D against the generator's truth across datasets.

Units on the axes are the ones used at the beamline: q in 1/Angstrom, tau and t in
seconds, D in um^2/s (the results files hold SI units: 1/m, s, m^2/s).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PER_ANGSTROM = 1e10     # 1/m per 1/Angstrom
UM2 = 1e-12             # m^2 per um^2
RESULT_KEYS = ("tau_s", "rings", "diffusion_m2_per_s")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def is_result(data: Any) -> bool:
    return isinstance(data, dict) and all(k in data for k in RESULT_KEYS)


H5_SUFFIXES = (".h5", ".hdf", ".hdf5", ".nxs")


def read_h5_result(path: Path) -> dict[str, Any] | None:
    """A results file in pyXPCSViewer's layout written by the reduction: its summary
    (/xpcs/balsam/summary: g2, fits, D, truth) and, when present, the two-time map of
    its first mapped ring (/xpcs/twotime/correlation_map/c2_NNNNN, one triangle stored,
    NNNNN the 1-based ring). None for other HDF5 files."""
    import h5py

    with h5py.File(path, "r") as f:
        if "/xpcs/balsam/summary" not in f:
            return None
        raw = f["/xpcs/balsam/summary"][()]
        data = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        maps = f.get("/xpcs/twotime/correlation_map")
        if maps is not None and len(maps):
            name = min(maps)
            half = maps[name][()].astype(np.float64)
            ring = int(name.rsplit("_", 1)[-1]) - 1
            avg = int(f["/xpcs/twotime/config/avg_frame"][()]) if "/xpcs/twotime/config/avg_frame" in f else 1
            frame_time = float(data.get("frame_time_s") or 1.0)
            rings = data.get("rings") or []
            data["two_time"] = {"c2": half + half.T - np.diag(np.diag(half)), "ring": ring, "bin_s": avg * frame_time,
                                "q_per_m": rings[ring]["q_per_m"] if ring < len(rings) else None}
    return data


def load_results(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """The XPCS results among `paths` (files, or folders searched for *.json and HDF5
    results), each with its file name under "path"; other files are skipped, unreadable
    ones raise."""
    found: list[dict[str, Any]] = []
    for path in paths:
        if Path(path).is_dir():
            files = sorted(p for p in Path(path).rglob("*") if p.suffix in (".json", *H5_SUFFIXES))
            # A dataset's JSON summary beside its HDF5 results file (NAME.json and
            # NAME_results.hdf, as the site app stages them out) is one result: the HDF5
            # file, which also carries the two-time maps.
            stems = {(p.parent, result_name({"path": str(p)})) for p in files if p.suffix in H5_SUFFIXES}
            files = [p for p in files if p.suffix in H5_SUFFIXES or (p.parent, p.stem) not in stems]
        else:
            files = [Path(path)]
        for file in files:
            try:
                if file.suffix in H5_SUFFIXES:
                    data = read_h5_result(file)
                else:
                    data = json.loads(file.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"{file}: not readable as XPCS results ({exc})") from exc
            if is_result(data):
                found.append({**data, "path": str(file)})
    return found


def default_rings(n_rings: int, count: int = 4) -> list[int]:
    """`count` rings spread from the smallest q to the largest."""
    if n_rings <= count:
        return list(range(n_rings))
    return sorted({round(i * (n_rings - 1) / (count - 1)) for i in range(count)})


def result_name(result: dict[str, Any]) -> str:
    """The results file's name (the dataset field is the job's local copy, the same
    name in every workdir)."""
    source = result.get("path") or result.get("dataset") or "dataset"
    stem = Path(str(source)).stem
    return stem.removesuffix("_results") or stem  # NAME_results.hdf: pyXPCSViewer's naming


def _truth_d(result: dict[str, Any]) -> float | None:
    truth = result.get("truth") or {}
    value = truth.get("diffusion_m2_per_s")
    return float(value) if value else None


def decay_curve(ring: dict[str, Any], tau: np.ndarray) -> np.ndarray:
    """The fitted model g2 = baseline + beta exp(-2 Gamma tau) of a ring."""
    return ring["baseline"] + ring["beta"] * np.exp(-2.0 * ring["gamma_per_s"] * tau)


def diffusion_error(result: dict[str, Any]) -> float:
    """One standard error of D = Gamma / <q^2> fitted through the origin: from the
    scatter of the rings' Gamma about the line (nan with fewer than two rings)."""
    pairs = [(r["q2_mean_per_m2"], r["gamma_per_s"]) for r in result["rings"]
             if r.get("gamma_per_s") is not None and math.isfinite(r["gamma_per_s"])]
    if len(pairs) < 2:
        return float("nan")
    q2 = np.array([p[0] for p in pairs])
    gamma = np.array([p[1] for p in pairs])
    d = float(result["diffusion_m2_per_s"])
    return float(np.sqrt(np.sum((gamma - d * q2) ** 2) / (len(pairs) - 1) / np.sum(q2**2)))


def plot_g2(path: Path, result: dict[str, Any], rings: Sequence[int] | None = None) -> Path:
    """g2(tau) with fits for `rings` (default: four from low to high q), and Gamma(q^2)."""
    plt = _pyplot()
    all_rings = result["rings"]
    chosen = list(rings) if rings is not None else default_rings(len(all_rings))
    bad = [i for i in chosen if not 0 <= i < len(all_rings)]
    if bad:
        raise ValueError(f"rings {bad} out of range: the results have rings 0..{len(all_rings) - 1}")
    tau = np.asarray(result["tau_s"], dtype=float)
    smooth = np.geomspace(tau.min(), tau.max(), 200)
    fig, (ax, rates) = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [1.35, 1]})
    colours = plt.cm.viridis(np.linspace(0.0, 0.85, max(len(chosen), 2)))
    for colour, i in zip(colours, chosen, strict=False):
        ring = all_rings[i]
        g2 = np.asarray(ring["g2"], dtype=float)
        err = np.asarray(ring["g2_err"], dtype=float)
        q = ring["q_per_m"] / PER_ANGSTROM
        label = (f"ring {i}: q = {q:.4f} Å⁻¹, Γ = {ring['gamma_per_s']:.3g} s⁻¹"
                 if ring.get("fit_ok") else f"ring {i}: q = {q:.4f} Å⁻¹ (fit failed)")
        ax.errorbar(tau, g2, yerr=err, fmt="o", ms=3.5, color=colour, elinewidth=0.8, capsize=0, label=label)
        if ring.get("fit_ok"):
            ax.plot(smooth, decay_curve(ring, smooth), "-", color=colour, lw=1.3)
    ax.axhline(1.0, color="0.6", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set(xlabel="delay τ (s)", ylabel="g₂(q, τ)",
           title=f"{result_name(result)}: g₂ per q ring (points ± s.e. over pixels; lines: fits)")
    ax.legend(fontsize=8, loc="upper right", title="fit: g₂ = b + β exp(−2Γτ)", title_fontsize=8)
    ax.grid(True, which="both", alpha=0.25)

    q2 = np.array([r["q2_mean_per_m2"] for r in all_rings]) / PER_ANGSTROM**2
    exponent = math.floor(math.log10(q2.max())) if q2.max() > 0 else 0
    unit = 10.0**exponent    # q^2 axis in units of 10^exponent 1/A^2 (no offset text to miss)
    gamma = np.array([r["gamma_per_s"] for r in all_rings], dtype=float)
    gamma_err = np.array([r.get("gamma_err") or 0.0 for r in all_rings], dtype=float)
    ok = np.isfinite(gamma)
    rates.errorbar(q2[ok] / unit, gamma[ok], yerr=np.nan_to_num(gamma_err[ok]), fmt="o", ms=4, color="C0", capsize=2,
                   label="fitted Γ per ring")
    line = np.linspace(0.0, q2.max() * 1.05, 50)
    d = result["diffusion_m2_per_s"]
    rates.plot(line / unit, d * PER_ANGSTROM**2 * line, "-", color="C0",
               label=f"Γ = D q², D = {d / UM2:.4g} ± {diffusion_error(result) / UM2:.2g} µm²/s")
    truth = _truth_d(result)
    if truth:
        rates.plot(line / unit, truth * PER_ANGSTROM**2 * line, "--", color="C3",
                   label=f"truth (generator): D = {truth / UM2:.4g} µm²/s")
    power = "".join("⁰¹²³⁴⁵⁶⁷⁸⁹"[int(c)] if c.isdigit() else "⁻" for c in str(exponent))
    rates.set(xlabel=f"q² (10{power} Å⁻²)", ylabel="Γ (s⁻¹)", title="relaxation rate against q²", xlim=(0, None),
              ylim=(0, None))
    rates.legend(fontsize=8, loc="upper left")
    rates.grid(True, alpha=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_two_time(path: Path, c2: np.ndarray, frame_time_s: float, *, title: str = "",
                  q_per_m: float | None = None) -> Path:
    """The two-time correlation map C(t1, t2) (a square 2-D array, one row per frame or
    per time bin of `frame_time_s`), with t1 and t2 in seconds from the start of the run."""
    c2 = np.asarray(c2, dtype=float)
    if c2.ndim != 2 or c2.shape[0] != c2.shape[1]:
        raise ValueError(f"a two-time map is a square 2-D array, got shape {c2.shape}")
    plt = _pyplot()
    span = c2.shape[0] * frame_time_s
    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    finite = c2[np.isfinite(c2)]
    off_diag = c2[~np.eye(c2.shape[0], dtype=bool)]
    off_diag = off_diag[np.isfinite(off_diag)]
    # The diagonal holds the (Poisson-inflated) zero-delay values: scale the colours to
    # the off-diagonal part, where the dynamics are.
    lo, hi = (np.percentile(off_diag, [1, 99.5]) if off_diag.size else (finite.min(), finite.max()))
    image = ax.imshow(c2, origin="lower", extent=(0, span, 0, span), cmap="viridis", vmin=lo, vmax=hi,
                      interpolation="nearest")
    bar = fig.colorbar(image, ax=ax, shrink=0.85)
    bar.set_label("C(t₁, t₂)")
    ax.set(xlabel="t₁ (s)", ylabel="t₂ (s)")
    ring = f", q = {q_per_m / PER_ANGSTROM:.4f} Å⁻¹" if q_per_m else ""
    ax.set_title(f"{title or 'two-time correlation'}{ring}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_diffusion(path: Path, results: Sequence[dict[str, Any]]) -> Path:
    """Fitted D against the truth, one point per dataset (with one standard error), and
    the relative error of each; datasets without a truth are left out."""
    rows = [(t, r["diffusion_m2_per_s"], diffusion_error(r), result_name(r)) for r in results
            if (t := _truth_d(r)) and r.get("diffusion_m2_per_s") is not None
            and math.isfinite(r["diffusion_m2_per_s"])]
    if not rows:
        raise ValueError("no results with both a fitted and a true D")
    plt = _pyplot()
    truth = np.array([x[0] for x in rows]) / UM2
    fitted = np.array([x[1] for x in rows]) / UM2
    err = np.nan_to_num(np.array([x[2] for x in rows])) / UM2
    rel = 100.0 * (fitted - truth) / truth
    fig, (ax, dev) = plt.subplots(1, 2, figsize=(12, 4.8))
    ax.errorbar(truth, fitted, yerr=err, fmt="o", ms=4, capsize=2, color="C0", label=f"{len(rows)} datasets (± 1 s.e.)")
    span = np.array([truth.min() * 0.9, truth.max() * 1.1])
    ax.plot(span, span, "-", color="0.3", lw=1, label="fitted = truth")
    ax.fill_between(span, span * 0.95, span * 1.05, color="0.5", alpha=0.15, label="± 5 %")
    ax.set(xlabel="true D (µm²/s)", ylabel="fitted D (µm²/s)", title="diffusion coefficient: fitted against truth")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(True, alpha=0.25)
    dev.errorbar(truth, rel, yerr=100.0 * err / truth, fmt="o", ms=4, capsize=2, color="C0")
    dev.axhline(0.0, color="0.3", lw=1)
    median = float(np.median(rel))
    dev.axhline(median, color="C3", lw=1, ls="--", label=f"median {median:+.2f} %")
    dev.set(xlabel="true D (µm²/s)", ylabel="(fitted − true) / true (%)",
            title=f"relative error; |error| median {np.median(np.abs(rel)):.2f} %, max {np.abs(rel).max():.2f} %")
    dev.legend(fontsize=8)
    dev.grid(True, alpha=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
