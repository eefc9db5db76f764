"""Liveness of launcher sessions: which sessions have a stream on this server, their
heartbeat, and the reaper that expires a session whose stream stayed away longer than
the lease timeout.

The reaper sleeps until the earliest deadline it knows (no fixed polling period) and is
woken when a stream breaks. Deadlines come from streams that broke on this server and,
at start, from every session left ACTIVE in the database (a server crash or restart):
those get at least one full lease timeout to resume, since their launchers could not
reach the server while it was down.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import structlog

from balsam_grpc.core.errors import BalsamError, FailedPrecondition
from balsam_grpc.server.store import sessions as store
from balsam_grpc.server.store.db import Database

log = structlog.get_logger("balsam.sessions")


class Attached(Protocol):
    """What the keeper needs of a session stream."""

    session_id: str

    def supersede(self) -> None: ...

    def end(self, error: BalsamError) -> None: ...


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt


class SessionKeeper:
    def __init__(self, db: Database, lease_timeout_seconds: float) -> None:
        self.db = db
        self.lease_timeout = timedelta(seconds=lease_timeout_seconds)
        self.connected: dict[str, Attached] = {}
        self.deadlines: dict[str, datetime] = {}
        self._changed = asyncio.Event()
        self._has_streams = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._pending: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        now = _now()
        grace = now + self.lease_timeout

        def recover(conn: Any) -> dict[str, datetime]:
            store.extend_active(conn, grace)
            return store.active_deadlines(conn)

        recovered = await self.db.write(recover)
        for sid, expire in recovered.items():
            self.deadlines.setdefault(sid, _aware(expire))
        if recovered:
            log.info("sessions recovered", active=len(recovered), resume_by=grace.isoformat())
        self._tasks = [asyncio.create_task(self._reap(), name="balsam-session-reaper"),
                       asyncio.create_task(self._heartbeat(), name="balsam-session-heartbeat")]

    async def stop(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    # ------------------------------------------------------------------ streams

    def attach(self, stream: Attached) -> None:
        """A stream now carries this session; an older stream of it (a half-open
        connection the launcher gave up on) is told to end."""
        old = self.connected.get(stream.session_id)
        if old is not None and old is not stream:
            old.supersede()
        self.connected[stream.session_id] = stream
        self.deadlines.pop(stream.session_id, None)
        self._has_streams.set()
        self._changed.set()

    def closed(self, session_id: str) -> None:
        """The session was closed by its owner: its stream (if here) sends the kills and ends."""
        self.deadlines.pop(session_id, None)
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
        now = _now()
        deadline = now + self.lease_timeout
        self.deadlines[stream.session_id] = deadline
        self._changed.set()
        task = asyncio.get_running_loop().create_task(
            self.db.write(store.touch_sessions, [stream.session_id], now, deadline))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        log.info("session stream gone", session_id=stream.session_id, expires=deadline.isoformat())

    # ------------------------------------------------------------------ background tasks

    async def _reap(self) -> None:
        while True:
            self._changed.clear()
            now = _now()
            due = sorted(sid for sid, t in self.deadlines.items() if t <= now and sid not in self.connected)
            for sid in due:
                await self._expire(sid, now)
            upcoming = [t for sid, t in self.deadlines.items() if sid not in self.connected]
            timeout = max(0.0, (min(upcoming) - _now()).total_seconds()) if upcoming else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    async def _expire(self, session_id: str, now: datetime) -> None:
        self.deadlines.pop(session_id, None)
        try:
            session, released = await self.db.write(store.expire_session, session_id, now)
        except Exception:  # the reaper must survive a failed transaction
            log.exception("session expiry failed; retrying after one lease timeout", session_id=session_id)
            self.deadlines[session_id] = now + self.lease_timeout
            return
        if session is None:
            return
        if session["state"] == store.EXPIRED:
            log.info("session expired", session_id=session_id, site_id=session["site_id"], released_jobs=len(released))
        elif session["state"] == store.ACTIVE and session_id not in self.connected:
            # Renewed meanwhile (e.g. by another server process): watch its new deadline.
            self.deadlines[session_id] = _aware(session["expire_time"])

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
            now = _now()
            try:
                await self.db.write(store.touch_sessions, ids, now, now + self.lease_timeout)
            except Exception:  # a missed heartbeat is retried next period
                log.exception("session heartbeat write failed")
            await asyncio.sleep(period)
