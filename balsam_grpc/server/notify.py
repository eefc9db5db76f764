"""PostgreSQL LISTEN on a connection of its own: how one replica learns what the others
committed.

Every event-writing transaction notifies `store.events.EVENTS_CHANNEL` at commit (never
on rollback) with the (owner, site) pairs it wrote; this listener hands each hint to the
fanout, which wakes only when a stream here is concerned. `CONTROL_CHANNEL` carries
other cross-replica news (a revoked token, a site stream taken over): its payload is
"<topic> <argument>", handed to whoever registered for the topic.

Notifications are a wake-up, never the record: they are not replayed to a listener that
was not connected. After (re)connecting, every handler is told to catch up from its own
cursor (`on_reconnect`), so a lost connection costs latency, not correctness.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import psycopg
import structlog
from sqlalchemy.engine import make_url

from balsam_grpc.core.backoff import Backoff
from balsam_grpc.core.aio import cancel_and_wait, wait_event
from balsam_grpc.server.store.events import EVENTS_CHANNEL, hint_origin, parse_hint

log = structlog.get_logger("balsam.notify")

CONTROL_CHANNEL = "balsam_control"
# Control topics: a token was revoked (argument: its id); a connection took a site's
# stream (argument: "<site id> <stream generation>").
REVOKED = "revoked"
SITE_STREAM_CLAIMED = "site_stream"


def libpq_url(url: str) -> str:
    """The SQLAlchemy URL as a libpq connection URI (psycopg.connect takes it)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def notify_control(conn: Any, topic: str, argument: str) -> None:
    """Inside a write transaction: tell every replica (at commit) about `topic`."""
    from sqlalchemy import text

    conn.execute(text("SELECT pg_notify(:channel, :payload)"),
                 {"channel": CONTROL_CHANNEL, "payload": f"{topic} {argument}"})


class Listener:
    """LISTENs for event hints and control messages; reconnects with backoff."""

    def __init__(self, url: str, on_hint: Callable[[list[tuple[int, int]] | None, str], None]) -> None:
        self.url = libpq_url(url)
        self.on_hint = on_hint
        self.topics: dict[str, list[Callable[[str], None]]] = {}
        self.reconnect_handlers: list[Callable[[], None]] = []
        self.connected = asyncio.Event()
        self.connections = 0  # successful connects (tests, diagnostics)
        self.received = 0
        self._task: asyncio.Task[None] | None = None
        self._conn: psycopg.AsyncConnection[Any] | None = None

    def on_control(self, topic: str, handler: Callable[[str], None]) -> None:
        self.topics.setdefault(topic, []).append(handler)

    def on_reconnect(self, handler: Callable[[], None]) -> None:
        self.reconnect_handlers.append(handler)

    async def start(self, timeout: float = 30.0) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="balsam-notify-listener")
        if not await wait_event(self.connected, timeout):
            raise TimeoutError(f"no LISTEN connection to the database within {timeout:g} s")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        backoff = Backoff(initial=0.2, maximum=5.0)
        while True:
            try:
                # TCP keepalive: a listener behind a dead network notices within ~25 s.
                async with await psycopg.AsyncConnection.connect(
                        self.url, autocommit=True, keepalives=1, keepalives_idle=10, keepalives_interval=5,
                        keepalives_count=3) as conn:
                    self._conn = conn
                    # Before LISTEN: a notification psycopg reads while running it comes here too.
                    conn.add_notify_handler(self._received)
                    await conn.execute(f"LISTEN {EVENTS_CHANNEL}")
                    await conn.execute(f"LISTEN {CONTROL_CHANNEL}")
                    self.connections += 1
                    if self.connections > 1:
                        log.info("notification listener reconnected; catching up")
                    self.connected.set()
                    backoff.reset()
                    for handler in self.reconnect_handlers:
                        handler()
                    await _until_lost(conn, self._deliver)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the listener must outlive a database outage
                log.warning("notification listener lost its connection; reconnecting", error=str(exc))
            finally:
                self._conn = None
                self.connected.clear()
            await asyncio.sleep(backoff.next_delay())

    def _received(self, note: psycopg.Notify) -> None:
        self.received += 1
        self._dispatch(note.channel, note.payload)

    def _deliver(self, channel: str, payload: str) -> None:
        self.received += 1
        self._dispatch(channel, payload)

    def _dispatch(self, channel: str, payload: str) -> None:
        try:
            if channel == EVENTS_CHANNEL:
                self.on_hint(parse_hint(payload), hint_origin(payload))
            elif channel == CONTROL_CHANNEL:
                topic, _, argument = payload.partition(" ")
                for handler in self.topics.get(topic, ()):
                    handler(argument)
        except Exception:  # noqa: BLE001 - one bad handler must not stop the listener
            log.exception("notification handler failed", channel=channel, payload=payload[:200])


async def _until_lost(conn: psycopg.AsyncConnection[Any], deliver: Callable[[str, str], None]) -> None:
    """Hand `conn`'s notifications to `deliver` (channel, payload) as they arrive, until
    the connection fails (raises its error). The socket's reader stays registered
    meanwhile: psycopg's notifies() registers and removes it and arms a timer at every
    wake-up, 9 % of a single create's server CPU on the notification of its own commit.
    libpq's notifications are decoded here, not by psycopg's handler (a Notify tuple and
    a loop over the connection's handlers for each: every create's own notification
    comes back to its replica)."""
    pgconn = conn.pgconn
    fd = pgconn.socket
    encoding = conn.info.encoding
    loop = asyncio.get_running_loop()
    lost: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        try:
            pgconn.consume_input()
            while (note := pgconn.notifies()) is not None:
                deliver(note.relname.decode(encoding), note.extra.decode(encoding))
        except Exception as exc:  # noqa: BLE001 - the connection's failure, raised by the waiting task
            loop.remove_reader(fd)
            if not lost.done():
                lost.set_exception(exc)

    loop.add_reader(fd, readable)
    try:
        readable()  # what libpq read already (while LISTEN ran) raises no readiness again
        await lost
    finally:
        loop.remove_reader(fd)
