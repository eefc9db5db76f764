"""`balsamctl analytics`: throughput, node utilisation and latency from the event log.

The server keeps no separate statistics: every state change is an event, and the SDK's
pure analytics functions (balsam_grpc.sdk.analytics) turn a window of them into figures,
per site and overall. Nodes held come from the sites' pilot batch jobs (start and end
times); a job's node footprint is num_nodes / node_packing_count.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from balsam_grpc.cli import context as ctx
from balsam_grpc.cli import output as out
from balsam_grpc.cli.errors import require_extra, usage
from balsam_grpc.cli.events import event_filter
from balsam_grpc.cli.output import Column, Format, NoHeaderOpt, OutputOpt
from balsam_grpc.sdk.analytics import (
    PHASES,
    Allocation,
    StateChange,
    activity,
    allocation,
    latency_breakdown,
    state_change,
    throughput,
)
from balsam_grpc.v1 import batch_job_service_pb2, event_service_pb2, job_service_pb2

ALL = "all"
_ID_CHUNK = 500


def state_counts(changes: Iterable[StateChange]) -> dict[str, int]:
    """How many times jobs entered each state (automatic steps included)."""
    counts: Counter[str] = Counter()
    for ch in changes:
        counts.update(ch.entered)
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _clean(value: Any, digits: int = 3) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, digits)
    return value


def summarize(changes: list[StateChange], bin_seconds: float, allocations: Iterable[Allocation] = (),
              site_names: Mapping[int, str] | None = None, footprint: Mapping[int, float] | None = None
              ) -> dict[str, Any]:
    """Plain data for every output format. `latency_seconds` and `throughput` are the
    overall figures; `sites` holds per-site (and "all") activity and latency."""
    names = dict(site_names or {})
    bins = throughput(changes, bin_seconds)
    latency = latency_breakdown(changes)
    acts = activity(changes, allocations, bin_seconds=bin_seconds, footprint=footprint)

    def latency_of(key: int | None) -> dict[str, Any]:
        return {phase: {k: _clean(v) for k, v in vars(p).items()} for phase, p in latency.get(key, {}).items()
                if p.count}

    sites = {}
    for key in sorted(acts, key=lambda k: (k is None, k or 0)):
        label = ALL if key is None else names.get(key, str(key))
        sites[label] = {"site_id": key, **{k: _clean(v) for k, v in vars(acts[key]).items()},
                        "latency_seconds": latency_of(key),
                        "throughput": [{"start": t.isoformat(), "finished": n, "cumulative": total}
                                       for t, n, total in bins.get(key, [])]}
    return {
        "events": len(changes),
        "jobs": len({c.job_id for c in changes}),
        "states": state_counts(changes),
        "throughput": [{"start": t.isoformat(), "finished": n, "cumulative": total}
                       for t, n, total in bins.get(None, [])],
        "latency_seconds": latency_of(None),
        "sites": sites,
    }


def _allocations(site_ids: set[int]) -> list[Allocation]:
    if not site_ids:
        return []
    request = batch_job_service_pb2.ListBatchJobsRequest()
    request.filter.site_ids.extend(sorted(site_ids))
    return [a for a in (allocation(b) for b in ctx.paged("BatchJobService", "ListBatchJobs", request, "batch_jobs"))
            if a is not None]


def _footprints(job_ids: list[int]) -> dict[int, float]:
    out: dict[int, float] = {}
    for i in range(0, len(job_ids), _ID_CHUNK):
        request = job_service_pb2.ListJobsRequest()
        request.filter.ids.extend(job_ids[i:i + _ID_CHUNK])
        for job in ctx.paged("JobService", "ListJobs", request, "jobs"):
            res = job.resources
            out[job.id] = max(res.num_nodes, 1) / max(res.node_packing_count, 1)
    return out


def analytics(
    since: Annotated[str, typer.Option("--since", help="window start: ISO time or an age (10m, 2h, 1d)")] = "1h",
    site: Annotated[list[str] | None, typer.Option("--site", help="only at this site (name or id)")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="only jobs with tag key=value")] = None,
    bin_seconds: Annotated[float, typer.Option("--bin", help="throughput bin in seconds")] = 60.0,
    plots: Annotated[Path | None, typer.Option("--plots", help="write PNG plots (throughput, utilisation, "
                                                               "latency) to this folder")] = None,
    output: OutputOpt = Format.table,
    no_header: NoHeaderOpt = False,
) -> None:
    """Summarise job activity from the event log, per site and overall: jobs finished
    and throughput over time, node utilisation (running jobs' node footprint over the
    nodes the site's pilots held), and latency percentiles of finished jobs (stage-in,
    wait, run, stage-out, total).

    Examples:

      balsamctl analytics --since 2h --tag exp=a

      balsamctl analytics --since 2024-05-01T08:00 --bin 300 -o json

      balsamctl analytics --tag exp=a --bin 10 --plots plots/
    """
    if bin_seconds <= 0:
        usage(f"--bin must be positive, got {bin_seconds:g}")
    if plots is not None:
        require_extra("plots", "matplotlib")
        out.make_folder(plots, "--plots")
    flt = event_filter(site=site, tag=tag, since=since, kind=["job_state"])
    request = event_service_pb2.ListEventsRequest(filter=flt)
    changes = [c for c in (state_change(e) for e in ctx.paged("EventService", "ListEvents", request, "events"))
               if c is not None]
    site_ids = {c.site_id for c in changes}
    names = {sid: s.name for sid, s in ctx.sites().items()} if changes else {}
    allocations = _allocations(site_ids)
    footprint = _footprints(sorted({c.job_id for c in changes}))
    summary = summarize(changes, bin_seconds, allocations, names, footprint)
    written: list[Path] = []
    if plots is not None and changes:
        from balsam_grpc.cli.analytics_plots import write_plots

        written = write_plots(plots, changes, allocations, names, footprint, bin_seconds, summary)
        summary["plots"] = [str(p) for p in written]
    if output in (Format.json, Format.yaml):
        out.write(out.dump([summary], output))
        return
    print_tables(summary, since=since, bin_seconds=bin_seconds, header=not no_header)
    for path in written:
        out.stdout().print(f"plot: {path}")


def print_tables(summary: dict[str, Any], *, since: str, bin_seconds: float, header: bool) -> None:
    console = out.stdout()
    console.print(f"{summary['events']} state changes of {summary['jobs']} jobs since {since}")
    if not summary["events"]:
        return
    console.print(out.build_table(list(summary["states"].items()), [
        Column("STATE", lambda kv: kv[0], no_wrap=True), Column("ENTERED", lambda kv: kv[1], justify="right")],
        header=header, title="\nstates entered"))
    rows = summary["throughput"]
    if rows:
        console.print(out.build_table(rows, [
            Column("BIN_START", lambda r: r["start"][:19].replace("T", " "), no_wrap=True),
            Column("FINISHED", lambda r: r["finished"], justify="right"),
            Column("CUMULATIVE", lambda r: r["cumulative"], justify="right")], header=header,
            title=f"\nthroughput (jobs finished per {bin_seconds:g} s, UTC)"))
    sites = list(summary["sites"].items())
    console.print(out.build_table(sites, [
        Column("SITE", lambda kv: kv[0], no_wrap=True),
        Column("FINISHED", lambda kv: kv[1]["finished"], justify="right"),
        Column("JOBS/MIN", lambda kv: _num(kv[1]["throughput_per_minute"], 1), justify="right"),
        Column("PEAK/MIN", lambda kv: _num(kv[1]["peak_per_minute"], 1), justify="right"),
        Column("RUNNING", lambda kv: _num(kv[1]["mean_running"], 2), justify="right"),
        Column("NODES", lambda kv: _num(kv[1]["mean_held_nodes"], 2), justify="right"),
        Column("UTIL", lambda kv: _pct(kv[1]["utilisation"]), justify="right")], header=header,
        title="\nper site over the run (RUNNING, NODES: time-averaged node footprint of running jobs and "
              "nodes held by pilots; UTIL = their ratio)"))
    latency = summary["latency_seconds"]
    if latency:
        console.print(out.build_table([(p, latency[p]) for p in PHASES if p in latency], [
            Column("PHASE", lambda r: r[0], no_wrap=True),
            *(Column(k.upper(), _stat_of(k), justify="right") for k in ("count", "p50", "p90", "p99", "mean", "max"))], header=header,
            title="\nlatency of finished jobs, all sites (seconds)"))
        console.print(out.build_table(sites, [
            Column("SITE", lambda kv: kv[0], no_wrap=True),
            *(Column(f"{phase.upper()} P50/P99", _phase_of(phase), justify="right") for phase in PHASES)],
            header=header,
            title="\nlatency per site, p50 / p99 (seconds)"))


def _stat_of(key: str) -> Any:
    return lambda row: _num(row[1][key])


def _phase_of(phase: str) -> Any:
    return lambda kv: _pair(kv[1]["latency_seconds"].get(phase))


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _pair(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "-"
    return f"{_num(stats['p50'], 2)} / {_num(stats['p99'], 2)}"
