"""`balsamctl job ...`: create, list, show, modify, delete, history, wait, watch."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import typer

from balsam_grpc.cli import context as ctx
from balsam_grpc.cli import output as out
from balsam_grpc.cli.events import Follower, deadline_after
from balsam_grpc.cli.errors import EXIT_FAILED, EXIT_NO_JOBS, describe, fail, print_error, usage
from balsam_grpc.cli.filters import (
    FINAL_STATES,
    INT32_MAX,
    INT32_MIN,
    MAX_ID,
    STATE_NAMES,
    JobSelection,
    job_filters,
    parse_key_values,
    parse_states,
    parse_tags,
)
from balsam_grpc.cli.jobspec import JobSpecError, read_job_lines, spec_from_dict, validate_specs
from balsam_grpc.cli.output import Column, Format, NoHeaderOpt, OutputOpt
from balsam_grpc.core.errors import BalsamError
from balsam_grpc.core.structs import struct_to_dict
from balsam_grpc.sdk.models import BULK_CHUNK, TOO_LARGE, create_jobs
from balsam_grpc.v1 import event_service_pb2, job_pb2, job_service_pb2

job_app = typer.Typer(help="Create, list, change and follow jobs.", no_args_is_help=True,
                   rich_markup_mode="markdown")

STATE_PREFIX = "JOB_STATE_"
FINAL_NUMBERS = frozenset(job_pb2.JobState.Value(STATE_PREFIX + s) for s in FINAL_STATES)
FINISHED = job_pb2.JOB_STATE_JOB_FINISHED


def state_name(number: int) -> str:
    return out.enum_name(job_pb2.JobState, number, STATE_PREFIX)


JOB_COLUMNS = [
    Column("ID", lambda j: j.id, no_wrap=True, justify="right"),
    Column("STATE", lambda j: state_name(j.state), no_wrap=True),
    Column("APP", lambda j: ctx.app_name(j.app_id)),
    Column("SITE", lambda j: ctx.site_name(j.site_id)),
    Column("WORKDIR", lambda j: j.workdir, ratio=2),
    Column("TAGS", lambda j: dict(j.tags), ratio=2),
    Column("NAME", lambda j: j.name, wide_only=True),
    Column("NODES", lambda j: j.resources.num_nodes, wide_only=True, justify="right"),
    Column("PRIO", lambda j: j.priority, wide_only=True, justify="right"),
    Column("RUNS", lambda j: j.run_count, wide_only=True, justify="right"),
    Column("RC", lambda j: j.return_code if j.HasField("return_code") else "", wide_only=True, justify="right"),
    Column("UPDATED", lambda j: j.update_time, wide_only=True, no_wrap=True),
    Column("MESSAGE", lambda j: j.state_message, wide_only=True, ratio=2),
]


# --------------------------------------------------------------------------- create

@job_app.command("create")
def create(
    app: Annotated[str | None, typer.Option("--app", "-a", help="app name or id")] = None,
    site: Annotated[str | None, typer.Option("--site", help="site name or id (needed when the app name "
                                                              "exists at several sites)")] = None,
    workdir: Annotated[str | None, typer.Option("--workdir", "-w", help="workdir relative to the site's data "
                                                                         "folder")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", "-p", help="app parameter key=value (repeat)")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="tag key=value (repeat)")] = None,
    name: Annotated[str, typer.Option(help="display name")] = "",
    num_nodes: Annotated[int, typer.Option(help="nodes")] = 0,
    ranks_per_node: Annotated[int, typer.Option(help="MPI ranks per node")] = 0,
    threads_per_rank: Annotated[int, typer.Option(help="threads per rank")] = 0,
    threads_per_core: Annotated[int, typer.Option(help="hardware threads per core")] = 0,
    gpus_per_rank: Annotated[int, typer.Option(help="GPUs per rank")] = 0,
    node_packing_count: Annotated[int, typer.Option(help="jobs sharing one node")] = 0,
    wall_time_min: Annotated[int, typer.Option(help="expected run time in minutes")] = 0,
    priority: Annotated[int, typer.Option(help="higher runs first")] = 0,
    parent: Annotated[list[int] | None, typer.Option("--parent", help="parent job id (repeat)")] = None,
    transfer: Annotated[list[str] | None, typer.Option(help="transfer slot=location:/path (repeat)")] = None,
    data: Annotated[str | None, typer.Option(help="JSON object attached to the job")] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="JSON-lines file, one job per line "
                                                                     "('-' reads stdin)")] = None,
    chunk_size: Annotated[int, typer.Option(help="jobs per create call (halved while the server finds "
                                                     "a call too large)")] = BULK_CHUNK,
    output: OutputOpt = Format.table,
    no_header: NoHeaderOpt = False,
) -> None:
    """Create one job from flags, or many from a JSON-lines file.

    Every job is checked against its app's declaration (required and typed parameters,
    workdir) before anything is sent. In a file, each line is a Job in the protobuf
    JSON mapping plus the shorthands "app" and "site" (names or ids); --app/--site/--tag
    give defaults for lines that do not say.

    Examples:

      balsamctl job create --app hello --site laptop -w runs/1 -p name=world -t exp=a

      balsamctl job create --file jobs.jsonl --site laptop   # {"app": "hello", "workdir": "r/1", "parameters": {"name": "x"}}
    """
    if chunk_size < 1 or chunk_size > BULK_CHUNK:
        usage(f"--chunk-size must be between 1 and {BULK_CHUNK}, got {chunk_size}")
    tags = parse_tags(tag)
    defaults = {"app": app, "site": site, "tags": tags}
    try:
        if file is not None:
            if workdir or param or parent or transfer or data:
                usage("--file takes the jobs from the file: only --app, --site and --tag apply as defaults")
            specs = read_job_lines(_open(file), defaults, source=str(file))
        else:
            specs = [spec_from_dict(_flags_job(app, workdir, param, name, priority, parent, transfer, data, {
                "numNodes": num_nodes, "ranksPerNode": ranks_per_node, "threadsPerRank": threads_per_rank,
                "threadsPerCore": threads_per_core, "gpusPerRank": gpus_per_rank,
                "nodePackingCount": node_packing_count, "wallTimeMin": wall_time_min}), defaults, line_no=0)]
        validate_specs(specs, resolve_app=ctx.resolve_app)
    except JobSpecError as err:
        usage(err.message)
    created = _create_all(specs, chunk_size)
    if output in (Format.json, Format.yaml) or len(created) == 1:
        out.render(created, JOB_COLUMNS, output, no_header=no_header)
    else:
        first, last = created[0].id, created[-1].id
        out.write(f"created {len(created)} jobs (ids {first}..{last})")


def _flags_job(app: str | None, workdir: str | None, param: list[str] | None, name: str, priority: int,
               parent: list[int] | None, transfer: list[str] | None, data: str | None,
               resources: dict[str, int]) -> dict[str, Any]:
    if not app or not workdir:
        usage("give --app and --workdir (or --file)")
    try:
        extra = json.loads(data) if data else {}
    except json.JSONDecodeError as err:
        usage(f"--data is not JSON: {err}")
    if not isinstance(extra, dict):
        usage("--data must be a JSON object")
    if any(v < 0 for v in resources.values()):
        usage("resource values must not be negative")
    return {"workdir": workdir, "parameters": parse_key_values(param, "--param"), "name": name,
            "priority": priority, "parentIds": [str(p) for p in parent or []],
            "transfers": parse_key_values(transfer, "--transfer"),
            "resources": {k: v for k, v in resources.items() if v}, "data": extra}


def _open(file: Path) -> Iterable[str]:
    if str(file) == "-":
        return sys.stdin
    try:
        return file.read_text().splitlines()
    except OSError as err:
        usage(f"--file: cannot read {file}: {err.strerror}")


def _create_all(specs: list[Any], chunk_size: int) -> list[job_pb2.Job]:
    """Create in chunks (each call atomic on the server; one too large for the server is
    sent in halves), with a progress bar on a terminal; on failure say which line and how
    many jobs were already created."""
    c = ctx.client()
    created: list[job_pb2.Job] = []
    view = job_service_pb2.JOB_VIEW_FULL if len(specs) == 1 else job_service_pb2.JOB_VIEW_BASIC
    with out.progress(total=len(specs), description="creating jobs") as advance:
        try:
            for jobs in create_jobs(c, [s.job for s in specs], chunk_size=chunk_size, view=view, timeout=120):
                created.extend(jobs)
                advance(len(jobs))
        except BalsamError as err:
            done = f"; {len(created)} jobs created before it" if created else "; nothing created"
            # The failed call began with the first job not yet created.
            fail(f"{_failure(err, specs[len(created):])}{done}")
    return created


def _failure(err: BalsamError, rest: list[Any]) -> str:
    """The error of a create call whose jobs start at rest[0], with the line of the job at fault."""
    import re

    match = re.match(r"jobs\[(\d+)\]", err.field or "") or re.match(r"jobs\[(\d+)\]", err.message)
    if match and int(match.group(1)) < len(rest):
        return f"{rest[int(match.group(1))].prefix()}{describe(err)}"
    if err.reason in TOO_LARGE and rest:
        # Halving got down to this one job, and the server's "split the request" cannot help.
        return (f"{rest[0].prefix()}this job alone is more than the server takes in one call (make its data or "
                f"parameters smaller): {describe(err)}")
    return describe(err)


# ------------------------------------------------------------------------------- ls

@job_app.command("ls")
@job_filters
def ls(
    selection: JobSelection,
    by_state: Annotated[bool, typer.Option("--by-state", help="count jobs per state instead")] = False,
    by_site: Annotated[bool, typer.Option("--by-site", help="count jobs per site instead")] = False,
    order_by: Annotated[str, typer.Option(help="sort keys: id, create_time, update_time, state_time, "
                                               "priority, workdir; '-' for descending")] = "id",
    watch: Annotated[bool, typer.Option("--watch", "-W", help="keep the table live, updated by events")] = False,
    output: OutputOpt = Format.table,
    no_header: NoHeaderOpt = False,
) -> None:
    """List jobs, or count them per state/site.

    Examples:

      balsamctl job ls --state RUNNING,RUN_ERROR --tag exp=a

      balsamctl job ls --by-state --site laptop

      balsamctl job ls --since 2h -o json
    """
    if by_state or by_site:
        if watch:
            usage("--watch lists jobs; it does not combine with --by-state/--by-site")
        _summary(selection, by_state, by_site, output, no_header)
        return
    if watch:
        if output in (Format.json, Format.yaml):
            usage("--watch shows a live table; use `balsamctl job watch` for a stream of events")
        _live(selection, order_by, output, no_header)
        return
    jobs = list(ctx.iter_jobs(selection, order_by=order_by))
    out.render(jobs, JOB_COLUMNS, output, no_header=no_header)


def _summary(selection: JobSelection, by_state: bool, by_site: bool, fmt: Format, no_header: bool) -> None:
    if selection.limit is not None:
        usage("--limit does not apply to --by-state/--by-site counts")
    group_by = ([job_service_pb2.JOB_GROUP_BY_STATE] if by_state else []) + (
        [job_service_pb2.JOB_GROUP_BY_SITE] if by_site else [])
    flt = ctx.job_filter(selection)
    if flt is None:
        response = job_service_pb2.CountJobsResponse()
    else:
        response = ctx.client().call("JobService", "CountJobs",
                                     job_service_pb2.CountJobsRequest(filter=flt, group_by=group_by))
    groups = sorted(response.groups, key=lambda g: (ctx.site_name(g.site_id) if by_site else "", g.state))
    if fmt in (Format.json, Format.yaml):
        # The dimensions grouped by, and the count: a dimension not asked for is no field
        # of the answer (its 0 is no site or state).
        keys = {"count"} | ({"state"} if by_state else set()) | ({"siteId"} if by_site else set())
        rows = [{k: v for k, v in out.to_plain(g).items() if k in keys} for g in groups]
        out.write(out.dump([{"groups": rows, "total": response.total}], fmt))
        return
    columns = ([Column("SITE", lambda g: ctx.site_name(g.site_id))] if by_site else []) + (
        [Column("STATE", lambda g: state_name(g.state), no_wrap=True)] if by_state else []) + [
        Column("COUNT", lambda g: g.count, justify="right")]
    out.stdout().print(out.build_table(groups, columns, header=not no_header))
    if not no_header:
        out.stdout().print(f"total {response.total}")


def _live(selection: JobSelection, order_by: str, fmt: Format, no_header: bool) -> None:
    """A live table: the event stream says which jobs changed, only those are re-read."""
    from rich.live import Live

    flt = ctx.job_filter(selection)
    follower = Follower(_event_filter(selection)).start()
    jobs = {j.id: j for j in ctx.iter_jobs(selection, order_by=order_by)}

    def table() -> Any:
        rows = list(jobs.values())
        if selection.limit:
            rows = rows[:selection.limit]
        return out.build_table(rows, JOB_COLUMNS, wide=fmt is Format.wide, header=not no_header,
                               title=f"{len(jobs)} jobs ({selection.describe()}), live: Ctrl-C to stop")

    with follower, Live(table(), console=out.stdout(), auto_refresh=False) as live:
        for batch in follower.batches(until_interrupted=True):
            changed = sorted({e.job_id for e in batch if e.job_id})
            if not changed or flt is None:
                continue
            for i in range(0, len(changed), 1000):
                ids = changed[i:i + 1000]
                narrowed = job_pb2.JobFilter()
                narrowed.CopyFrom(flt)
                if narrowed.ids:
                    ids = sorted(set(ids) & set(narrowed.ids))
                del narrowed.ids[:]
                narrowed.ids.extend(ids)
                fresh = {j.id: j for j in ctx.paged("JobService", "ListJobs",
                                                    job_service_pb2.ListJobsRequest(filter=narrowed),
                                                    "jobs")} if ids else {}
                for job_id in changed[i:i + 1000]:
                    if job_id in fresh:
                        jobs[job_id] = fresh[job_id]
                    else:
                        jobs.pop(job_id, None)  # left the selection (or deleted)
            jobs = dict(sorted(jobs.items())) if order_by == "id" else jobs
            live.update(table(), refresh=True)


# ----------------------------------------------------------------------------- show

@job_app.command("show")
def show(
    job_ids: Annotated[list[int], typer.Argument(help="job ids", min=1, max=MAX_ID)],
    output: Annotated[Format, typer.Option("--output", "-o", help="table (fields), json or yaml")] = Format.table,
) -> None:
    """Show every field of jobs.

    Example: balsamctl job show 42 -o yaml
    """
    jobs = [ctx.get_job(i) for i in job_ids]
    for job in jobs:
        # The server answers with app_id only (app_name selects the app on create), so
        # appName was shown empty: it is the name of the app, as the APP column shows.
        app = ctx.apps().get(job.app_id)
        if app is not None and not job.app_name:
            job.app_name = app.name
    if output in (Format.json, Format.yaml):
        out.write(out.dump(jobs, output))
        return
    for job in jobs:
        fields: dict[str, Any] = {}
        for key, value in out.to_plain(job).items():
            if key == "appId":  # the app and site by name and id, in one row each
                fields["app"] = f"{ctx.app_name(job.app_id)} ({job.app_id})"
            elif key == "siteId":
                fields["site"] = f"{ctx.site_name(job.site_id)} ({job.site_id})"
            elif key != "appName":
                fields[key] = value
        fields["state"] = state_name(job.state)
        rows = [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in fields.items()]
        out.stdout().print(out.build_table(rows, [Column("FIELD", lambda r: r[0], no_wrap=True),
                                                  Column("VALUE", lambda r: r[1])], header=False))


# --------------------------------------------------------------------------- modify

@job_app.command("modify")
@job_filters
def modify(
    selection: JobSelection,
    set_state: Annotated[str | None, typer.Option(help="move to this state (must be legal from the "
                                                       "current one, e.g. KILLED)")] = None,
    set_tag: Annotated[list[str] | None, typer.Option(help="add or change tag key=value (repeat)")] = None,
    set_priority: Annotated[int | None, typer.Option(help="new priority", min=INT32_MIN, max=INT32_MAX)] = None,
    set_name: Annotated[str | None, typer.Option(help="new display name")] = None,
    message: Annotated[str, typer.Option(help="note recorded with a state change")] = "",
    all_jobs: Annotated[bool, typer.Option("--all", help="allow an empty filter (every job)")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show what would change; change nothing")] = False,
) -> None:
    """Change the selected jobs (one patch for all), after a confirmation with the count.

    Examples:

      balsamctl job modify --tag exp=a --set-state KILLED --yes

      balsamctl job modify --state FAILED --set-tag retry=1 --set-priority 5 --dry-run
    """
    patch = job_pb2.Job()
    paths: list[str] = []
    if set_state is not None:
        states = parse_states([set_state], "--set-state")
        if len(states) != 1:
            usage("--set-state takes one state")
        patch.state = job_pb2.JobState.Value(STATE_PREFIX + states[0])
        paths.append("state")
        if message:
            patch.state_message = message
            paths.append("state_message")
    elif message:
        usage("--message goes with --set-state")
    if set_tag:
        patch.tags.update(parse_tags(set_tag, "--set-tag"))
        paths.append("tags")
    if set_priority is not None:
        patch.priority = set_priority
        paths.append("priority")
    if set_name is not None:
        patch.name = set_name
        paths.append("name")
    if not paths:
        usage("nothing to change: give --set-state, --set-tag, --set-priority or --set-name")
    _require_filter(selection, all_jobs)
    changes = ", ".join(f"{p}={_patch_text(patch, p)}" for p in paths if p != "state_message")

    flt = ctx.bulk_filter(selection)
    if flt is None:
        out.write("no jobs selected; nothing to change")
        return

    def run(validate_only: bool) -> job_service_pb2.BatchUpdateJobsResponse:
        return ctx.client().call("JobService", "BatchUpdateJobs", job_service_pb2.BatchUpdateJobsRequest(
            filter=flt, patch=patch, update_mask={"paths": paths}, validate_only=validate_only), timeout=120)

    preview = run(True)
    _bulk(preview, "updated_count", f"modify {{n}} jobs ({changes})", yes=yes, dry_run=dry_run, run=run,
          done="modified {n} jobs")


def _patch_text(patch: job_pb2.Job, path: str) -> str:
    if path == "state":
        return state_name(patch.state)
    if path == "tags":
        return out.cell(dict(patch.tags))
    return str(getattr(patch, path))


def _require_filter(selection: JobSelection, all_jobs: bool, every: list[str] | None = None) -> None:
    """An empty selection needs --all; the server refuses an empty bulk filter, so --all
    is sent as the explicit list of states `every` (default: all of them)."""
    if not selection.is_empty:
        return
    if not all_jobs:
        usage("no filter given: select jobs with --state/--tag/--app/--site/--id/--since, or pass --all")
    selection.states = list(every if every is not None else STATE_NAMES)


def _bulk(preview: Any, count_field: str, question: str, *, yes: bool, dry_run: bool, run: Any, done: str) -> None:
    """Preview (validate_only) -> confirm -> apply -> report every refused item.

    The preview's count goes in the question; items the server would refuse are listed
    first so nobody confirms blind. A refused item makes the exit code 1."""
    would = getattr(preview, count_field)
    failures = [o for o in preview.outcomes if o.code]
    if dry_run:
        out.write(f"dry run: would {question.format(n=would)}" + (f"; {len(failures)} would be refused:"
                                                                 if failures else ""))
        _report_failures(failures, to_stdout=True)
        return
    if not would:
        if failures:
            _report_failures(failures)
            fail(f"nothing changed: all {len(failures)} selected jobs would be refused")
        out.write("no jobs selected; nothing changed")
        return
    if failures and not yes:  # said before the question; with --yes the outcomes below say it
        sys.stderr.write(f"{len(failures)} of the selected jobs would be refused (see --dry-run)\n")
    what = question.format(n=would)
    out.confirm(f"{what[0].upper()}{what[1:]}?", assume_yes=yes, what=what)
    result = run(False)
    out.write(done.format(n=getattr(result, count_field)))
    failures = [o for o in result.outcomes if o.code]
    if failures:
        _report_failures(failures)
        raise typer.Exit(EXIT_FAILED)


def _report_failures(failures: list[Any], *, to_stdout: bool = False, limit: int = 50) -> None:
    stream = sys.stdout if to_stdout else sys.stderr
    prefix = "  " if to_stdout else "error: "
    for o in failures[:limit]:
        stream.write(f"{prefix}job {o.id}: {' '.join(o.message.split())} ({o.reason})\n")
    if len(failures) > limit:
        stream.write(f"{prefix}... and {len(failures) - limit} more\n")
    stream.flush()


# ------------------------------------------------------------------------------- rm

@job_app.command("rm")
@job_filters
def rm(
    selection: JobSelection,
    all_jobs: Annotated[bool, typer.Option("--all", help="allow an empty filter (every job)")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show what would be deleted; delete nothing")] = False,
    cascade: Annotated[bool, typer.Option(help="also delete jobs whose children wait on them; each such child "
                                               "follows its parent-failure policy")] = False,
) -> None:
    """Delete the selected jobs, after a confirmation with the count. Running jobs are
    refused (kill them first: job modify --set-state KILLED), and so are jobs whose
    children still wait on them unless --cascade.

    Examples:

      balsamctl job rm --tag exp=old --dry-run

      balsamctl job rm --state FAILED,KILLED --yes
    """
    _require_filter(selection, all_jobs)
    flt = ctx.bulk_filter(selection)
    if flt is None:
        out.write("no jobs selected; nothing to delete")
        return

    def run(validate_only: bool) -> job_service_pb2.BatchDeleteJobsResponse:
        return ctx.client().call("JobService", "BatchDeleteJobs", job_service_pb2.BatchDeleteJobsRequest(
            filter=flt, validate_only=validate_only, cascade=cascade), timeout=120)

    _bulk(run(True), "deleted_count", "delete {n} jobs", yes=yes, dry_run=dry_run, run=run, done="deleted {n} jobs")


# ---------------------------------------------------------------------------- retry

@job_app.command("retry")
@job_filters
def retry(
    selection: JobSelection,
    reset_run_count: Annotated[bool, typer.Option(help="start the run count from zero, so the app's "
                                                       "max_retries applies afresh")] = False,
    all_jobs: Annotated[bool, typer.Option("--all", help="allow an empty filter (every retryable job)")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show what would be retried; change nothing")] = False,
) -> None:
    """Run FAILED, KILLED, RUN_ERROR and RUN_TIMEOUT jobs again, each from where it must
    restart (its parents, stage-in, preprocess, stage-out or the run itself); children
    their failure had failed wait on them again. Other selected jobs are refused.

    Examples:

      balsamctl job retry --state FAILED --tag exp=a --dry-run

      balsamctl job retry --id 17 --reset-run-count --yes
    """
    _require_filter(selection, all_jobs, every=["FAILED", "KILLED", "RUN_ERROR", "RUN_TIMEOUT"])
    flt = ctx.bulk_filter(selection)
    if flt is None:
        out.write("no jobs selected; nothing to retry")
        return

    def run(validate_only: bool) -> job_service_pb2.RetryJobsResponse:
        return ctx.client().call("JobService", "RetryJobs", job_service_pb2.RetryJobsRequest(
            filter=flt, validate_only=validate_only, reset_run_count=reset_run_count), timeout=120)

    _bulk(run(True), "retried_count", "retry {n} jobs", yes=yes, dry_run=dry_run, run=run, done="retried {n} jobs")


# -------------------------------------------------------------------------- history

EVENT_COLUMNS = [
    Column("TIME", lambda e: e.time, no_wrap=True),
    Column("FROM", lambda e: state_name(e.job_state.from_state) if e.job_state.from_state else "-", no_wrap=True),
    Column("TO", lambda e: state_name(e.job_state.to_state), no_wrap=True),
    Column("MESSAGE", lambda e: e.message, ratio=2),
    Column("DATA", lambda e: json.dumps(struct_to_dict(e.data)) if e.data.fields else "", ratio=1),
]


@job_app.command("history")
def history(
    job_id: Annotated[int, typer.Argument(help="job id", min=1, max=MAX_ID)],
    output: OutputOpt = Format.table,
    no_header: NoHeaderOpt = False,
) -> None:
    """The event log of one job: every state change with its time, message and data.

    Example: balsamctl job history 42
    """
    ctx.get_job(job_id)  # a clear NOT_FOUND instead of an empty table
    request = event_service_pb2.ListEventsRequest(filter=event_service_pb2.EventFilter(
        job_ids=[job_id], kinds=[event_service_pb2.EVENT_KIND_JOB_STATE]))
    events = list(ctx.paged("EventService", "ListEvents", request, "events"))
    out.render(events, EVENT_COLUMNS, output, no_header=no_header)


# ----------------------------------------------------------------------- wait/watch

def _event_filter(selection: JobSelection, to_states: Iterable[int] = ()) -> event_service_pb2.EventFilter:
    """The part of a job selection an event filter can express (ids, tags, site ids);
    the rest is checked on the jobs themselves."""
    flt = event_service_pb2.EventFilter(kinds=[event_service_pb2.EVENT_KIND_JOB_STATE], to_states=list(to_states))
    flt.job_ids.extend(selection.ids)
    flt.tags.update(selection.tags)
    if selection.sites:
        flt.site_ids.extend(ctx.resolve_site(s).id for s in selection.sites)
    ctx.check_apps(selection.apps)  # checked on each job's app as events come (watch)
    return flt


@job_app.command("wait")
@job_filters
def wait(
    selection: JobSelection,
    timeout: Annotated[float | None, typer.Option(help="give up after this many seconds (exit 2)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no summary, only the exit code")] = False,
) -> None:
    """Wait until every selected job is final. Exit 0: all JOB_FINISHED; 1: any FAILED or
    KILLED; 2: --timeout passed first; 3: no job matches. Driven by the event stream, not
    polling.

    Examples:

      balsamctl job wait --tag exp=a --timeout 600

      balsamctl job wait --id 41,42 && echo done
    """
    deadline = deadline_after(timeout)
    follower = Follower(_event_filter(selection, FINAL_NUMBERS)).start()
    pending: set[int] = set()
    outcome: dict[int, int] = {}
    for job in ctx.iter_jobs(selection, view=job_service_pb2.JOB_VIEW_BASIC):
        if job.state in FINAL_NUMBERS:
            outcome[job.id] = job.state
        else:
            pending.add(job.id)
    total = len(pending) + len(outcome)
    if not total:
        # Nothing to wait for is almost always a wrong filter (a typo in a tag), not
        # success: a script's `job wait && next-step` must not go on.
        follower.close()
        if not quiet:
            print_error(f"no jobs match {selection.describe()}: nothing to wait for")
        raise typer.Exit(EXIT_NO_JOBS)
    with follower, out.progress(total=total, description="jobs final", completed=len(outcome)) as advance:
        for batch in follower.batches(deadline) if pending else ():
            for event in batch:
                if event.job_id in pending and event.job_state.to_state in FINAL_NUMBERS:
                    pending.discard(event.job_id)
                    outcome[event.job_id] = event.job_state.to_state
                    advance(1)
            if not pending:
                break
    counts = _count_states(outcome.values())
    summary = f"{total} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items())
    if pending:
        if not quiet:
            print_error(f"timed out after {timeout:g} s: {len(pending)} of {total} jobs not final "
                        f"(e.g. {', '.join(map(str, sorted(pending)[:5]))}); {summary}")
        raise typer.Exit(2)
    bad = sorted(i for i, s in outcome.items() if s != FINISHED)
    if not quiet:
        out.write(summary)
    if bad:
        if not quiet:
            print_error(f"{len(bad)} jobs did not finish: {', '.join(map(str, bad[:20]))}"
                        + (" ..." if len(bad) > 20 else ""))
        raise typer.Exit(1)


def _count_states(states: Iterable[int]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in states:
        counts[state_name(s)] = counts.get(state_name(s), 0) + 1
    return dict(sorted(counts.items()))


@job_app.command("watch")
@job_filters
def watch(
    selection: JobSelection,
    replay: Annotated[bool, typer.Option(help="start with the matching history")] = False,
    timeout: Annotated[float | None, typer.Option(help="stop after this many seconds")] = None,
    output: Annotated[Format, typer.Option("--output", "-o", help="table (one line per event) or json "
                                                                  "(one JSON object per line)")] = Format.table,
) -> None:
    """Follow the state changes of the selected jobs as they happen (Ctrl-C stops).

    Events carry job ids, tags and sites; other filters (state, app) are checked on
    the job's current values.

    Example: balsamctl job watch --tag exp=a
    """
    flt = _event_filter(selection, [job_pb2.JobState.Value(STATE_PREFIX + s) for s in selection.states])
    deadline = deadline_after(timeout)
    with Follower(flt, replay=replay).start() as follower:
        for batch in follower.batches(deadline, until_interrupted=True):
            for event in batch:
                if selection.apps and not _app_matches(event.job_id, selection):
                    continue
                out.write(json.dumps(out.to_plain(event)) if output is Format.json else _event_line(event))


_app_cache: dict[int, bool] = {}


def _app_matches(job_id: int, selection: JobSelection) -> bool:
    if job_id not in _app_cache:
        try:
            job = ctx.get_job(job_id)
        except BalsamError:
            return False
        _app_cache[job_id] = any(a in (job.app_id, ctx.app_name(job.app_id)) for a in selection.apps)
    return _app_cache[job_id]


def _event_line(event: Any) -> str:
    frm = state_name(event.job_state.from_state) if event.job_state.from_state else "-"
    msg = f"  {' '.join(event.message.split())}" if event.message else ""
    return f"{out.fmt_time(event.time)}  job {event.job_id}  {frm} -> {state_name(event.job_state.to_state)}{msg}"
