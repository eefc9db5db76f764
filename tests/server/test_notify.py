"""server.notify.Listener: every notification reaches its handler, the ones sent while it
connects included, and a lost connection is replaced and followed by a catch-up."""

from __future__ import annotations

import asyncio
import time

import psycopg
import pytest

from balsam_grpc.server.notify import CONTROL_CHANNEL, Listener, libpq_url
from balsam_grpc.server.store.events import EVENTS_CHANNEL


@pytest.fixture
def url(harness):
    if harness.backend != "postgres":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    return harness.url


async def _until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not reached in time"
        await asyncio.sleep(0.01)


def test_notifications_reach_handlers_across_a_lost_connection(url):
    async def main() -> None:
        hints: list[str] = []
        controls: list[str] = []
        reconnects: list[int] = []
        listener = Listener(url, lambda pairs, origin: hints.append(origin))
        listener.on_control("topic", controls.append)
        listener.on_reconnect(lambda: reconnects.append(listener.connections))
        await listener.start()
        async with await psycopg.AsyncConnection.connect(libpq_url(url), autocommit=True) as other:
            async def notify(channel: str, payload: str) -> None:
                await other.execute("SELECT pg_notify(%s, %s)", (channel, payload))

            # Several at once: all of them, not only the first of a read.
            for i in range(3):
                await notify(CONTROL_CHANNEL, f"topic a{i}")
            await _until(lambda: len(controls) == 3)
            assert controls == ["a0", "a1", "a2"]

            backend = listener._conn.info.backend_pid
            await other.execute("SELECT pg_terminate_backend(%s)", (backend,))
            await _until(lambda: listener.connections == 2 and listener.connected.is_set())
            assert reconnects == [1, 2]
            await notify(CONTROL_CHANNEL, "topic b")
            await notify(EVENTS_CHANNEL, "")
            await _until(lambda: controls[-1:] == ["b"] and hints)
            assert listener.received == 5
        await listener.stop()

    asyncio.run(main())
