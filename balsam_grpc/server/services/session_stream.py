"""One launcher stream (SessionService.Connect): open or resume a session, lease jobs
under the launcher's credit, apply its transition reports, and tell it to kill jobs.

How it wakes (no polling interval anywhere):
- a reader task moves the launcher's messages into a small bounded inbox (so a flood of
  reports waits in gRPC's flow control, not in server memory) and sets `wake`;
- its subscription to the fanout (server/fanout.py) sets `wake` when committed events of
  its (owner, site) arrive; events elsewhere never wake it;
- the loop then handles the inbox, and looks in the delivered events, without a query,
  for (a) jobs it holds that left RUNNING without its report (a user kill, a close: their
  rows are checked, then sent as KillJobs) and, only while credit is left, (b) whether a
  job of its site became runnable; only then does it run the acquisition transaction.
  When the fanout could not deliver the events (a gap: the session resumed from an older
  cursor, or fell far behind) the same is read from the event log.
- a create on this replica that committed runnable jobs of its site tells it their ids
  at once (Fanout.runnable), ahead of their events: it acquires then. An acquisition that
  began after that commit saw those jobs, so their creation events, when they come, call
  for no second one. Nothing depends on this: without it the events wake it as above.
Responses are yielded one at a time: grpc.aio completes each write before the loop goes
on, so nothing is buffered toward a slow launcher.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import AsyncIterator, Collection
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from balsam_grpc.core.errors import BalsamError, FailedPrecondition, InvalidArgument
from balsam_grpc.core.states import JobState
from balsam_grpc.core.validation import FIELD_LIMITS, clip_utf8
from balsam_grpc.server.convert import EnumCodec, struct_to_dict, utcnow
from balsam_grpc.server.fanout import Delivery, EventRow, Subscription
from balsam_grpc.server.job_tokens import JobTokens
from balsam_grpc.server.principal import Principal
from balsam_grpc.server.services.apps import app_to_pb
from balsam_grpc.server.services.jobs import fill_job
from balsam_grpc.server.services.session_convert import session_to_pb
from balsam_grpc.server.services.common import check_map
from balsam_grpc.server.state import ServerState
from balsam_grpc.server.store import leases
from balsam_grpc.server.store import sessions as store
from balsam_grpc.v1 import common_pb2, job_pb2, session_service_pb2

log = structlog.get_logger("balsam.sessions")

JOB_STATES = EnumCodec(job_pb2.JobState, "JOB_STATE_")
JOB_MODE = EnumCodec(common_pb2.JobMode, "JOB_MODE_")
INBOX_SIZE = 8
# Jobs in one JobLeases message; a bigger credit is served by several messages.
LEASE_BATCH = 1000
# Jobs one session may hold ahead of its free capacity (SessionCredit.reserve_jobs).
MAX_RESERVE = 10_000
MAX_NODES = 100_000
MAX_TRANSITIONS = 10_000
# Apps whose message a session stream keeps between lease messages (leased_jobs_pb).
MAX_KNOWN_APPS = 64
# Jobs whose creation an acquisition already saw (SessionStream.looked_at), and jobs woken
# for that no acquisition saw yet (woken_for), at most: their events normally come soon
# after; beyond this (they were routed before the create's own wake-up, or fell into a
# gap) a set is forgotten, which costs at most an acquisition that finds nothing.
MAX_LOOKED_AT = 100_000
_TAIL_LIMIT = FIELD_LIMITS["balsam.v1.JobTransition.error_tail"]
_MESSAGE_LIMIT = FIELD_LIMITS["balsam.v1.JobTransition.message"]
_DATA_LIMIT = FIELD_LIMITS["balsam.v1.JobTransition.data"]
_EOF = object()
CREATED = str(JobState.CREATED)
Response = session_service_pb2.SessionServiceConnectResponse


def node_dicts(nodes: Any) -> list[dict[str, Any]]:
    if len(nodes) > MAX_NODES:
        raise InvalidArgument(f"open.nodes has more than {MAX_NODES} entries", field="open.nodes", reason="TOO_LARGE")
    out = []
    for i, n in enumerate(nodes):
        if n.cpus < 0 or n.gpus < 0 or len(n.hostname) > 255:
            raise InvalidArgument(f"open.nodes[{i}]: cpus and gpus must be >= 0 and hostname at most 255 characters",
                                  field=f"open.nodes[{i}]")
        out.append({"hostname": n.hostname, "cpus": n.cpus, "gpus": n.gpus})
    return out


def credit_from_pb(c: session_service_pb2.SessionCredit, state: ServerState) -> leases.Credit:
    if c.max_jobs < 0 or c.max_nodes_per_job < 0 or c.wall_time_remaining_min < 0 or c.reserve_jobs < 0:
        raise InvalidArgument("credit: max_jobs, max_nodes_per_job, wall_time_remaining_min and reserve_jobs must "
                              "be >= 0", field="credit")
    for name in ("free_nodes", "reserve_nodes"):
        value = getattr(c, name)
        if not math.isfinite(value) or value < 0:
            raise InvalidArgument(f"credit.{name} must be a finite number >= 0, got {value}", field=f"credit.{name}")
    if any(a <= 0 for a in c.app_ids):
        raise InvalidArgument("credit.app_ids must be positive ids", field="credit.app_ids")
    tags = check_map(dict(c.filter_tags), "credit.filter_tags", state.settings, tag_keys=True)
    return leases.Credit(max_jobs=c.max_jobs, free_nodes=c.free_nodes, max_nodes_per_job=c.max_nodes_per_job,
                         wall_time_remaining_min=c.wall_time_remaining_min, serial_only=c.serial_only,
                         filter_tags=tags, app_ids=tuple(sorted(set(c.app_ids))),
                         reserve_jobs=min(c.reserve_jobs, MAX_RESERVE), reserve_nodes=c.reserve_nodes)


def transition_from_pb(t: session_service_pb2.JobTransition) -> leases.Transition:
    """A launcher's report in store terms, within FIELD_LIMITS (bytes of UTF-8). The
    state change is always kept: a refused transition would make the launcher stop the
    job, and its next run would report the same. What is over a limit is cut (the error
    tail keeps its end) or, for data, dropped, and the data says which field and why."""
    notes: dict[str, str] = {}
    try:
        data = struct_to_dict(t.data, "data") if t.HasField("data") else {}
    except InvalidArgument:  # NaN/Infinity: as with oversized data, keep the state change
        data = {"data_dropped": "holds NaN or Infinity, which JSON cannot represent"}
    if data and t.data.ByteSize() > _DATA_LIMIT:
        data = {"data_dropped": f"data is {t.data.ByteSize():,} bytes; the limit is {_DATA_LIMIT:,} bytes"}
    error_tail = clip_utf8(t.error_tail, _TAIL_LIMIT, keep_end=True)
    if len(error_tail) != len(t.error_tail):
        notes["error_tail"] = f"cut to its last {_TAIL_LIMIT:,} bytes"
    message = clip_utf8(t.message, _MESSAGE_LIMIT)
    if len(message) != len(t.message):
        notes["message"] = f"cut to its first {_MESSAGE_LIMIT:,} bytes"
    if notes:
        data = {**data, "cut_by_server": notes}
    # Positional: keyword arguments to a dataclass cost 0.3 us more.
    return leases.Transition(t.seq, t.job_id, t.lease_generation, JOB_STATES.to_name.get(t.state, ""),
                             t.return_code if t.HasField("return_code") else None, error_tail, data, message,
                             _reported_time(t) if t.HasField("time") else None)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _reported_time(t: session_service_pb2.JobTransition) -> datetime | None:
    """The launcher's time of the transition (set); None when it is not a real instant
    (the server's receive time is used then). What convert.from_timestamp gives
    (protobuf's ToDatetime, its checks and zero as unset) in a quarter of its time: the
    epoch plus whole microseconds, nanos truncated."""
    ts = t.time
    seconds, nanos = ts.seconds, ts.nanos
    if not 0 <= nanos < 1_000_000_000 or (seconds == 0 and nanos == 0):
        return None
    try:
        return _EPOCH + timedelta(0, seconds, nanos // 1000)
    except OverflowError:  # outside years 1..9999
        return None


def _checked(report: session_service_pb2.TransitionReport) -> session_service_pb2.TransitionReport:
    if len(report.transitions) > MAX_TRANSITIONS:
        raise InvalidArgument(f"report has more than {MAX_TRANSITIONS} transitions; send smaller reports",
                              field="report.transitions", reason="TOO_LARGE")
    return report


def leased_jobs_pb(rows: list[dict[str, Any]], app_rows: dict[int, dict[str, Any]], tokens: JobTokens,
                   out: Any, known: dict[int, tuple[dict[str, Any], Any]] | None = None) -> None:
    """Append a LeasedJob per row, with its app, to the repeated field `out`, built in
    place: a job message built apart is copied into its LeasedJob and that again into the
    response. Each app's message is converted once for all its jobs, and with `known`
    (app id -> the row and message of an earlier call) once for as long as its row stays
    the same: a session leases the same few apps' jobs message after message."""
    apps: dict[int, Any] = {}
    known = {} if known is None else known
    add = out.add
    for row in rows:
        app_id = row["app_id"]
        app = apps.get(app_id)
        if app is None:
            app_row = app_rows[app_id]
            seen = known.get(app_id)
            if seen is not None and seen[0] == app_row:
                app = apps[app_id] = seen[1]
            else:
                if len(known) >= MAX_KNOWN_APPS:
                    known.clear()
                app = apps[app_id] = app_to_pb(app_row)
                known[app_id] = (app_row, app)
        leased = add()
        fill_job(leased.job, row)
        leased.app.CopyFrom(app)
        leased.lease_generation = row["lease_generation"]
        leased.job_token = tokens.mint(row["id"], row["lease_generation"])


class SessionStream:
    def __init__(self, state: ServerState, principal: Principal) -> None:
        self.state = state
        self.db = state.db
        self.bus = state.bus
        self.keeper = state.sessions
        self.principal = principal
        self.session_id = ""
        self.ref: leases.SessionRef | None = None
        self.credit = leases.Credit()  # nothing until the launcher grants some
        self.look = False  # acquire at the next turn of the loop
        # Jobs are known to wait (an event made one runnable, or the last batch was full):
        # acquire at once. Otherwise (new credit) a read checks first that any job fits.
        self.look_sure = False
        self.held: dict[int, int] = {}  # job id -> lease generation
        # Jobs a create here made runnable (Fanout.runnable) since the last acquisition
        # began, and those an acquisition began after: their creation events need no look.
        self.woken_for: set[int] = set()
        self.looked_at: set[int] = set()
        self.cursor = 0  # events up to here have been looked at
        self.events: Subscription | None = None
        self.inbox: asyncio.Queue[Any] = asyncio.Queue(maxsize=INBOX_SIZE)
        self.wake = asyncio.Event()
        self.superseded = False
        self.ended: BalsamError | None = None  # set when the session was closed elsewhere
        self.closed = False
        self.close_reason: str | None = None  # set by the launcher's close message
        self.leases_sent = 0
        self.counts_leases = False  # the launcher sends leases_received
        # (JobLeases number, jobs, nodes, jobs held ahead, their nodes)
        self.in_flight: deque[tuple[int, int, float, int, float]] = deque()
        self.apps: dict[int, tuple[dict[str, Any], Any]] = {}  # leased_jobs_pb's `known`
        # The last credit message and what it parsed to: a launcher sends the same one
        # with report after report.
        self.last_credit: tuple[session_service_pb2.SessionCredit, leases.Credit] | None = None
        self.log = log

    def supersede(self) -> None:
        self.superseded = True
        self.wake.set()

    def end(self, error: BalsamError) -> None:
        """The session was closed (DeleteSession): send the last kills, then end with `error`."""
        self.ended = error
        self.wake.set()

    # ------------------------------------------------------------------ entry

    async def run(self, requests: AsyncIterator[Any]) -> AsyncIterator[Response]:
        try:
            first = await anext(requests)
        except StopAsyncIteration:
            raise InvalidArgument("the stream ended before its first message (open)", field="open") from None
        if first.WhichOneof("message") != "open":
            raise InvalidArgument("the first message on a session stream must be open", field="open")
        opened = await self._open(first.open)
        assert self.ref is not None
        # Events after the cursor taken in _open: those the fanout already routed come as a
        # gap (read from the event log once), later ones as rows.
        self.events = self.state.fanout.subscribe(self.ref.owner_id, [self.ref.site_id], since=self.cursor,
                                                  on_wake=self.wake.set, on_runnable=self._runnable_here)
        self.keeper.attach(self)
        reader = asyncio.create_task(self._read(requests))
        try:
            yield Response(opened=opened)
            async for response in self._loop():
                yield response
        finally:
            reader.cancel()
            self.events.close()
            self.keeper.detach(self, closed=self.closed)

    async def _open(self, o: session_service_pb2.SessionOpen) -> session_service_pb2.SessionOpened:
        p = self.principal
        timeout = self.state.settings.lease_timeout_seconds
        now = utcnow()
        expire = now + timedelta(seconds=timeout)
        if len(o.hostname) > 255:
            raise InvalidArgument("open.hostname is longer than 255 characters", field="open.hostname")
        held_rows: list[dict[str, Any]] = []
        app_rows: dict[int, dict[str, Any]] = {}
        # Kills and runnable jobs are looked for in events after this point. Taken before
        # the transaction below: anything committed earlier is in the rows it reads, and
        # anything later (a kill racing a resume) is still scanned.
        cursor = self.bus.high_water
        if o.resume_session_id:
            sid = o.resume_session_id
            if len(sid) > 32:
                raise InvalidArgument("open.resume_session_id is longer than 32 characters",
                                      field="open.resume_session_id")

            def resume(conn: Any) -> tuple[dict[str, Any], list[dict[str, Any]], dict[int, dict[str, Any]]]:
                row = store.require_session(conn, p.user_id, sid, field="open.resume_session_id")
                p.check_site(row["site_id"])
                if o.site_id and o.site_id != row["site_id"]:
                    raise InvalidArgument(f"open.site_id {o.site_id} is not the site of session {sid} "
                                          f"({row['site_id']})", field="open.site_id")
                row = store.resume_session(conn, p.user_id, sid, now, expire)
                held = leases.held_jobs(conn, p.user_id, sid)
                return row, held, leases.load_apps(conn, {r["app_id"] for r in held})

            row, held_rows, app_rows = await self.db.write(resume)
        else:
            if o.site_id <= 0:
                raise InvalidArgument("open.site_id is required", field="open.site_id")
            p.check_site(o.site_id)
            mode = JOB_MODE.name(o.job_mode, "open.job_mode") if o.job_mode else "SERIAL"
            nodes = node_dicts(o.nodes)
            row = await self.db.write(store.open_session, p.user_id, o.site_id, o.batch_job_id or None, mode, nodes,
                                      o.hostname, now, expire)
        self.session_id = row["id"]
        self.ref = leases.SessionRef(row["id"], p.user_id, row["site_id"], row["job_mode"], row["batch_job_id"])
        self.held = {r["id"]: r["lease_generation"] for r in held_rows}
        self.cursor = cursor
        self.log = log.bind(session_id=self.session_id, site_id=row["site_id"], user_id=p.user_id)
        self.log.info("session resumed" if o.resume_session_id else "session opened",
                      held_jobs=len(held_rows), applied_through_seq=row["applied_through_seq"],
                      hostname=o.hostname, nodes=len(o.nodes), batch_job_id=row["batch_job_id"] or 0)
        opened = session_service_pb2.SessionOpened(session=session_to_pb(row), lease_timeout_seconds=timeout,
                                                   applied_through_seq=row["applied_through_seq"])
        leased_jobs_pb(held_rows, app_rows, self.state.auth.job_tokens, opened.leased_jobs)
        return opened

    # ------------------------------------------------------------------ tasks

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        try:
            async for msg in requests:
                await self.inbox.put(msg)
                self.wake.set()
            await self.inbox.put(_EOF)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the stream broke; the handler is being cancelled
            self.log.debug("session stream read ended", error=str(exc))
        self.wake.set()

    # ------------------------------------------------------------------ loop

    async def _loop(self) -> AsyncIterator[Response]:
        assert self.events is not None
        while True:
            if self.superseded:
                raise FailedPrecondition(f"session {self.session_id} was resumed on another stream",
                                         reason="SESSION_RESUMED_ELSEWHERE")
            if self.ended is not None:
                # The close committed its events before ending us; the fanout may not have
                # routed them yet, so the last kills are read from the event log.
                self.events.take()
                async for response in self._scan_events(Delivery([], self.cursor, self.bus.high_water)):
                    yield response
                raise self.ended
            # What the launcher sent, in order; reports that follow one another are applied
            # in one transaction (with the leases of the last credit among them).
            messages = []
            while not self.inbox.empty():
                messages.append(self.inbox.get_nowait())
            i = 0
            while i < len(messages):
                msg = messages[i]
                if msg is _EOF:
                    if self.close_reason is not None:
                        await self._close()
                    else:
                        # A lost connection can end the requests like a half-close; only an
                        # explicit close ends the session, so this one stays resumable.
                        self.log.info("session requests ended without close: kept for resume")
                    return
                if msg.WhichOneof("message") == "report":
                    reports = [_checked(msg.report)]
                    size = len(msg.report.transitions)
                    i += 1
                    while i < len(messages) and messages[i] is not _EOF \
                            and messages[i].WhichOneof("message") == "report" \
                            and size + len(messages[i].report.transitions) <= MAX_TRANSITIONS:
                        reports.append(messages[i].report)
                        size += len(messages[i].report.transitions)
                        i += 1
                    async for response in self._reports(reports):
                        yield response
                    continue
                i += 1
                response = await self._handle(msg)
                if response is not None:
                    yield response
            delivery = self.events.take()
            if not delivery.empty:
                async for response in self._scan_events(delivery):
                    yield response
            self.cursor = delivery.upto
            if self.look and not self.credit.exhausted:
                self.look = False
                sure, self.look_sure = self.look_sure, False
                response = await self._acquire(check_first=not sure)
                if response is not None:
                    yield response
                continue
            self.wake.clear()
            if self.inbox.empty() and not self.events.pending and not self.superseded and not self.ended:
                await self.wake.wait()

    async def _handle(self, msg: session_service_pb2.SessionServiceConnectRequest) -> Response | None:
        kind = msg.WhichOneof("message")
        if kind == "credit":
            self._set_credit(msg.credit)
            return None
        if kind == "close":
            if len(msg.close.reason) > 1000:
                raise InvalidArgument("close.reason is longer than 1000 characters", field="close.reason")
            self.close_reason = msg.close.reason or "closed by its launcher"
            return None
        if kind == "open":
            raise InvalidArgument("open may only be the first message of a stream", field="open")
        raise InvalidArgument("empty message: set credit, report or close", field="message")

    def _set_credit(self, c: session_service_pb2.SessionCredit) -> None:
        last = self.last_credit
        if last is not None and last[0] == c:
            credit = last[1]
        else:
            credit = credit_from_pb(c, self.state)
            kept = session_service_pb2.SessionCredit()
            kept.CopyFrom(c)  # not `c`: a part of its report would keep the whole report alive
            self.last_credit = (kept, credit)
        if c.HasField("leases_received"):
            self.counts_leases = True
            while self.in_flight and self.in_flight[0][0] <= c.leases_received:
                self.in_flight.popleft()
            for _, n_jobs, nodes, n_held, held_nodes in self.in_flight:
                credit = credit.minus(n_jobs, nodes, n_held, held_nodes)
        self.credit = credit
        self.look = True
        self.wake.set()

    def _runnable_here(self, job_ids: Collection[int]) -> None:
        """Jobs of the site committed runnable by a create on this replica: look now."""
        if len(self.woken_for) + len(job_ids) > MAX_LOOKED_AT:
            # No acquisition for long (no credit) and their events missed (a gap): forget
            # them; their creation events, when read, each ask for a look as before.
            self.woken_for.clear()
        self.woken_for.update(job_ids)
        self.look = self.look_sure = True
        self.wake.set()

    def _looking(self) -> None:
        """An acquisition begins: every job woken for so far is committed, so it sees them."""
        if self.woken_for:
            if len(self.looked_at) + len(self.woken_for) > MAX_LOOKED_AT:
                self.looked_at.clear()
            self.looked_at |= self.woken_for
            self.woken_for = set()

    def _batch(self) -> leases.Credit:
        return replace(self.credit, max_jobs=min(self.credit.max_jobs, LEASE_BATCH),
                       reserve_jobs=min(self.credit.reserve_jobs, LEASE_BATCH))

    async def _acquire(self, *, check_first: bool) -> Response | None:
        assert self.ref is not None
        batch = self._batch()
        # Nothing fits now: a job that becomes runnable later commits an event after this
        # read, which the fanout delivers (and which sets look_sure).
        self._looking()
        if check_first and not await self.db.read(leases.has_candidate, self.ref, batch):
            return None
        return self._leased(await self.db.write(leases.acquire, self.ref, batch, utcnow()))

    def _leased(self, got: leases.Acquired) -> Response | None:
        """Account for an acquisition under the current credit; the JobLeases to send."""
        started = len(got.jobs) - got.reserved
        self.credit = self.credit.minus(started, got.nodes, got.reserved, got.reserved_nodes)
        if LEASE_BATCH in (started, got.reserved) and not self.credit.exhausted:
            self.look = self.look_sure = True  # more may match: serve the rest in the next message
        if not got.jobs:
            return None
        self.state.metrics.jobs_leased.inc(len(got.jobs))
        for row in got.jobs:
            self.held[row["id"]] = row["lease_generation"]
        self.leases_sent += 1
        if self.counts_leases:
            self.in_flight.append((self.leases_sent, started, got.nodes, got.reserved, got.reserved_nodes))
        self.log.debug("jobs leased", jobs=len(got.jobs), held_ahead=got.reserved, nodes=round(got.nodes, 3),
                      held=len(self.held))
        response = Response()
        leased_jobs_pb(got.jobs, got.apps, self.state.auth.job_tokens, response.leases.jobs, self.apps)
        return response

    async def _reports(self, reports: list[session_service_pb2.TransitionReport]) -> AsyncIterator[Response]:
        """Apply reports that arrived together in one transaction and answer one ack. When
        they carry a credit (the last one counts, as for credit messages), the leases under
        it are taken in the same transaction and sent right after the ack."""
        assert self.ref is not None
        transitions = [transition_from_pb(t) for report in reports for t in report.transitions]
        credited = False
        for report in reports:
            if report.HasField("credit"):
                self._set_credit(report.credit)
                credited = True
        batch = self._batch() if credited and not self.credit.exhausted else None
        if batch is not None:
            self._looking()
        result, got = await self.db.write(leases.report_and_acquire, self.ref, transitions, batch, utcnow())
        yield Response(ack=self._ack(result))
        if batch is not None:
            # This transaction looked for jobs under the new credit: no second look is due
            # (_leased asks for one when the batch came back full), unless a create here
            # made jobs runnable meanwhile (it may have begun before their commit).
            if not self.woken_for:
                self.look = self.look_sure = False
            response = self._leased(got)
            if response is not None:
                yield response

    def _ack(self, result: leases.ReportResult) -> session_service_pb2.TransitionAck:
        for job_id in result.released:
            self.held.pop(job_id, None)
        for r in result.rejections:
            if r.error.reason == "LEASE_LOST":
                self.held.pop(r.job_id, None)
            self.log.warning("transition refused", job_id=r.job_id, seq=r.seq, reason=r.error.reason,
                             error=r.error.message)
        if result.applied or result.rejections:
            self.log.debug("transitions applied", applied=result.applied, rejected=len(result.rejections),
                          resent=result.resent, applied_through_seq=result.applied_through_seq)
        return session_service_pb2.TransitionAck(
            applied_through_seq=result.applied_through_seq,
            rejections=[session_service_pb2.TransitionRejection(
                seq=r.seq, job_id=r.job_id, code=r.error.code.value[0], reason=r.error.reason,
                message=r.error.message) for r in result.rejections])

    async def _scan_events(self, delivery: Delivery) -> AsyncIterator[Response]:
        """Look at new events of the site: kills for held jobs, and (only while credit is
        left and no acquisition is already due) whether new jobs became runnable. Delivered
        rows cost no query unless they moved a held job; a gap is read from the event log."""
        assert self.ref is not None
        gap = delivery.gap_after
        suspects = {r.job_id for r in delivery.rows if r.job_id in self.held
                    and leases.may_lose_lease(r.kind, r.from_state, r.to_state)}
        if self.held and (gap is not None or suspects):
            if gap is not None:
                lost = await self.db.read(leases.lost_leases, self.ref.owner_id, self.session_id, dict(self.held),
                                          gap)
            else:
                lost = await self.db.read(leases.check_leases, self.session_id, dict(self.held), suspects)
            by_reason: dict[str, list[int]] = {}
            for job_id, now_state in lost:
                self.held.pop(job_id, None)
                why = "killed by its owner" if now_state == "KILLED" else f"lease lost: the job is now {now_state}"
                by_reason.setdefault(why, []).append(job_id)
            for why, ids in by_reason.items():
                self.log.info("kill sent", jobs=len(ids), reason=why)
                yield Response(kill=session_service_pb2.KillJobs(job_ids=ids, reason=why))
        if self.looked_at or self.woken_for:
            fresh = False
            for r in delivery.rows:
                if leases.becomes_runnable(r.kind, r.to_state) and not self._seen(r):
                    fresh = True
            if gap is not None:
                self.looked_at.clear()  # runnable_since below sees their events again: one more look at most
        else:
            fresh = any(leases.becomes_runnable(r.kind, r.to_state) for r in delivery.rows)
        if not self.credit.exhausted and not self.look:
            self.look = fresh
            if not self.look and gap is not None:
                self.look = await self.db.read(leases.runnable_since, self.ref.owner_id, self.ref.site_id, gap)
            self.look_sure = self.look

    def _seen(self, row: EventRow) -> bool:
        """A creation event of a job an acquisition already saw. Either way the job is
        forgotten: a job is created once (one not yet looked for gets its look now)."""
        if row.from_state != CREATED:
            return False
        if row.job_id in self.looked_at:
            self.looked_at.discard(row.job_id)
            return True
        self.woken_for.discard(row.job_id)  # type: ignore[arg-type]
        return False

    async def _close(self) -> None:
        """The launcher said close and ended its requests: release what it still holds."""
        await self.db.write(store.close_session, self.principal.user_id, self.session_id, utcnow(),
                            reason=self.close_reason or "closed by its launcher")
        self.closed = True
        self.log.info("session closed by its launcher", released_jobs=len(self.held))

