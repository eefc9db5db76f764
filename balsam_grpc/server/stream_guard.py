"""Ends a long-lived stream within a bounded time once its token stops being valid.

A stream is authenticated once, when it opens; a site or launcher stream may then live
for days. The guard ends it (UNAUTHENTICATED, so the client knows to get a new token):
- at once when the token is revoked through this server (Authenticator.forget notifies);
- when the token expires (a timer at its expiry time);
- within `recheck_seconds` when it is revoked through another server process sharing
  the database (a periodic re-read of the token row, one for all the streams of that
  token: Authenticator.watch; this server's cache cannot know).

How it ends the stream: the handler's task is cancelled while the handler is awaiting
(inside the servicer's generator), and the wrapper in server/rpc.py turns that
cancellation into the UNAUTHENTICATED status. While the wrapper is instead handing a
message to gRPC (possibly blocked on a client that does not read), it first waits up
to `send_grace_seconds` for the send to finish; a send still blocked after that is
cancelled outright (the client, not reading, sees the stream end as it can).
"""

from __future__ import annotations

import asyncio

import structlog

from balsam_grpc.server.convert import utcnow
from balsam_grpc.core.errors import BalsamError, Unauthenticated
from balsam_grpc.server.auth import Authenticator
from balsam_grpc.server.principal import Principal

log = structlog.get_logger("balsam.rpc")


class StreamGuard:
    def __init__(self, auth: Authenticator, principal: Principal, *, recheck_seconds: float,
                 send_grace_seconds: float = 2.0) -> None:
        self.auth = auth
        self.principal = principal
        self.recheck_seconds = recheck_seconds
        self.send_grace_seconds = send_grace_seconds
        self.task = asyncio.current_task()
        self.reason: BalsamError | None = None
        self.sending = False  # the wrapper is handing a message to gRPC
        self._unwatch = auth.watch(principal.token_id, self.trip, recheck_seconds)
        self._handles: list[asyncio.TimerHandle] = []
        loop = asyncio.get_running_loop()
        expires = auth.expiry(principal.token_id)
        if expires is not None:
            delay = max(0.0, expires - utcnow().timestamp())
            self._handles.append(loop.call_later(
                delay, self.trip, Unauthenticated("token expired; log in again with 'balsamctl login'")))

    def trip(self, reason: BalsamError) -> None:
        """End the stream with `reason` (its token is no longer valid, or the server drains)."""
        if self.reason is not None or self.task is None or self.task.done():
            return
        self.reason = reason
        if isinstance(reason, Unauthenticated):
            log.info("stream ended: token no longer valid", token_id=self.principal.token_id, reason=reason.message)
        if self.sending:
            self._handles.append(asyncio.get_running_loop().call_later(self.send_grace_seconds, self._cancel))
        else:
            self._cancel()

    def _cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def check(self) -> None:
        if self.reason is not None:
            raise self.reason

    def absorb(self) -> BalsamError | None:
        """Inside `except CancelledError`: the reason when this guard caused it (the
        cancellation is then withdrawn), None when it came from elsewhere."""
        if self.reason is None:
            return None
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        return self.reason

    def close(self) -> None:
        self._unwatch()
        for handle in self._handles:
            handle.cancel()
