"""JobService and EventService through the generated stubs, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import uuid

import grpc
import pytest
from grpc_status import rpc_status

from balsam_grpc.v1 import (
    app_pb2,
    app_service_pb2,
    app_service_pb2_grpc,
    event_service_pb2,
    event_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    site_pb2,
    site_service_pb2,
    site_service_pb2_grpc,
)

S = job_pb2


def make_site_app(caller, **app_fields):
    site = caller.stub(site_service_pb2_grpc.SiteServiceStub).CreateSite(
        site_service_pb2.CreateSiteRequest(site=site_pb2.Site(name=f"site-{uuid.uuid4().hex[:6]}"))).site
    fields = {"name": "hello", "command_template": "echo {{ x }}",
              "parameters": [app_pb2.AppParameter(name="x", required=True, type=app_pb2.PARAMETER_TYPE_INT)]}
    fields.update(app_fields)
    app = caller.stub(app_service_pb2_grpc.AppServiceStub).CreateApp(
        app_service_pb2.CreateAppRequest(app=app_pb2.App(site_id=site.id, **fields))).app
    return site, app


def jobs_stub(caller):
    return caller.stub(job_service_pb2_grpc.JobServiceStub)


def move(stub, job_id, state):
    return stub.UpdateJob(job_service_pb2.UpdateJobRequest(
        job=job_pb2.Job(id=job_id, state=state), update_mask={"paths": ["state"]})).job


def error_reason(err: grpc.RpcError) -> str:
    from google.rpc import error_details_pb2

    status = rpc_status.from_call(err)
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    return info.reason


def test_ten_thousand_jobs_paged_counted_and_released(alice):
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    jobs = [job_pb2.Job(app_id=app.id, workdir=f"run/{i}", parameters={"x": str(i)},
                        tags={"experiment": "xpcs", "q": str(i % 4)}) for i in range(10_000)]
    created = stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=jobs)).jobs
    assert len(created) == 10_000
    assert {j.state for j in created} == {S.JOB_STATE_PREPROCESSED}  # no transfers, no hooks: skipped at once

    seen, token, pages = [], "", 0
    while True:
        page = stub.ListJobs(job_service_pb2.ListJobsRequest(
            filter=job_pb2.JobFilter(tags={"q": "1"}, site_ids=[site.id]), page_size=700, page_token=token))
        seen += [j.id for j in page.jobs]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 2_500 and len(set(seen)) == 2_500 and seen == sorted(seen) and pages == 4
    assert all(j.tags["q"] == "1" for j in page.jobs)

    counts = stub.CountJobs(job_service_pb2.CountJobsRequest(
        filter=job_pb2.JobFilter(site_ids=[site.id]), group_by=[job_service_pb2.JOB_GROUP_BY_STATE]))
    assert counts.total == 10_000
    assert [(g.state, g.count) for g in counts.groups] == [(S.JOB_STATE_PREPROCESSED, 10_000)]

    # an illegal transition is refused and changes nothing
    with pytest.raises(grpc.RpcError) as err:
        move(stub, created[0].id, S.JOB_STATE_JOB_FINISHED)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "PREPROCESSED to JOB_FINISHED" in err.value.details()
    assert error_reason(err.value) == "ILLEGAL_TRANSITION"
    after = stub.GetJob(job_service_pb2.GetJobRequest(id=created[0].id)).job
    assert after.state == S.JOB_STATE_PREPROCESSED and after.update_time == after.create_time

    # a child waits for both parents and is released when they finish
    p1, p2 = created[1].id, created[2].id
    child = stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
        app_id=app.id, workdir="child", parameters={"x": "1"}, parent_ids=[p1, p2]))).job
    assert child.state == S.JOB_STATE_AWAITING_PARENTS
    for parent in (p1, p2):
        move(stub, parent, S.JOB_STATE_RUNNING)
        done = move(stub, parent, S.JOB_STATE_RUN_DONE)
        assert done.state == S.JOB_STATE_JOB_FINISHED  # postprocess/stage-out skipped in the same transaction
        state = stub.GetJob(job_service_pb2.GetJobRequest(id=child.id)).job.state
        assert state == (S.JOB_STATE_PREPROCESSED if parent == p2 else S.JOB_STATE_AWAITING_PARENTS)

    history = alice.stub(event_service_pb2_grpc.EventServiceStub).ListEvents(
        event_service_pb2.ListEventsRequest(filter=event_service_pb2.EventFilter(job_ids=[child.id]))).events
    assert [(e.job_state.from_state, e.job_state.to_state) for e in history] == [
        (S.JOB_STATE_CREATED, S.JOB_STATE_AWAITING_PARENTS),
        (S.JOB_STATE_AWAITING_PARENTS, S.JOB_STATE_PREPROCESSED)]
    assert list(history[1].data["via"]) == ["READY", "STAGED_IN"]


def test_failed_parent_fails_children_unless_ignored(alice):
    _, app = make_site_app(alice)
    stub = jobs_stub(alice)
    parent = stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
        app_id=app.id, workdir="p", parameters={"x": "1"}))).job
    strict, lenient = (stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
        app_id=app.id, workdir=w, parameters={"x": "1"}, parent_ids=[parent.id], on_parent_failure=policy))).job
        for w, policy in (("c1", S.PARENT_FAILURE_POLICY_FAIL), ("c2", S.PARENT_FAILURE_POLICY_IGNORE)))
    move(stub, parent.id, S.JOB_STATE_KILLED)
    get = lambda j: stub.GetJob(job_service_pb2.GetJobRequest(id=j.id)).job.state  # noqa: E731
    assert get(strict) == S.JOB_STATE_FAILED
    assert get(lenient) == S.JOB_STATE_PREPROCESSED


@pytest.mark.parametrize("job, field, code", [
    (dict(app_id=999_999), "app 999999 not found", grpc.StatusCode.NOT_FOUND),
    (dict(parent_ids=[999_999]), "parent_ids", grpc.StatusCode.NOT_FOUND),
    (dict(resources=job_pb2.JobResources(num_nodes=-1)), "num_nodes", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(resources=job_pb2.JobResources(num_nodes=4, node_packing_count=2)), "node_packing_count",
     grpc.StatusCode.INVALID_ARGUMENT),
    (dict(tags={f"k{i}": "v" for i in range(65)}), "tags", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(parameters={"x": "1" * 5000}), "parameters", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(parameters={}), "needs parameter 'x'", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(parameters={"x": "one"}), "not a valid int", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(workdir="../escape"), "escapes", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(workdir="/abs"), "not absolute", grpc.StatusCode.INVALID_ARGUMENT),
])
def test_bad_jobs_are_refused_and_write_nothing(alice, job, field, code):
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    fields = dict(app_id=app.id, workdir="ok", parameters={"x": "1"})
    fields.update(job)
    good = job_pb2.Job(app_id=app.id, workdir="good", parameters={"x": "2"})
    with pytest.raises(grpc.RpcError) as err:
        stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[good, job_pb2.Job(**fields)]))
    assert err.value.code() == code
    assert field in err.value.details()
    assert stub.CountJobs(job_service_pb2.CountJobsRequest(filter=job_pb2.JobFilter(site_ids=[site.id]))).total == 0


def test_duplicate_workdir_in_one_call_and_across_calls(alice):
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    job = job_pb2.Job(app_id=app.id, workdir="same", parameters={"x": "1"})
    with pytest.raises(grpc.RpcError) as err:
        stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[job, job]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "repeats jobs[0]" in err.value.details()
    stub.CreateJob(job_service_pb2.CreateJobRequest(job=job))
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateJob(job_service_pb2.CreateJobRequest(job=job))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert stub.CountJobs(job_service_pb2.CountJobsRequest(filter=job_pb2.JobFilter(site_ids=[site.id]))).total == 1


def test_too_many_jobs_in_one_call(alice, harness):
    _, app = make_site_app(alice)
    n = harness.server.settings.max_jobs_per_call + 1
    jobs = [job_pb2.Job(app_id=app.id, workdir=f"w{i}", parameters={"x": "1"}) for i in range(n)]
    with pytest.raises(grpc.RpcError) as err:
        jobs_stub(alice).BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=jobs))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most" in err.value.details()


def test_page_token_from_another_query_is_refused(alice):
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[
        job_pb2.Job(app_id=app.id, workdir=f"w{i}", parameters={"x": "1"}, tags={"a": "1"}) for i in range(5)]))
    page = stub.ListJobs(job_service_pb2.ListJobsRequest(filter=job_pb2.JobFilter(site_ids=[site.id]), page_size=2))
    assert page.next_page_token
    for request in (
        job_service_pb2.ListJobsRequest(filter=job_pb2.JobFilter(tags={"a": "1"}), page_size=2,
                                        page_token=page.next_page_token),
        job_service_pb2.ListJobsRequest(filter=job_pb2.JobFilter(site_ids=[site.id]), page_token="garbage!"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            stub.ListJobs(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_reason(err.value) == "INVALID_PAGE_TOKEN"


def test_bulk_update_and_delete_report_every_item(alice):
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    created = stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[
        job_pb2.Job(app_id=app.id, workdir=f"w{i}", parameters={"x": "1"}, tags={"g": "a"}) for i in range(6)])).jobs
    move(stub, created[0].id, S.JOB_STATE_RUNNING)
    killed = created[5].id
    move(stub, killed, S.JOB_STATE_KILLED)
    result = stub.BatchUpdateJobs(job_service_pb2.BatchUpdateJobsRequest(
        filter=job_pb2.JobFilter(tags={"g": "a"}, site_ids=[site.id]),
        patch=job_pb2.Job(state=S.JOB_STATE_RUNNING, tags={"phase": "2"}), update_mask={"paths": ["state", "tags"]}))
    assert result.updated_count == 5 and result.failed_count == 1  # a killed job cannot start again
    refused = [o for o in result.outcomes if o.code != 0]
    assert [o.id for o in refused] == [killed] and refused[0].reason == "ILLEGAL_TRANSITION"
    listed = stub.ListJobs(job_service_pb2.ListJobsRequest(filter=job_pb2.JobFilter(tags={"phase": "2"}))).jobs
    assert len(listed) == 5 and all(j.tags["g"] == "a" for j in listed)  # tags merged, not replaced

    move(stub, created[1].id, S.JOB_STATE_KILLED)
    dry = stub.BatchDeleteJobs(job_service_pb2.BatchDeleteJobsRequest(
        filter=job_pb2.JobFilter(site_ids=[site.id], exclude_states=[S.JOB_STATE_KILLED]), validate_only=True))
    assert dry.deleted_count == 0 and dry.failed_count == 4 and all(o.code == 9 for o in dry.outcomes)
    deleted = stub.BatchDeleteJobs(job_service_pb2.BatchDeleteJobsRequest(
        filter=job_pb2.JobFilter(site_ids=[site.id])))
    assert deleted.deleted_count == 2 and deleted.failed_count == 4
    assert all("kill it first" in o.message for o in deleted.outcomes if o.code)
    with pytest.raises(grpc.RpcError) as err:
        stub.BatchDeleteJobs(job_service_pb2.BatchDeleteJobsRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_request_id_replays_the_first_answer(alice):
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    request = job_service_pb2.CreateJobRequest(
        job=job_pb2.Job(app_id=app.id, workdir="once", parameters={"x": "1"}), request_id="req-1")
    first, second = stub.CreateJob(request).job, stub.CreateJob(request).job
    assert first == second
    assert stub.CountJobs(job_service_pb2.CountJobsRequest(filter=job_pb2.JobFilter(site_ids=[site.id]))).total == 1
    other = job_service_pb2.CreateJobRequest(
        job=job_pb2.Job(app_id=app.id, workdir="twice", parameters={"x": "1"}), request_id="req-1")
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateJob(other)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(err.value) == "REQUEST_ID_REUSED"


def test_jobs_are_invisible_to_other_users(alice, bob):
    site, app = make_site_app(alice)
    job = jobs_stub(alice).CreateJob(job_service_pb2.CreateJobRequest(
        job=job_pb2.Job(app_id=app.id, workdir="mine", parameters={"x": "1"}))).job
    other = jobs_stub(bob)
    for call in (lambda: other.GetJob(job_service_pb2.GetJobRequest(id=job.id)),
                 lambda: move(other, job.id, S.JOB_STATE_KILLED),
                 lambda: other.DeleteJob(job_service_pb2.DeleteJobRequest(id=job.id)),
                 lambda: other.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
                     app_id=app.id, workdir="theirs", parameters={"x": "1"})))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert other.ListJobs(job_service_pb2.ListJobsRequest(filter=job_pb2.JobFilter(ids=[job.id]))).jobs == []
    assert other.CountJobs(job_service_pb2.CountJobsRequest()).total == 0
    bulk = other.BatchUpdateJobs(job_service_pb2.BatchUpdateJobsRequest(
        filter=job_pb2.JobFilter(ids=[job.id]), patch=job_pb2.Job(state=S.JOB_STATE_KILLED),
        update_mask={"paths": ["state"]}))
    assert bulk.updated_count == 0 and not bulk.outcomes
    assert jobs_stub(alice).GetJob(job_service_pb2.GetJobRequest(id=job.id)).job.state == S.JOB_STATE_PREPROCESSED
    events = bob.stub(event_service_pb2_grpc.EventServiceStub).ListEvents(event_service_pb2.ListEventsRequest(
        filter=event_service_pb2.EventFilter(job_ids=[job.id]))).events
    assert list(events) == []


def test_watch_events_streams_changes_and_resumes_from_cursor(alice):
    _, app = make_site_app(alice)
    stub = jobs_stub(alice)
    events_stub = alice.stub(event_service_pb2_grpc.EventServiceStub)
    job = stub.CreateJob(job_service_pb2.CreateJobRequest(
        job=job_pb2.Job(app_id=app.id, workdir="watched", parameters={"x": "1"}))).job
    watch_filter = event_service_pb2.EventFilter(job_ids=[job.id])
    stream = events_stub.WatchEvents(event_service_pb2.WatchEventsRequest(filter=watch_filter), timeout=30)
    first = next(stream)  # the initial response carries the starting cursor
    received: list = []
    done = threading.Event()

    def consume():
        for response in stream:
            received.extend(response.events)
            if len(received) >= 2:
                done.set()
                return

    threading.Thread(target=consume, daemon=True).start()
    move(stub, job.id, S.JOB_STATE_RUNNING)
    move(stub, job.id, S.JOB_STATE_RUN_ERROR)
    assert done.wait(10), f"watch delivered {len(received)} events"
    stream.cancel()
    assert [e.job_state.to_state for e in received] == [S.JOB_STATE_RUNNING, S.JOB_STATE_FAILED]
    # resuming from the first cursor replays exactly the same events, then waits
    replay = events_stub.WatchEvents(event_service_pb2.WatchEventsRequest(filter=watch_filter, cursor=first.cursor),
                                     timeout=30)
    got = []
    for response in replay:
        got.extend(response.events)
        if len(got) >= 2:
            break
    replay.cancel()
    assert [e.id for e in got] == [e.id for e in received]
