"""`EventStream`: EventService.WatchEvents as an endless iterator that survives
disconnects and server restarts.

The server's contract: resuming with the last cursor received delivers every later
event exactly once, in order. Only failures that a reconnect can cure are resumed
(`should_resume`); a refusal that would repeat on every resume (a bad filter, a revoked
token, an answer over the receive limit) is raised instead of retried forever. So the stream keeps the cursor of the last event it handed
out (an event's id is its cursor) and, when the connection fails with a transient code,
reconnects after a backoff and resumes from there. Events are also de-duplicated by id,
so even a server that replays a batch cannot make one appear twice.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import structlog
from google.protobuf.message import Message

from balsam_grpc.core.backoff import Backoff
from balsam_grpc.core.errors import is_draining
from balsam_grpc.sdk.errors import error_from_rpc
from balsam_grpc.sdk.service import BACKOFF_INITIAL, BACKOFF_MAX, Connection
from balsam_grpc.v1 import event_service_pb2

log = structlog.get_logger("balsam.sdk.watch")

# Codes after which reconnecting helps: the server went away or restarted, or a proxy
# cut the stream.
TRANSIENT = frozenset({
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.CANCELLED,
})
# Codes that may come from a passing fault (a server bug hit by one request, a proxy
# reset) but also from one that repeats: retried at most this many times in a row
# without an answer from the server in between, then raised.
SUSPECT = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
MAX_SUSPECT_RETRIES = 5
# RESOURCE_EXHAUSTED is retried only when the server's admission control asked for it
# (SERVER_BUSY, TOO_MANY_STREAMS: nothing was done, come back later). Any other (a
# message larger than this client's receive limit) repeats on every resume: raised.
RETRY_LATER_REASONS = frozenset({"SERVER_BUSY", "TOO_MANY_STREAMS"})


def should_resume(err: grpc.RpcError, suspect_failures: int) -> bool:
    """Whether a watch that failed with `err` may reconnect and resume (everything else,
    PERMISSION_DENIED, INVALID_ARGUMENT, UNAUTHENTICATED, NOT_FOUND, ..., is raised)."""
    code = err.code() if hasattr(err, "code") else None  # type: ignore[attr-defined]
    if code in TRANSIENT:
        return True
    if code in SUSPECT:
        return suspect_failures < MAX_SUSPECT_RETRIES
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return error_from_rpc(err).reason in RETRY_LATER_REASONS
    return False


class EventStream:
    """Iterate to receive events as they are committed; `close()` from any thread ends
    the iteration. `cursor` is where a later watch would resume (after the last event
    handed out); `reconnects` counts the connections after the first.

    Each event is handed out as `wrap(message)`: `Client.watch` wraps them in
    `sdk.models.Event`; without `wrap` they are the event_pb2.Event messages."""

    def __init__(self, client: Connection, filter_msg: Message, *, cursor: str | None = None, replay: bool = False,
                 on_connect: Callable[[], None] | None = None, wrap: Callable[[Message], Any] | None = None) -> None:
        self._client = client
        self._wrap = wrap
        self._filter = filter_msg
        self._replay = replay
        self._on_connect = on_connect
        self.cursor = cursor or ""
        self.reconnects = 0
        self._last_id = 0
        self._closed = threading.Event()
        self._has_cursor = threading.Event()
        self._call: grpc.Call | None = None
        self._lock = threading.Lock()
        self._events = self._generate()
        if self.cursor:
            self._has_cursor.set()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        return next(self._events)

    def wait_started(self, timeout: float | None) -> bool:
        """True once the stream has a position: every event committed after this
        returns True will be delivered (use it before reading current states)."""
        return self._has_cursor.wait(timeout)

    def release_waiters(self) -> None:
        """Wake every wait_started() (the owner gives up on the stream)."""
        self._has_cursor.set()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()

    def _request(self) -> event_service_pb2.WatchEventsRequest:
        return event_service_pb2.WatchEventsRequest(filter=self._filter, cursor=self.cursor,
                                                    replay_from_start=self._replay and not self.cursor)

    def _generate(self) -> Iterator[Any]:
        delays = Backoff(BACKOFF_INITIAL, BACKOFF_MAX)
        connections = 0
        suspect_failures = 0  # INTERNAL/UNKNOWN in a row, without a response in between
        while not self._closed.is_set():
            call = self._client.open_stream("EventService", "WatchEvents", self._request())
            with self._lock:
                self._call = call
            if self._closed.is_set():
                call.cancel()
                return
            connections += 1
            self.reconnects = connections - 1
            first = True
            try:
                for response in call:
                    suspect_failures = 0
                    for msg in response.events:
                        if msg.id <= self._last_id:
                            continue
                        self._last_id = msg.id
                        self.cursor = str(msg.id)
                        yield msg if self._wrap is None else self._wrap(msg)
                    if response.cursor:
                        self.cursor = response.cursor
                        self._has_cursor.set()
                    if first:
                        first = False
                        delays.reset()  # a working connection starts the backoff over
                        if self._on_connect is not None:
                            self._on_connect()
                if self._closed.is_set():
                    return
                log.info("watch stream ended by the server; resuming", cursor=self.cursor)
            except grpc.RpcError as err:
                if self._closed.is_set():
                    return
                code = err.code() if hasattr(err, "code") else None  # type: ignore[attr-defined]
                if not should_resume(err, suspect_failures):
                    log.warning("watch stream failed; not resuming", code=getattr(code, "name", code),
                                error=err.details() if hasattr(err, "details") else str(err))  # type: ignore[attr-defined]
                    raise error_from_rpc(err) from None
                if code in SUSPECT:
                    suspect_failures += 1
                log.info("watch stream lost; resuming", code=getattr(code, "name", code), cursor=self.cursor)
                if not first and is_draining(err):
                    continue  # its replica is shutting down: resume through another one now
            finally:
                with self._lock:
                    self._call = None
                call.cancel()
            self._closed.wait(delays.next_delay())
