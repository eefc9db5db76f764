"""A launcher's transition in store terms (session_stream.transition_from_pb): the same
Transition for every shape of message, its reported time included, as protobuf's own
conversion (convert.from_timestamp) gives it: the launcher's times are converted without
it (it cost 2 us a transition, half of the conversion)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from google.protobuf import struct_pb2, timestamp_pb2

from balsam_grpc.core.errors import InvalidArgument
from balsam_grpc.server.convert import from_timestamp
from balsam_grpc.server.services.session_stream import transition_from_pb
from balsam_grpc.server.store import leases
from balsam_grpc.v1 import job_pb2, session_service_pb2


def _reference_time(ts: timestamp_pb2.Timestamp) -> datetime | None:
    try:
        return from_timestamp(ts, field="time")
    except (InvalidArgument, ValueError, OverflowError):
        return None


@pytest.mark.parametrize(("seconds", "nanos"), [
    (0, 0), (0, 1), (0, -1), (5, -1), (5, 10**9), (1, 1999), (1, 999), (-1, 999_999_999), (1_765_000_000, 123_456_789),
    (-62135596800, 0), (-62135596801, 999_999_999), (253402300799, 999_999_999), (253402300800, 0),
    (-(2**63), 0), (2**63 - 1, 0)])
def test_a_reported_time_is_protobufs_own_conversion(seconds: int, nanos: int) -> None:
    msg = session_service_pb2.JobTransition(seq=1, job_id=2, lease_generation=3, state=job_pb2.JOB_STATE_RUN_DONE)
    msg.time.seconds, msg.time.nanos = seconds, nanos
    got = transition_from_pb(msg).time
    assert got == _reference_time(msg.time)
    assert got is None or got.tzinfo is not None


def test_every_field_is_carried_over() -> None:
    data = struct_pb2.Struct()
    data.update({"k": "v", "n": 1.5})
    msg = session_service_pb2.JobTransition(
        seq=7, job_id=8, lease_generation=9, state=job_pb2.JOB_STATE_RUN_ERROR, return_code=-3, error_tail="tail",
        data=data, message="msg", time=timestamp_pb2.Timestamp(seconds=1_765_000_000, nanos=5_000))
    assert transition_from_pb(msg) == leases.Transition(
        7, 8, 9, "RUN_ERROR", -3, "tail", {"k": "v", "n": 1.5}, "msg",
        datetime(2025, 12, 6, 5, 46, 40, 5, tzinfo=UTC))
    bare = transition_from_pb(session_service_pb2.JobTransition(seq=1, job_id=2, lease_generation=0, state=999))
    assert bare == leases.Transition(1, 2, 0, "", None, "", {}, "", None)
    zero = transition_from_pb(session_service_pb2.JobTransition(seq=1, job_id=2, state=job_pb2.JOB_STATE_RUN_DONE,
                                                                return_code=0))
    assert zero.return_code == 0 and zero.state == "RUN_DONE"
