"""`balsamctl route`: where a new job of an app would go, and why.

Prints each site's predicted completion of one more job, by term (stage-in, wait for a
slot or a pilot, run, stage-out), with its typical error, its 90th percentile (what the
deadline policy plans for: each term's measured spread, see balsam_grpc.sdk.routing)
and cost, the history the figures come from (samples, transfer rate, the cold start's
median..p90; `*` marks a term borrowed from the other sites' pooled history), and the
site each routing policy would choose. Nothing is submitted and no placement is counted.

The high quantile includes the margin calibrated on the routed jobs that have finished
(their predictions travel in their data, see `Decision.job_data`): the same margin the
router of the experiment plans with, once MIN_CALIBRATION of them have finished.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from balsam_grpc.cli import context as ctx
from balsam_grpc.cli import output as out
from balsam_grpc.cli.errors import usage
from balsam_grpc.cli.filters import parse_ref
from balsam_grpc.cli.output import Column, Format, NoHeaderOpt, OutputOpt
from balsam_grpc.sdk.routing import (
    STRATEGIES,
    SiteHistory,
    choose_best,
    choose_earliest,
    choose_for_deadline,
    choose_shortest_backlog,
    estimates,
)


def _rate(history: SiteHistory | None, term: str) -> str:
    model = getattr(history, term, None) if history else None
    if model is None or model.bytes_per_s is None:
        return "-"
    return f"{model.bytes_per_s / 1e6:.1f} MB/s"


def route(
    app: Annotated[str, typer.Option("--app", "-a", help="app name (registered at each site)")],
    site: Annotated[list[str] | None, typer.Option("--site", help="candidate site (name or id); default every site "
                                                                   "where the app is registered")] = None,
    input_bytes: Annotated[float, typer.Option("--input-bytes", help="the job's input size in bytes")] = 0.0,
    output_bytes: Annotated[float, typer.Option("--output-bytes", help="the job's output size in bytes")] = 0.0,
    deadline: Annotated[float | None, typer.Option("--deadline", help="seconds from now the result is due")] = None,
    in_location: Annotated[str | None, typer.Option("--in-location", help="only stage-ins from this location "
                                                                            "count for transfer rates")] = None,
    out_location: Annotated[str | None, typer.Option("--out-location", help="only stage-outs to this location")] = None,
    output: OutputOpt = Format.table,
    no_header: NoHeaderOpt = False,
) -> None:
    """Predict one more job's completion at each candidate site and show the choice of
    every routing policy.

    Examples:

      balsamctl route --app XpcsAnalysis

      balsamctl route --app XpcsAnalysis --input-bytes 4e6 --deadline 60 --in-location aps
    """
    from balsam_grpc.sdk.routing import Router

    if input_bytes < 0 or output_bytes < 0:
        usage("--input-bytes and --output-bytes must be >= 0")
    if deadline is not None and deadline <= 0:
        usage(f"--deadline must be positive seconds, got {deadline:g}")
    client = ctx.client()
    if site:
        site_ids = [ctx.resolve_site(parse_ref(s, "--site")).id for s in site]
    else:
        site_ids = sorted({a.site_id for a in ctx.apps().values() if a.name == app})
        if not site_ids:
            usage(f"no app named {app!r} at any site: see `balsamctl app ls`")
    router = Router(client, site_ids, "earliest", app=app, in_location=in_location, out_location=out_location)
    loads = router.loads()
    history = router.history()
    margin, finished = router.calibration()
    ests = estimates(loads, history, calibration_s=margin, input_bytes=input_bytes, output_bytes=output_bytes)
    choices: dict[str, Any] = {"earliest": choose_earliest(ests).site_id,
                               "shortest_backlog": choose_shortest_backlog(loads), "best": choose_best(loads),
                               "round_robin": site_ids[0]}
    if deadline is not None:
        chosen, miss = choose_for_deadline(ests, deadline)
        choices["deadline"] = chosen.site_id
    names = {s.site_id: s.name for s in loads}
    rows = [{**e.as_dict(), "backlog": next(s.backlog_jobs + s.running_jobs for s in loads if s.site_id == e.site_id),
             "run_samples": history[e.site_id].run.samples if history[e.site_id].run else 0,
             "stage_in_rate": _rate(history[e.site_id], "stage_in"),
             "pilot_delay_s": history[e.site_id].pilot_delay_s,
             "pilot_delay_samples": history[e.site_id].pilot_delay_samples,
             "pilot_delay_high_s": history[e.site_id].pilot_delay_high_s,
             "meets_deadline": None if deadline is None else e.high_s <= deadline}
            for e in ests]
    if output in (Format.json, Format.yaml):
        out.write(out.dump([{"app": app, "deadline_s": deadline, "sites": rows,
                             "calibration": {"margin_s": margin, "finished_predictions": finished,
                                             "needed": router.min_calibration},
                             "choices": {k: names.get(v, v) for k, v in choices.items()}}], output))
        return

    def secs(key: str, term: str | None = None) -> Any:
        def value(row: dict[str, Any]) -> str:
            star = "*" if term and term in row["borrowed"] else ""
            return f"{row[key]:.1f}{star}"
        return value
    columns = [Column("SITE", lambda r: r["site"], no_wrap=True),
               Column("BACKLOG", lambda r: r["backlog"], justify="right"),
               Column("STAGE_IN", secs("stage_in_s", "stage_in"), justify="right"),
               Column("WAIT", secs("wait_s", "pilot_delay"), justify="right"),
               Column("RUN", secs("run_s", "run"), justify="right"),
               Column("STAGE_OUT", secs("stage_out_s", "stage_out"), justify="right"),
               Column("TOTAL_S", lambda r: f"{r['total_s']:.1f} ±{r['error_s']:.1f}", justify="right", no_wrap=True),
               Column(f"P{round(100 * router.quantile)}_S", lambda r: f"{r['high_s']:.1f}", justify="right"),
               Column("COST_NODE_H", lambda r: f"{r['cost']:.4f}", justify="right"),
               Column("RUN_SAMPLES", lambda r: r["run_samples"], justify="right"),
               Column("IN_RATE", lambda r: r["stage_in_rate"], justify="right"),
               Column("PILOT_DELAY", lambda r: "-" if r["pilot_delay_s"] is None
                      else f"{r['pilot_delay_s']:.1f}..{r['pilot_delay_high_s']:.1f} (n={r['pilot_delay_samples']})",
                      justify="right")]
    if deadline is not None:
        columns.append(Column(f"MEETS_AT_P{round(100 * router.quantile)}",
                              lambda r: "yes" if r["meets_deadline"] else "NO"))
    out.render(rows, columns, output, no_header=no_header,
               title=f"one more {app} job ({input_bytes:g} B in, {output_bytes:g} B out), seconds from now; "
                     "* = borrowed from the other sites' history")
    p = round(100 * router.quantile)
    if margin is None:
        out.stdout().print(f"P{p}_S by the per-term spreads alone: {finished} routed job(s) finished with a "
                           f"prediction, {router.min_calibration} needed to calibrate")
    else:
        out.stdout().print(f"P{p}_S includes a calibrated margin of {margin:.1f} s (from {finished} routed jobs' "
                           "predictions against their turnarounds)")
    picks = "  ".join(f"{k}: {names.get(v, v)}" for k, v in choices.items() if k in STRATEGIES)
    out.stdout().print(f"policies would choose  {picks}")
    if deadline is not None and choices.get("deadline") is not None and miss:
        out.stdout().print(f"no site is predicted to meet the {deadline:g} s deadline")


