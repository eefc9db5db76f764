"""The event fanout (server/fanout.py): one reader of committed events that wakes only
the streams they concern, on SQLite and PostgreSQL.

- Site streams, launcher sessions and event watchers are not woken (and run no query)
  for events of other sites or other users; they are for their own (spies on the store
  functions they call, as test_session_stream does for acquisitions).
- Nothing is missed under concurrent commits and subscriptions: a Fanout on a database
  of its own is stressed with concurrent writers (the database's thread pool) and
  subscribers joining at random moments, some slow enough to overflow into gaps; every
  subscriber sees every event of its interest after its start, in id order. The same
  through the server: WatchEvents streams opened while client threads commit.
"""

from __future__ import annotations

import asyncio
import queue
import random
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from sqlalchemy import func, select

from balsam_grpc.server import fanout as fanout_mod
from balsam_grpc.server.fanout import Fanout, Subscription
from balsam_grpc.server.services import events as events_service
from balsam_grpc.server.services import site_stream as site_stream_service
from balsam_grpc.server.services.jobs import JobServicer
from balsam_grpc.server.services.session_stream import SessionStream
from balsam_grpc.server.state import EventBus
from balsam_grpc.server.store import events as event_store
from balsam_grpc.server.store import leases, site_work
from balsam_grpc.server.store.db import Database
from balsam_grpc.server.store.tables import events
from balsam_grpc.v1 import event_service_pb2, event_service_pb2_grpc, job_pb2, site_service_pb2
from tests.conftest import Caller, Harness
from tests.support.launcher import Launcher
from tests.support.records import World, make_app, make_batch_job, make_jobs, make_site
from tests.support.site_stream import SiteClient, kinds_scanned

S = job_pb2
WAIT = 20.0


def _fanout(harness: Harness) -> Fanout:
    return harness.embedded.server.state.fanout


def _caught_up(harness: Harness) -> None:
    """Every committed event has been routed (the RPCs that committed them have returned,
    so the bus already knows them)."""
    state = harness.embedded.server.state
    # SQLite: the bus knows every commit of this server (other tests' Database objects
    # write to the same file without telling it). PostgreSQL: the database's horizon.
    horizon = state.db.read_sync(event_store.event_horizon)[0] if state.db.is_postgres else state.bus.high_water
    # Events no stream here cares about (other tests' writes) wake nobody: look now.
    harness.embedded.loop.loop.call_soon_threadsafe(state.bus.poke)
    deadline = time.monotonic() + WAIT
    while state.fanout.position < horizon:
        assert time.monotonic() < deadline, "the fanout did not catch up"
        time.sleep(0.01)


def _subscription(harness: Harness, owner_id: int, site_id: int | None = None) -> Subscription:
    f = _fanout(harness)
    deadline = time.monotonic() + WAIT
    while True:
        subs = f.by_owner.get(owner_id, []) if site_id is None else f.by_site.get((owner_id, site_id), [])
        if subs:
            assert len(subs) == 1
            return subs[0]
        assert time.monotonic() < deadline, "no subscription"
        time.sleep(0.01)


class Spy:
    """Counts calls of store functions, by (name, owner_id, site_id-or-session) key."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: Counter[tuple[Any, ...]] = Counter()
        self.monkeypatch = monkeypatch

    def watch(self, module: Any, name: str, key: Any) -> None:
        real = getattr(module, name)
        if asyncio.iscoroutinefunction(real):
            async def counted_async(*args: Any, **kw: Any) -> Any:
                self.calls[(name, *key(*args, **kw))] += 1
                return await real(*args, **kw)

            self.monkeypatch.setattr(module, name, counted_async)
            return

        def counted(*args: Any, **kw: Any) -> Any:
            self.calls[(name, *key(*args, **kw))] += 1
            return real(*args, **kw)

        self.monkeypatch.setattr(module, name, counted)

    def count(self, name: str, *key: Any) -> int:
        return self.calls[(name, *key)]


def _by_site(conn: Any, owner_id: int, site_id: int, *args: Any, **kw: Any) -> tuple[int, int]:
    return owner_id, site_id


# ---------------------------------------------------------------------------- woken only by what concerns it

def test_site_stream_is_woken_only_by_events_of_its_site(harness: Harness, alice: Caller,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(monkeypatch)
    for name in ("find_work", "site_backlog", "site_events_after"):
        spy.watch(site_work, name, _by_site)
    # No event of `mine` exists before the baseline (creating and connecting a site write
    # none; the credit comes with the hello, so the first backlog follows the first scan):
    # nothing of its own can be routed late. What else moves the counts is the stream's
    # periodic backlog refresh after BACKLOG_REFRESH_SECONDS of quiet: out of reach here.
    monkeypatch.setattr(site_stream_service, "BACKLOG_REFRESH_SECONDS", 3600.0)
    mine, other = make_site(alice), make_site(alice)
    other_app = make_app(alice, other.id)
    client = SiteClient(alice, mine.id, capabilities=("batch_jobs",))
    try:
        client.welcome()
        # The first backlog follows the first work scan; then the stream sleeps.
        client.next("backlog")
        sub = _subscription(harness, alice.user_id, mine.id)
        _caught_up(harness)
        before = (sub.delivered, spy.count("find_work", alice.user_id, mine.id),
                  spy.count("site_backlog", alice.user_id, mine.id))
        # Busy elsewhere: jobs, state changes and a pilot at the other site.
        for _ in range(5):
            make_jobs(alice, other_app, 3)
        make_batch_job(alice, other.id)
        _caught_up(harness)
        assert (sub.delivered, spy.count("find_work", alice.user_id, mine.id),
                spy.count("site_backlog", alice.user_id, mine.id)) == before
        assert spy.count("site_events_after", alice.user_id, mine.id) == 0  # no event-log query at all
        assert not sub.pending
        # Its own pilot: delivered, and the work is found and pushed.
        bj = make_batch_job(alice, mine.id)
        item = client.next("work")
        assert item.submit_batch_job.batch_job.id == bj.id
        assert sub.delivered > before[0]
        assert spy.count("find_work", alice.user_id, mine.id) > before[1]
        assert spy.count("site_events_after", alice.user_id, mine.id) == 0  # the rows were the hint
    finally:
        client.close()


def test_site_stream_skips_the_work_scan_for_events_that_make_no_work(harness: Harness, alice: Caller,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(monkeypatch)
    spy.watch(site_work, "find_work", _by_site)
    site = make_site(alice)
    app = make_app(alice, site.id)  # no hooks, no transfers: new jobs rest in PREPROCESSED
    client = SiteClient(alice, site.id, capabilities=("batch_jobs", "hooks", "cleanup"))
    try:
        client.welcome()
        client.next("backlog")  # after the first work scan; then the stream sleeps
        scans = spy.count("find_work", alice.user_id, site.id)
        sub = _subscription(harness, alice.user_id, site.id)
        _caught_up(harness)
        delivered = sub.delivered
        make_jobs(alice, app, 4)
        _caught_up(harness)
        # Delivered (the backlog changes) but no work scan: PREPROCESSED makes no site work.
        assert sub.delivered == delivered + 4
        backlog = client.next("backlog")
        while backlog.runnable_jobs < 4:
            backlog = client.next("backlog")
        assert spy.count("find_work", alice.user_id, site.id) == scans
    finally:
        client.close()


def test_credit_alone_makes_no_work_scan(harness: Harness, alice: Caller, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon gives a credit back after every work item it finishes. A kind the last
    scan emptied stays empty until an event or a result says otherwise (a scan that used
    up the credit leaves its kinds to be looked at again): the credit itself is no reason
    to run every kind's query again (five queries per finished item, before)."""
    site = make_site(alice)
    asked = kinds_scanned(monkeypatch, site.id)
    client = SiteClient(alice, site.id, capabilities=("batch_jobs", "hooks", "cleanup"))
    try:
        client.welcome()
        client.next("backlog")  # after the first work scan (of every kind); then the stream sleeps
        assert asked and asked[0] >= {site_work.HOOK, site_work.CLEANUP}
        first = len(asked)
        for _ in range(3):
            client.send(credit=site_service_pb2.SiteCredit(items=1))
            # The barrier's own results (unsolicited) make it look at batch jobs, no more.
            assert client.barrier()[0] == []
        assert all(kinds <= {site_work.SUBMIT, site_work.CANCEL} for kinds in asked[first:]), asked[first:]
        # An event that makes work still brings a scan.
        bj = make_batch_job(alice, site.id)
        assert client.next("work").submit_batch_job.batch_job.id == bj.id
    finally:
        client.close()


def test_session_is_woken_only_by_its_site_and_kills_cost_one_row_check(harness: Harness, alice: Caller,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(monkeypatch)
    spy.watch(leases, "acquire", lambda conn, ref, *a, **k: (ref.id,))
    spy.watch(leases, "runnable_since", lambda conn, owner_id, site_id, *a, **k: (owner_id, site_id))
    spy.watch(leases, "lost_leases", lambda conn, owner_id, session_id, *a, **k: (session_id,))
    spy.watch(leases, "check_leases", lambda conn, session_id, *a, **k: (session_id,))
    w, elsewhere = World(alice), World(alice)
    launcher = Launcher(alice)
    try:
        opened = launcher.open(w.site.id)
        sid = opened.session.id
        launcher.credit(max_jobs=3)
        (job,) = w.create(1)
        (held,) = launcher.leased(1)
        assert held.job.id == job.id
        sub = _subscription(harness, alice.user_id, w.site.id)
        _caught_up(harness)
        # The job's creation may reach the session after the credit's own look leased it
        # (the job was created while that look waited for a database thread): the event
        # then calls for one more acquisition, which finds nothing. Counted after this
        # point, it read as a wake-up by another site.
        launcher.settle()
        before = (sub.delivered, spy.count("acquire", sid), spy.count("check_leases", sid))
        for _ in range(5):
            elsewhere.create(2)
        _caught_up(harness)
        assert (sub.delivered, spy.count("acquire", sid), spy.count("check_leases", sid)) == before
        # Its own site: a new job is leased with no look at the event log.
        (new,) = w.create(1)
        (leased,) = launcher.leased(1)
        assert leased.job.id == new.id
        assert spy.count("runnable_since", alice.user_id, w.site.id) == 0
        # A kill of a held job: one check of that job's row, then KillJobs.
        w.kill(job.id)
        kill = launcher.next("kill")
        assert list(kill.job_ids) == [job.id]
        assert spy.count("check_leases", sid) == 1
        assert spy.count("lost_leases", sid) == 0
    finally:
        launcher.cancel()


def test_watcher_is_woken_only_by_its_owners_events(harness: Harness, alice: Caller, bob: Caller,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(monkeypatch)
    spy.watch(events_service, "read_events", lambda db, q, **k: (q.owner_id,))
    site = make_site(alice)
    app = make_app(alice, site.id)
    bob_app = make_app(bob, make_site(bob).id)
    stub = alice.stub(event_service_pb2_grpc.EventServiceStub)
    responses: queue.Queue[Any] = queue.Queue()
    call = stub.WatchEvents(event_service_pb2.WatchEventsRequest())

    def pump() -> None:
        try:
            for r in call:
                responses.put(r)
        except grpc.RpcError:
            pass
        responses.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        assert responses.get(timeout=WAIT).cursor  # the first answer: where it starts
        sub = _subscription(harness, alice.user_id)
        _caught_up(harness)
        deadline = time.monotonic() + WAIT
        while spy.count("read_events", alice.user_id) < 1:  # its first read, then it waits
            assert time.monotonic() < deadline, "the watcher never read"
            time.sleep(0.01)
        reads = spy.count("read_events", alice.user_id)
        assert reads == 1
        delivered = sub.delivered
        for _ in range(5):
            make_jobs(bob, bob_app, 2)
        _caught_up(harness)
        assert sub.delivered == delivered
        assert spy.count("read_events", alice.user_id) == reads
        (job,) = make_jobs(alice, app, 1)
        while True:
            r = responses.get(timeout=WAIT)
            assert r is not None
            if r.events:
                assert [e.job_id for e in r.events] == [job.id]
                break
    finally:
        call.cancel()


# ---------------------------------------------------------------------------- nothing missed

OWNERS = (9_000_001, 9_000_002)  # event rows only: no user rows are needed
SITES = (1, 2, 3)
STATES = ("PREPROCESSED", "RUNNING", "RUN_DONE", "JOB_FINISHED", "KILLED")


def _write_events(conn: Any, rows: list[dict[str, Any]]) -> None:
    event_store.append(conn, rows)


def _ids(conn: Any, owner_id: int, site_id: int | None, after: int, upto: int | None = None) -> list[int]:
    conds = [events.c.owner_id == owner_id, events.c.id > after]
    if site_id is not None:
        conds.append(events.c.site_id == site_id)
    if upto is not None:
        conds.append(events.c.id <= upto)
    return [r[0] for r in conn.execute(select(events.c.id).where(*conds).order_by(events.c.id))]


def _max_id(conn: Any, owner_id: int, site_id: int | None) -> int:
    conds = [events.c.owner_id == owner_id] + ([events.c.site_id == site_id] if site_id is not None else [])
    return conn.execute(select(func.coalesce(func.max(events.c.id), 0)).where(*conds)).scalar_one()


async def _stress(db: Database, seed: int) -> tuple[Fanout, list[dict[str, Any]], int]:
    bus = EventBus(ordered_commits=not db.is_postgres)
    db.on_events = bus.published
    fanout = Fanout(db, bus)
    rng = random.Random(seed)
    writes_done = asyncio.Event()
    target = 0  # the horizon once every write committed
    commits = 0

    async def writer(n: int) -> None:
        nonlocal commits
        for _ in range(n):
            rows = [{"owner_id": rng.choice(OWNERS), "site_id": rng.choice(SITES), "job_id": rng.randint(1, 50),
                     "kind": event_store.JOB_STATE, "from_state": "RUNNING", "to_state": rng.choice(STATES),
                     "time": datetime.now(UTC)} for _ in range(rng.randint(1, 4))]
            await db.write(_write_events, rows)
            commits += 1
            await asyncio.sleep(rng.random() * 0.004)

    async def subscriber(i: int) -> dict[str, Any]:
        await asyncio.sleep(rng.random() * 0.3)
        owner = rng.choice(OWNERS)
        site = None if i % 5 == 0 else rng.choice(SITES)
        sites = None if site is None else [site]
        style = i % 3
        if style == 0:
            # A site stream: subscribe, then the initial scan.
            sub = fanout.subscribe(owner, sites)
            start = await db.read(_max_id, owner, site)
        elif style == 1:
            # A session: a cursor taken first, a transaction, then subscribe from the cursor.
            start = bus.high_water
            await asyncio.sleep(rng.random() * 0.02)
            sub = fanout.subscribe(owner, sites, since=start)
        else:
            # A late subscriber that starts at an old cursor.
            start = max(0, bus.high_water - rng.randint(0, 30))
            sub = fanout.subscribe(owner, sites, since=start)
        slow = i % 2 == 0
        seen: list[int] = []
        gaps = 0
        last_row = start if style else 0  # a scan's subscriber may get rows its scan saw
        while True:
            finished = writes_done.is_set() and fanout.position >= target
            d = sub.take()
            for r in d.rows:
                assert r.owner_id == owner and (site is None or r.site_id == site), "a foreign event was delivered"
                assert r.id > last_row, "rows out of order or repeated"
                last_row = r.id
                seen.append(r.id)
            if d.gap_after is not None:
                gaps += 1
                seen += await db.read(_ids, owner, site, d.gap_after, d.upto)
            if finished:
                break
            if slow:
                await asyncio.sleep(0.05)  # falls behind: overflows into gaps
            else:
                await sub.wait(0.05)
        sub.close()
        return {"owner": owner, "site": site, "start": start, "seen": set(seen), "gaps": gaps}

    writers = [asyncio.create_task(writer(40)) for _ in range(4)]
    subs = [asyncio.create_task(subscriber(i)) for i in range(12)]
    await asyncio.gather(*writers)
    target = (await db.read(event_store.event_horizon))[0]
    writes_done.set()
    results = await asyncio.gather(*subs)
    # With nobody subscribed, a commit costs the dispatcher no read of its rows.
    reads = fanout.reads
    await db.write(_write_events, [{"owner_id": 9_000_009, "site_id": SITES[0], "job_id": 1,
                                    "kind": event_store.JOB_STATE, "to_state": "RUNNING", "time": datetime.now(UTC)}])
    last = (await db.read(event_store.event_horizon))[0]
    while fanout.position < last:
        await asyncio.sleep(0.01)
    assert fanout.reads == reads, "the dispatcher read rows nobody subscribed to"
    await fanout.stop()
    return fanout, results, commits


def test_nothing_missed_under_concurrent_commits_and_subscriptions(harness: Harness,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fanout_mod, "MAX_PENDING", 8)  # slow subscribers overflow into gaps
    db = Database(harness.url)
    try:
        fanout, results, commits = asyncio.run(_stress(db, seed=7))
        for r in results:
            expected = set(db.read_sync(_ids, r["owner"], r["site"], r["start"]))
            missing = expected - r["seen"]
            assert not missing, f"subscriber {r['owner']}/{r['site']} from {r['start']} missed {sorted(missing)}"
        assert any(r["gaps"] for r in results), "no subscriber overflowed: the gap path was not exercised"
        # One read of the new rows per wake, however many subscribers there are.
        assert 0 < fanout.reads <= commits
    finally:
        db.dispose()


def test_watchers_miss_nothing_while_clients_commit(harness: Harness, alice: Caller,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from balsam_grpc.server.services import events as event_service

    # No heartbeat: a watcher that missed its wake-up would wait for good (and fail below).
    monkeypatch.setattr(event_service, "HEARTBEAT_SECONDS", 3600.0)
    apps = [make_app(alice, make_site(alice).id) for _ in range(2)]
    sites = [a.site_id for a in apps]
    stub = alice.stub(event_service_pb2_grpc.EventServiceStub)
    final: dict[int | None, int] = {}  # set once the writers are done: the last ids to wait for
    final_known = threading.Event()
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []
    n_watchers = 6
    started: list[int] = []  # watchers that have their starting cursor
    all_started = threading.Event()

    def writer(i: int) -> None:
        try:
            rng = random.Random(i)
            # Commit until every watcher has joined (at least 15 times): they join mid-stream.
            for k in range(10_000):
                if k >= 15 and all_started.is_set():
                    break
                make_jobs(alice, apps[rng.randrange(2)], rng.randint(1, 3))
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    def watcher(delay: float, site_id: int | None) -> None:
        time.sleep(delay)
        f = event_service_pb2.EventFilter(site_ids=[site_id] if site_id else [])
        call = stub.WatchEvents(event_service_pb2.WatchEventsRequest(filter=f), timeout=WAIT * 3)
        got: list[int] = []
        start = None
        try:
            for r in call:
                if start is None:
                    start = int(r.cursor)
                    started.append(start)
                    if len(started) == n_watchers:
                        all_started.set()
                got += [e.id for e in r.events]
                if final_known.is_set() and got and got[-1] > final[site_id]:
                    break
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            call.cancel()
        results.append({"start": start, "got": got, "site": site_id})

    watchers = [threading.Thread(target=watcher, args=(0.05 * i, None if i % 3 == 0 else sites[i % 2]))
                for i in range(n_watchers)]
    writers = [threading.Thread(target=writer, args=(i,)) for i in range(3)]
    for t in (*watchers, *writers):
        t.start()
    for t in writers:
        t.join(WAIT * 3)
    assert not errors, errors
    db = harness.db
    final[None] = db.read_sync(_max_id, alice.user_id, None)
    for s in sites:
        final[s] = db.read_sync(_max_id, alice.user_id, s)
    final_known.set()
    # One more event at each site: every watcher has something after `final` to wake for.
    for app in apps:
        make_jobs(alice, app, 1)
    for t in watchers:
        t.join(WAIT * 3)
        assert not t.is_alive(), "a watcher never saw the last event (a missed wake-up)"
    assert not errors, errors
    assert len(results) == len(watchers)
    for r in results:
        expected = db.read_sync(_ids, alice.user_id, r["site"], r["start"], r["got"][-1])
        assert r["got"] == expected, f"watcher of site {r['site']} from {r['start']}: gaps or disorder"


# ---------------------------------------------------------------------------- own notifications
def test_a_replicas_own_notification_is_not_looked_at_twice(harness: Harness) -> None:
    """PostgreSQL: a commit pokes its own replica's fanout at once (Database.write), so the
    notification it sends back to that replica wakes nothing; another replica's does."""
    if harness.backend != "postgres":
        pytest.skip("notifications are PostgreSQL's")
    own, other = Database(harness.url, workers=1), Database(harness.url, workers=1)

    async def hints() -> tuple[bool, bool, int]:
        bus = EventBus(ordered_commits=False)
        fanout = Fanout(own, bus)
        sub = fanout.subscribe(1, [2])
        try:
            rows = [{"owner_id": 1, "site_id": 2}]
            mine = own.write_sync(lambda conn: event_store.wake_hint(rows, conn))
            theirs = other.write_sync(lambda conn: event_store.wake_hint(rows, conn))
            await asyncio.sleep(0)  # the dispatcher waits on the bus
            fanout.hint(event_store.parse_hint(mine), event_store.hint_origin(mine))
            woken_by_mine = bus._poked
            fanout.hint(event_store.parse_hint(theirs), event_store.hint_origin(theirs))
            return woken_by_mine, bus._poked, fanout.own_hints
        finally:
            sub.close()
            await fanout.stop()

    try:
        assert asyncio.run(hints()) == (False, True, 1)
    finally:
        own.dispose()
        other.dispose()


# ---------------------------------------------------------------------------- a create's own wake-up
def _on_loop(harness: Harness, fn: Any) -> Any:
    async def run() -> Any:
        return fn()
    return harness.embedded.loop.run(run())


class _HeldRouting:
    """The fanout's routing of events held back (hold(), on its loop) until release():
    what reaches a session meanwhile came by another way."""

    def __init__(self, fanout: Any) -> None:
        self.fanout = fanout
        self.held: list[list[Any]] = []

    def _keep(self, rows: list[Any], upto: int) -> None:
        self.held.append(rows)
        self.fanout.position = upto

    def hold(self) -> None:
        self.fanout._route = self._keep

    def release(self) -> None:
        if "_route" in vars(self.fanout):
            del self.fanout._route
            for rows in self.held:
                self.fanout._route(rows, self.fanout.position)


def test_a_create_wakes_the_sessions_of_its_replica_before_its_events_are_routed(
        harness: Harness, alice: Caller, monkeypatch: pytest.MonkeyPatch) -> None:
    """The create's commit wakes the session here with the new job's id (Fanout.runnable):
    leased while no event reaches it; when the creation event comes, it calls for no
    second acquisition (the first began after the commit)."""
    spy = Spy(monkeypatch)
    spy.watch(leases, "acquire", lambda conn, ref, *a, **k: (ref.id,))
    w = World(alice)
    launcher = Launcher(alice)
    routing = _HeldRouting(_fanout(harness))
    try:
        sid = launcher.open(w.site.id).session.id
        launcher.credit(max_jobs=3)
        launcher.settle()
        sub = _subscription(harness, alice.user_id, w.site.id)
        _caught_up(harness)
        _on_loop(harness, routing.hold)
        delivered, acquired = sub.delivered, spy.count("acquire", sid)
        (job,) = w.create(1)
        (leased,) = launcher.leased(1)
        assert leased.job.id == job.id
        assert sub.delivered == delivered and spy.count("acquire", sid) == acquired + 1
        _caught_up(harness)
        _on_loop(harness, routing.release)
        launcher.settle()
        assert sub.delivered == delivered + 2  # created, then leased (RUNNING)
        assert spy.count("acquire", sid) == acquired + 1
        # A job that becomes runnable again is looked for again (only creations are skipped).
        ack = launcher.report(launcher.transition(leased, S.JOB_STATE_RESTART_READY))
        assert not ack.rejections
        launcher.credit(max_jobs=2)
        (again,) = launcher.leased(1)
        assert again.job.id == job.id
    finally:
        _on_loop(harness, routing.release)
        launcher.cancel()


def test_a_large_create_wakes_the_sessions_of_its_replica_before_its_events_are_routed(
        harness: Harness, alice: Caller) -> None:
    """As above for a create large enough to be streamed on PostgreSQL (its rows are let
    go chunk by chunk; the runnable ids are kept for the wake-up): the session leases
    from it while no event reaches it."""
    w = World(alice)
    launcher = Launcher(alice)
    routing = _HeldRouting(_fanout(harness))
    try:
        launcher.open(w.site.id)
        launcher.credit(max_jobs=3)
        launcher.settle()
        _caught_up(harness)
        _on_loop(harness, routing.hold)
        created = w.create(100)
        leased = launcher.leased(3)
        assert {a.job.id for a in leased} <= {j.id for j in created}
    finally:
        _on_loop(harness, routing.release)
        launcher.cancel()


@pytest.mark.parametrize("count", [1, 3])
def test_a_create_answers_after_the_sessions_it_woke_began_their_acquisition(
        harness: Harness, alice: Caller, monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """The session woken by a create here begins its acquisition (which stamps the jobs'
    RUNNING time) before the create's answer goes back, not after the rest of the call and
    gRPC's send of the answer. One job (the one-statement or one-transaction create) and
    a few (the general create)."""
    order: list[str] = []
    for name in ("_create_at_once", "_create_one", "_create", "_create_streamed"):
        async def answered(self: Any, *args: Any, _real: Any = getattr(JobServicer, name), **kw: Any) -> Any:
            response = await _real(self, *args, **kw)
            if response is not None:  # None: the general path answers
                order.append("answered")
            return response
        monkeypatch.setattr(JobServicer, name, answered)
    real_acquire = SessionStream._acquire

    async def acquire(self: SessionStream, **kw: Any) -> Any:
        order.append("acquisition")
        return await real_acquire(self, **kw)

    monkeypatch.setattr(SessionStream, "_acquire", acquire)
    w = World(alice)
    launcher = Launcher(alice)
    try:
        launcher.open(w.site.id)
        launcher.credit(max_jobs=count)
        launcher.settle()
        _subscription(harness, alice.user_id, w.site.id)
        order.clear()
        created = w.create(count)
        assert order[:2] == ["acquisition", "answered"]
        assert {a.job.id for a in launcher.leased(count)} == {j.id for j in created}
    finally:
        launcher.cancel()


def test_a_session_on_another_replica_is_woken_by_the_notification(harness: Harness, alice: Caller) -> None:
    """PostgreSQL: the create's own wake-up reaches only its replica's sessions; a session
    on another replica is woken by the commit's notification, as before."""
    if harness.backend != "postgres":
        pytest.skip("replicas share a PostgreSQL database")
    from balsam_grpc.server.embedded import EmbeddedServer
    from balsam_grpc.server.state import ServerSettings

    w = World(alice)
    other = EmbeddedServer(ServerSettings(address="127.0.0.1:0", database_url=harness.url, grace_seconds=0.2))
    channel = grpc.insecure_channel(other.address)
    launcher = Launcher(alice, channel=channel)
    try:
        launcher.open(w.site.id)
        launcher.credit(max_jobs=2)
        launcher.settle()
        assert (alice.user_id, w.site.id) not in _fanout(harness).by_site  # nothing for the fast path here
        there = other.server.state.fanout
        hints = there.hints
        (job,) = w.create(1)
        (leased,) = launcher.leased(1)
        assert leased.job.id == job.id
        assert there.hints > hints
    finally:
        launcher.cancel()
        channel.close()
        other.stop()


def test_what_a_session_remembers_of_the_fast_path_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A session without credit is told of every job created here; when their events are
    not delivered to it (a gap), nothing took the ids out: they piled up."""
    from types import SimpleNamespace

    from balsam_grpc.server.services import session_stream

    monkeypatch.setattr(session_stream, "MAX_LOOKED_AT", 100)
    state = SimpleNamespace(db=None, bus=None, sessions=None)
    stream = session_stream.SessionStream(state, principal=None)  # type: ignore[arg-type]
    for start in range(0, 1000, 10):
        stream._runnable_here(range(start, start + 10))
        assert len(stream.woken_for) <= 100
        stream._looking()  # an acquisition begins: they were seen
        assert len(stream.looked_at) <= 100
    stream._runnable_here(range(5000, 5090))
    stream._runnable_here(range(6000, 6020))
    assert stream.look and stream.look_sure and 6019 in stream.woken_for and len(stream.woken_for) <= 100
