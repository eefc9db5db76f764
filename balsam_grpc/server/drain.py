"""Draining a replica: its streams move to the other replicas before it stops.

A site daemon's, a launcher's or a watcher's stream lives for days on one replica. When
that replica is stopped (SIGTERM), waiting for the streams to end by themselves would
take forever, and cutting them with the transport would look to the client like a
broken network (it backs off before reconnecting). Instead the replica, after its health
service says NOT_SERVING (clients' round_robin then leaves it out of new picks):

1. refuses new streams and ends every open one with UNAVAILABLE, reason DRAINING: the
   clients reconnect at once, through another replica (their session is resumed, the site
   stream taken over by the next generation);
2. waits (bounded) for those streams to finish their own cleanup (a session's lease
   deadline written, a site's liveness handed over);
3. lets unary calls in flight finish within the grace period (grpc's server.stop).

The stream registry is per process, and only says which streams this process holds: no
state that another replica would need.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from balsam_grpc.core.aio import wait_event
from balsam_grpc.core.errors import DRAINING, Unavailable
from balsam_grpc.server.stream_guard import StreamGuard

log = structlog.get_logger("balsam.drain")


def draining_error() -> Unavailable:
    return Unavailable("this server replica is shutting down; reconnect to another one", reason=DRAINING)


class Drain:
    def __init__(self) -> None:
        self.draining = False
        self.streams: set[StreamGuard] = set()
        self._empty = asyncio.Event()
        self._empty.set()

    def admit(self) -> None:
        """A new stream: refused once draining has begun."""
        if self.draining:
            raise draining_error()

    def add(self, guard: StreamGuard) -> None:
        self.streams.add(guard)
        self._empty.clear()

    def discard(self, guard: StreamGuard) -> None:
        self.streams.discard(guard)
        if not self.streams:
            self._empty.set()

    async def start(self, timeout: float) -> None:
        """Refuse new streams, end the open ones, and wait up to `timeout` seconds for
        them to be gone."""
        self.draining = True
        started = time.monotonic()
        count = len(self.streams)
        for guard in list(self.streams):
            guard.trip(draining_error())
        if not await wait_event(self._empty, timeout):
            log.warning("streams still open after the drain timeout", streams=len(self.streams), timeout=timeout)
        log.info("streams handed over", streams=count, ms=round((time.monotonic() - started) * 1000, 1))
