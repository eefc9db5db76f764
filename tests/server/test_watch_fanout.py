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

from balsam_grpc.server.services import events as events_service
from balsam_grpc.server.store import events as event_store
from balsam_grpc.v1 import event_service_pb2, event_service_pb2_grpc
from tests.support.records import make_app, make_jobs, make_site

WATCHERS = 200


class LogReads:
    """Counts the watches' reads of the event log (services.events.read_events, which
    both databases' reads go through)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        self.after_ids: list[int | None] = []
        self._lock = threading.Lock()
        real = events_service.read_events

        async def counted(*args: Any, **kw: Any) -> Any:
            with self._lock:
                self.count += 1
                self.after_ids.append(kw.get("after_id"))
            return await real(*args, **kw)

        monkeypatch.setattr(events_service, "read_events", counted)


def test_watchers_of_one_selection_share_one_read_per_wake(harness: Any, alice: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    app = make_app(alice, make_site(alice).id)
    reads = LogReads(monkeypatch)

    async def run() -> tuple[int, int]:
        md = (("authorization", f"Bearer {alice.token}"),)
        async with grpc.aio.insecure_channel(harness.address) as channel:
            stub = event_service_pb2_grpc.EventServiceStub(channel)
            calls = [stub.WatchEvents(event_service_pb2.WatchEventsRequest(), metadata=md) for _ in range(WATCHERS)]
            for call in calls:  # each has its starting cursor: subscribed
                await asyncio.wait_for(call.read(), 60)
            before = reads.count
            await asyncio.to_thread(make_jobs, alice, app, 1)

            async def first_event(call: Any) -> int:
                while True:
                    msg = await call.read()
                    if msg.events:
                        return len(msg.events)

            got = await asyncio.wait_for(asyncio.gather(*(first_event(c) for c in calls)), 120)
            for call in calls:
                call.cancel()
            return reads.count - before, sum(got)

    queries, delivered = asyncio.run(run())
    assert delivered == WATCHERS  # every watcher got the one event
    # One shared read per wake (a few if the wake-ups straggle), not one per watcher.
    assert queries <= 5, f"{queries} reads of the event log for one event and {WATCHERS} watchers"


def test_a_watch_reads_the_log_only_for_events_its_filter_may_take(harness: Any, alice: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's job watcher asks for final states only; every other event of its user
    (each job created, started, leased) woke it into a query of the event log that found
    nothing: a tenth of the server's CPU on the 1,000-job real path. The fanout's routing
    rows (kind, states, job, site) now say which wake-ups can concern the filter."""
    from balsam_grpc.v1 import job_pb2, job_service_pb2, job_service_pb2_grpc

    app = make_app(alice, make_site(alice).id)
    reads = LogReads(monkeypatch)
    final = event_service_pb2.EventFilter(kinds=[event_service_pb2.EVENT_KIND_JOB_STATE],
                                          to_states=[job_pb2.JOB_STATE_JOB_FINISHED, job_pb2.JOB_STATE_KILLED])

    async def run() -> tuple[int, list[Any]]:
        md = (("authorization", f"Bearer {alice.token}"),)
        async with grpc.aio.insecure_channel(harness.address) as channel:
            call = event_service_pb2_grpc.EventServiceStub(channel).WatchEvents(
                event_service_pb2.WatchEventsRequest(filter=final), metadata=md)
            await asyncio.wait_for(call.read(), 60)  # its starting cursor: subscribed
            created = []
            for _ in range(10):  # ten commits of events the filter does not take, ten wake-ups
                created += await asyncio.to_thread(make_jobs, alice, app, 1)
                await asyncio.sleep(0.05)
            killed = created[3].id
            await asyncio.to_thread(
                job_service_pb2_grpc.JobServiceStub(harness.channel).UpdateJob,
                job_service_pb2.UpdateJobRequest(job=job_pb2.Job(id=killed, state=job_pb2.JOB_STATE_KILLED),
                                                 update_mask={"paths": ["state"]}), metadata=md)
            while True:
                msg = await asyncio.wait_for(call.read(), 60)
                if msg.events:
                    call.cancel()
                    return killed, list(msg.events)

    killed, got = asyncio.run(run())
    assert [(e.job_id, e.job_state.to_state) for e in got] == [(killed, job_pb2.JOB_STATE_KILLED)]
    # The kill's read; one at the start if an event committed while the watch began (a gap);
    # one after the kill's if other events (another test's sessions expiring) moved the
    # position past it. Not one per wake-up: the old code read 11 times here.
    assert reads.count <= 4, f"{reads.count} reads of the event log for one event the watch takes"


def test_a_watch_of_some_jobs_moves_its_cursor_past_events_of_others(harness: Any, alice: Any,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A watch of given jobs kept its cursor where its last event of those jobs was: every
    wake-up read the log again from there (a longer read each time), and its heartbeats gave
    a reconnecting client that old cursor to resume from."""
    from balsam_grpc.server.services import events as event_service

    monkeypatch.setattr(event_service, "HEARTBEAT_SECONDS", 0.2)
    app = make_app(alice, make_site(alice).id)
    watched = make_jobs(alice, app, 1)[0].id
    reads = LogReads(monkeypatch)
    # Tags: the routing rows cannot tell, so every wake-up reads the log.
    mine = event_service_pb2.EventFilter(job_ids=[watched], tags={"no": "such tag"})

    async def run() -> tuple[int, int, int]:
        md = (("authorization", f"Bearer {alice.token}"),)
        async with grpc.aio.insecure_channel(harness.address) as channel:
            call = event_service_pb2_grpc.EventServiceStub(channel).WatchEvents(
                event_service_pb2.WatchEventsRequest(filter=mine), metadata=md)
            start = int((await asyncio.wait_for(call.read(), 60)).cursor)
            others = []
            for _ in range(5):  # five commits of other jobs' events, five wake-ups
                others += await asyncio.to_thread(make_jobs, alice, app, 1)
                await asyncio.sleep(0.05)
            last = await asyncio.to_thread(harness.db.read_sync, event_store.max_event_id, alice.user_id)
            cursor = start
            for _ in range(10):  # heartbeats (0.2 s) until one says it is past the others' events
                msg = await asyncio.wait_for(call.read(), 60)
                assert not msg.events
                cursor = int(msg.cursor)
                if cursor >= last:
                    break
            call.cancel()
            return start, last, cursor

    start, last, cursor = asyncio.run(run())
    assert cursor >= last > start, "the heartbeats' cursor stayed behind the events the watch has passed"
    starts = [a for a in reads.after_ids if a is not None]
    # Each read begins where the previous ended, not at the watch's start every time.
    assert starts == sorted(starts) and starts[-1] > start, starts
