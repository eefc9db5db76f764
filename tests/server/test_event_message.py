"""An event row as its message (services/events.event_to_message): its times set in place
(convert.set_timestamp) equal what Timestamp.FromDatetime gives, for the datetimes either
database hands back (aware, or naive UTC from SQLite), before and after the epoch."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

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
    row = {"id": 5, "job_id": 7, "site_id": 1, "message": "m", "time": when, "receive_time": received,
           "kind": event_store.JOB_STATE, "from_state": "RUNNING", "to_state": "RUN_DONE", "subject_id": None,
           "data": {"k": 1}}
    msg = event_to_message(row)
    assert msg.time == _reference(when)
    assert msg.receive_time == _reference(when if received is None else received)
    assert (msg.job_state.from_state, msg.job_state.to_state) == (job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_RUN_DONE)
    assert dict(msg.data) == {"k": 1}
