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
from balsam_grpc.server.store import sessions as store
from balsam_grpc.server.store.db import Database
from tests.support.records import make_site

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
