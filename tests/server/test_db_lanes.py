"""Interactive database work goes first (store/db.py Lanes): the streams of site daemons
and launchers cannot keep a unary call waiting behind their transactions, and they keep
making progress themselves. Ordering and progress only, never timings."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from balsam_grpc.server.services import events as event_service
from balsam_grpc.server.store.db import Lanes
from balsam_grpc.v1 import event_service_pb2, event_service_pb2_grpc, job_service_pb2, job_service_pb2_grpc

WAIT = 20.0  # bound on every wait below (never reached when things work)


# -- the lanes alone ------------------------------------------------------------------------

def test_bulk_work_yields_to_interactive_work_and_still_progresses() -> None:
    async def scenario() -> None:
        lanes = Lanes(bulk_when_idle=3, bulk_when_busy=1)
        order: list[str] = []

        async def bulk(name: str) -> None:
            await lanes.enter_bulk()
            order.append(name)

        # Idle: bulk work takes up to three places at once.
        for name in ("b1", "b2", "b3"):
            await bulk(name)
        late = [asyncio.ensure_future(bulk(name)) for name in ("b4", "b5")]
        await asyncio.sleep(0)
        assert order == ["b1", "b2", "b3"] and lanes.bulk == 3
        # Interactive work enters at once, whatever bulk work holds or waits for.
        lanes.enter_interactive()
        # While it runs only one bulk transaction may: two leaving admit nobody...
        lanes.leave_bulk()
        lanes.leave_bulk()
        await asyncio.sleep(0)
        assert order == ["b1", "b2", "b3"] and lanes.bulk == 1
        # ...the last leaving admits the next, in arrival order (never none at all).
        lanes.leave_bulk()
        await asyncio.sleep(0)
        assert order == ["b1", "b2", "b3", "b4"] and lanes.bulk == 1
        # Interactive work done: the bulk limit is back to three.
        lanes.leave_interactive()
        await asyncio.sleep(0)
        assert order == ["b1", "b2", "b3", "b4", "b5"] and lanes.bulk == 2
        await asyncio.gather(*late)

    asyncio.run(scenario())


def test_a_bulk_waiter_cancelled_after_admission_hands_its_place_on() -> None:
    async def scenario() -> None:
        lanes = Lanes(bulk_when_idle=1, bulk_when_busy=1)
        await lanes.enter_bulk()
        first = asyncio.ensure_future(lanes.enter_bulk())
        second = asyncio.ensure_future(lanes.enter_bulk())
        await asyncio.sleep(0)
        lanes.leave_bulk()  # admits `first`...
        first.cancel()  # ...which is cancelled before it ran
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert first.cancelled() and second.done() and lanes.bulk == 1

    asyncio.run(scenario())


# -- on the server --------------------------------------------------------------------------

@pytest.fixture
def held_stream_reads(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, Callable[[], int]]:
    """Every WatchEvents stream's first read (its starting cursor) blocks in its database
    thread until the returned event is set; the count says how many are in."""
    gate = threading.Event()
    entered = 0
    lock = threading.Lock()
    original = event_service.store.max_event_id

    def held(conn: Any, owner_id: int) -> int:
        nonlocal entered
        with lock:
            entered += 1
        gate.wait(WAIT)
        return original(conn, owner_id)

    monkeypatch.setattr(event_service.store, "max_event_id", held)
    yield gate, lambda: entered
    gate.set()


def test_a_unary_call_is_answered_while_stream_work_fills_the_database_pool(
        harness: Any, alice: Any, held_stream_reads: tuple[threading.Event, Callable[[], int]]) -> None:
    gate, entered = held_stream_reads
    workers = harness.db._pool._max_workers
    watch = event_service_pb2_grpc.EventServiceStub(harness.channel)
    streams = [watch.WatchEvents(event_service_pb2.WatchEventsRequest(), metadata=alice.metadata, timeout=2 * WAIT)
               for _ in range(workers + 2)]
    try:
        # More stream transactions than database threads are waiting: as many as bulk work
        # may hold are in the pool, blocked.
        limit = harness.db.lanes.bulk_when_idle
        deadline = threading.Event()
        timer = threading.Timer(WAIT, deadline.set)
        timer.start()
        while entered() < limit and not deadline.is_set():
            deadline.wait(0.01)
        timer.cancel()
        assert entered() == limit < workers
        # A unary call still finds a thread (before, it queued behind the blocked streams
        # until its deadline).
        jobs = job_service_pb2_grpc.JobServiceStub(harness.channel)
        counted = jobs.CountJobs(job_service_pb2.CountJobsRequest(), metadata=alice.metadata, timeout=WAIT)
        assert counted.total == 0
        assert not gate.is_set() and entered() == limit  # the streams did not move meanwhile
        # Released, every stream makes progress: each sends its starting cursor.
        gate.set()
        for call in streams:
            assert next(call).cursor
    finally:
        for call in streams:
            call.cancel()
    with pytest.raises(grpc.RpcError):
        next(streams[0])
