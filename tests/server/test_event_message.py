"""An event row as its message (services/events.event_to_message): its times set in place
(convert.set_timestamp) equal what Timestamp.FromDatetime gives, for the forms
store.list_events hands back (integer microseconds since the epoch from PostgreSQL,
SQLite's stored text) and datetimes, before and after the epoch; and the rows of both
databases give the same messages."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf import timestamp_pb2

from balsam_grpc.server.services.events import event_to_message
from balsam_grpc.server.store import events as event_store
from balsam_grpc.v1 import job_pb2


def _reference(dt: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt if dt.tzinfo else dt.replace(tzinfo=UTC))
    return ts


@pytest.mark.parametrize("when", [
    datetime(2026, 12, 7, 17, 0, 0, 123456, tzinfo=UTC),
    datetime(2026, 12, 7, 17, 0, 0, 999999),  # naive: SQLite's
    datetime(1965, 3, 4, 5, 6, 7, 891011, tzinfo=UTC),
    datetime(1970, 1, 1, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
])
@pytest.mark.parametrize("received_apart", [None, timedelta(0), timedelta(microseconds=7)])
def test_event_times_as_from_datetime(when: datetime, received_apart: timedelta | None) -> None:
    received = None if received_apart is None else when - received_apart
    for form in (lambda dt: dt, _micros, _sqlite_text):
        values = {"id": 5, "owner_id": 3, "job_id": 7, "site_id": 1, "message": "m", "time": form(when),
                  "receive_time": None if received is None else form(received), "kind": event_store.JOB_STATE,
                  "from_state": "RUNNING", "to_state": "RUN_DONE", "subject_id": None, "data": {"k": 1}}
        row = tuple(values[name] for name in sorted(event_store.EVENT_COLUMN, key=event_store.EVENT_COLUMN.get))
        msg = event_to_message(row)
        assert msg.time == _reference(when)
        assert msg.receive_time == _reference(when if received is None else received)
        assert (msg.job_state.from_state, msg.job_state.to_state) == (job_pb2.JOB_STATE_RUNNING,
                                                                        job_pb2.JOB_STATE_RUN_DONE)
        assert dict(msg.data) == {"k": 1}


def _micros(dt: datetime) -> int:
    delta = (dt if dt.tzinfo else dt.replace(tzinfo=UTC)) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _sqlite_text(dt: datetime) -> str:
    return dt.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ") if dt.tzinfo else dt.isoformat(sep=" ")


def test_events_read_back_from_the_database(harness: Any) -> None:
    """Written through store.events.append, read back through list_events (raw times, data
    decoded, NULL data) into messages equal to what was written, on either database."""
    owner = 9_100_001  # event rows only: no user rows are needed
    times = [datetime(2026, 12, 7, 17, 0, 0, 123456, tzinfo=UTC), datetime(1965, 3, 4, 5, 6, 7, 891011, tzinfo=UTC)]
    written = [{"owner_id": owner, "site_id": 4, "job_id": 70 + i, "kind": event_store.JOB_STATE,
                "from_state": "RUNNING", "to_state": "RUN_DONE", "time": when, "message": f"m{i}",
                "data": {"rc": i} if i else None}
               for i, when in enumerate(times)]
    harness.db.write_sync(event_store.append, written)
    q = event_store.EventQuery(owner_id=owner)
    rows = harness.db.read_sync(lambda conn: event_store.list_events(conn, q, after_id=0, limit=10))
    got = [event_to_message(r) for r in rows]
    assert [(m.job_id, m.site_id, m.message, m.time, dict(m.data)) for m in got] == \
        [(w["job_id"], 4, w["message"], _reference(w["time"]), w["data"] or {}) for w in written]
    # append() records an event without a receive time as received when it happened.
    assert [m.receive_time for m in got] == [_reference(w["time"]) for w in written]
    assert all(m.job_state.to_state == job_pb2.JOB_STATE_RUN_DONE for m in got)


def test_the_event_loop_statement_reads_what_list_events_reads(harness: Any, alice: Any) -> None:
    """store.list_events_statement (PostgreSQL, on the event loop: the watches' and
    ListEvents' reads) selects the rows list_events selects, for every filter alone and
    together, in both orders, with and without a cursor and an upper bound."""
    if harness.backend != "postgres":
        pytest.skip("list_events_statement is PostgreSQL's")
    from balsam_grpc.server.store.db import Database
    from tests.support.records import make_app, make_jobs, make_site

    app = make_app(alice, make_site(alice).id)
    tagged = make_jobs(alice, app, 3, tags={"beam": "x"})
    plain = make_jobs(alice, app, 3)
    owner = alice.user_id
    base = datetime(2026, 12, 7, 18, 0, tzinfo=UTC)
    harness.db.write_sync(event_store.append, [
        {"owner_id": owner, "site_id": 7 + i % 2, "job_id": (tagged + plain)[i % 6].id, "subject_id": i % 3,
         "kind": (event_store.JOB_STATE, event_store.BATCH_JOB_STATE)[i % 5 == 4],
         "from_state": ("RUNNING", "READY")[i % 2], "to_state": ("RUN_DONE", "JOB_FINISHED", "FAILED")[i % 3],
         "time": base.replace(minute=i), "message": f"m{i}", "data": {"i": i} if i % 2 else None}
        for i in range(40)])
    everything = harness.db.read_sync(lambda conn: event_store.list_events(
        conn, event_store.EventQuery(owner_id=owner), after_id=0, limit=1000))
    ids = [r[0] for r in everything]
    filters: list[dict[str, Any]] = [
        {}, {"job_ids": [tagged[0].id, plain[1].id]}, {"site_ids": [8]}, {"kinds": [event_store.BATCH_JOB_STATE]},
        {"to_states": ["FAILED", "RUN_DONE"]}, {"from_states": ["READY"]}, {"batch_job_ids": [1, 2]},
        {"time_start": base.replace(minute=10), "time_end": base.replace(minute=30)}, {"tags": {"beam": "x"}},
        {"job_ids": [j.id for j in tagged], "to_states": ["JOB_FINISHED"], "site_ids": [7, 8], "tags": {"beam": "x"}},
    ]
    db = Database(harness.url, workers=1)
    try:
        for f in filters:
            q = event_store.EventQuery(owner_id=owner, **f)
            for descending, after_id, upto in ((False, 0, None), (False, ids[5], ids[30]), (True, None, None),
                                               (True, ids[20], None)):
                kw = {"after_id": after_id, "limit": 7, "descending": descending, "upto": upto}
                want = harness.db.read_sync(lambda conn, q=q, kw=kw: event_store.list_events(conn, q, **kw))
                got = asyncio.run(db.statement_now(*event_store.list_events_statement(q, **kw)))
                assert [tuple(r) for r in got] == [tuple(r) for r in want], (f, kw)
                assert want or f, "the plain query reads events"
    finally:
        db.dispose()
