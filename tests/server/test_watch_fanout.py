"""The cost of many watchers (issue 12, item 4): one user's watch streams with the same
selection share one read of the event log per wake (services/events.py SharedReads), so
an event costs one query however many of them there are, not one per stream (2,000
streams of one user took every other call to 22-36 s)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import grpc
import pytest

from balsam_grpc.server.store import events as event_store
from balsam_grpc.v1 import event_service_pb2, event_service_pb2_grpc
from tests.support.records import make_app, make_jobs, make_site

WATCHERS = 200


def test_watchers_of_one_selection_share_one_read_per_wake(harness: Any, alice: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(alice, make_site(alice).id)
    reads = 0
    lock = threading.Lock()
    real = event_store.list_events

    def counted(*args: Any, **kw: Any) -> Any:
        nonlocal reads
        with lock:
            reads += 1
        return real(*args, **kw)

    monkeypatch.setattr(event_store, "list_events", counted)

    async def run() -> tuple[int, int]:
        md = (("authorization", f"Bearer {alice.token}"),)
        async with grpc.aio.insecure_channel(harness.address) as channel:
            stub = event_service_pb2_grpc.EventServiceStub(channel)
            calls = [stub.WatchEvents(event_service_pb2.WatchEventsRequest(), metadata=md) for _ in range(WATCHERS)]
            for call in calls:  # each has its starting cursor: subscribed
                await asyncio.wait_for(call.read(), 60)
            before = reads
            await asyncio.to_thread(make_jobs, alice, app, 1)

            async def first_event(call: Any) -> int:
                while True:
                    msg = await call.read()
                    if msg.events:
                        return len(msg.events)

            got = await asyncio.wait_for(asyncio.gather(*(first_event(c) for c in calls)), 120)
            for call in calls:
                call.cancel()
            return reads - before, sum(got)

    queries, delivered = asyncio.run(run())
    assert delivered == WATCHERS  # every watcher got the one event
    # One shared read per wake (a few if the wake-ups straggle), not one per watcher.
    assert queries <= 5, f"{queries} reads of the event log for one event and {WATCHERS} watchers"
