"""A job row becomes the same Job message however its shared fields are written: from
the base of its state, policy and resources the first time its combination of them is
seen, from that combination's template later, with times as integer microseconds
(PostgreSQL's rows) or as SQLite stores them."""

from __future__ import annotations

import itertools

import pytest

from balsam_grpc.server.services import jobs as service
from balsam_grpc.v1 import job_pb2, job_service_pb2

_START = 1_700_000_000_123_456  # microseconds since the epoch


def _row(i: int, micros: int, as_text: bool) -> tuple:
    def t(offset: int):
        value = micros + offset
        if not as_text:
            return value
        seconds, us = divmod(value, 1_000_000)
        from datetime import UTC, datetime

        return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S") + f".{us:06d}"

    values = dict(
        id=i, workdir=f"w/{i}", app_id=3, site_id=2, name="n" if i % 2 else "", tags={"k": str(i)}, parameters={},
        data=None, parent_ids=None, transfers=None, launch_params=None, priority=i % 3, state_message="",
        return_code=None, error_tail="", batch_job_id=None, session_id=None, lease_generation=0,
        lease_expire_time=None, run_count=0, state=("STAGED_IN", "RUNNING", "JOB_FINISHED")[i % 3],
        on_parent_failure="FAIL", create_time=t(0), update_time=t(i), state_time=t(2 * i),
        num_nodes=1 + i % 2, ranks_per_node=1, threads_per_rank=1, threads_per_core=1, gpus_per_rank=0,
        node_packing_count=1, wall_time_min=i % 5)
    return tuple(values[name] for name in service._FULL_NAMES)


def _expected(i: int, micros: int) -> job_pb2.Job:
    def ts(offset: int):
        seconds, us = divmod(micros + offset, 1_000_000)
        return {"seconds": seconds, "nanos": us * 1000}

    return job_pb2.Job(
        id=i, workdir=f"w/{i}", app_id=3, site_id=2, name="n" if i % 2 else "", tags={"k": str(i)},
        priority=i % 3, state=service.STATES.to_number[("STAGED_IN", "RUNNING", "JOB_FINISHED")[i % 3]],
        on_parent_failure=job_pb2.PARENT_FAILURE_POLICY_FAIL, create_time=ts(0), update_time=ts(i),
        state_time=ts(2 * i), resources=job_pb2.JobResources(
            num_nodes=1 + i % 2, ranks_per_node=1, threads_per_rank=1, threads_per_core=1, node_packing_count=1,
            wall_time_min=i % 5))


@pytest.mark.parametrize("as_text", [False, True], ids=["micros", "sqlite_text"])
def test_a_row_makes_the_same_message_the_first_second_and_later_times(as_text):
    micros = _START + (7_000_000 if as_text else 0)  # combinations no other test has seen
    rows = [_row(i, micros, as_text) for i in range(6)]
    for attempt in range(4):
        response = job_service_pb2.ListJobsResponse()
        service.tuples_to_messages(service._FULL_NAMES, rows, job_service_pb2.JOB_VIEW_FULL, response.jobs)
        assert list(response.jobs) == [_expected(i, micros) for i in range(6)], attempt
        one = job_pb2.Job()
        service.fill_job(one, dict(zip(service._FULL_NAMES, rows[1], strict=True)))
        assert one == _expected(1, micros)


def test_templates_and_bases_are_never_changed_by_the_messages_built_from_them():
    rows = [_row(i, _START + 11_000_000, False) for i in range(3)]
    for _ in range(3):
        for row in rows:
            msg = job_pb2.Job()
            service._fill(msg, row, job_service_pb2.JOB_VIEW_FULL)
            msg.resources.num_nodes = 99
            msg.create_time.seconds = 1
    for cached in itertools.chain(service._TEMPLATES.values(), service._BASES.values()):
        assert cached.resources.num_nodes != 99 and cached.create_time.seconds != 1
