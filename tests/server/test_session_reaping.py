"""Session expiry owned by the database (server/session_keeper.py, store/sessions.py).

Any replica's reaper expires any ACTIVE session whose expire_time passed, including
sessions it never saw (opened on a replica that died after it started): before, each
server only reaped the sessions whose streams broke on it or that existed at its start,
so a dead replica's sessions stayed ACTIVE, their jobs RUNNING, until it came back.
Two reapers (two replicas) expire each session once.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from balsam_grpc.server.convert import utcnow
from balsam_grpc.server.session_keeper import SessionKeeper
from balsam_grpc.server.store import migrate
from balsam_grpc.server.store import sessions as store
from balsam_grpc.server.store.db import Database
from tests.support.records import make_site
from tests.support.waiting import wait_until

LEASE = 1.0


async def _reaped(harness, alice, replicas: int, sessions: int) -> list[str]:
    site = make_site(alice)
    dbs = [Database(harness.url, workers=2) for _ in range(replicas)]
    keepers = [SessionKeeper(db, LEASE) for db in dbs]
    try:
        for keeper in keepers:
            await keeper.start()
        # Opened after the reapers started, as by another replica that then died: nothing
        # here holds their streams and nothing tells the reapers about them.
        now = utcnow()
        ids = [dbs[0].write_sync(store.open_session, alice.user_id, site.id, None, "SERIAL", [], "gone", now,
                                 now + timedelta(seconds=LEASE))["id"] for _ in range(sessions)]
        deadline = time.monotonic() + 30  # generous: a loaded machine
        while True:
            rows = [dbs[0].read_sync(store.get_session, alice.user_id, sid) for sid in ids]
            if all(r["state"] == store.EXPIRED for r in rows):
                return ids
            assert time.monotonic() < deadline, f"sessions not reaped: {[r['state'] for r in rows]}"
            await asyncio.sleep(0.05)
    finally:
        for keeper in keepers:
            await keeper.stop()
        for db in dbs:
            db.dispose()


def test_a_replica_reaps_sessions_it_never_saw(harness, alice):
    assert len(asyncio.run(_reaped(harness, alice, replicas=1, sessions=2))) == 2


def test_two_replicas_reap_each_session_once(harness, alice, monkeypatch):
    expired: list[str] = []
    real = store.reap_expired

    def spy(*args, **kw):  # type: ignore[no-untyped-def]
        out = real(*args, **kw)
        expired.extend(session["id"] for session, _ in out)
        return out

    monkeypatch.setattr(store, "reap_expired", spy)
    ids = asyncio.run(_reaped(harness, alice, replicas=2 if harness.backend == "postgres" else 1, sessions=6))
    # The test server's own reaper (one more replica) may take some of them, and sessions
    # other tests left behind: each of these six is expired exactly once, by someone.
    assert sorted(e for e in expired if e in ids) == sorted(ids), "a session was expired twice, or by nobody"


class _Stream:
    def __init__(self, session_id: str) -> None:
        self.session_id = session_id

    def supersede(self) -> None: ...

    def end(self, error: object) -> None: ...


def test_streams_attaching_or_breaking_do_not_wake_the_reaper(tmp_path, monkeypatch):
    """A stream attaching only takes its session out of the reaper's reach (its expiry can
    come no sooner), and one breaking gives its session a lease timeout from now, later
    than the reaper's next pass: neither has anything for the reaper to do. Before, each
    woke it for a full pass (a write transaction and a read): 100 passes when bench_load's
    100 launcher sessions connected, and again when they left."""
    passes: list[list[str]] = []
    real = store.next_expiry

    def spy(conn, exclude):  # type: ignore[no-untyped-def]
        # Only this keeper's passes: the in-process server of other tests in this run
        # (tests/conftest.py's harness) has a reaper of its own that calls this too.
        if conn.engine is db.engine:
            passes.append(list(exclude))
        return real(conn, exclude)

    monkeypatch.setattr(store, "next_expiry", spy)
    db = Database(f"sqlite:///{tmp_path / 'balsam.db'}", workers=2)  # no other test's sessions to wait for
    migrate.upgrade(db.url)

    async def scenario() -> None:
        keeper = SessionKeeper(db, 3600.0)  # the reaper's own timer stays out of the test
        await keeper.start()
        try:
            await asyncio.to_thread(wait_until, lambda: len(passes) == 1, "the reaper's first pass")
            streams = [_Stream(f"s{i}") for i in range(5)]
            for stream in streams:
                keeper.attach(stream)
                await asyncio.sleep(0.05)  # room for a pass, had the attach woken the reaper
            for stream in streams[:2]:
                keeper.detach(stream, closed=False)
            await asyncio.gather(*keeper._pending)  # the sessions' new deadlines are written
            await asyncio.sleep(0.3)  # room for a pass, had the break woken the reaper
        finally:
            await keeper.stop()

    try:
        asyncio.run(scenario())
    finally:
        db.dispose()
    assert passes == [[]], passes
