"""core.structs: what a Struct holds, read as the JSON it was made from (whole numbers as
ints: a Struct keeps every number as a double)."""

from __future__ import annotations

import math
from pathlib import Path

from google.protobuf import struct_pb2

from balsam_grpc.core.appdef import JobHandle
from balsam_grpc.core.structs import struct_to_dict, whole_numbers
from balsam_grpc.v1 import job_pb2


def test_whole_numbers_are_ints_and_the_rest_is_kept() -> None:
    s = struct_pb2.Struct()
    s.update({"n": 5, "f": 1.5, "l": [1, 2.0, "3"], "d": {"rc": 3}, "t": True, "z": None})
    got = struct_to_dict(s)
    assert got == {"n": 5, "f": 1.5, "l": [1, 2, "3"], "d": {"rc": 3}, "t": True, "z": None}
    assert type(got["n"]) is int and type(got["d"]["rc"]) is int and type(got["f"]) is float
    assert got["t"] is True  # a bool is not a number here
    # Beyond 2**53 a double no longer names one integer: kept as it came.
    assert type(whole_numbers(2.0**60)) is float and whole_numbers(-(2.0**53)) == -(2**53)
    assert math.isnan(whole_numbers(math.nan)) and whole_numbers(math.inf) == math.inf


def test_an_apps_hooks_see_whole_numbers_as_ints_and_no_change_unless_made() -> None:
    job = job_pb2.Job(id=7, state=job_pb2.JOB_STATE_RUN_DONE)
    job.data.update({"n": 5, "f": 0.25})
    handle = JobHandle(job, Path("/tmp/w"))
    assert handle.data == {"n": 5, "f": 0.25} and type(handle.data["n"]) is int
    assert list(range(handle.data["n"])) == [0, 1, 2, 3, 4]  # failed with 5.0
    assert handle.changes() == (None, {})
