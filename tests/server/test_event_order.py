"""The event log's order without a global lock (store/events.py).

Watchers resume from the highest id they were given, so no event may become visible
below it later. PostgreSQL writers (on any number of replicas) run concurrently; each
marks itself in flight and readers go only up to `event_horizon`. Shown here:
- a writer in flight holds the horizon below its ids while a later writer commits, and
  releases it when it commits or rolls back (one-statement insert and the COPY path);
- several databases' pools (as several replicas) write concurrently, some transactions
  slow and some rolled back, while a reader delivers ids up to the horizon: it delivers
  every committed event exactly once, in id order (SQLite and PostgreSQL);
- event-writing transactions do not wait for each other (the old advisory lock made a
  second writer wait for the first to commit).
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any

import pytest
from sqlalchemy import select, text

from balsam_grpc.server.convert import utcnow
from balsam_grpc.server.store import events as event_log
from balsam_grpc.server.store.db import Database
from balsam_grpc.server.store.tables import events

OWNER = 9_100_001


def _rows(n: int, owner: int = OWNER) -> list[dict[str, Any]]:
    return [event_log.job_event(owner, 1, None, "A", "B", utcnow(), {"n": i} if i % 2 else None, "m")
            for i in range(n)]


def _ids(conn: Any, after: int, upto: int) -> list[int]:
    return list(conn.execute(select(events.c.id).where(events.c.id > after, events.c.id <= upto)
                             .order_by(events.c.id)).scalars())


@pytest.mark.parametrize("count", [1, 80])  # one INSERT statement, or marker + COPY
@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_horizon_stays_below_a_writer_in_flight(harness, count, outcome):
    if harness.backend != "postgres":
        pytest.skip("SQLite has a single writer: a second one cannot commit while the first is in flight")
    owner = OWNER + random.randrange(10**6)  # rows of earlier cases stay in the database
    engine = harness.db.engine
    slow = engine.connect()
    try:
        tx = slow.begin()
        event_log.append(slow, _rows(count, owner))
        slow_ids = list(slow.execute(select(events.c.id).where(events.c.owner_id == owner)
                                     .order_by(events.c.id)).scalars())
        stored = slow.execute(select(events.c.data, text("data IS NULL")).where(events.c.owner_id == owner)
                              .order_by(events.c.id)).all()
        assert [r[0] for r in stored] == [{"n": i} if i % 2 else None for i in range(count)]
        assert [r[1] for r in stored] == [not i % 2 for i in range(count)]  # None is SQL NULL, not JSON null
        # A later writer is not held up by the one in flight, and its id is higher.
        later = harness.db.write_sync(lambda conn: event_log.append(conn, _rows(1, OWNER + 1))
                                      or conn.info[event_log.MAX_EVENT_ID])
        assert later > max(slow_ids)
        horizon, last = harness.db.read_sync(event_log.event_horizon)
        assert last >= later
        assert horizon < min(slow_ids), "the horizon passed ids of a transaction still in flight"
        # A reader that trusted the highest committed id would skip the in-flight ones for good.
        assert harness.db.read_sync(_ids, min(slow_ids) - 1, later) == [later]
        (tx.commit if outcome == "commit" else tx.rollback)()
        horizon, last = harness.db.read_sync(event_log.event_horizon)
        assert horizon >= later
        visible = harness.db.read_sync(_ids, min(slow_ids) - 1, later)
        assert visible == (slow_ids if outcome == "commit" else []) + [later]
    finally:
        slow.close()


def test_event_writers_do_not_wait_for_each_other(harness):
    if harness.backend != "postgres":
        pytest.skip("SQLite has a single writer")
    first = harness.db.engine.connect()
    try:
        tx = first.begin()
        event_log.append(first, _rows(1))
        done = threading.Event()

        def second() -> None:
            harness.db.write_sync(lambda conn: event_log.append(conn, _rows(1, OWNER + 2)))
            done.set()

        threading.Thread(target=second, daemon=True).start()
        # The second writer commits while the first is still open (generous: a loaded machine).
        assert done.wait(30), "a second event writer waited for the first to commit"
        tx.rollback()
    finally:
        first.close()


class _RollBack(Exception):
    pass


def test_concurrent_writers_on_several_replicas_are_delivered_once_in_order(harness):
    """Three Database objects stand for three replicas (each its own pool and threads).
    SQLite has one process (a second server on it is refused): its writers share one."""
    replicas = [Database(harness.url, workers=4) for _ in range(3 if harness.backend == "postgres" else 1)]
    rng = random.Random(11)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(db: Database, seed: int) -> None:
        r = random.Random(seed)
        try:
            for _ in range(25):
                n = r.choice([1, 1, 2, 3, 70])  # 70: the COPY path
                roll_back = r.random() < 0.15
                pause = r.random() * 0.01

                def tx(conn: Any, n: int = n, pause: float = pause, roll_back: bool = roll_back) -> None:
                    event_log.append(conn, _rows(n, OWNER + 10))
                    time.sleep(pause)  # in flight while others commit
                    if roll_back:
                        raise _RollBack

                try:
                    db.write_sync(tx)
                except _RollBack:
                    pass
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    delivered: list[int] = []

    def reader() -> None:
        db = replicas[0]
        position = db.read_sync(event_log.event_horizon)[0]
        start.append(position)
        try:
            while True:
                finished = stop.is_set()
                horizon, _ = db.read_sync(event_log.event_horizon)
                if horizon > position:
                    delivered.extend(db.read_sync(_ids, position, horizon))
                    position = horizon
                if finished:
                    return
                time.sleep(0.002)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    start: list[int] = []
    read_thread = threading.Thread(target=reader, daemon=True)
    read_thread.start()
    while not start:
        time.sleep(0.01)
    writers = [threading.Thread(target=writer, args=(replicas[i % len(replicas)], rng.random()), daemon=True) for i in range(6)]
    try:
        for t in writers:
            t.start()
        for t in writers:
            t.join(120)
        stop.set()
        read_thread.join(60)
        assert not errors, errors
        committed = harness.db.read_sync(_ids, start[0], 2**62)
        assert len(committed) > 100
        assert delivered == sorted(set(delivered)), "delivered out of order or twice"
        assert delivered == committed, f"missed {sorted(set(committed) - set(delivered))[:10]}"
    finally:
        for db in replicas:
            db.dispose()
