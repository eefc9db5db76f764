"""The live feed: one Server-Sent Events stream per open page, relaying the user's
`WatchEvents` in coalesced batches.

Each SSE connection owns an SDK `EventStream` (its own gRPC server-stream, iterated on a
thread of its own) that starts after the page's cursor, or after the browser's
Last-Event-ID when EventSource reconnects. Events collect in a list; the first one of a
batch wakes the connection, which waits COALESCE_SECONDS more, takes everything and sends
ONE message: the newest state of each job and the ids of the jobs created, so 1,000
events/s cost the browser four small DOM passes a second and a slow browser only makes
the batches bigger, never the backlog longer. The message's SSE id is the last event's id,
which is a WatchEvents cursor: EventSource only advances Last-Event-ID after a whole
message arrived, so a reconnect resumes exactly after the last batch applied, and the
server delivers every later event once.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

import structlog

from balsam_grpc.core.aio import wait_event
from balsam_grpc.dashboard.reads import state_of, ts
from balsam_grpc.dashboard.views import FAILURE_STATES
from balsam_grpc.sdk.client import Client
from balsam_grpc.sdk.convert import enum_name
from balsam_grpc.sdk.errors import BalsamError
from balsam_grpc.v1 import batch_job_pb2, event_pb2, job_pb2, transfer_item_pb2

log = structlog.get_logger("balsam.dashboard.live")

COALESCE_SECONDS = 0.25
KEEPALIVE_SECONDS = 15.0   # a comment-free "tick" frame: keeps proxies from closing the stream
RECONNECT_MS = 1000
# A stream ends after this long and the browser resumes it (Last-Event-ID) at once. Whether
# a vanished browser cancels the stream depends on the ASGI server (uvicorn's 2.3 spec
# does; under 2.4 a send to a closed connection is silently dropped): this bounds the cost
# of one that is not noticed.
MAX_STREAM_SECONDS = 1800.0
FAILURES_PER_BATCH = 20
NEW_JOB = (job_pb2.JOB_STATE_UNSPECIFIED, job_pb2.JOB_STATE_CREATED)


_open: weakref.WeakSet[Relay] = weakref.WeakSet()


def stop_all() -> None:
    """End every open stream (the dashboard is shutting down: browsers reconnect later)."""
    for relay in list(_open):
        relay.stop()


def valid_cursor(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 19


def compact(events: list[event_pb2.Event]) -> dict[str, Any]:
    """One message for a batch of events (in id order)."""
    jobs: dict[str, dict[str, Any]] = {}
    created: list[int] = []
    failures: list[dict[str, Any]] = []
    batch_jobs: dict[str, str] = {}
    transfers: dict[str, tuple[str, int]] = {}
    for e in events:
        which = e.WhichOneof("change")
        if which == "job_state":
            to_state = state_of(e.job_state.to_state)
            jobs[str(e.job_id)] = {"state": to_state, "time": ts(e.time), "site_id": e.site_id}
            if e.job_state.from_state in NEW_JOB:  # a job's first event leaves CREATED
                created.append(e.job_id)
            if to_state in FAILURE_STATES:
                failures.append({"job_id": e.job_id, "state": to_state, "time": ts(e.time), "message": e.message})
        elif which == "batch_job_state":
            batch_jobs[str(e.batch_job_state.batch_job_id)] = enum_name(
                batch_job_pb2.BatchJobState.DESCRIPTOR, e.batch_job_state.to_state)
        elif which == "transfer_state":
            transfers[str(e.transfer_state.transfer_item_id)] = (enum_name(
                transfer_item_pb2.TransferState.DESCRIPTOR, e.transfer_state.to_state), e.job_id)
    return {"cursor": str(events[-1].id), "events": len(events), "jobs": jobs, "created": created,
            "failures": failures[-FAILURES_PER_BATCH:], "batch_jobs": batch_jobs, "transfers": transfers}


def frame(data: Any, *, event: str = "", id: str = "") -> str:
    lines = []
    if event:
        lines.append(f"event: {event}")
    if id:
        lines.append(f"id: {id}")
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return "\n".join(lines) + "\n\n"


class Relay:
    """One page's feed, from `cursor` ("" = from now)."""

    def __init__(self, client: Client, cursor: str, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._stream = client.watch(since_cursor=cursor or None)
        self._pending: list[event_pb2.Event] = []
        self._lock = threading.Lock()
        self._wake = asyncio.Event()
        self.error: str | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._pump, name="dashboard-relay", daemon=True)
        _open.add(self)

    def _notify(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # the loop is closing: nobody is listening any more
            pass

    def _pump(self) -> None:
        try:
            for event in self._stream:
                with self._lock:
                    self._pending.append(event.message)
                    first = len(self._pending) == 1
                if first:
                    self._notify()
        except BalsamError as err:  # not transient (bad cursor, revoked token): the page is told
            self.error = err.message
        except Exception as err:  # noqa: BLE001 - reported to the page, logged with context
            log.exception("relay failed", error=str(err))
            self.error = f"the dashboard lost the event stream: {err}"
        finally:
            self._notify()

    def _take(self) -> list[event_pb2.Event]:
        with self._lock:
            batch, self._pending = self._pending, []
        return batch

    def close(self) -> None:
        self._stream.close()

    def stop(self) -> None:
        """From any thread: the stream ends after what it holds now."""
        self._stopping = True
        self._notify()

    async def frames(self) -> AsyncIterator[str]:
        self._thread.start()
        ends = time.monotonic() + MAX_STREAM_SECONDS
        try:
            yield f"retry: {RECONNECT_MS}\n\n"
            while time.monotonic() < ends:
                if not await wait_event(self._wake, KEEPALIVE_SECONDS):
                    yield frame({}, event="tick")
                    continue
                await asyncio.sleep(COALESCE_SECONDS)
                # Taking and clearing in one step of the loop: a wake-up the thread sends for
                # an event appended after the take runs after the clear, so none is lost.
                batch = self._take()
                self._wake.clear()
                if batch:
                    yield frame(compact(batch), id=str(batch[-1].id))
                if self.error is not None and not self._pending:
                    yield frame({"message": self.error}, event="failure")
                    return
                if self._stopping:
                    return
        finally:
            self.close()
