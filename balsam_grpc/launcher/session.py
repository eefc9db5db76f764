"""The launcher's end of `SessionService.Connect`: one session kept alive across broken
streams.

`SessionClient.run()` opens (or resumes) the session, then reads leases, acks and kills
and writes credits and transition reports. When the stream breaks it reconnects with
jittered exponential backoff and resumes the same session; the outbox resends whatever the
server has not applied. If the server says the session is gone (expired or closed), the
owner is told (it stops its jobs) and a new session is opened. The owner supplies the
callbacks and the current credit; this module knows nothing about processes.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from balsam_grpc.core.aio import wait_event
from balsam_grpc.core.backoff import Backoff
from balsam_grpc.core.errors import ERRORS_BY_CODE, BalsamError, error_reason, is_draining
from balsam_grpc.launcher.outbox import Outbox
from balsam_grpc.v1 import session_service_pb2 as pb
from balsam_grpc.v1 import session_service_pb2_grpc

BACKOFF_START_S = 0.2
BACKOFF_MAX_S = 10.0
REPORT_BATCH = 2000
# While the launcher is busy, a report follows the previous one after at least this long,
# so the transitions of many short jobs share one report (one server transaction, one
# event insert, one wake of the site's streams) instead of a few each. An idle
# launcher's report goes at once.
REPORT_INTERVAL_S = 0.02
# The same while its credit asks for no jobs (every slot runs a job or has one held ahead
# to start, and enough are held ahead): nothing waits on the report then but the server's
# record, and each report costs the server a transaction and the reads that follow it
# (about 1.4-3 ms of its CPU on the 2-core machine) whatever it holds. When the credit
# asks for jobs again (a slot with nothing to start, held-ahead jobs running low) the
# pause shortens to REPORT_INTERVAL_S at once: the credit rides on the report.
FED_REPORT_INTERVAL_S = 0.05
# Codes after which retrying the same request cannot help.
FATAL_CODES = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
               grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED}
SESSION_GONE_REASONS = {"SESSION_EXPIRED", "SESSION_CLOSED"}


class SessionFatal(Exception):
    """The server refused the launcher in a way a retry cannot fix."""

    def __init__(self, error: BalsamError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class Callbacks:
    open_message: Callable[[], pb.SessionOpen]
    credit: Callable[[], pb.SessionCredit]
    on_opened: Callable[[pb.SessionOpened, bool], None]  # (opened, resumed)
    on_leases: Callable[[pb.JobLeases], None]
    on_kill: Callable[[pb.KillJobs], None]
    on_rejection: Callable[[pb.TransitionRejection], None]
    on_session_lost: Callable[[str], None]
    busy: Callable[[], bool] = lambda: False  # jobs run or wait: more transitions are coming


class SessionClient:
    def __init__(self, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...], callbacks: Callbacks,
                 outbox: Outbox | None = None) -> None:
        self.stub = session_service_pb2_grpc.SessionServiceStub(channel)
        self.metadata = metadata
        self.cb = callbacks
        self.outbox = outbox or Outbox()
        self.session_id = ""
        self.lease_timeout_s = 0
        self.connected = asyncio.Event()
        self.closing = False
        self.close_reason = "done"
        self.closed = asyncio.Event()
        self._wake = asyncio.Event()
        self._leases_received = 0
        self._last_credit: bytes | None = None
        self._asked_jobs = False  # the credit last sent asked for jobs
        self._asked_reserve = False  # ... for jobs to hold ahead
        # The credit last serialized: (the owner's message, its leases_received, the bytes).
        # The owner hands back the same message while its figures stay the same.
        self._credit_bytes: tuple[pb.SessionCredit | None, int, bytes] = (None, 0, b"")
        self._fed_pause = False  # the writer waits out fed_report_interval_s (see _pace)
        self._last_report_at = -math.inf
        self.report_interval_s = REPORT_INTERVAL_S
        self.fed_report_interval_s = FED_REPORT_INTERVAL_S
        self.reconnects = 0
        self.opens = 0  # streams the server answered with SessionOpened

    # -- owner API ------------------------------------------------------------------------

    def report(self, transition: pb.JobTransition) -> int:
        seq = self.outbox.add(transition)
        self.wake()
        return seq

    def wake(self) -> None:
        """Something changed: send the current credit (if different) and pending reports.
        While the writer waits out a fed pause, only what ends the pause wakes it (the
        credit asks for jobs, or the launcher is not busy any more): a busy launcher calls
        this for every job, and each wake-up cost the writer a turn of the loop."""
        if self._fed_pause and self.cb.busy() and not self._wants_jobs():
            return
        self._wake.set()

    def _wants_jobs(self) -> bool:
        credit = self.cb.credit()
        return credit.max_jobs > 0 or credit.reserve_jobs > 0

    def close(self, reason: str = "done") -> None:
        """Once every transition is acknowledged, send close and half-close: the session
        becomes CLOSED."""
        self.closing = True
        self.close_reason = reason
        self._wake.set()

    # -- stream ---------------------------------------------------------------------------

    def _backoff(self) -> Backoff:
        """Once the server has said its lease timeout, reconnect attempts stay well inside
        it, so a broken stream is resumed before the session expires."""
        maximum = BACKOFF_MAX_S
        if self.lease_timeout_s:
            maximum = max(BACKOFF_START_S, min(maximum, self.lease_timeout_s / 4))
        return Backoff(initial=BACKOFF_START_S, maximum=maximum)

    async def run(self) -> None:
        delays = self._backoff()
        while True:
            opens_before = self.opens
            try:
                finished = await self._one_stream()
            except grpc.aio.AioRpcError as err:
                self.connected.clear()
                if self.opens != opens_before:
                    delays = self._backoff()  # that connection worked: start over from a short delay
                reason = error_reason(err)
                # NOT_FOUND before any session: its site or batch job does not exist (a
                # pilot whose batch job was deleted), and retrying cannot change that; nor
                # for a pilot whose batch job was cancelled or has ended (PILOT_ENDED).
                if err.code() in FATAL_CODES or (err.code() == grpc.StatusCode.NOT_FOUND and not self.session_id) \
                        or reason == "PILOT_ENDED":
                    cls = ERRORS_BY_CODE.get(err.code(), BalsamError)
                    raise SessionFatal(cls(err.details() or str(err.code()), reason=reason or None)) from err
                if (reason in SESSION_GONE_REASONS or (err.code() == grpc.StatusCode.NOT_FOUND and self.session_id)):
                    lost = self.session_id
                    self.session_id = ""
                    self.outbox.reset()
                    self.cb.on_session_lost(f"session {lost} is gone ({reason or err.code().name}): "
                                            f"{err.details()}")
                    if self.closing:
                        self.closed.set()
                        return
                    continue  # open a new session at once
                if is_draining(err) and self.opens != opens_before:
                    # The replica is shutting down and ended a stream that worked: resume
                    # the session through another one now (refused again: back off).
                    self.reconnects += 1
                    continue
                await asyncio.sleep(delays.next_delay())
                self.reconnects += 1
                continue
            self.connected.clear()
            if finished:
                self.closed.set()
                return
            # The server ended the stream without an error (e.g. it is shutting down): resume.
            delays = self._backoff()
            await asyncio.sleep(delays.next_delay())
            self.reconnects += 1

    async def _one_stream(self) -> bool:
        """One connection: True when the session closed normally."""
        call = self.stub.Connect(metadata=self.metadata)
        try:
            open_msg = self.cb.open_message()
            open_msg.resume_session_id = self.session_id
            await call.write(pb.SessionServiceConnectRequest(open=open_msg))
            first = await call.read()
            if first is grpc.aio.EOF:  # a failed call raises from read(); EOF means it ended with OK
                raise RuntimeError("the server ended the session stream before answering open")
            if first.WhichOneof("message") != "opened":
                raise RuntimeError(f"server answered open with {first.WhichOneof('message')}")
            opened = first.opened
            resumed = bool(self.session_id) and opened.session.id == self.session_id
            if not resumed:
                self.outbox.reset()
            self.session_id = opened.session.id
            self.lease_timeout_s = opened.lease_timeout_seconds
            self.opens += 1
            self._leases_received = 0
            self._last_credit = None
            self._asked_jobs = self._asked_reserve = False
            self.outbox.rewind(opened.applied_through_seq if resumed else 0)
            self.cb.on_opened(opened, resumed)
            self.connected.set()
            self._wake.set()
            writer = asyncio.create_task(self._writer(call))
            try:
                while True:
                    msg = await call.read()
                    if msg is grpc.aio.EOF:
                        break
                    self._dispatch(msg)
            finally:
                writer.cancel()
                try:
                    await writer
                except (asyncio.CancelledError, asyncio.InvalidStateError, grpc.aio.AioRpcError,
                        grpc.aio.UsageError):
                    pass  # a write on the call that just ended ("RPC already finished"): reconnecting
            return self.closing
        except asyncio.CancelledError:
            call.cancel()
            raise
        except BaseException:
            call.cancel()
            raise

    def _dispatch(self, msg: pb.SessionServiceConnectResponse) -> None:
        kind = msg.WhichOneof("message")
        if kind == "leases":
            self._leases_received += 1
            self.cb.on_leases(msg.leases)
            self._wake.set()
        elif kind == "ack":
            self.outbox.ack(msg.ack.applied_through_seq)
            for rej in msg.ack.rejections:
                self.cb.on_rejection(rej)
            self._wake.set()  # reports held back while this one was in flight go now
        elif kind == "kill":
            self.cb.on_kill(msg.kill)

    def _credit_now(self) -> tuple[pb.SessionCredit, bytes]:
        credit = self.cb.credit()
        last, leases, raw = self._credit_bytes
        if credit is not last or leases != self._leases_received:
            credit.leases_received = self._leases_received
            raw = credit.SerializeToString(deterministic=True)
            self._credit_bytes = (credit, self._leases_received, raw)
        return credit, raw

    def _sent_credit(self, raw: bytes, credit: pb.SessionCredit) -> None:
        self._last_credit = raw
        self._asked_jobs = credit.max_jobs > 0 or credit.reserve_jobs > 0
        self._asked_reserve = credit.reserve_jobs > 0

    def _hungrier(self, credit: pb.SessionCredit) -> bool:
        """This credit asks for jobs where the last sent did not, or for jobs to hold ahead
        where the last asked only for free slots (the held-ahead jobs ran low)."""
        return ((credit.max_jobs > 0 or credit.reserve_jobs > 0) and not self._asked_jobs) \
            or (credit.reserve_jobs > 0 and not self._asked_reserve)

    async def _pace(self) -> None:
        """While the launcher is busy, wait until its last report is report_interval_s old,
        or fed_report_interval_s while its credit asks for no jobs; a wake-up in the
        longer wait looks again (a slot may have nothing left to start)."""
        while self.cb.busy() and not self.closing:
            wants_jobs = self._wants_jobs()
            pause = self._last_report_at - time.monotonic() + (
                self.report_interval_s if wants_jobs else self.fed_report_interval_s)
            if pause <= 0:
                return
            if wants_jobs:
                await asyncio.sleep(pause)
                return
            self._wake.clear()
            self._fed_pause = True
            try:
                if not await wait_event(self._wake, pause):
                    return
            finally:
                self._fed_pause = False

    async def _writer(self, call: Any) -> None:
        half_closed = False
        while True:
            await self._wake.wait()
            self._wake.clear()
            # One report in flight at a time: what finishes while the server applies it goes
            # in the next one, so a busy launcher's reports coalesce (one transaction for
            # many jobs) and an idle one's go out at once.
            if self.outbox.has_unsent() and not self.outbox.awaiting_ack():
                await self._pace()  # what finishes meanwhile joins this report
                self._last_report_at = time.monotonic()
                while self.outbox.has_unsent():
                    report = pb.TransitionReport(transitions=self.outbox.take_unsent(REPORT_BATCH))
                    if not self.outbox.has_unsent() and not half_closed:
                        # The last report carries the credit its jobs freed: the server
                        # leases in the report's own transaction and round trip.
                        credit, raw = self._credit_now()
                        if raw != self._last_credit:
                            self._sent_credit(raw, credit)
                            report.credit.CopyFrom(credit)
                    await call.write(pb.SessionServiceConnectRequest(report=report))
            if self.outbox.has_unsent():
                # The credit rides on the next report, sent when the ack comes; but one that
                # asks for jobs when the last sent did not, or for jobs to hold ahead when
                # the last asked only for free slots (the jobs held ahead ran low), goes now:
                # the server applies the report in flight and leases under it, so the slots
                # are not left to run dry for an ack's round trip (40-100 ms while a busy
                # server applies a few hundred transitions) and the next report's.
                if not (self._asked_jobs and self._asked_reserve) and not half_closed:
                    credit, raw = self._credit_now()
                    if self._hungrier(credit) and raw != self._last_credit:
                        self._sent_credit(raw, credit)
                        await call.write(pb.SessionServiceConnectRequest(credit=credit))
                continue
            credit, raw = self._credit_now()
            if raw != self._last_credit and not half_closed:
                self._sent_credit(raw, credit)
                await call.write(pb.SessionServiceConnectRequest(credit=credit))
            if self.closing and not half_closed and len(self.outbox) == 0:
                half_closed = True
                await call.write(pb.SessionServiceConnectRequest(close=pb.SessionClose(reason=self.close_reason)))
                await call.done_writing()
                return
