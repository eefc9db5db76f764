"""`balsamctl events`: the event log, listed or followed live."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from balsam_grpc.cli import context as ctx
from balsam_grpc.cli import output as out
from balsam_grpc.cli.errors import fail, usage
from balsam_grpc.cli.filters import parse_ids, parse_refs, parse_since, parse_states, parse_tags, split_list
from balsam_grpc.cli.output import Column, Format, NoHeaderOpt, OutputOpt
from balsam_grpc.core.structs import struct_to_dict
from balsam_grpc.sdk.convert import enum_names, enum_number
from balsam_grpc.sdk.watch import EventStream
from balsam_grpc.v1 import batch_job_pb2, event_pb2, event_service_pb2, job_pb2, transfer_item_pb2

KIND = event_service_pb2.EventKind.DESCRIPTOR


def _states(event: event_pb2.Event) -> tuple[str, str]:
    change = event.WhichOneof("change")
    if change == "job_state":
        c, enum, prefix = event.job_state, job_pb2.JobState, "JOB_STATE_"
    elif change == "batch_job_state":
        c, enum, prefix = event.batch_job_state, batch_job_pb2.BatchJobState, "BATCH_JOB_STATE_"
    elif change == "transfer_state":
        c, enum, prefix = event.transfer_state, transfer_item_pb2.TransferState, "TRANSFER_STATE_"
    else:
        return "", ""
    frm = out.enum_name(enum, c.from_state, prefix) if c.from_state else "-"
    return frm, out.enum_name(enum, c.to_state, prefix)


def subject(event: event_pb2.Event) -> str:
    change = event.WhichOneof("change")
    if change == "batch_job_state":
        return f"batch job {event.batch_job_state.batch_job_id}"
    if change == "transfer_state":
        return f"transfer {event.transfer_state.transfer_item_id} (job {event.job_id})"
    return f"job {event.job_id}"


EVENT_COLUMNS = [
    Column("ID", lambda e: e.id, no_wrap=True, justify="right"),
    Column("TIME", lambda e: e.time, no_wrap=True),
    Column("SUBJECT", subject, no_wrap=True),
    Column("FROM", lambda e: _states(e)[0], no_wrap=True),
    Column("TO", lambda e: _states(e)[1], no_wrap=True),
    Column("MESSAGE", lambda e: e.message, ratio=2),
    Column("SITE", lambda e: ctx.site_name(e.site_id) if e.site_id else "", wide_only=True),
    Column("DATA", lambda e: json.dumps(struct_to_dict(e.data)) if e.data.fields else "",
           wide_only=True, ratio=2),
]


def event_line(event: event_pb2.Event) -> str:
    frm, to = _states(event)
    msg = f"  {' '.join(event.message.split())}" if event.message else ""
    return f"{event.id}  {out.fmt_time(event.time)}  {subject(event)}  {frm} -> {to}{msg}"


class Follower:
    """The SDK's EventStream (reconnects and resumes without a gap or a repeat) read on
    a thread, so the command keeps control of its own deadline.

    `start()` returns once the stream has a position: every event committed afterwards
    will be delivered, so a listing made after start() cannot miss a change made in
    between."""

    _END = object()

    def __init__(self, flt: event_service_pb2.EventFilter, *, replay: bool = False) -> None:
        self.stream = EventStream(ctx.client(), flt, replay=replay)
        self.queue: queue.Queue[Any] = queue.Queue()
        self.timed_out = False
        self._thread = threading.Thread(target=self._pump, name="balsamctl-watch", daemon=True)

    def _pump(self) -> None:
        try:
            for event in self.stream:
                self.queue.put(event)  # EventStream without `wrap` hands out the messages
        except BaseException as err:  # handed to the command's thread, raised there
            self.queue.put(err)
            self.stream.release_waiters()
        finally:
            self.queue.put(self._END)

    def start(self, timeout: float = 30.0) -> Follower:
        self._thread.start()
        if not self.stream.wait_started(timeout):
            self.close()
            fail(f"the server did not start the event stream within {timeout:g} s")
        if not self.queue.empty() and isinstance(self.queue.queue[0], BaseException):
            raise self.queue.get()
        return self

    def batches(self, deadline: float | None = None, *,
                until_interrupted: bool = False) -> Iterator[list[event_pb2.Event]]:
        """Lists of events as they come (each drains what is queued); stops at the
        monotonic `deadline` with `timed_out` set, and on Ctrl-C when
        `until_interrupted` (following is stopped that way: not an error)."""
        try:
            yield from self._batches(deadline)
        except KeyboardInterrupt:
            if not until_interrupted:
                raise

    def _batches(self, deadline: float | None) -> Iterator[list[event_pb2.Event]]:
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                self.timed_out = True
                return
            try:
                item = self.queue.get(timeout=remaining)
            except queue.Empty:
                self.timed_out = True
                return
            batch = []
            while True:
                if item is self._END:
                    if batch:
                        yield batch
                    return
                if isinstance(item, BaseException):
                    raise item
                batch.append(item)
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
            yield batch

    def close(self) -> None:
        self.stream.close()

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def deadline_after(seconds: float | None, option: str = "--timeout") -> float | None:
    """The monotonic time `seconds` (a --timeout) from now; None for no limit. A negative
    or NaN timeout is a usage error: -1 was taken as "already passed" (job wait gave up at
    once and said it had timed out) and NaN as never."""
    if seconds is None:
        return None
    if not seconds >= 0:
        usage(f"{option} must be a number of seconds, 0 or more, got {seconds:g}")
    return time.monotonic() + seconds


def event_filter(*, job: list[str] | None = None, site: list[str] | None = None,
                 batch_job: list[str] | None = None, kind: list[str] | None = None,
                 to_state: list[str] | None = None, from_state: list[str] | None = None,
                 tag: list[str] | None = None, since: str | None = None) -> event_service_pb2.EventFilter:
    kinds = []
    for value in split_list(kind):
        try:
            kinds.append(enum_number(KIND, value, "event kind"))
        except ValueError:
            usage(f"--kind: unknown event kind {value!r}; valid: {', '.join(n.lower() for n in enum_names(KIND))}")
    flt = event_service_pb2.EventFilter(
        job_ids=parse_ids(job, "--job"), batch_job_ids=parse_ids(batch_job, "--batch-job"), kinds=kinds,
        to_states=[job_pb2.JobState.Value("JOB_STATE_" + s) for s in parse_states(to_state, "--to-state")],
        from_states=[job_pb2.JobState.Value("JOB_STATE_" + s) for s in parse_states(from_state, "--from-state")])
    flt.tags.update(parse_tags(tag))
    start = parse_since(since)
    if start is not None:
        flt.time.start.FromDatetime(start)
    refs = parse_refs(site)
    if refs:
        flt.site_ids.extend(ctx.resolve_site(s).id for s in refs)
    return flt


def events(
    job: Annotated[list[str] | None, typer.Option("--job", "-j", help="only events of these jobs")] = None,
    site: Annotated[list[str] | None, typer.Option("--site", help="only at this site (name or id)")] = None,
    batch_job: Annotated[list[str] | None, typer.Option("--batch-job", help="only of these batch jobs")] = None,
    kind: Annotated[list[str] | None, typer.Option("--kind", help="job_state, batch_job_state or "
                                                                  "transfer_state")] = None,
    to_state: Annotated[list[str] | None, typer.Option("--to-state", help="only job changes into these "
                                                                          "states")] = None,
    from_state: Annotated[list[str] | None, typer.Option("--from-state", help="only job changes out of these "
                                                                              "states")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", "-t", help="only jobs with tag key=value")] = None,
    since: Annotated[str | None, typer.Option("--since", help="ISO time or an age (10m, 2h, 1d)")] = None,
    limit: Annotated[int | None, typer.Option("--limit", "-n", help="at most this many (the newest with "
                                                                    "--newest)")] = None,
    newest: Annotated[bool, typer.Option("--newest", help="newest first")] = False,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="then keep printing new events (Ctrl-C "
                                                                "stops)")] = False,
    timeout: Annotated[float | None, typer.Option(help="with --follow: stop after this many seconds")] = None,
    output: OutputOpt = Format.table,
    no_header: NoHeaderOpt = False,
) -> None:
    """List the event log (every state change of jobs, batch jobs and transfers), and
    follow it live with -f.

    Examples:

      balsamctl events --job 42

      balsamctl events --tag exp=a --to-state FAILED --since 1h

      balsamctl events -f --kind job_state -o json     # one JSON object per line
    """
    if limit is not None and limit < 1:
        usage(f"--limit must be at least 1, got {limit}")
    if follow and newest:
        usage("--follow prints in order; it does not combine with --newest")
    flt = event_filter(job=job, site=site, batch_job=batch_job, kind=kind, to_state=to_state,
                       from_state=from_state, tag=tag, since=since)
    deadline = deadline_after(timeout)
    follower = Follower(flt).start() if follow else None
    request = event_service_pb2.ListEventsRequest(filter=flt, descending=newest or (follow and limit is not None))
    listed = list(ctx.paged("EventService", "ListEvents", request, "events", limit=limit))
    if request.descending and not newest:
        listed.reverse()  # the newest `limit`, shown oldest first before following
    if follower is None:
        out.render(listed, EVENT_COLUMNS, output, no_header=no_header)
        return
    last = max((e.id for e in listed), default=0)
    show = _printer(output)
    for event in listed:
        show(event)
    with follower:
        for batch in follower.batches(deadline, until_interrupted=True):
            for event in batch:
                if event.id > last:  # the listing and the stream overlap; print each once
                    last = event.id
                    show(event)


def _printer(fmt: Format) -> Any:
    if fmt in (Format.json, Format.yaml):
        return lambda e: out.write(json.dumps(out.to_plain(e)))
    return lambda e: out.write(event_line(e))
