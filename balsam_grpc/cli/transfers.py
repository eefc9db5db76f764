"""`balsamctl transfers ...`: data staging items (list with figures, per-task summary,
retry failed ones)."""

from __future__ import annotations

from collections import defaultdict
from typing import Annotated, Any

import typer
from google.protobuf import field_mask_pb2

from balsam_grpc.cli import context as ctx
from balsam_grpc.cli import output as out
from balsam_grpc.cli.errors import usage
from balsam_grpc.cli.filters import parse_ids, parse_refs, split_list
from balsam_grpc.cli.output import Column, Format, NoHeaderOpt, OutputOpt
from balsam_grpc.sdk.convert import enum_names, enum_number
from balsam_grpc.v1 import common_pb2, transfer_item_pb2, transfer_item_service_pb2

transfers_app = typer.Typer(help="Data staging: the files moved in and out for jobs.", no_args_is_help=True,
                            rich_markup_mode="markdown")

STATE = transfer_item_pb2.TransferState.DESCRIPTOR
TS = transfer_item_pb2


def t_state(number: int) -> str:
    return out.enum_name(transfer_item_pb2.TransferState, number, "TRANSFER_STATE_")


def direction(number: int) -> str:
    return out.enum_name(common_pb2.TransferDirection, number, "TRANSFER_DIRECTION_").lower()


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def rate(bytes_: float, seconds: float) -> str:
    """Effective rate of a task (its bytes over its duration)."""
    return f"{human_bytes(bytes_ / seconds)}/s" if seconds > 0 and bytes_ else ""


def _remote(i: TS.TransferItem) -> str:
    return f"{i.location_alias}:{i.remote_path}"


ITEM_COLUMNS = [
    Column("ID", lambda i: i.id, no_wrap=True, justify="right"),
    Column("JOB", lambda i: i.job_id, justify="right"),
    Column("DIR", lambda i: direction(i.direction)),
    Column("SLOT", lambda i: i.slot),
    Column("REMOTE", _remote, ratio=2),
    Column("LOCAL", lambda i: i.local_path),
    Column("STATE", lambda i: t_state(i.state), no_wrap=True),
    Column("BYTES", lambda i: human_bytes(i.metrics.bytes) if i.metrics.bytes else "", justify="right"),
    Column("FILES", lambda i: i.metrics.files or "", justify="right"),
    Column("SECONDS", lambda i: f"{i.metrics.duration_seconds:.1f}" if i.metrics.duration_seconds else "",
           justify="right", wide_only=True),
    Column("TASK", lambda i: i.task_id, wide_only=True, no_wrap=True),
    Column("ERROR", lambda i: i.error, ratio=2),
]


def _states(values: list[str] | None) -> list[int]:
    numbers = []
    for value in split_list(values):
        try:
            numbers.append(enum_number(STATE, value, "transfer state"))
        except ValueError:
            usage(f"--state: unknown transfer state {value!r}; valid states: {', '.join(enum_names(STATE))}")
    return numbers


def _filter(job: list[str] | None, state: list[str] | None, site: list[str] | None,
            dir_: str | None, task: str | None) -> transfer_item_service_pb2.TransferItemFilter:
    flt = transfer_item_service_pb2.TransferItemFilter(states=_states(state), task_id=task or "")
    flt.job_ids.extend(parse_ids(job, "--job"))
    flt.site_ids.extend(ctx.resolve_site(s).id for s in parse_refs(site))
    if dir_:
        if dir_.lower() not in ("in", "out"):
            usage("--direction: in or out")
        flt.direction = common_pb2.TRANSFER_DIRECTION_IN if dir_.lower() == "in" else common_pb2.TRANSFER_DIRECTION_OUT
    return flt


JobOpt = Annotated[list[str] | None, typer.Option("--job", "-j", help="only items of these job ids")]
StateOpt = Annotated[list[str] | None, typer.Option("--state", "-s", help="only in these states (PENDING, ACTIVE, "
                                                                           "DONE, ERROR, AWAITING_JOB)")]
SiteOpt = Annotated[list[str] | None, typer.Option("--site", help="only at this site (name or id)")]
DirOpt = Annotated[str | None, typer.Option("--direction", "-d", help="in or out")]
TaskOpt = Annotated[str | None, typer.Option("--task", help="only items of this backend task id")]
LimitOpt = Annotated[int | None, typer.Option("--limit", "-n", help="at most this many")]


@transfers_app.command("ls")
def ls(job: JobOpt = None, state: StateOpt = None, site: SiteOpt = None, direction_: DirOpt = None,
       task: TaskOpt = None, limit: LimitOpt = None, output: OutputOpt = Format.table,
       no_header: NoHeaderOpt = False) -> None:
    """List transfer items with their state, figures and errors.

    Example: balsamctl transfers ls --job 42 -o wide
    """
    request = transfer_item_service_pb2.ListTransferItemsRequest(filter=_filter(job, state, site, direction_, task))
    items = list(ctx.paged("TransferService", "ListTransferItems", request, "transfer_items", limit=limit))
    out.render(items, ITEM_COLUMNS, output, no_header=no_header)


def task_summary(items: list[Any]) -> list[dict[str, Any]]:
    """One row per backend task: items, bytes, files, duration and effective rate."""
    tasks: dict[str, dict[str, Any]] = defaultdict(lambda: {"items": 0, "bytes": 0, "files": 0, "seconds": 0.0,
                                                            "done": 0, "error": 0, "location": "", "direction": ""})
    for i in items:
        if not i.task_id:
            continue
        t = tasks[i.task_id]
        t["task_id"] = i.task_id
        t["location"], t["direction"] = i.location_alias, direction(i.direction)
        t["items"] += 1
        t["bytes"] += i.metrics.bytes
        t["files"] += i.metrics.files
        t["seconds"] = max(t["seconds"], i.metrics.duration_seconds)
        t["done"] += i.state == TS.TRANSFER_STATE_DONE
        t["error"] += i.state == TS.TRANSFER_STATE_ERROR
    rows = list(tasks.values())
    for t in rows:
        t["rate_bytes_per_second"] = round(t["bytes"] / t["seconds"], 1) if t["seconds"] > 0 else 0.0
    return rows


TASK_COLUMNS = [
    Column("TASK", lambda t: t["task_id"], no_wrap=True),
    Column("LOCATION", lambda t: t["location"]),
    Column("DIR", lambda t: t["direction"]),
    Column("ITEMS", lambda t: t["items"], justify="right"),
    Column("DONE", lambda t: t["done"], justify="right"),
    Column("ERROR", lambda t: t["error"], justify="right"),
    Column("BYTES", lambda t: human_bytes(t["bytes"]), justify="right"),
    Column("FILES", lambda t: t["files"], justify="right"),
    Column("SECONDS", lambda t: f"{t['seconds']:.1f}", justify="right"),
    Column("RATE", lambda t: rate(t["bytes"], t["seconds"]), justify="right"),
]


@transfers_app.command("tasks")
def tasks(job: JobOpt = None, state: StateOpt = None, site: SiteOpt = None, direction_: DirOpt = None,
          limit: LimitOpt = None, output: OutputOpt = Format.table, no_header: NoHeaderOpt = False) -> None:
    """Summarise backend tasks: items, bytes, files, duration and effective rate.

    Example: balsamctl transfers tasks --site aps-cluster
    """
    request = transfer_item_service_pb2.ListTransferItemsRequest(filter=_filter(job, state, site, direction_, None))
    items = list(ctx.paged("TransferService", "ListTransferItems", request, "transfer_items", limit=limit))
    rows = task_summary(items)
    if output in (Format.json, Format.yaml):
        out.write(out.dump(rows, output))
        return
    out.render(rows, TASK_COLUMNS, output, no_header=no_header)


@transfers_app.command("retry")
def retry(item_ids: Annotated[list[int], typer.Argument(help="transfer item ids in state ERROR")]) -> None:
    """Move failed transfer items back to PENDING (their job must still wait for them).

    Example: balsamctl transfers retry 17 18
    """
    c = ctx.client()
    for item_id in item_ids:
        c.call("TransferService", "UpdateTransferItem", transfer_item_service_pb2.UpdateTransferItemRequest(
            transfer_item=TS.TransferItem(id=item_id, state=TS.TRANSFER_STATE_PENDING),
            update_mask=field_mask_pb2.FieldMask(paths=["state"])))
        out.write(f"transfer item {item_id}: PENDING")
