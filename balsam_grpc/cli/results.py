"""`balsamctl results`: the science in the XPCS results, as a table and as pictures.

The results are the files the analysis jobs staged out (the JSON summary, or the HDF5
results file in pyXPCSViewer's layout, read with h5py): given as paths (files or
folders), or found from the jobs (`--tag exp=RUN`): each finished job's stage-out
transfer ("viewer": "results:/RUN/ds_results.hdf" where the job has one, else "result":
"results:/RUN/ds.json") names a location alias of its site, and a file:// location is a
folder on this machine. The CLI reads those files; it never runs
the analysis itself.

Pictures (with `--plots DIR`): g2(tau) with fits for the chosen q rings and Gamma(q^2)
per dataset (g2-<dataset>.png, the first `--datasets-plotted` datasets), the fitted D
against the truth across the datasets (diffusion.png), and the two-time map of a
dataset whose results carry one (twotime-<dataset>.png).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote, urlparse

import typer

from balsam_grpc.cli import context as ctx
from balsam_grpc.cli import output as out
from balsam_grpc.cli.errors import fail, require_extra, usage
from balsam_grpc.cli.filters import JobSelection
from balsam_grpc.cli.output import Column, Format, NoHeaderOpt, OutputOpt
from balsam_grpc.sdk.filters import parse_tags


def result_paths_of_jobs(tags: dict[str, str], slots: tuple[str, ...] = ("viewer", "result")
                         ) -> tuple[list[Path], list[str]]:
    """Local paths of the stage-outs of the finished jobs with `tags` (each job's first
    of `slots` it has: the HDF5 results file, which carries the two-time maps too, else
    the JSON summary), and why the others could not be read (no such slot, or a location
    that is not file://)."""
    selection = JobSelection(tags=tags, states=["JOB_FINISHED"])
    sites = ctx.sites()
    paths, skipped = [], []
    for job in ctx.iter_jobs(selection):
        target = next((job.transfers[s] for s in slots if job.transfers.get(s)), "")
        if not target or ":" not in target:
            skipped.append(f"job {job.id}: no {' or '.join(map(repr, slots))} transfer")
            continue
        alias, _, remote = target.partition(":")
        site = sites.get(job.site_id)
        url = next((loc.url for loc in (site.transfer_locations if site else ()) if loc.alias == alias), None)
        parsed = urlparse(url or "")
        if parsed.scheme != "file":
            skipped.append(f"job {job.id}: location {alias!r} is {url or 'unknown'}, not a folder here (file://)")
            continue
        paths.append(Path(unquote(parsed.path)) / remote.lstrip("/"))
    return paths, skipped


def _rings(spec: str) -> list[int] | None:
    if not spec:
        return None
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        usage(f"--rings wants ring numbers separated by commas, got {spec!r}")


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def results(
    paths: Annotated[list[Path] | None, typer.Argument(help="results files (the JSON summary, or the HDF5 results "
                                                                "in pyXPCSViewer's layout), or folders of them")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="read the results the finished jobs with this "
                                                                "tag (k=v) staged out to a file:// location")] = None,
    plots: Annotated[Path | None, typer.Option("--plots", help="write the pictures (PNG) into this folder")] = None,
    rings: Annotated[str, typer.Option("--rings", help="q rings in the g2 pictures, e.g. 0,3,7 "
                                                       "(default four from low to high q)")] = "",
    plotted: Annotated[int, typer.Option("--datasets-plotted", help="g2 pictures for this many datasets")] = 3,
    output: OutputOpt = Format.table,
    no_header: NoHeaderOpt = False,
) -> None:
    """Fitted diffusion coefficients against the truth, one row per dataset, and the
    pictures a beamline scientist reads: g2(tau) with fits, the two-time map, D against
    the truth.

    Examples:

      balsamctl results xpcs-results/run1/ --plots pictures/ --rings 0,3,7

      balsamctl results --tag exp=xpcs-1234 --plots pictures/
    """
    require_extra("plots", "numpy", "h5py", *(("matplotlib",) if plots is not None else ()))
    from balsam_grpc.cli.xpcs_plots import (
        diffusion_error,
        load_results,
        plot_diffusion,
        plot_g2,
        result_name,
    )

    chosen_rings = _rings(rings)
    if plotted < 0:
        usage(f"--datasets-plotted must be >= 0, got {plotted}")
    if plots is not None:
        out.make_folder(plots, "--plots")
    files = list(paths or [])
    skipped: list[str] = []
    if tag:
        try:
            tags = parse_tags(tag)
        except ValueError as exc:
            usage(f"--tag: {exc}")
        found, skipped = result_paths_of_jobs(tags)
        files += found
    if not files:
        usage("give results files or folders, or --tag k=v to read the results of finished jobs")
    missing = [str(p) for p in files if not p.exists()]
    if missing:
        fail(f"no such results file or folder: {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    try:
        found_results = load_results(files)
    except ValueError as exc:
        fail(str(exc))
    if not found_results:
        fail(f"no XPCS results among {len(files)} path(s) (a JSON summary with tau_s, rings and "
             "diffusion_m2_per_s, or an HDF5 results file with /xpcs/balsam/summary)")
    if chosen_rings is not None:
        n = min(len(r["rings"]) for r in found_results)
        if any(not 0 <= i < n for i in chosen_rings):
            usage(f"--rings: the results have rings 0..{n - 1}, got {rings}")
    rows = []
    for r in found_results:
        truth = (r.get("truth") or {}).get("diffusion_m2_per_s")
        fitted = r.get("diffusion_m2_per_s")
        rel = (fitted - truth) / truth if truth and fitted is not None and math.isfinite(fitted) else None
        rows.append({"dataset": result_name(r), "path": r["path"],
                     "frames": r.get("frames"), "rings": len(r["rings"]),
                     "rings_fitted": sum(bool(x.get("fit_ok")) for x in r["rings"]),
                     "diffusion_m2_per_s": fitted, "diffusion_err_m2_per_s": diffusion_error(r),
                     "true_diffusion_m2_per_s": truth, "rel_error": rel})
    written: list[Path] = []
    if plots is not None:
        for r, row in list(zip(found_results, rows, strict=True))[:plotted]:
            written.append(plot_g2(plots / f"g2-{row['dataset']}.png", r, chosen_rings))
            written += _two_time(plots, r, row["dataset"])
        if any(row["rel_error"] is not None for row in rows):
            written.append(plot_diffusion(plots / "diffusion.png", found_results))
    if output in (Format.json, Format.yaml):
        out.write(out.dump([{"results": rows, "plots": [str(p) for p in written], "skipped": skipped}], output))
        return
    um2 = 1e-12
    out.render(rows, [
        Column("DATASET", lambda r: r["dataset"], no_wrap=True),
        Column("FRAMES", lambda r: _num(r["frames"], "{}"), justify="right"),
        Column("RINGS_FIT", lambda r: f"{r['rings_fitted']}/{r['rings']}", justify="right"),
        Column("D_UM2_S", lambda r: _num(None if r["diffusion_m2_per_s"] is None else r["diffusion_m2_per_s"] / um2,
                                         "{:.5f}"), justify="right"),
        Column("±", lambda r: _num(r["diffusion_err_m2_per_s"] / um2, "{:.5f}"), justify="right"),
        Column("TRUE_D", lambda r: _num(None if r["true_diffusion_m2_per_s"] is None
                                        else r["true_diffusion_m2_per_s"] / um2, "{:.5f}"), justify="right"),
        Column("ERROR", lambda r: _num(None if r["rel_error"] is None else 100 * r["rel_error"], "{:+.2f}%"),
               justify="right")], output, no_header=no_header,
        title=f"{len(rows)} XPCS results: diffusion coefficient D (µm²/s) fitted through Γ = D q², and the truth")
    errors = [abs(r["rel_error"]) for r in rows if r["rel_error"] is not None]
    console = out.stdout()
    if errors:
        console.print(f"|D error| median {100 * statistics.median(errors):.2f}%, max {100 * max(errors):.2f}% "
                      f"over {len(errors)} datasets with a known truth")
    for why in skipped:
        console.print(f"skipped {why}")
    for path in written:
        console.print(f"plot: {path}")


def _two_time(folder: Path, result: dict[str, Any], name: str) -> list[Path]:
    """The two-time map, when the results carry one (HDF5 results with /xpcs/twotime:
    `load_results` puts it under "two_time": c2, bin_s, ring, q_per_m)."""
    tt = result.get("two_time")
    if not isinstance(tt, dict) or "c2" not in tt:
        return []
    from balsam_grpc.cli.xpcs_plots import plot_two_time

    step = tt.get("bin_s") or tt.get("frame_time_s") or result.get("frame_time_s") or 1.0
    ring = f" ring {tt['ring']}" if "ring" in tt else ""
    return [plot_two_time(folder / f"twotime-{name}.png", tt["c2"], float(step), title=f"{name}{ring}: two-time",
                          q_per_m=tt.get("q_per_m"))]
