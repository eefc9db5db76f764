"""Interactive database work goes first (store/db.py Workers): the streams of site daemons
and launchers cannot keep a unary call waiting behind their transactions, and they keep
making progress themselves. Ordering and progress only, never timings."""

from __future__ import annotations

import asyncio
import datetime
import gc
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from balsam_grpc.server.services import events as event_service
from balsam_grpc.server.auth import Authenticator
from balsam_grpc.server.store import db as db_module
from balsam_grpc.server.store.db import Workers, bulk_work
from balsam_grpc.v1 import event_service_pb2, event_service_pb2_grpc, job_service_pb2, job_service_pb2_grpc

WAIT = 20.0  # bound on every wait below (never reached when things work)


# -- the threads alone -----------------------------------------------------------------------

class Jobs:
    """Jobs that record when they start and run until released."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.gates: dict[str, threading.Event] = {}

    def __call__(self, name: str) -> Callable[[], str]:
        gate = self.gates[name] = threading.Event()

        def run() -> str:
            self.started.append(name)
            assert gate.wait(WAIT)
            return name

        return run

    def wait_started(self, *names: str) -> None:
        deadline = threading.Event()
        timer = threading.Timer(WAIT, deadline.set)
        timer.start()
        while not set(names) <= set(self.started) and not deadline.is_set():
            deadline.wait(0.005)
        timer.cancel()
        assert set(names) <= set(self.started), (names, self.started)


def test_a_free_thread_takes_interactive_work_before_bulk_work_beyond_the_reserve() -> None:
    workers, jobs = Workers(3, bulk_reserved=1), Jobs()
    try:
        b1 = workers.submit(jobs("b1"), bulk=True)
        i1 = workers.submit(jobs("i1"))
        b2 = workers.submit(jobs("b2"), bulk=True)  # the last free thread: bulk work below its cap
        jobs.wait_started("b1", "i1", "b2")
        b3 = workers.submit(jobs("b3"), bulk=True)
        i2 = workers.submit(jobs("i2"))  # after b3, yet before it
        jobs.gates["i1"].set()
        jobs.wait_started("i2")
        assert "b3" not in jobs.started
        jobs.gates["i2"].set()
        assert i1.result(WAIT) == "i1" and i2.result(WAIT) == "i2"
        # Bulk work never takes the last thread: b3 waits for a bulk job to end.
        assert "b3" not in jobs.started
        jobs.gates["b1"].set()
        jobs.wait_started("b3")
        for name in ("b2", "b3"):
            jobs.gates[name].set()
        assert [f.result(WAIT) for f in (b1, b2, b3)] == ["b1", "b2", "b3"]
    finally:
        for gate in jobs.gates.values():
            gate.set()
        workers.shutdown()


def test_bulk_work_keeps_its_reserved_threads_under_interactive_load() -> None:
    workers, jobs = Workers(3, bulk_reserved=1), Jobs()
    try:
        first = [workers.submit(jobs(f"i{n}")) for n in range(3)]
        jobs.wait_started("i0", "i1", "i2")
        i3 = workers.submit(jobs("i3"))
        b1 = workers.submit(jobs("b1"), bulk=True)  # after i3, yet before it: no thread runs bulk work
        jobs.gates["i0"].set()
        jobs.wait_started("b1")
        assert "i3" not in jobs.started
        for gate in jobs.gates.values():
            gate.set()
        assert [f.result(WAIT) for f in (*first, i3, b1)] == ["i0", "i1", "i2", "i3", "b1"]
    finally:
        for gate in jobs.gates.values():
            gate.set()
        workers.shutdown()


def test_a_streams_token_recheck_is_interactive_work() -> None:
    # The periodic re-read of a stream's token (revocation through another replica) was
    # started from the stream's task and inherited its bulk mark: under stream load it
    # waited behind every stream's transactions.
    lanes: list[bool] = []

    class Database:
        async def read_now(self, fn: Any, *args: Any) -> dict[str, Any]:
            lanes.append(db_module._BULK.get())
            return {"revoked": True, "expire_time": datetime.datetime.now(datetime.UTC)}

    async def stream_task() -> None:
        bulk_work()  # as server/rpc.py stream() marks a stream's task
        auth = Authenticator(Database())  # type: ignore[arg-type]
        ended = asyncio.Event()
        unwatch = auth.watch("token-1", lambda reason: ended.set(), recheck_seconds=0.01)
        await asyncio.wait_for(ended.wait(), WAIT)
        unwatch()
        assert db_module._BULK.get()  # the stream's own work stays bulk

    asyncio.run(stream_task())
    assert lanes == [False]


def test_a_job_cancelled_before_it_ran_never_runs() -> None:
    workers, jobs = Workers(2, bulk_reserved=1), Jobs()
    try:
        held = [workers.submit(jobs("i0")), workers.submit(jobs("i1"))]
        jobs.wait_started("i0", "i1")
        dropped = workers.submit(jobs("never"))
        assert dropped.cancel()
        for gate in jobs.gates.values():
            gate.set()
        assert [f.result(WAIT) for f in held] == ["i0", "i1"]
    finally:
        for gate in jobs.gates.values():
            gate.set()
        workers.shutdown()
    assert "never" not in jobs.started


def test_finished_bulk_work_wakes_a_thread_only_when_bulk_work_waits() -> None:
    """Each wake-up of an idle thread costs a context switch and a GIL hand-off; a thread
    that finished bulk work with none queued woke another for nothing (a stream's every
    transaction: about a tenth of the server's samples in bench_e2e's profile)."""
    workers = Workers(3, bulk_reserved=1)  # at most 2 threads run bulk work
    wakes: list[str] = []
    notify = workers._ready.notify

    def counted(n: int = 1) -> None:
        wakes.append(threading.current_thread().name)
        notify(n)

    workers._ready.notify = counted  # type: ignore[method-assign]
    try:
        for i in range(20):
            assert workers.submit(lambda i=i: i, bulk=True).result(WAIT) == i
        assert len(wakes) == 20  # one per submit, none when each finished
        # Bulk work queued behind the reserve still gets a thread when one finishes.
        jobs = Jobs()
        held = [workers.submit(jobs(f"b{i}"), bulk=True) for i in range(3)]
        jobs.wait_started("b0", "b1")
        assert jobs.started == ["b0", "b1"]  # the third waits for a bulk thread
        jobs.gates["b0"].set()
        jobs.wait_started("b2")
        for gate in jobs.gates.values():
            gate.set()
        assert [f.result(WAIT) for f in held] == ["b0", "b1", "b2"]
    finally:
        workers.shutdown()


def test_an_idle_thread_keeps_nothing_of_the_work_it_ran() -> None:
    # A thread waiting for its next job held the last call (its request) and its future
    # (the answer): after three large creates the server kept ~100 MiB it could not give back.
    class Big:
        pass

    workers = Workers(2, bulk_reserved=1)
    try:
        given, answered = Big(), Big()
        futures = [workers.submit(lambda g=given: answered), workers.submit(lambda g=given: answered, bulk=True)]  # noqa: F821 - deleted below, after the calls ran
        assert [f.result(WAIT) for f in futures] == [answered, answered]
        kept = [weakref.ref(given), weakref.ref(answered)]
        del given, answered, futures
        deadline = time.monotonic() + WAIT  # the threads let go just after answering
        while any(ref() is not None for ref in kept) and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.01)
        assert [ref() for ref in kept] == [None, None]
    finally:
        workers.shutdown()


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
    workers = harness.db.workers.workers
    watch = event_service_pb2_grpc.EventServiceStub(harness.channel)
    streams = [watch.WatchEvents(event_service_pb2.WatchEventsRequest(), metadata=alice.metadata, timeout=2 * WAIT)
               for _ in range(workers + 2)]
    try:
        # More stream transactions than database threads are waiting: all threads but one
        # run them, blocked.
        limit = workers - 1
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
