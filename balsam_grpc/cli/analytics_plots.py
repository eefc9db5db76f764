"""PNG plots of `balsamctl analytics --plots DIR` (matplotlib, Agg backend: no display).

- throughput.png: jobs finished over time (cumulative) and per bin, per site and overall;
- utilisation.png: per site, nodes held by pilots and the running jobs' node footprint;
- latency.png: p50 and p99 of each phase (stage-in, wait, run, stage-out, total) per site.
Times are seconds since the first state change of the selection.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from balsam_grpc.sdk.analytics import (
    PHASES,
    Allocation,
    StateChange,
    held_over_time,
    running_over_time,
    throughput,
)

ALL = "all"


def _label(site: int | None, names: Mapping[int, str]) -> str:
    return ALL if site is None else names.get(site, str(site))


def _steps(series: list[tuple[datetime, float]], t0: datetime, t_end: datetime) -> tuple[list[float], list[float]]:
    """x, y of a step series starting at 0 at t0 and held until t_end."""
    xs, ys = [0.0], [0.0]
    for t, v in series:
        xs.append((t - t0).total_seconds())
        ys.append(v)
    xs.append((t_end - t0).total_seconds())
    ys.append(ys[-1])
    return xs, ys


def write_plots(folder: Path, changes: list[StateChange], allocations: Iterable[Allocation],
                names: Mapping[int, str], footprint: Mapping[int, float], bin_seconds: float,
                summary: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    t0 = min(c.time for c in changes)
    t_end = max(c.time for c in changes)
    sites = sorted({c.site_id for c in changes})
    colors = {s: plt.cm.tab10(i % 10) for i, s in enumerate(sites)}
    colors[None] = "black"  # type: ignore[index]
    written = []

    # Throughput: cumulative and per bin.
    bins = throughput(changes, bin_seconds)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for site in [*sites, None]:
        series = bins.get(site, [])
        if not series:
            continue
        finishes = sorted(c.time for c in changes if "JOB_FINISHED" in c.entered and (site is None or c.site_id == site))
        xs = [0.0] + [(t - t0).total_seconds() for t in finishes]
        ys = list(range(len(xs)))
        style = {"color": colors[site], "linewidth": 2.5 if site is None else 1.5}
        top.step(xs, ys, where="post", label=_label(site, names), **style)
        centers = [(t - t0).total_seconds() + bin_seconds / 2 for t, _, _ in series]
        rates = [n * 60.0 / bin_seconds for _, n, _ in series]
        bottom.plot(centers, rates, marker="o", markersize=3, label=_label(site, names), **style)
    top.set_ylabel("jobs finished (cumulative)")
    top.set_title("Throughput")
    top.legend(loc="upper left")
    top.grid(alpha=0.3)
    bottom.set_ylabel(f"jobs / min ({bin_seconds:g} s bins)")
    bottom.set_xlabel("seconds since the first event")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    written.append(_save(fig, folder / "throughput.png", plt))

    # Utilisation: held nodes vs running footprint, one panel per site.
    running = running_over_time(changes, footprint)
    held = held_over_time(allocations, until=t_end)
    fig, axes = plt.subplots(len(sites), 1, figsize=(9, 2.4 * len(sites) + 0.8), sharex=True, squeeze=False)
    for ax, site in zip(axes[:, 0], sites, strict=True):
        hx, hy = _steps(held.get(site, []), t0, t_end)
        rx, ry = _steps(running.get(site, []), t0, t_end)
        ax.fill_between(hx, hy, step="post", color=colors[site], alpha=0.2, label="nodes held by pilots")
        ax.step(rx, ry, where="post", color=colors[site], linewidth=1.5, label="running jobs (node footprint)")
        util = summary["sites"].get(_label(site, names), {}).get("utilisation")
        title = _label(site, names) + (f": utilisation {util:.0%}" if util is not None else "")
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_ylabel("nodes")
        ax.set_ylim(bottom=0, top=max(max(hy), max(ry), 1) * 1.15)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("seconds since the first event")
    fig.suptitle("Node utilisation")
    fig.tight_layout()
    written.append(_save(fig, folder / "utilisation.png", plt))

    # Latency breakdown: p50 bars with p99 markers, grouped by phase.
    fig, ax = plt.subplots(figsize=(9, 4.5))
    groups = [*sites, None]
    width = 0.8 / len(groups)
    for i, site in enumerate(groups):
        lat = summary["sites"].get(_label(site, names), {}).get("latency_seconds", {})
        xs = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(PHASES))]
        p50 = [(lat.get(p) or {}).get("p50") or 0.0 for p in PHASES]
        p99 = [(lat.get(p) or {}).get("p99") or 0.0 for p in PHASES]
        ax.bar(xs, p50, width, color=colors[site], alpha=0.85, label=f"{_label(site, names)} p50")
        ax.scatter(xs, p99, color=colors[site], marker="_", s=300, linewidths=2.5)
    ax.scatter([], [], color="gray", marker="_", s=300, linewidths=2.5, label="p99")
    ax.set_xticks(range(len(PHASES)), [p.replace("_", "-") for p in PHASES])
    ax.set_ylabel("seconds")
    ax.set_title("Latency breakdown of finished jobs (bars p50, dashes p99)")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    written.append(_save(fig, folder / "latency.png", plt))
    return written


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
