"""Liveness of launcher sessions: which sessions have a stream on this server, their
heartbeat, and the reaper that expires a session whose stream stayed away longer than
the lease timeout.

The database owns expiry, so several replicas can share it: each connected session's
expire_time is kept ahead by its replica's heartbeat, and any replica's reaper expires
any ACTIVE session whose expire_time passed (claimed with SKIP LOCKED), so the sessions
of a replica that died are reaped within one lease timeout by the others. The reaper
sleeps until the earliest expire_time in the database, at most one lease timeout: a
session opened meanwhile expires no sooner, and neither does one whose stream attaches
(that takes it out of the reaper's reach) or breaks (it may be resumed for one lease
timeout from then, later than the reaper's next pass), so nothing needs to wake it.
At start every ACTIVE session gets at least one lease timeout to resume (its launcher
could not reach a server that was down).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any, Protocol

import structlog

from balsam_grpc.core.aio import cancel_and_wait
from balsam_grpc.core.backoff import Backoff
from balsam_grpc.core.errors import BalsamError, FailedPrecondition
from balsam_grpc.server.convert import utcnow
from balsam_grpc.server.store import sessions as store
from balsam_grpc.server.store.db import Database

log = structlog.get_logger("balsam.sessions")


class Attached(Protocol):
    """What the keeper needs of a session stream."""

    session_id: str

    def supersede(self) -> None: ...

    def end(self, error: BalsamError) -> None: ...


class SessionKeeper:
    def __init__(self, db: Database, lease_timeout_seconds: float, metrics: Any = None) -> None:
        self.db = db
        self.metrics = metrics
        self.lease_timeout = timedelta(seconds=lease_timeout_seconds)
        self.connected: dict[str, Attached] = {}
        self._has_streams = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._pending: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        grace = utcnow() + self.lease_timeout
        extended = await self.db.write(store.extend_active, grace)
        if extended:
            log.info("sessions given time to resume", sessions=extended, resume_by=grace.isoformat())
        self._tasks = [asyncio.create_task(self._reap(), name="balsam-session-reaper"),
                       asyncio.create_task(self._heartbeat(), name="balsam-session-heartbeat")]

    async def stop(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await cancel_and_wait(*self._tasks)
        self._tasks = []

    # ------------------------------------------------------------------ streams

    def attach(self, stream: Attached) -> None:
        """A stream now carries this session; an older stream of it (a half-open
        connection the launcher gave up on) is told to end."""
        old = self.connected.get(stream.session_id)
        if old is not None and old is not stream:
            old.supersede()
        self.connected[stream.session_id] = stream
        self._has_streams.set()
        # The reaper is not woken: an attached session leaves its reach, so its next
        # expiry can only come later than the one it sleeps until.

    def closed(self, session_id: str) -> None:
        """The session was closed by its owner: its stream (if here) sends the kills and ends."""
        stream = self.connected.get(session_id)
        if stream is not None:
            stream.end(FailedPrecondition(f"session {session_id} was closed by its owner; its jobs were released",
                                          reason="SESSION_CLOSED"))

    def detach(self, stream: Attached, *, closed: bool) -> None:
        """The stream ended. Unless the session was closed, it may be resumed until now +
        lease timeout; after that the reaper expires it. Synchronous so it can run in a
        cancelled handler's `finally`; the database write runs as its own task."""
        if self.connected.get(stream.session_id) is not stream:
            return  # superseded: the newer stream owns the session now
        del self.connected[stream.session_id]
        if closed:
            return
        now = utcnow()
        deadline = now + self.lease_timeout
        task = asyncio.get_running_loop().create_task(self.db.write(store.touch_sessions, [stream.session_id], now,
                                                                   deadline))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        log.info("session stream gone", session_id=stream.session_id, expires=deadline.isoformat())

    # ------------------------------------------------------------------ background tasks

    async def _reap(self) -> None:
        backoff = Backoff(initial=0.2, maximum=self.lease_timeout.total_seconds())
        while True:
            try:
                expired = await self.db.write(store.reap_expired, utcnow(), sorted(self.connected))
                if self.metrics is not None and expired:
                    self.metrics.sessions_expired.inc(len(expired))
                for session, released in expired:
                    log.info("session expired", session_id=session["id"], site_id=session["site_id"],
                             released_jobs=len(released))
                next_due = await self.db.read(store.next_expiry, sorted(self.connected))
                backoff.reset()
            except Exception:  # the reaper must survive a failed transaction (database outage)
                delay = backoff.next_delay()
                log.exception("session reaping failed; retrying", retry_in=round(delay, 2))
                next_due = utcnow() + timedelta(seconds=delay)
            # At most one lease timeout: a session opened after this read expires no sooner.
            until = self.lease_timeout if next_due is None else min(self.lease_timeout, next_due - utcnow())
            await asyncio.sleep(max(0.0, until.total_seconds()))

    async def _heartbeat(self) -> None:
        """Keeps expire_time of connected sessions ahead in the database, so GetSession
        shows them alive and a restarted server (or another one) knows how long to wait."""
        period = max(0.5, self.lease_timeout.total_seconds() / 3)
        while True:
            await self._has_streams.wait()
            ids = sorted(self.connected)
            if not ids:
                self._has_streams.clear()
                continue
            now = utcnow()
            try:
                await self.db.write(store.touch_sessions, ids, now, now + self.lease_timeout)
            except Exception:  # a missed heartbeat is retried next period
                log.exception("session heartbeat write failed")
            await asyncio.sleep(period)
