"""`balsamctl queue ...`: pilot batch jobs (submit, list, cancel/remove)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from balsam_grpc.cli import context as ctx
from balsam_grpc.cli import output as out
from balsam_grpc.cli.errors import describe, fail, print_error, usage
from balsam_grpc.cli.filters import INT32_MAX, MAX_ID, parse_key_values, parse_refs, parse_tags, split_list
from balsam_grpc.cli.output import Column, Format, NoHeaderOpt, OutputOpt
from balsam_grpc.core.errors import BalsamError
from balsam_grpc.sdk.convert import enum_names, enum_number
from balsam_grpc.v1 import batch_job_pb2, batch_job_service_pb2, common_pb2

queue_app = typer.Typer(help="Pilot batch jobs that run launchers at your sites.", no_args_is_help=True,
                   rich_markup_mode="markdown")

BJ_STATE = batch_job_pb2.BatchJobState.DESCRIPTOR
S = batch_job_pb2
# What `queue rm` does to a batch job in each state.
DELETE_STATES = frozenset({S.BATCH_JOB_STATE_PENDING_SUBMISSION, S.BATCH_JOB_STATE_SUBMIT_FAILED,
                           S.BATCH_JOB_STATE_FINISHED})
CANCEL_STATES = frozenset({S.BATCH_JOB_STATE_QUEUED, S.BATCH_JOB_STATE_RUNNING})


def bj_state(number: int) -> str:
    return out.enum_name(batch_job_pb2.BatchJobState, number, "BATCH_JOB_STATE_")


def _mode(number: int) -> str:
    return out.enum_name(common_pb2.JobMode, number, "JOB_MODE_").lower()


BATCH_COLUMNS = [
    Column("ID", lambda b: b.id, no_wrap=True, justify="right"),
    Column("SITE", lambda b: ctx.site_name(b.site_id)),
    Column("SCHED_ID", lambda b: b.scheduler_id, no_wrap=True),
    Column("QUEUE", lambda b: b.queue),
    Column("NODES", lambda b: b.num_nodes, justify="right"),
    Column("WALL_MIN", lambda b: b.wall_time_min, justify="right"),
    Column("MODE", lambda b: _mode(b.job_mode)),
    Column("STATE", lambda b: bj_state(b.state), no_wrap=True),
    Column("PROJECT", lambda b: b.project, wide_only=True),
    Column("TAGS", lambda b: dict(b.filter_tags), wide_only=True),
    Column("START", lambda b: b.start_time, wide_only=True, no_wrap=True),
    Column("END", lambda b: b.end_time, wide_only=True, no_wrap=True),
    Column("STATUS", lambda b: b.status_info, wide_only=True, ratio=2),
]


@queue_app.command("submit")
def submit(
    site: Annotated[str, typer.Option("--site", help="site name or id")],
    num_nodes: Annotated[int, typer.Option("--num-nodes", "-n", help="nodes to request", max=INT32_MAX)],
    wall_time_min: Annotated[int, typer.Option("--wall-time-min", "-t", help="wall time in minutes",
                                               max=INT32_MAX)],
    queue: Annotated[str, typer.Option("--queue", "-q", help="scheduler queue or partition (default: the "
                                                             "site's only allowed one)")] = "",
    project: Annotated[str, typer.Option("--project", "-A", help="project/account charged (default: the "
                                                                 "site's only allowed one)")] = "",
    job_mode: Annotated[str, typer.Option("--job-mode", help="serial or mpi")] = "mpi",
    tag: Annotated[list[str] | None, typer.Option("--tag", help="only run jobs with tag key=value")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", "-x", help="extra scheduler option key=value "
                                                                          "(allowed by the site)")] = None,
    output: OutputOpt = Format.table,
    no_header: NoHeaderOpt = False,
) -> None:
    """Request a pilot batch job; the site daemon submits it to the scheduler.

    Example: balsamctl queue submit --site theta -n 8 -t 60 -q debug -A myproj --job-mode mpi
    """
    if num_nodes < 1 or wall_time_min < 1:
        usage("--num-nodes and --wall-time-min must be at least 1")
    try:
        mode = enum_number(common_pb2.JobMode.DESCRIPTOR, job_mode, "job mode")
    except ValueError:
        usage(f"--job-mode: {job_mode!r} is not one of: {', '.join(n.lower() for n in enum_names(common_pb2.JobMode.DESCRIPTOR))}")
    target = ctx.resolve_site(parse_refs([site])[0])
    # A site that allows exactly one queue or project (the local platform) needs no flag.
    queue = queue or (target.allowed_queues[0] if len(target.allowed_queues) == 1 else "")
    project = project or (target.allowed_projects[0] if len(target.allowed_projects) == 1 else "")
    batch_job = batch_job_pb2.BatchJob(
        site_id=target.id, num_nodes=num_nodes, wall_time_min=wall_time_min,
        queue=queue, project=project, job_mode=mode, filter_tags=parse_tags(tag),
        optional_params=parse_key_values(param, "--param"))
    created = ctx.client().call("BatchJobService", "CreateBatchJob",
                                batch_job_service_pb2.CreateBatchJobRequest(batch_job=batch_job)).batch_job
    out.render([created], BATCH_COLUMNS, output, no_header=no_header)


@queue_app.command("ls")
def ls(
    site: Annotated[list[str] | None, typer.Option("--site", help="only at this site (name or id)")] = None,
    state: Annotated[list[str] | None, typer.Option("--state", "-s", help="only in these states")] = None,
    show_all: Annotated[bool, typer.Option("--all", help="include finished batch jobs")] = False,
    limit: Annotated[int | None, typer.Option("--limit", "-n", help="at most this many")] = None,
    output: OutputOpt = Format.table,
    no_header: NoHeaderOpt = False,
) -> None:
    """List batch jobs (finished ones only with --all or --state FINISHED).

    Example: balsamctl queue ls --site theta -o wide
    """
    flt = batch_job_service_pb2.BatchJobFilter(states=_states(state))
    flt.site_ids.extend(ctx.resolve_site(s).id for s in parse_refs(site))
    if not flt.states and not show_all:
        flt.states.extend(v for v in batch_job_pb2.BatchJobState.values()
                          if v not in (0, S.BATCH_JOB_STATE_FINISHED))
    request = batch_job_service_pb2.ListBatchJobsRequest(filter=flt)
    items = list(ctx.paged("BatchJobService", "ListBatchJobs", request, "batch_jobs", limit=limit))
    out.render(items, BATCH_COLUMNS, output, no_header=no_header)


def _states(values: list[str] | None) -> list[int]:
    numbers = []
    for value in split_list(values):
        try:
            numbers.append(enum_number(BJ_STATE, value, "batch job state"))
        except ValueError:
            usage(f"--state: unknown batch job state {value!r}; valid states: {', '.join(enum_names(BJ_STATE))}")
    return numbers


def plan_removal(items: list[batch_job_pb2.BatchJob]) -> tuple[list[Any], list[Any], list[Any]]:
    """(to cancel in the scheduler, to delete, already being cancelled)."""
    cancel = [b for b in items if b.state in CANCEL_STATES]
    delete = [b for b in items if b.state in DELETE_STATES]
    pending = [b for b in items if b not in cancel and b not in delete]
    return cancel, delete, pending


@queue_app.command("rm")
def rm(
    ids: Annotated[list[int], typer.Argument(help="batch job ids", min=1, max=MAX_ID)],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show what would happen")] = False,
) -> None:
    """Cancel queued or running batch jobs (the site daemon removes them from the
    scheduler) and delete those that never reached it or have ended.

    Example: balsamctl queue rm 12 13 --yes
    """
    c = ctx.client()
    items, failed = [], 0
    for bj_id in dict.fromkeys(ids):
        try:
            items.append(c.call("BatchJobService", "GetBatchJob",
                                batch_job_service_pb2.GetBatchJobRequest(id=bj_id)).batch_job)
        except BalsamError as err:
            failed += 1
            print_error(f"batch job {bj_id}: {describe(err)}")
    cancel, delete, pending = plan_removal(items)
    for b in pending:
        out.write(f"batch job {b.id} is already {bj_state(b.state)}")
    what = " and ".join(p for p in (f"cancel {len(cancel)}" if cancel else "",
                                    f"delete {len(delete)}" if delete else "") if p) + " batch job(s)"
    if cancel or delete:
        if dry_run:
            out.write(f"dry run: would {what}: " + ", ".join(
                f"{b.id} ({'cancel' if b in cancel else 'delete'}, {bj_state(b.state)})" for b in cancel + delete))
        else:
            out.confirm(f"{what[0].upper()}{what[1:]}?", assume_yes=yes, what=what)
            def cancel_one(b: Any) -> None:
                patch = batch_job_pb2.BatchJob(id=b.id, state=S.BATCH_JOB_STATE_PENDING_DELETION)
                c.call("BatchJobService", "UpdateBatchJob", batch_job_service_pb2.UpdateBatchJobRequest(
                    batch_job=patch, update_mask={"paths": ["state"]}))
                out.write(f"cancelling batch job {b.id}")

            for b in cancel + delete:
                try:
                    if b in cancel:
                        cancel_one(b)
                        continue
                    try:
                        c.call("BatchJobService", "DeleteBatchJob", batch_job_service_pb2.DeleteBatchJobRequest(id=b.id))
                        out.write(f"deleted batch job {b.id}")
                    except BalsamError as err:
                        if err.reason != "BATCH_JOB_SUBMITTING":
                            raise
                        cancel_one(b)  # its daemon may be submitting it right now
                except BalsamError as err:
                    failed += 1
                    print_error(f"batch job {b.id}: {describe(err)}")
    if failed:
        fail(f"{failed} of {len(dict.fromkeys(ids))} batch jobs not removed")
