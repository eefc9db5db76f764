"""The server's end of SiteService.Connect (contract: notes/site_stream.md).

One stream per site, across server replicas: each connection takes the site's next
stream_generation in the database and writes (results, liveness) only while it is still
the current one, so a stream another connection took over (on any replica) can change
nothing; the replica holding it is told at commit (NOTIFY) and ends it. After SiteHello and SiteWelcome the stream pushes WorkItems found
from the database state (store/site_work.py) while the daemon has credit, the SiteBacklog
whenever it changes, and a ResultAck for every batch of results it applies.

What wakes it (no polling period on the way from "work exists" to "work pushed"):
- its subscription to the fanout (server/fanout.py): committed events of its (owner,
  site) are delivered to it, and only those. It recomputes the backlog for any of them,
  and looks for work only when one may have made work, and only for the kinds it may
  have made (site_work.kinds_made: nothing for a job that merely started or stopped
  running, cleanups for one that finished). When the fanout could not deliver
  the rows (a gap) one indexed query over the event log answers the same;
- a message from the daemon (results, credit, acks, snapshots), moved by a reader task
  into a small bounded inbox, so a flooding daemon waits in gRPC's flow control, not in
  server memory;
- being replaced by a newer stream of the same site.
A slow refresh of the backlog (BACKLOG_REFRESH_SECONDS) covers changes that append no
event (a launcher session opening); it is not on the work path.

Credits: the daemon's max_in_flight is the initial credit, each WorkItem sent uses one,
each SiteCredit{items} gives some back. The server never has more items outstanding than
the daemon granted, so a slow site simply receives nothing more (backpressure).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import grpc
import structlog
from google.protobuf import json_format
from sqlalchemy import Connection

from balsam_grpc.core.aio import wait_event
from balsam_grpc.core.errors import Aborted, BalsamError, InvalidArgument
from balsam_grpc.server.convert import EnumCodec, from_timestamp, struct_to_dict, utcnow
from balsam_grpc.server.fanout import Subscription
from balsam_grpc.server.notify import SITE_STREAM_CLAIMED, notify_control
from balsam_grpc.server.principal import Principal
from balsam_grpc.server.services.apps import app_to_pb
from balsam_grpc.server.services.batch_jobs import STATE as BATCH_STATE
from balsam_grpc.server.services.batch_jobs import batch_job_to_pb
from balsam_grpc.server.services.jobs import STATES as JOB_STATES
from balsam_grpc.server.services.jobs import _data, job_spec, job_to_message
from balsam_grpc.server.services.site_convert import site_to_pb
from balsam_grpc.server.services.transfers import STATE as TRANSFER_STATE
from balsam_grpc.server.services.transfers import transfer_to_pb
from balsam_grpc.server.state import ServerState
from balsam_grpc.server.store import site_work as work_store
from balsam_grpc.server.store import sites as site_store
from balsam_grpc.server.store import transfers as transfer_store
from balsam_grpc.server.store.db import MAX_EVENT_ID, TransactionLost, storage_full_detail
from balsam_grpc.server.wire import FieldLimits
from balsam_grpc.v1 import site_service_pb2 as pb

log = structlog.get_logger("balsam.site_stream")

SERVER_VERSION = "0.1.0"
MAX_IN_FLIGHT = 10_000
# Credit beyond this is pointless and would only hide a daemon's accounting bug.
MAX_CREDIT = 100_000
HELLO_TIMEOUT_SECONDS = 30.0
# The backlog is sent at most this often. The first change after a quiet spell goes at
# once (a job at an idle site asks for a pilot without delay); later ones are coalesced.
# Each message makes the daemon plan its pilots, which lists its batch jobs (a unary
# call), and the plan works in minutes: at 0.2 s, 50 busy sites sent ~190 messages a
# second (bench_load), each a backlog read here and a ListBatchJobs at the daemon.
BACKLOG_MIN_INTERVAL = 1.0
# Reading the backlog scans the site's waiting jobs: ~1 ms per thousand on PostgreSQL,
# 0.25-0.4 s at 300,000 (with parallel workers). A stream waits this many times its last
# read's duration before the next, so a site's backlog reads take at most 1/20 of one
# database backend however large the backlog grows, instead of all of it (a read every
# BACKLOG_MIN_INTERVAL). The elastic queue plans pilots over minutes: a few seconds' lag
# is harmless.
BACKLOG_COST_RATIO = 20.0
# Cleanups are looked for at most this often. A busy launcher's every report finishes
# jobs, and a look per report was a third of the database calls each report caused (the
# sites of 1,000 /bin/true jobs have no globs to clean at all); the first finished job
# after a quiet spell is looked at at once, later ones within this time together.
CLEANUP_MIN_INTERVAL = 1.0
# Site streams reading their backlog at once, at most (SiteHub.backlog_reads).
BACKLOG_READS = 2
BACKLOG_REFRESH_SECONDS = 30.0
# last_seen_time is written at most this often while messages keep arriving.
SEEN_WRITE_INTERVAL = 5.0
# One-shot work ids remembered per stream (see SiteStream.answered).
MAX_ANSWERED = 10_000
# Results applied in one transaction.
RESULT_BATCH = 200
# Daemon messages read ahead of the loop (each is one result, credit, ack or snapshot).
INBOX_SIZE = 64
# Checks results against core.validation.FIELD_LIMITS (what unary requests get in wire.py).
RESULT_LIMITS = FieldLimits()
HOOK_KINDS = EnumCodec(pb.HookKind, "HOOK_KIND_")
HOOK_CHANGE_FIELDS = ("data", "parameters", "tags")


def hook_kind_number(hook: str) -> int:
    return HOOK_KINDS.number(hook.upper())


# ---------------------------------------------------------------------------- conversion

def work_to_pb(work: work_store.Work, attempt: int) -> pb.WorkItem:
    """The one place a store Work becomes a WorkItem message."""
    item = pb.WorkItem(id=work.id, attempt=attempt)
    if work.kind == work_store.SUBMIT:
        item.submit_batch_job.batch_job.CopyFrom(batch_job_to_pb(work.batch_job))
    elif work.kind == work_store.CANCEL:
        item.cancel_batch_job.batch_job.CopyFrom(batch_job_to_pb(work.batch_job))
    elif work.kind == work_store.HOOK:
        item.run_hook.job.CopyFrom(job_to_message(work.job))
        item.run_hook.app.CopyFrom(app_to_pb(work.app))
        item.run_hook.hook = hook_kind_number(work.hook)
    elif work.kind == work_store.CLEANUP:
        item.cleanup.job_id = work.job["id"]
        item.cleanup.workdir = work.job["workdir"]
        item.cleanup.globs.extend(work.globs)
    elif work.kind == work_store.TRANSFER:
        item.start_transfers.items.append(transfer_to_pb(work.transfer))
    return item


def backlog_gap(read_seconds: float) -> float:
    """Seconds from the start of a backlog read that took `read_seconds` until the next may start."""
    return max(BACKLOG_MIN_INTERVAL, BACKLOG_COST_RATIO * read_seconds)


def backlog_to_pb(values: dict[str, Any]) -> pb.SiteBacklog:
    return pb.SiteBacklog(**values)


def batch_report(update: pb.BatchJobUpdate) -> work_store.BatchJobReport:
    state = BATCH_STATE.name(update.state, "result.batch_job.state") if update.state else ""
    return work_store.BatchJobReport(
        batch_job_id=update.batch_job_id, state=state, scheduler_id=update.scheduler_id,
        status_info=update.status_info, start_time=from_timestamp(update.start_time, update.HasField("start_time")),
        end_time=from_timestamp(update.end_time, update.HasField("end_time")))


def hook_outcome(result: pb.HookResult, site_id: int, state: ServerState,
                 too_large: str | None = None) -> work_store.HookOutcome:
    """A HookResult in store terms; input that cannot be read, or a field over its limit
    (`too_large`), becomes `refusal` (the job is failed with it rather than left waiting
    for a hook that already ran; nothing else of the result is stored)."""
    out = work_store.HookOutcome(job_id=result.job_id)
    if too_large:
        out.refusal = too_large
        return out
    try:
        out.hook = HOOK_KINDS.name(result.hook, "result.hook.hook").lower() if result.hook else ""
        out.next_state = JOB_STATES.name(result.next_state, "result.hook.next_state") if result.next_state else ""
        out.message = result.state_message
        out.event_data = struct_to_dict(result.event_data)
        for path in result.job_mask.paths:
            if path not in HOOK_CHANGE_FIELDS:
                raise InvalidArgument(f"result.hook.job_mask: a hook may change {', '.join(HOOK_CHANGE_FIELDS)}, "
                                      f"not {path!r}", field="result.hook.job_mask")
            if path == "data":
                out.changes["data"] = _data(result.job_changes.data, "result.hook.job_changes.data")
            else:
                out.changes[path] = dict(getattr(result.job_changes, path))
        if len(result.new_jobs) > state.settings.max_jobs_per_call:
            raise InvalidArgument(f"result.hook.new_jobs: at most {state.settings.max_jobs_per_call} jobs per hook",
                                  field="result.hook.new_jobs", reason="TOO_LARGE")
        for i, job in enumerate(result.new_jobs):
            if not job.app_id and not job.site_id:
                job.site_id = site_id  # jobs a hook creates belong to its own site by default
            out.new_jobs.append(job_spec(job, f"result.hook.new_jobs[{i}]", state))
    except BalsamError as exc:
        out.refusal = exc.message
    return out


MAX_TRANSFER_ITEMS = 10_000


def transfer_reports(update: pb.TransferUpdate) -> list[transfer_store.SiteReport]:
    """A TransferUpdate in store terms; raises InvalidArgument naming the bad field."""
    if len(update.items) > MAX_TRANSFER_ITEMS:
        raise InvalidArgument(f"result.transfers.items: at most {MAX_TRANSFER_ITEMS} items per update",
                              field="result.transfers.items", reason="TOO_LARGE")
    out = []
    for i, item in enumerate(update.items):
        where = f"result.transfers.items[{i}]"
        if item.id <= 0:
            raise InvalidArgument(f"{where}.id is required", field=f"{where}.id")
        state = TRANSFER_STATE.name(item.state, f"{where}.state")
        if state == "AWAITING_JOB":
            raise InvalidArgument(f"{where}.state: the site reports PENDING, ACTIVE, DONE or ERROR",
                                  field=f"{where}.state")
        m = item.metrics
        if m.bytes < 0 or m.files < 0 or m.duration_seconds < 0:
            raise InvalidArgument(f"{where}.metrics must not be negative", field=f"{where}.metrics")
        out.append(transfer_store.SiteReport(
            id=item.id, state=state, task_id=item.task_id, error=item.error,
            bytes=m.bytes, files=m.files, duration_seconds=m.duration_seconds))
    return out


def apply_result(conn: Connection, state: ServerState, owner_id: int, site_id: int, result: pb.WorkResult,
                 now: datetime) -> work_store.Outcome:
    """Apply one result in its own savepoint: a server bug on one result is logged and
    refused without losing the others applied in the same transaction."""
    events_before = conn.info.get(MAX_EVENT_ID)
    try:
        with conn.begin_nested():
            return _apply_result(conn, state, owner_id, site_id, result, now)
    except Exception as exc:  # noqa: BLE001 - reported to the daemon, logged with an incident id
        if isinstance(exc, TransactionLost) or storage_full_detail(exc) is not None:
            raise  # not this result's fault: the whole write fails, the daemon sends it again
        work_store.rolled_back(conn, events_before)
        incident = uuid.uuid4().hex[:12]
        log.exception("site result failed", incident=incident, site_id=site_id, work_id=result.work_id)
        return work_store.Outcome(work_store.REFUSED, f"internal server error (incident {incident})", park=True)


def too_large(result: pb.WorkResult) -> str | None:
    """Why `result` breaks FIELD_LIMITS (the field's path and its limit), if it does."""
    try:
        RESULT_LIMITS.check(result, "result.")
    except BalsamError as exc:
        return exc.message
    return None


def _apply_result(conn: Connection, state: ServerState, owner_id: int, site_id: int, result: pb.WorkResult,
                  now: datetime) -> work_store.Outcome:
    kind = result.WhichOneof("outcome")
    # The same limits as the unary calls: an oversized result is refused, naming the
    # field, and nothing of it is stored (a hook's job fails with the reason).
    oversized = too_large(result)
    if oversized and kind != "hook":
        return work_store.Outcome(work_store.REFUSED, f"{result.work_id}: {oversized}" if result.work_id else oversized)
    if kind == "batch_job":
        try:
            report = batch_report(result.batch_job)
        except BalsamError as exc:
            return work_store.Outcome(work_store.REFUSED, exc.message)
        return work_store.apply_batch_job_report(conn, owner_id, site_id, result.work_id, report, now)
    if not result.work_id:
        return work_store.Outcome(work_store.REFUSED, f"an unsolicited result may only report a batch job, not {kind}")
    if kind == "hook":
        return work_store.apply_hook_result(conn, owner_id, site_id, result.work_id,
                                            hook_outcome(result.hook, site_id, state, oversized), now)
    if kind == "cleanup":
        c = result.cleanup
        return work_store.apply_cleanup_result(conn, owner_id, site_id, result.work_id, c.job_id, c.removed_files,
                                               c.error, now)
    if kind == "transfers":
        try:
            reports = transfer_reports(result.transfers)
        except BalsamError as exc:
            return work_store.Outcome(work_store.REFUSED, f"{result.work_id}: {exc.message}")
        return work_store.apply_transfer_result(conn, owner_id, site_id, result.work_id, reports, now)
    return work_store.Outcome(work_store.REFUSED, "the result has no outcome")


# ---------------------------------------------------------------------------- hub

class SiteHub:
    """The live stream of each site in this server process, and how often each work id
    was offered (WorkItem.attempt)."""

    MAX_ATTEMPT_ENTRIES = 50_000

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.streams: dict[int, SiteStream] = {}
        if state.listener is not None:
            state.listener.on_control(SITE_STREAM_CLAIMED, self.claimed)
        self.attempts: dict[int, dict[str, int]] = {}
        # Serialises the liveness writes of one site's streams with their (un)registration,
        # so an old stream ending never marks a site disconnected that a new stream holds.
        self.locks: dict[int, asyncio.Lock] = {}
        # PostgreSQL: backlog reads run on the event loop's few database connections,
        # which unary reads (ListJobs) and the fanout use too; when many sites' jobs move
        # at once, their reads take turns on BACKLOG_READS of them, not on all.
        self.backlog_reads = asyncio.Semaphore(BACKLOG_READS)

    def lock(self, site_id: int) -> asyncio.Lock:
        return self.locks.setdefault(site_id, asyncio.Lock())

    def register(self, stream: SiteStream) -> None:
        older = self.streams.get(stream.site_id)
        self.streams[stream.site_id] = stream
        if older is not None:
            older.replace()

    def claimed(self, argument: str) -> None:
        """A connection (on any replica) took site `argument` = "<site id> <generation>":
        a stream of an older generation here ends."""
        try:
            site_id, generation = map(int, argument.split())
        except ValueError:
            return
        stream = self.streams.get(site_id)
        if stream is not None and stream.generation < generation:
            stream.replace()

    def unregister(self, stream: SiteStream) -> bool:
        """True when `stream` was the site's live stream (and no newer one took over)."""
        if self.streams.get(stream.site_id) is stream:
            del self.streams[stream.site_id]
            return True
        return False

    def offer(self, site_id: int, work_id: str) -> int:
        seen = self.attempts.setdefault(site_id, {})
        if len(seen) >= self.MAX_ATTEMPT_ENTRIES:
            # Subjects that moved on without a result leave entries behind; forget the oldest.
            for key in list(seen)[: len(seen) // 2]:
                del seen[key]
        attempt = seen.get(work_id, 0)
        seen[work_id] = attempt + 1
        return attempt

    def resolved(self, site_id: int, work_id: str) -> None:
        self.attempts.get(site_id, {}).pop(work_id, None)

    async def serve(self, requests: AsyncIterator[pb.SiteServiceConnectRequest], context: grpc.aio.ServicerContext,
                    principal: Principal) -> AsyncIterator[pb.SiteServiceConnectResponse]:
        stream = SiteStream(self, requests, principal)
        async for msg in stream.run():
            yield msg


# ---------------------------------------------------------------------------- one stream

class SiteStream:
    def __init__(self, hub: SiteHub, requests: AsyncIterator[pb.SiteServiceConnectRequest],
                 principal: Principal) -> None:
        self.hub = hub
        self.state = hub.state
        self.db = hub.state.db
        self.requests = requests
        self.principal = principal
        self.owner_id = principal.user_id
        self.site_id = 0
        self.generation = 0  # the site's stream_generation this stream holds
        self.kinds: set[str] = set()
        self.credit = 0
        # Offered on this stream and not yet resolved by a result: never offered twice here.
        self.outstanding: set[str] = set()
        self.acked: set[str] = set()
        # One-shot work (submit, cancel, cleanup) answered on this stream, and any work whose
        # result the server failed on: not offered here again even if its subject stayed put
        # (a cancellation the scheduler refused), so nothing is retried in a tight loop; a
        # reconnect offers it again. Other hook ids are not parked: a hook result always moves
        # its job on, and the same id may legitimately come back (a rerun with the same count).
        self.answered: set[str] = set()
        self.inbound: asyncio.Queue[pb.SiteServiceConnectRequest] = asyncio.Queue(maxsize=INBOX_SIZE)
        self.reader_done = False
        self.reader_error: BaseException | None = None
        self.replaced = False
        self.events: Subscription | None = None
        self.wake = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self._iterator: AsyncIterator[pb.SiteServiceConnectRequest] = requests.__aiter__()
        self.log = log

    def replace(self) -> None:
        self.replaced = True
        self.wake.set()

    # ----- reading -----------------------------------------------------------------
    async def _read_hello(self) -> pb.SiteHello:
        try:
            first = await asyncio.wait_for(self._iterator.__anext__(), HELLO_TIMEOUT_SECONDS)
        except StopAsyncIteration:
            raise InvalidArgument("the stream ended before SiteHello", field="hello") from None
        except TimeoutError:
            raise InvalidArgument(f"no SiteHello within {HELLO_TIMEOUT_SECONDS:.0f} s", field="hello") from None
        if first.WhichOneof("message") != "hello":
            raise InvalidArgument("the first message on a site stream must be SiteHello", field="hello")
        return first.hello

    async def _reader(self) -> None:
        try:
            async for msg in self._iterator:
                await self.inbound.put(msg)  # waits while the inbox is full: backpressure
                self.wake.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the client went away; the loop ends the stream
            self.reader_error = exc
        finally:
            self.reader_done = True
            self.wake.set()

    # ----- hello -------------------------------------------------------------------
    def _check_hello(self, hello: pb.SiteHello) -> None:
        if hello.site_id <= 0:
            raise InvalidArgument("hello.site_id is required (a positive id)", field="hello.site_id")
        known = set(work_store.CAPABILITY_KINDS)
        unknown = sorted(set(hello.capabilities) - known)
        if unknown:
            raise InvalidArgument(f"hello.capabilities: unknown {', '.join(map(repr, unknown))}; the server knows "
                                  f"{', '.join(sorted(known))}", field="hello.capabilities")
        if not 0 <= hello.max_in_flight <= MAX_IN_FLIGHT:
            raise InvalidArgument(f"hello.max_in_flight must be between 0 and {MAX_IN_FLIGHT}, got "
                                  f"{hello.max_in_flight}", field="hello.max_in_flight")
        if len(hello.hostname) > 255:
            raise InvalidArgument("hello.hostname is longer than 255 characters", field="hello.hostname")
        if len(hello.daemon_version) > 64:
            raise InvalidArgument("hello.daemon_version is longer than 64 characters", field="hello.daemon_version")

    async def _welcome(self, hello: pb.SiteHello) -> pb.SiteWelcome:
        self._check_hello(hello)

        def connect(conn: Connection) -> dict[str, Any]:
            site_store.require_site(conn, self.owner_id, hello.site_id, field="hello.site_id")
            self.principal.check_site(hello.site_id)
            row = site_store.mark_connected(conn, self.owner_id, hello.site_id, hostname=hello.hostname,
                                            version=hello.daemon_version, now=utcnow())
            if conn.dialect.name == "postgresql":
                notify_control(conn, SITE_STREAM_CLAIMED, f"{hello.site_id} {row['stream_generation']}")
            return row

        async with self.hub.lock(hello.site_id):
            row = await self.db.write(connect)
            self.site_id = hello.site_id
            self.generation = row["stream_generation"]
            self.hub.register(self)
        self.kinds = {k for cap in hello.capabilities for k in work_store.CAPABILITY_KINDS[cap]}
        self.credit = hello.max_in_flight
        self.log = log.bind(site_id=self.site_id, owner_id=self.owner_id)
        return pb.SiteWelcome(site=site_to_pb(row, self.principal.username), server_version=SERVER_VERSION)

    # ----- the loop ----------------------------------------------------------------
    async def run(self) -> AsyncIterator[pb.SiteServiceConnectResponse]:
        hello = await self._read_hello()
        welcome = await self._welcome(hello)
        self.log.info("site connected", hostname=hello.hostname, version=hello.daemon_version,
                      capabilities=list(hello.capabilities), max_in_flight=hello.max_in_flight)
        try:
            # Subscribed before the first scan: anything committed later is delivered to us.
            self.events = self.state.fanout.subscribe(self.owner_id, [self.site_id], on_wake=self.wake.set)
            self.tasks = [asyncio.create_task(self._reader(), name=f"site {self.site_id} reader")]
            yield pb.SiteServiceConnectResponse(welcome=welcome)
            async for msg in self._loop():
                yield msg
        finally:
            for task in self.tasks:
                task.cancel()
            if self.events is not None:
                self.events.close()
            await self._disconnect()

    async def _loop(self) -> AsyncIterator[pb.SiteServiceConnectResponse]:
        assert self.events is not None
        loop = asyncio.get_running_loop()
        # Work kinds that may have work to offer: a delivered event names the kind it may
        # have made (site_work.kinds_made), so a job that finished looks for cleanups only,
        # not for batch jobs, hooks and transfers as well.
        dirty: set[str] = set(work_store.ALL_KINDS)
        backlog_dirty = True
        last_backlog: dict[str, Any] | None = None
        next_backlog_at = -1e9
        backlog_timer: asyncio.TimerHandle | None = None
        last_cleanup_at = -1e9
        cleanup_timer: asyncio.TimerHandle | None = None

        # Each timer is cleared by its own firing, not judged by comparing its time with
        # the loop's: a timer may fire a little before its time by the loop's clock
        # (uvloop's, for one, counts whole milliseconds), and a stream woken then, finding the work
        # not yet due and a timer whose time had not come, waited for no timer at all.
        def backlog_due() -> None:
            nonlocal backlog_timer
            backlog_timer = None
            self.wake.set()

        def cleanup_due() -> None:
            nonlocal cleanup_timer
            cleanup_timer = None
            self.wake.set()

        last_seen_write = time.monotonic()
        while True:
            self.wake.clear()
            if self.replaced:
                raise Aborted("replaced by a newer connection", reason="REPLACED")
            # 1. What the daemon sent.
            messages = []
            while not self.inbound.empty():
                messages.append(self.inbound.get_nowait())
            results: list[pb.WorkResult] = []
            snapshot: pb.SchedulerSnapshot | None = None
            for msg in messages:
                kind = msg.WhichOneof("message")
                if kind == "credit":
                    if msg.credit.items < 0:
                        raise InvalidArgument("credit.items must be >= 0", field="credit.items")
                    # No kind becomes dirty: a scan that used up the credit left its kinds
                    # dirty, and one that did not found all there was.
                    self.credit = min(MAX_CREDIT, self.credit + msg.credit.items)
                elif kind == "ack":
                    self.acked.update(w for w in msg.ack.work_ids if w in self.outstanding)
                elif kind == "result":
                    results.append(msg.result)
                elif kind == "snapshot":
                    snapshot = msg.snapshot
                elif kind == "hello":
                    raise InvalidArgument("SiteHello may only be sent once, first", field="hello")
                else:
                    raise InvalidArgument("empty message on the site stream", field="message")
            if messages:
                now = time.monotonic()
                if snapshot is not None or now - last_seen_write >= SEEN_WRITE_INTERVAL:
                    await self._seen(snapshot)
                    last_seen_write = now
            for start in range(0, len(results), RESULT_BATCH):
                yield pb.SiteServiceConnectResponse(result_ack=await self._apply(results[start:start + RESULT_BATCH]))
            if results:
                # A result may release held work: a cancellation waits for its submission's
                # result; work the server failed on is parked. Look at those kinds again.
                dirty |= work_store.kinds_released(r.work_id for r in results)
            if self.reader_done and self.inbound.empty():
                if self.reader_error is not None:
                    self.log.info("site stream broken", error=str(self.reader_error))
                return  # the daemon closed its side: end the stream cleanly
            # 2. Did anything happen at this site? (Only its own events are delivered.)
            delivery = self.events.take()
            if delivery.gap_after is not None:
                newest, may_work = await self.db.read_now(work_store.site_events_after, self.owner_id, self.site_id,
                                                          delivery.gap_after)
                backlog_dirty = backlog_dirty or newest is not None
                if may_work:
                    dirty.update(work_store.ALL_KINDS)
            if delivery.rows:
                backlog_dirty = True
                for r in delivery.rows:
                    dirty |= work_store.kinds_made(r.kind, r.to_state)
            # 3. Work, within the daemon's credit; cleanups no more often than
            # CLEANUP_MIN_INTERVAL (left dirty meanwhile, with a timer to come back).
            due = dirty & self.kinds
            if work_store.CLEANUP in due and self.credit > 0:
                wait = last_cleanup_at + CLEANUP_MIN_INTERVAL - loop.time()
                if wait > 0:
                    due.discard(work_store.CLEANUP)
                    if cleanup_timer is None:
                        cleanup_timer = loop.call_later(wait, cleanup_due)
                else:
                    last_cleanup_at = loop.time()
            if due and self.credit > 0:
                # A cancellation waits for the submission in flight on this stream: its result
                # brings the scheduler id the cancellation needs.
                held = {work_store.cancel_id(int(w.partition(":")[2])) for w in self.outstanding
                        if w.startswith(work_store.SUBMIT)}
                # read_now: each of its statements stands alone (as READ COMMITTED gives them
                # anyway), so PostgreSQL spends no BEGIN and ROLLBACK round trips on it.
                found = await self.db.read_now(work_store.find_work, self.owner_id, self.site_id, due,
                                               self.outstanding | self.answered | held, self.credit)
                if len(found) < self.credit:  # else more may wait for credit: stay dirty
                    dirty -= due
                for work in found:
                    self.outstanding.add(work.id)
                    self.credit -= 1
                    yield pb.SiteServiceConnectResponse(work=work_to_pb(work, self.hub.offer(self.site_id, work.id)))
            elif not dirty & self.kinds:
                dirty.clear()
            # 4. Backlog, coalesced.
            if backlog_dirty:
                wait = next_backlog_at - loop.time()
                if wait <= 0:
                    backlog_dirty = False
                    async with self.hub.backlog_reads:
                        started = loop.time()
                        values = await work_store.site_backlog(self.db, self.owner_id, self.site_id)
                    next_backlog_at = started + backlog_gap(loop.time() - started)
                    if values != last_backlog:
                        last_backlog = values
                        yield pb.SiteServiceConnectResponse(backlog=backlog_to_pb(values))
                elif backlog_timer is None:
                    backlog_timer = loop.call_later(wait, backlog_due)
            # 5. Sleep until something happens.
            if not self.inbound.empty() or self.events.pending or self.replaced or (dirty & due and self.credit > 0):
                continue
            if not await wait_event(self.wake, BACKLOG_REFRESH_SECONDS):
                backlog_dirty = True

    async def _apply(self, results: list[pb.WorkResult]) -> pb.ResultAck:
        def work(conn: Connection) -> list[work_store.Outcome]:
            self._fence(conn)
            now = utcnow()
            return [apply_result(conn, self.state, self.owner_id, self.site_id, r, now) for r in results]

        outcomes = await self.db.write(work)
        ack = pb.ResultAck()
        for result, outcome in zip(results, outcomes, strict=True):
            if result.work_id:
                kind = result.work_id.partition(":")[0]
                if result.work_id in self.outstanding and (
                        outcome.park or kind in (work_store.SUBMIT, work_store.CANCEL, work_store.TRANSFER)
                        or (kind == work_store.CLEANUP and outcome.status != work_store.APPLIED)):
                    if len(self.answered) >= MAX_ANSWERED:
                        self.answered.clear()  # at worst a stuck one-shot item is offered once more
                    self.answered.add(result.work_id)
                ack.work_ids.append(result.work_id)
                self.outstanding.discard(result.work_id)
                self.acked.discard(result.work_id)
                self.hub.resolved(self.site_id, result.work_id)
            if outcome.status == work_store.REFUSED:
                ack.errors.append(f"{result.work_id or 'unsolicited'}: {outcome.message}")
                self.log.warning("site result refused", work_id=result.work_id, reason=outcome.message)
            else:
                self.log.debug("site result", work_id=result.work_id, status=outcome.status, detail=outcome.message)
        return ack

    async def _seen(self, snapshot: pb.SchedulerSnapshot | None) -> None:
        try:
            data = (json_format.MessageToDict(snapshot, preserving_proto_field_name=True)
                    if snapshot is not None else None)
        except (json_format.SerializeToJsonError, ValueError) as exc:  # a time outside the calendar, NaN
            raise InvalidArgument(f"snapshot is not valid: {exc}", field="snapshot") from None
        def seen(conn: Connection) -> None:
            self._fence(conn)
            site_store.mark_seen(conn, self.owner_id, self.site_id, utcnow(), snapshot=data)

        await self.db.write(seen)

    def _fence(self, conn: Connection) -> None:
        """Inside a write: refuse it (and end this stream) once another connection of the
        site, on this replica or another, has taken over."""
        if not site_store.holds_stream(conn, self.site_id, self.generation):
            raise Aborted("another connection of this site took over its stream (on this or another server "
                          "replica); this one is stale", reason="REPLACED")

    async def _disconnect(self) -> None:
        if not self.site_id:
            return

        async def mark() -> None:
            async with self.hub.lock(self.site_id):
                if not self.hub.unregister(self):
                    self.log.info("site stream replaced", outstanding=len(self.outstanding))
                    return  # the newer stream holds the liveness flag now
                self.log.info("site disconnected", outstanding=len(self.outstanding), taken=len(self.acked))

                def gone(conn: Connection) -> None:
                    if site_store.holds_stream(conn, self.site_id, self.generation):  # else a newer stream holds it
                        site_store.mark_seen(conn, self.owner_id, self.site_id, utcnow(), connected=False)

                await self.db.write(gone)

        with contextlib.suppress(Exception):
            # Shielded: the stream's task may be cancelled (client gone) while this runs.
            await asyncio.shield(mark())
