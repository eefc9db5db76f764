"""Byte budgets, on SQLite and PostgreSQL: stored free-form fields have limits (one
table, core/validation.py FIELD_LIMITS, checked before any servicer code), a bulk update
cannot copy event data into thousands of events, and list and watch answers are cut by
bytes as well as by count with nothing lost or repeated across the cut."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import struct_pb2

from balsam_grpc.server.paging import MAX_RESPONSE_BYTES
from balsam_grpc.v1 import (
    event_service_pb2,
    event_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
)
from tests.support.records import error_info, error_reason, make_site_app

Code = grpc.StatusCode


def struct_of(nbytes: int) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update({"blob": "x" * nbytes})
    return s


def count_jobs(stub, app_id: int) -> int:
    return stub.CountJobs(job_service_pb2.CountJobsRequest(filter=job_pb2.JobFilter(app_ids=[app_id]))).total


@pytest.mark.parametrize("build,field,limit", [
    (lambda app: job_service_pb2.CreateJobRequest(job=job_pb2.Job(app_id=app.id, workdir="w", data=struct_of(300_000))),
     "job.data", "262,144"),
    (lambda app: job_service_pb2.BatchCreateJobsRequest(jobs=[
        job_pb2.Job(app_id=app.id, workdir="a"),
        job_pb2.Job(app_id=app.id, workdir="b", tags={f"k{i}": "v" * 1000 for i in range(40)})]),
     "jobs[1].tags", "32,768"),
    (lambda app: job_service_pb2.BatchCreateJobsRequest(jobs=[job_pb2.Job(
        app_id=app.id, workdir="a", resources=job_pb2.JobResources(launch_params={"env": "y" * 5000}))]),
     "jobs[0].resources.launch_params", "4,096"),
    # Large enough for PostgreSQL's streamed create, which checks a chunk at a time while
    # the chunks before are written: the first oversized job is named, nothing stays.
    (lambda app: job_service_pb2.BatchCreateJobsRequest(jobs=[
        job_pb2.Job(app_id=app.id, workdir=f"s/{i}", tags={"big": "v" * 40_000} if i in (2500, 2999) else {},
                    state_message="m" * 5000 if i == 2999 else "") for i in range(3000)]),
     "jobs[2500].tags", "32,768"),
    (lambda app: job_service_pb2.BatchCreateJobsRequest(jobs=[
        job_pb2.Job(app_id=app.id, workdir=f"s/{i}", data=struct_of(300_000) if i == 2999 else None)
        for i in range(3000)]),
     "jobs[2999].data", "262,144"),
    (lambda app: job_service_pb2.CreateJobRequest(job=job_pb2.Job(app_id=app.id, workdir="w",
                                                                  state_message="m" * 5000)),
     "job.state_message", "4,096"),
])
@pytest.mark.edge("a stored free-form field over its limit",
                   "INVALID_ARGUMENT naming the field and the limit; nothing created")
def test_stored_field_limits_name_the_field_and_limit(alice, build, field, limit) -> None:
    _, app = make_site_app(alice, command_template="echo hi", parameters=[])
    stub = alice.stub(job_service_pb2_grpc.JobServiceStub)
    request = build(app)
    method = stub.CreateJob if isinstance(request, job_service_pb2.CreateJobRequest) else stub.BatchCreateJobs
    with pytest.raises(grpc.RpcError) as caught:
        method(request)
    err = caught.value
    assert err.code() == Code.INVALID_ARGUMENT, err
    assert field in err.details() and f"the limit is {limit} bytes" in err.details(), err.details()
    detail = error_info(err)
    assert detail.reason == "TOO_LARGE" and detail.metadata["field"] == field
    assert count_jobs(stub, app.id) == 0


@pytest.mark.edge("2 MiB event_data; 4 KB copied into 2,200 events",
                   "INVALID_ARGUMENT (field limit; 16 MiB per-call copy budget); nothing written")
def test_event_data_limit_and_bulk_copy_budget(alice) -> None:
    _, app = make_site_app(alice, command_template="echo hi", parameters=[])
    stub = alice.stub(job_service_pb2_grpc.JobServiceStub)
    events = alice.stub(event_service_pb2_grpc.EventServiceStub)
    stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(
        jobs=[job_pb2.Job(app_id=app.id, workdir=f"b/{i}", tags={"bulk": "yes"}) for i in range(2_200)]))
    kill = {"filter": job_pb2.JobFilter(app_ids=[app.id]), "patch": job_pb2.Job(state=job_pb2.JOB_STATE_KILLED),
            "update_mask": {"paths": ["state"]}}
    # One event_data over its own limit (the 2 MiB of the original report).
    with pytest.raises(grpc.RpcError) as caught:
        stub.BatchUpdateJobs(job_service_pb2.BatchUpdateJobsRequest(event_data=struct_of(2 * 1024 * 1024), **kill))
    assert caught.value.code() == Code.INVALID_ARGUMENT
    assert "event_data" in caught.value.details() and "4,096 bytes" in caught.value.details()
    # Within the field limit, but copied into 2,200 events: over what one call may write.
    kill["patch"].state_message = "s" * 4000
    kill["update_mask"]["paths"].append("state_message")
    with pytest.raises(grpc.RpcError) as caught:
        stub.BatchUpdateJobs(job_service_pb2.BatchUpdateJobsRequest(event_data=struct_of(4000), **kill))
    assert caught.value.code() == Code.INVALID_ARGUMENT
    assert "2,200 jobs" in caught.value.details() and "16,777,216" in caught.value.details()
    assert error_reason(caught.value) == "TOO_LARGE"
    killed = event_service_pb2.EventFilter(to_states=[job_pb2.JOB_STATE_KILLED])
    assert not events.ListEvents(event_service_pb2.ListEventsRequest(filter=killed)).events  # nothing written
    counts = stub.CountJobs(job_service_pb2.CountJobsRequest(
        filter=job_pb2.JobFilter(app_ids=[app.id], states=[job_pb2.JOB_STATE_KILLED]))).total
    assert counts == 0


@pytest.mark.edge("6 MiB of jobs listed, 5 MiB of events listed and watched",
                   "every answer under the receive limit; each item once, in order")
def test_list_and_watch_pages_are_cut_by_bytes(alice) -> None:
    """30 jobs of 200 KiB data (6 MiB) listed 100 per page, and 1,200 events of 4 KiB
    (5 MiB) listed and replayed: every answer under the byte budget, every item exactly
    once, in order, the cut continuing right after the last item sent."""
    _, app = make_site_app(alice, command_template="echo hi", parameters=[])
    stub = alice.stub(job_service_pb2_grpc.JobServiceStub)
    big = stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(
        jobs=[job_pb2.Job(app_id=app.id, workdir=f"big/{i}", data=struct_of(200 * 1024)) for i in range(30)]))
    want = [j.id for j in big.jobs]
    seen, token, pages = [], "", 0
    while True:
        page = stub.ListJobs(job_service_pb2.ListJobsRequest(filter=job_pb2.JobFilter(app_ids=[app.id]),
                                                             page_size=100, page_token=token))
        assert page.ByteSize() <= MAX_RESPONSE_BYTES
        seen += [j.id for j in page.jobs]
        assert all(len(j.data.fields["blob"].string_value) == 200 * 1024 for j in page.jobs)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == want and pages >= 2

    small = stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(
        jobs=[job_pb2.Job(app_id=app.id, workdir=f"e/{i}", tags={"ev": "1"}) for i in range(1_200)]))
    stub.BatchUpdateJobs(job_service_pb2.BatchUpdateJobsRequest(
        filter=job_pb2.JobFilter(app_ids=[app.id], tags={"ev": "1"}), event_data=struct_of(4000),
        patch=job_pb2.Job(state=job_pb2.JOB_STATE_KILLED), update_mask={"paths": ["state"]}))
    job_ids = [j.id for j in small.jobs]
    events = alice.stub(event_service_pb2_grpc.EventServiceStub)
    flt = event_service_pb2.EventFilter(job_ids=job_ids, to_states=[job_pb2.JOB_STATE_KILLED])
    listed, token, pages = [], "", 0
    while True:
        page = events.ListEvents(event_service_pb2.ListEventsRequest(filter=flt, page_size=10_000, page_token=token))
        assert page.ByteSize() <= MAX_RESPONSE_BYTES
        listed += [e.id for e in page.events]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert len(listed) == 1_200 and listed == sorted(set(listed)) and pages >= 2

    watch = events.WatchEvents(event_service_pb2.WatchEventsRequest(filter=flt, replay_from_start=True), timeout=120)
    replayed: list[int] = []
    try:
        for response in watch:
            assert response.ByteSize() <= MAX_RESPONSE_BYTES
            replayed += [e.id for e in response.events]
            if len(replayed) >= 1_200:
                break
    finally:
        watch.cancel()
    assert replayed == listed
