"""The site daemon's end of SiteService.Connect (contract: notes/site_stream.md).

One long-lived bidirectional stream: hello with capabilities and credit, work items
acknowledged when taken and answered with a WorkResult, results kept in an outbox until
the server's ResultAck names them and resent after a reconnect, reconnects with jittered
exponential backoff, keepalive pings from the channel options. Handlers never take the
stream down: an exception while handling one work item is logged with its context and
reported as a failure result by the caller-supplied `on_error`.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import structlog

from balsam_grpc.core.aio import wait_event
from balsam_grpc.core.backoff import Backoff
from balsam_grpc.core.errors import error_reason, is_draining
from balsam_grpc.v1 import site_pb2, site_service_pb2, site_service_pb2_grpc

log = structlog.get_logger(__name__)

DAEMON_VERSION = "0.1.0"

WorkHandler = Callable[[site_service_pb2.WorkItem], Awaitable[site_service_pb2.WorkResult | None]]
ErrorResult = Callable[[site_service_pb2.WorkItem, BaseException], site_service_pb2.WorkResult | None]


class ResultOutbox:
    """Results sent but not yet acknowledged, by work id, in send order."""

    def __init__(self) -> None:
        self._pending: dict[str, site_service_pb2.WorkResult] = {}

    def add(self, result: site_service_pb2.WorkResult) -> None:
        self._pending[result.work_id] = result

    def ack(self, work_ids: list[str]) -> int:
        return sum(1 for w in work_ids if self._pending.pop(w, None) is not None)

    def get(self, work_id: str) -> site_service_pb2.WorkResult | None:
        return self._pending.get(work_id)

    def __contains__(self, work_id: str) -> bool:
        return work_id in self._pending

    def __len__(self) -> int:
        return len(self._pending)

    def pending(self) -> list[site_service_pb2.WorkResult]:
        return list(self._pending.values())


class SiteStream:
    """Holds the stream to the server and reconnects until `stop()`.

    `handler(item)` does the work and returns its WorkResult (the work id is filled in);
    `on_backlog(msg)` and `on_connected(welcome)` are notified. `send_update` and
    `send_snapshot` push unsolicited reports when connected.
    """

    def __init__(self, channel: grpc.aio.Channel, *, site_id: int, token: str | Callable[[], str],
                 capabilities: list[str],
                 max_in_flight: int, handler: WorkHandler, on_error: ErrorResult,
                 on_backlog: Callable[[site_service_pb2.SiteBacklog], None] | None = None,
                 on_connected: Callable[[site_service_pb2.SiteWelcome], Awaitable[None]] | None = None,
                 backoff: Backoff | None = None) -> None:
        self.stub = site_service_pb2_grpc.SiteServiceStub(channel)
        self.site_id = site_id
        # A callable (site/token_source.py) is asked again at every connection, so a
        # renewed token is used without a restart.
        self.token = token if callable(token) else (lambda: token)
        self.capabilities = capabilities
        self.max_in_flight = max_in_flight
        self.handler = handler
        self.on_error = on_error
        self.on_backlog = on_backlog
        self.on_connected = on_connected
        self.backoff = backoff or Backoff(initial=0.5, maximum=30.0)
        self.outbox = ResultOutbox()
        self.connected = asyncio.Event()
        self._stopping = asyncio.Event()
        self._queue: asyncio.Queue[site_service_pb2.SiteServiceConnectRequest | None] | None = None
        # Work being done, by id; survives reconnects (a re-offered item is not run twice).
        self._running: dict[str, asyncio.Task[None]] = {}
        # Items the server charged against the current connection's credit.
        self._charged: set[str] = set()
        self._call: grpc.aio.StreamStreamCall | None = None
        self.connections = 0

    # ----- public -----------------------------------------------------------------
    async def run(self) -> None:
        while not self._stopping.is_set():
            handover = False
            connections = self.connections
            try:
                await self._connect_once()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                # A draining replica ended a stream that worked: reconnect now, another
                # replica takes it (refused again at once: back off as usual).
                handover = is_draining(exc) and self.connections > connections
                log.warning("site stream ended", code=exc.code().name, details=exc.details(),
                            reason=error_reason(exc), reconnect_now=handover)
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    # Revoked or expired: a renewed token may already be in the token file.
                    refresh = getattr(self.token, "refresh", None)
                    if refresh is not None:
                        refresh()
            except Exception:
                log.exception("site stream failed")
            finally:
                self.connected.clear()
                self._queue = None
                self._call = None
            if self._stopping.is_set():
                break
            if handover:
                continue
            delay = self.backoff.next_delay()
            log.info("reconnecting", in_seconds=round(delay, 2), unacknowledged_results=len(self.outbox))
            await wait_event(self._stopping, delay)

    async def stop(self, drain_seconds: float = 5.0) -> None:
        """Stop taking work, let running work finish (bounded), flush results, close."""
        self._stopping.set()
        if self._running:
            await asyncio.wait(list(self._running.values()), timeout=drain_seconds)
        for task in list(self._running.values()):
            task.cancel()
        if self._queue is not None:
            # Give the last results a moment to reach the server and be acknowledged.
            deadline = asyncio.get_running_loop().time() + 2.0
            while len(self.outbox) and self.connected.is_set() and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            self._queue.put_nowait(None)
        if self._call is not None:
            self._call.cancel()

    def send_update(self, result: site_service_pb2.WorkResult) -> bool:
        """Send an unsolicited report (empty work id); False when not connected."""
        return self._send(site_service_pb2.SiteServiceConnectRequest(result=result))

    def report(self, result: site_service_pb2.WorkResult) -> None:
        """Send a result of the daemon's own (transfer progress, its own work id) that must
        reach the server: kept in the outbox until acknowledged, resent after reconnects."""
        self.outbox.add(result)
        self._send(site_service_pb2.SiteServiceConnectRequest(result=result))

    def send_snapshot(self, snapshot: site_pb2.SchedulerSnapshot) -> bool:
        return self._send(site_service_pb2.SiteServiceConnectRequest(snapshot=snapshot))

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token()}"),)

    @property
    def in_flight(self) -> int:
        return len(self._running)

    # ----- internals --------------------------------------------------------------
    def _send(self, msg: site_service_pb2.SiteServiceConnectRequest) -> bool:
        if self._queue is None or not self.connected.is_set():
            return False
        self._queue.put_nowait(msg)
        return True

    async def _requests(self, queue: asyncio.Queue[site_service_pb2.SiteServiceConnectRequest | None]
                        ) -> AsyncIterator[site_service_pb2.SiteServiceConnectRequest]:
        while True:
            msg = await queue.get()
            if msg is None:
                return
            yield msg

    async def _connect_once(self) -> None:
        queue: asyncio.Queue[site_service_pb2.SiteServiceConnectRequest | None] = asyncio.Queue()
        hello = site_service_pb2.SiteHello(site_id=self.site_id, hostname=socket.gethostname(),
                                           daemon_version=DAEMON_VERSION, capabilities=self.capabilities,
                                           max_in_flight=self.max_in_flight)
        queue.put_nowait(site_service_pb2.SiteServiceConnectRequest(hello=hello))
        self._charged = set()
        call = self.stub.Connect(self._requests(queue), metadata=self.metadata)  # the current token
        self._call = call
        self._queue = queue
        async for msg in call:
            kind = msg.WhichOneof("message")
            if kind == "welcome":
                await self._welcomed(msg.welcome, queue)
            elif kind == "work":
                self._take(msg.work, queue)
            elif kind == "result_ack":
                self.outbox.ack(list(msg.result_ack.work_ids))
                for error in msg.result_ack.errors:
                    log.warning("server refused a result", error=error)
            elif kind == "backlog":
                if self.on_backlog is not None:
                    try:
                        self.on_backlog(msg.backlog)
                    except Exception:
                        log.exception("backlog handler failed")
            if self._stopping.is_set() and not self._running and not len(self.outbox):
                break

    async def _welcomed(self, welcome: site_service_pb2.SiteWelcome,
                        queue: asyncio.Queue[site_service_pb2.SiteServiceConnectRequest | None]) -> None:
        self.connections += 1
        self.backoff.reset()
        log.info("connected to server", site_id=self.site_id, server_version=welcome.server_version,
                 resending=len(self.outbox), still_running=len(self._running))
        for result in self.outbox.pending():
            queue.put_nowait(site_service_pb2.SiteServiceConnectRequest(result=result))
        self.connected.set()
        if self.on_connected is not None:
            try:
                await self.on_connected(welcome)
            except Exception:
                log.exception("on_connected failed")

    def _take(self, item: site_service_pb2.WorkItem,
              queue: asyncio.Queue[site_service_pb2.SiteServiceConnectRequest | None]) -> None:
        queue.put_nowait(site_service_pb2.SiteServiceConnectRequest(
            ack=site_service_pb2.WorkAck(work_ids=[item.id])))
        self._charged.add(item.id)
        if item.id in self._running:
            return  # offered again after a reconnect while still running: one result will come
        done = self.outbox.get(item.id)
        if done is not None:
            # Done, result not yet acknowledged: resend it and give the credit back.
            self._charged.discard(item.id)
            queue.put_nowait(site_service_pb2.SiteServiceConnectRequest(result=done))
            queue.put_nowait(site_service_pb2.SiteServiceConnectRequest(credit=site_service_pb2.SiteCredit(items=1)))
            return
        task = asyncio.create_task(self._do(item), name=f"work {item.id}")
        self._running[item.id] = task

    async def _do(self, item: site_service_pb2.WorkItem) -> None:
        try:
            try:
                result = await self.handler(item)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("work item failed", work_id=item.id, kind=item.WhichOneof("kind"))
                result = self.on_error(item, exc)
            if result is not None:
                result.work_id = item.id
                self.outbox.add(result)
        finally:
            self._running.pop(item.id, None)
        if result is not None:
            self._send(site_service_pb2.SiteServiceConnectRequest(result=result))
        if item.id in self._charged:
            self._charged.discard(item.id)
            self._send(site_service_pb2.SiteServiceConnectRequest(credit=site_service_pb2.SiteCredit(items=1)))
