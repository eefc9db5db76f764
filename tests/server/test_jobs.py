"""JobService and EventService through the generated stubs, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_status import rpc_status

from balsam_grpc.v1 import (
    app_pb2,
    event_service_pb2,
    event_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
)

from tests.support import leases
from tests.support.records import error_reason, jobs_stub, make_site_app
from tests.support.together import sent_together

S = job_pb2


def move(stub, job_id, state):
    return stub.UpdateJob(job_service_pb2.UpdateJobRequest(
        job=job_pb2.Job(id=job_id, state=state), update_mask={"paths": ["state"]})).job


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
        leases.run(alice.harness, alice.user_id, parent, "RUN_DONE")
        done = stub.GetJob(job_service_pb2.GetJobRequest(id=parent)).job
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
    (dict(tags={"a": "1", "bad key!": "v"}), "key 'bad key!' is invalid", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(tags={"a": "é" * 2100}), "longer than", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(parameters={"x": "1" * 5000}), "parameters", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(parameters={}), "needs parameter 'x'", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(parameters={"x": "one"}), "not a valid int", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(workdir="../escape"), "escapes", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(workdir="/abs"), "not absolute", grpc.StatusCode.INVALID_ARGUMENT),
    # Control characters in a workdir (every tool that prints paths shows them raw): the
    # plain-column shortcut of a bulk create let every one but NUL through.
    (dict(workdir="runs/a\nb"), "\\u000a (a newline) at character 7", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(workdir="runs/a\tb"), "\\u0009 (a tab)", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(workdir="runs/\x1b[2J"), "\\u001b (ESC)", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(workdir="runs/a\x7f"), "\\u007f (DEL)", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(workdir="runs/a\u009bb"), "\\u009b (a C1 control)", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(workdir="runs/ab\u202ecd.h5"), "\\u202e (a bidirectional control)", grpc.StatusCode.INVALID_ARGUMENT),
    (dict(workdir="runs/a\u2067b"), "jobs[1].workdir", grpc.StatusCode.INVALID_ARGUMENT),
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


def test_create_job_errors_name_the_job_field(alice):
    """CreateJob takes one `job`: its errors name job.<field>, not the batch path jobs[0]."""
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(app_id=app.id, workdir="/abs",
                                                                        parameters={"x": "1"})))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("job.workdir") and "jobs[0]" not in err.value.details()
    info = rpc_status.from_call(err.value)
    assert info is not None and b"job.workdir" in info.details[0].value
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(app_id=app.id, workdir="w",
                                                                        parameters={"nope": "1"})))
    assert "job.parameters" in err.value.details() and "jobs[0]" not in err.value.details()


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


def test_page_token_with_keys_of_the_wrong_type_is_refused(alice):
    """Page tokens are not signed: one whose keys were altered (a dict for the id, a time
    that is no time, an id beyond 64 bits) is the caller's error, not INTERNAL."""
    import base64
    import json

    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[
        job_pb2.Job(app_id=app.id, workdir=f"w{i}", parameters={"x": "1"}) for i in range(3)]))
    for order_by in ("", "-create_time"):
        request = job_service_pb2.ListJobsRequest(filter=job_pb2.JobFilter(site_ids=[site.id]), page_size=1,
                                                  order_by=order_by)
        token = stub.ListJobs(request).next_page_token
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        for wrong in ({"x": 1}, [1], "not a time", 2**70, True, None):
            data["k"][0] = wrong
            request.page_token = base64.urlsafe_b64encode(json.dumps(data).encode()).decode()
            with pytest.raises(grpc.RpcError) as err:
                stub.ListJobs(request)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (order_by, wrong)
            assert error_reason(err.value) == "INVALID_PAGE_TOKEN"


def test_bulk_update_and_delete_report_every_item(alice):
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    created = stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[
        job_pb2.Job(app_id=app.id, workdir=f"w{i}", parameters={"x": "1"}, tags={"g": "a"}) for i in range(6)])).jobs
    leases.run(alice.harness, alice.user_id, created[0].id, None)  # RUNNING, held by a launcher
    killed = created[5].id
    move(stub, killed, S.JOB_STATE_KILLED)
    result = stub.BatchUpdateJobs(job_service_pb2.BatchUpdateJobsRequest(
        filter=job_pb2.JobFilter(tags={"g": "a"}, site_ids=[site.id]),
        patch=job_pb2.Job(state=S.JOB_STATE_RESTART_READY, tags={"phase": "2"}),
        update_mask={"paths": ["state", "tags"]}))
    # only the killed job may restart (a retry); the launcher's job is its launcher's to move
    assert result.updated_count == 1 and result.failed_count == 5
    by_id = {o.id: o for o in result.outcomes}
    assert by_id[killed].code == 0
    assert (by_id[created[0].id].code, by_id[created[0].id].reason) == (7, "ROLE_NOT_ALLOWED")
    assert {(by_id[j.id].code, by_id[j.id].reason) for j in created[1:5]} == {(9, "ILLEGAL_TRANSITION")}
    listed = stub.ListJobs(job_service_pb2.ListJobsRequest(filter=job_pb2.JobFilter(tags={"phase": "2"}))).jobs
    assert [j.id for j in listed] == [killed] and listed[0].tags["g"] == "a"  # tags merged, not replaced
    assert listed[0].state == S.JOB_STATE_RESTART_READY

    dry = stub.BatchDeleteJobs(job_service_pb2.BatchDeleteJobsRequest(
        filter=job_pb2.JobFilter(site_ids=[site.id]), validate_only=True))
    assert dry.deleted_count == 5 and dry.failed_count == 1
    deleted = stub.BatchDeleteJobs(job_service_pb2.BatchDeleteJobsRequest(
        filter=job_pb2.JobFilter(site_ids=[site.id])))
    assert deleted.deleted_count == 5 and deleted.failed_count == 1
    assert [(o.id, o.code) for o in deleted.outcomes if o.code] == [(created[0].id, 9)]
    assert all("kill it first" in o.message for o in deleted.outcomes if o.code)


@pytest.mark.parametrize("rpc, verb, fields", [
    ("BatchDeleteJobs", "delete", {}),
    ("RetryJobs", "retry", {}),
    # A forgotten filter would retag (or kill) every job of the caller just the same.
    ("BatchUpdateJobs", "update", {"patch": job_pb2.Job(tags={"t": "1"}), "update_mask": {"paths": ["tags"]}}),
])
def test_bulk_changes_refuse_an_empty_filter_alike(alice, rpc, verb, fields):
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(app_id=app.id, workdir="kept",
                                                                     parameters={"x": "1"})))
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, rpc)(getattr(job_service_pb2, f"{rpc}Request")(**fields))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{rpc} refuses an empty filter, which would {verb} every job")
    assert f"to {verb} all of them, list every state in filter.states" in err.value.details()
    kept = stub.ListJobs(job_service_pb2.ListJobsRequest(filter=job_pb2.JobFilter(site_ids=[site.id]))).jobs
    assert len(kept) == 1 and dict(kept[0].tags) == {}


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


@pytest.mark.parametrize("n_jobs", [2, 100])  # a transaction of its own; a streamed COPY on PostgreSQL
def test_the_same_batch_sent_at_once_gets_one_answer(alice, n_jobs):
    """Retries of one request that overlap (a client that timed out and sent again while
    the first was still being written): every one gets the first answer, none an error.
    On PostgreSQL the second writer waited on the first's rows and then failed (workdir
    taken, or its request_id record a duplicate) instead of answering from the record."""
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    request = job_service_pb2.BatchCreateJobsRequest(
        jobs=[job_pb2.Job(app_id=app.id, workdir=f"twin/{i}", parameters={"x": "1"}) for i in range(n_jobs)],
        request_id=f"req-twins-{n_jobs}")
    answers = sent_together(lambda: stub.BatchCreateJobs(request, timeout=60))
    assert len(answers) == 4 and all(a == answers[0] for a in answers), answers
    assert len(answers[0].jobs) == n_jobs
    assert stub.CountJobs(job_service_pb2.CountJobsRequest(filter=job_pb2.JobFilter(site_ids=[site.id]))).total \
        == n_jobs


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
    leases.run(alice.harness, alice.user_id, job.id, "RUN_ERROR")
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


# ---------------------------------------------------------------------------- fast paths
# The store takes different routes by batch size and value shape (COPY vs INSERT
# RETURNING, grouped UPDATEs vs per-row arrays, cached SQL): each route must give the
# same answers.


def test_tag_filters_with_the_same_shape_do_not_reuse_each_others_values(alice):
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[
        job_pb2.Job(app_id=app.id, workdir=f"t{i}", parameters={"x": "1"}, tags={"shard": str(i % 3)})
        for i in range(9)]))
    for shard in ("0", "1", "2"):
        listed = stub.ListJobs(job_service_pb2.ListJobsRequest(
            filter=job_pb2.JobFilter(site_ids=[site.id], tags={"shard": shard}))).jobs
        assert len(listed) == 3 and {j.tags["shard"] for j in listed} == {shard}
        others = stub.ListJobs(job_service_pb2.ListJobsRequest(
            filter=job_pb2.JobFilter(site_ids=[site.id], exclude_tags={"shard": shard}))).jobs
        assert len(others) == 6 and shard not in {j.tags["shard"] for j in others}
        count = stub.CountJobs(job_service_pb2.CountJobsRequest(
            filter=job_pb2.JobFilter(site_ids=[site.id], tags={"shard": shard})))
        assert count.total == 3


def test_excluded_tags_keep_the_jobs_without_the_key(alice):
    """exclude_tags drops the jobs having one of the pairs; a job without the key has none
    of them (SQLite dropped it: its json_extract is NULL, and NOT NULL is not true)."""
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[
        job_pb2.Job(app_id=app.id, workdir=f"x{i}", parameters={"x": "1"}, tags=tags)
        for i, tags in enumerate([{"skip": "yes"}, {"skip": "no"}, {}, {"other": "yes"}])]))
    flt = job_pb2.JobFilter(site_ids=[site.id], exclude_tags={"skip": "yes"})
    listed = stub.ListJobs(job_service_pb2.ListJobsRequest(filter=flt)).jobs
    assert sorted(j.workdir for j in listed) == ["x1", "x2", "x3"]
    assert stub.CountJobs(job_service_pb2.CountJobsRequest(filter=flt)).total == 3


def _full_job(app_id: int, workdir: str, i: int) -> job_pb2.Job:
    job = job_pb2.Job(app_id=app_id, workdir=workdir, name=f"näme\t{i}\\", parameters={"x": str(i)},
                      tags={"kind": "tab\there", "path": "a\\b\nc", "n": str(i)}, priority=i % 5,
                      resources=job_pb2.JobResources(num_nodes=2, ranks_per_node=4, threads_per_rank=2, threads_per_core=1,
                                                     gpus_per_rank=1, node_packing_count=1, wall_time_min=30,
                                                     launch_params={"cpu_bind": "depth"}))
    job.data.update({"nested": {"list": [1, "two", None], "flag": True}, "text": "line\nbreak\\"})
    return job


@pytest.mark.parametrize("count", [1, 3, 80])  # single INSERT, small batch, COPY
def test_created_jobs_read_back_exactly_as_sent(alice, count):
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    sent = [_full_job(app.id, f"exact/{count}/{i}", i) for i in range(count)]
    if count == 1:
        created = [stub.CreateJob(job_service_pb2.CreateJobRequest(job=sent[0])).job]
    else:
        created = list(stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(
            jobs=sent, view=job_service_pb2.JOB_VIEW_FULL)).jobs)
    assert len({j.id for j in created}) == count
    listed = stub.ListJobs(job_service_pb2.ListJobsRequest(filter=job_pb2.JobFilter(site_ids=[site.id]))).jobs
    assert [j.id for j in listed] == [j.id for j in created]  # ids follow request order
    for job, want, back in zip(created, sent, listed, strict=True):
        assert job == back
        assert (back.name, back.workdir, dict(back.tags), dict(back.parameters), back.priority) == (
            want.name, want.workdir, dict(want.tags), dict(want.parameters), want.priority)
        assert back.data == want.data and back.resources == want.resources
        assert back.state == S.JOB_STATE_PREPROCESSED and back.create_time == back.update_time
    history = alice.stub(event_service_pb2_grpc.EventServiceStub).ListEvents(event_service_pb2.ListEventsRequest(
        filter=event_service_pb2.EventFilter(job_ids=[j.id for j in created]), page_size=1000)).events
    assert sorted(e.job_id for e in history) == sorted(j.id for j in created)  # one event per job
    assert all(list(e.data["via"]) == ["READY", "STAGED_IN"] for e in history)


@pytest.mark.parametrize("size", [10, 100])  # one INSERT ... ON CONFLICT on PostgreSQL, or COPY
def test_taken_workdir_in_a_batch_writes_nothing(alice, size):
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(app_id=app.id, workdir="big/7",
                                                                     parameters={"x": "1"})))
    batch = [job_pb2.Job(app_id=app.id, workdir=f"big/{i}", parameters={"x": "1"}) for i in range(size)]
    with pytest.raises(grpc.RpcError) as err:
        stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=batch))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS and "jobs[7].workdir" in err.value.details()
    assert stub.CountJobs(job_service_pb2.CountJobsRequest(filter=job_pb2.JobFilter(site_ids=[site.id]))).total == 1


def test_bulk_state_change_updates_every_row_with_one_event_each(alice):
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    created = stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[
        job_pb2.Job(app_id=app.id, workdir=f"u{i}", parameters={"x": "1"}, tags={"u": "1"}) for i in range(300)])).jobs
    result = stub.BatchUpdateJobs(job_service_pb2.BatchUpdateJobsRequest(
        filter=job_pb2.JobFilter(site_ids=[site.id]), update_mask={"paths": ["state", "state_message"]},
        patch=job_pb2.Job(state=S.JOB_STATE_KILLED, state_message="go")))
    assert result.updated_count == 300 and result.failed_count == 0
    listed = stub.ListJobs(job_service_pb2.ListJobsRequest(filter=job_pb2.JobFilter(site_ids=[site.id]))).jobs
    assert {(j.state, j.state_message) for j in listed} == {(S.JOB_STATE_KILLED, "go")}
    assert all(j.state_time.ToDatetime() >= j.create_time.ToDatetime() and j.update_time == j.state_time for j in listed)
    events = alice.stub(event_service_pb2_grpc.EventServiceStub).ListEvents(event_service_pb2.ListEventsRequest(
        filter=event_service_pb2.EventFilter(job_ids=[j.id for j in created], to_states=[S.JOB_STATE_KILLED]),
        page_size=1000)).events
    assert sorted(e.job_id for e in events) == sorted(j.id for j in created)


@pytest.mark.parametrize("shape", ["uniform", "per_row", "json"])
def test_transitioner_writes_per_row_values(alice, harness, shape):
    """Per-job extra values (return codes, error tails) survive every write strategy:
    one UPDATE per value set, one UPDATE over per-row arrays, and executemany."""
    from balsam_grpc.server.convert import utcnow
    from balsam_grpc.server.store import jobs as job_store
    from balsam_grpc.core.states import Role
    from balsam_grpc.server.store.transitions import Transitioner

    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    created = stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[
        job_pb2.Job(app_id=app.id, workdir=f"v{i}", parameters={"x": "1"}) for i in range(20)])).jobs
    ids = [j.id for j in created]
    leases.lease(harness, alice.user_id, ids)

    def values_for(i: int) -> dict:
        if shape == "uniform":
            return {"return_code": 7, "error_tail": "same"}
        if shape == "per_row":
            return {"return_code": i, "error_tail": f"tail\t{i}"}
        return {"return_code": i, "data": {"attempt": i}}

    def work(conn):
        rows = job_store.select_for_change(conn, job_store.JobQuery(owner_id=alice.user_id, ids=ids), with_tags=False)
        engine = Transitioner(conn, utcnow())
        refused = engine.move(rows, job_store.S.RUN_ERROR, Role.SESSION, message="boom",
                              values={r["id"]: values_for(ids.index(r["id"])) for r in rows})
        assert not refused
        engine.flush()
        return engine.changed

    changed = harness.db.write_sync(work)
    assert set(changed) == set(ids) and set(changed.values()) == {"FAILED"}  # no hook, no restart policy
    listed = {j.id: j for j in stub.ListJobs(job_service_pb2.ListJobsRequest(filter=job_pb2.JobFilter(ids=ids))).jobs}
    for i, job_id in enumerate(ids):
        job, want = listed[job_id], values_for(i)
        assert job.state == S.JOB_STATE_FAILED and job.state_message == "boom" and not job.lease.session_id
        assert job.return_code == want["return_code"]
        assert job.error_tail == want.get("error_tail", "")
        if "data" in want:
            assert dict(job.data) == want["data"]
    events = alice.stub(event_service_pb2_grpc.EventServiceStub).ListEvents(event_service_pb2.ListEventsRequest(
        filter=event_service_pb2.EventFilter(job_ids=ids, to_states=[S.JOB_STATE_FAILED]), page_size=100)).events
    assert sorted(e.job_id for e in events) == sorted(ids)
    assert {e.job_id: e.data["return_code"] for e in events} == {
        job_id: values_for(i)["return_code"] for i, job_id in enumerate(ids)}
    assert all(list(e.data["via"]) == ["RUN_ERROR"] for e in events)


def test_json_loads_hands_out_copies():
    from balsam_grpc.server.store import codec

    first = codec.loads(b'{"a": "1", "b": "2"}')
    first["a"] = "changed"
    again = codec.loads(b'{"a": "1", "b": "2"}')
    assert again == {"a": "1", "b": "2"} and again is not first
    empty = codec.loads("{}")
    empty["x"] = 1
    assert codec.loads("{}") == {} and codec.loads("[]") == [] and codec.loads(" [1, 2]") == [1, 2]
    assert codec.loads('{"n": {"deep": [1]}}') == {"n": {"deep": [1]}}


def test_pooled_connection_cut_while_idle_is_replaced(harness):
    if harness.backend != "postgres":
        pytest.skip("SQLite connections cannot be cut")
    from sqlalchemy import text

    from balsam_grpc.server.store.db import Database

    db = Database(harness.url, workers=1, idle_ping_seconds=0.0)  # its own pool: only its connection is cut
    try:
        with db.engine.begin() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with harness.db.engine.begin() as other:
            assert other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar_one()
        # the dead connection is still pooled: checkout pings it and opens a new one
        with db.engine.begin() as conn:
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
    finally:
        db.dispose()


@pytest.mark.parametrize("ping_idle", [True, False])
def test_a_statement_run_on_the_event_loop_survives_a_cut_connection(harness, ping_idle):
    # Database.statement_now keeps connections of its own (psycopg's AsyncConnection), on
    # the server's loop, their sockets watched between statements.
    if harness.backend != "postgres":
        pytest.skip("SQLite connections cannot be cut")
    import asyncio

    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    from balsam_grpc.server.rpc import database_unavailable
    from balsam_grpc.server.store.db import Database

    db = Database(harness.url, workers=1, idle_ping_seconds=0.0 if ping_idle else 3600.0)

    def cut(pid: int) -> None:
        with harness.db.engine.begin() as other:
            assert other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar_one()

    async def scenario() -> None:
        pid = (await db.statement_now("SELECT pg_backend_pid() AS pid", {}))[0][0]
        cut(pid)
        # Cut while idle: the loop sees its socket close, closes it (not called at every
        # turn of the loop after), and the next statement runs on a new connection.
        for _ in range(200):
            if db._statements._idle[-1][0].closed:
                break
            await asyncio.sleep(0.01)
        assert db._statements._idle[-1][0].closed
        pid2 = (await db.statement_now("SELECT pg_backend_pid() AS pid", {}))[0][0]
        assert pid2 != pid
        # Cut during a statement: UNAVAILABLE (callers retry), and the connection is dropped.
        with pytest.raises(DBAPIError) as err:
            await db.statement_now("SELECT pg_terminate_backend(pg_backend_pid()) AS gone", {})
        assert database_unavailable(err.value) is not None
        assert (await db.statement_now("SELECT pg_backend_pid() AS pid", {}))[0][0] not in (pid, pid2)
        assert await db.statement_now("SELECT 1 WHERE false", {}) == []

    try:
        asyncio.run(scenario())
    finally:
        db.dispose()


def test_a_statement_connection_registers_its_socket_once(harness):
    # Not once per statement (two epoll_ctl calls and the loop's bookkeeping each).
    if harness.backend != "postgres":
        pytest.skip("statements on the event loop are PostgreSQL's")
    import asyncio

    from balsam_grpc.server.store.db import Database

    db = Database(harness.url, workers=1)
    added: list[int] = []

    async def scenario() -> None:
        await db.statement_now("SELECT 1", {})  # connected (psycopg's connect waits its own way)
        loop = asyncio.get_running_loop()
        add_reader = loop.add_reader
        loop.add_reader = lambda fd, *args: (added.append(fd), add_reader(fd, *args))[1]  # type: ignore[method-assign]
        for i in range(20):
            assert (await db.statement_now("SELECT %(i)s::int AS i", {"i": i}))[0][0] == i

    try:
        asyncio.run(scenario())
        assert added == []
    finally:
        db.dispose()


def test_statements_run_as_tuples_convert_prepare_and_fail_as_psycopg_does(harness, monkeypatch):
    # statement_now runs on the connection's libpq handle (no cursor): its
    # placeholders, prepared statements and errors must be psycopg's.
    if harness.backend != "postgres":
        pytest.skip("statements on the event loop are PostgreSQL's")
    import asyncio

    from sqlalchemy.exc import DBAPIError, IntegrityError

    from balsam_grpc.server.store import db as db_module
    from balsam_grpc.server.store.db import Database

    monkeypatch.setattr(db_module, "MAX_PREPARED", 3)
    db = Database(harness.url, workers=1)

    async def prepared() -> list[str]:
        rows = await db.statement_now("SELECT name FROM pg_prepared_statements ORDER BY name", {})
        return [name for (name,) in rows]

    async def scenario() -> None:
        now = db.statement_now
        # a repeated name is one parameter; %% is a literal %; one parameter; none; NULL
        assert await now("SELECT %(a)s::int + %(a)s::int, '5%%', %(b)s::text", {"a": 2, "b": None}) == [(4, "5%", None)]
        assert await now("SELECT %(x)s::text", {"x": "one"}) == [("one",)]
        assert await now("SELECT 1 WHERE false", {}) == []
        assert await now("SELECT CAST(%(j)s AS JSONB)", {"j": '{"k": [1]}'}) == [({"k": [1]},)]
        # prepared at the fifth execution, as psycopg does
        before = await prepared()
        for i in range(db_module.PREPARE_AFTER - 1):
            assert await now("SELECT %(i)s::int * 10", {"i": i}) == [(i * 10,)]
        assert await prepared() == before
        assert await now("SELECT %(i)s::int * 10", {"i": 7}) == [(70,)]
        assert len(await prepared()) == len(before) + 1
        # at most MAX_PREPARED per connection: the least recently used is deallocated
        for n in range(4):
            for _ in range(db_module.PREPARE_AFTER):
                await now(f"SELECT %(i)s::int + {n}", {"i": 1})
        assert len(await prepared()) == 3
        # errors as SQLAlchemy raises them; the connection serves on
        with pytest.raises(IntegrityError):
            await now("SELECT CAST(NULL AS INT) FROM (SELECT 1) AS t WHERE (SELECT 1/0) IS NULL OR true "
                      "UNION ALL SELECT 1 FROM (SELECT raise_unique()) AS r", {})
        with pytest.raises(DBAPIError):
            await now("SELEKT %(i)s", {"i": 1})
        for _ in range(db_module.PREPARE_AFTER + 1):  # a failing statement is never kept prepared
            with pytest.raises(DBAPIError):
                await now("SELECT 1 / %(z)s::int", {"z": 0})
        assert await now("SELECT %(i)s::int * 10", {"i": 8}) == [(80,)]
        assert (await now("SELECT %(i)s::int AS i", {"i": 9})) == [(9,)]
        assert len(db._statements._idle) == 1  # one connection throughout

    try:
        from sqlalchemy import text

        with harness.db.engine.begin() as conn:
            conn.execute(text("CREATE OR REPLACE FUNCTION raise_unique() RETURNS int LANGUAGE plpgsql AS "
                              "$$BEGIN RAISE unique_violation USING MESSAGE = 'taken'; END$$"))
        asyncio.run(scenario())
    finally:
        db.dispose()
        with harness.db.engine.begin() as conn:
            conn.execute(text("DROP FUNCTION IF EXISTS raise_unique()"))


@pytest.mark.parametrize("count", [1, 70])  # INSERT ... RETURNING and COPY for the transfer items
def test_jobs_with_transfer_slots_get_their_items(alice, count):
    from balsam_grpc.v1 import common_pb2, transfer_item_service_pb2, transfer_item_service_pb2_grpc

    site, app = make_site_app(alice, transfers=[
        app_pb2.TransferSlot(name="inp", direction=common_pb2.TRANSFER_DIRECTION_IN, local_path="in.h5"),
        app_pb2.TransferSlot(name="out", direction=common_pb2.TRANSFER_DIRECTION_OUT, local_path="out")])
    stub = jobs_stub(alice)
    created = stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[
        job_pb2.Job(app_id=app.id, workdir=f"tr{i}", parameters={"x": "1"},
                    transfers={"inp": f"aps:/data/{i}.h5", "out": "home:/results"}) for i in range(count)])).jobs
    assert {j.state for j in created} == {S.JOB_STATE_READY}  # waits for its stage-in
    items = alice.stub(transfer_item_service_pb2_grpc.TransferServiceStub).ListTransferItems(
        transfer_item_service_pb2.ListTransferItemsRequest(page_size=1000)).transfer_items
    mine = [t for t in items if t.job_id in {j.id for j in created}]
    assert len(mine) == 2 * count
    assert {t.job_id for t in mine if t.direction == common_pb2.TRANSFER_DIRECTION_IN} == {j.id for j in created}


def test_planner_statistics_refresh_only_after_large_growth(harness, alice):
    from balsam_grpc.server.store import jobs as job_store

    _, app = make_site_app(alice)
    jobs_stub(alice).BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[
        job_pb2.Job(app_id=app.id, workdir=f"s{i}", parameters={"x": "1"}) for i in range(5)]))
    assert harness.db.write_sync(job_store.refresh_planner_stats, 10**9) is True  # more than the table ever held
    if harness.backend == "postgres":
        from sqlalchemy import text

        believed = harness.db.read_sync(
            lambda conn: conn.execute(text("SELECT reltuples FROM pg_class WHERE oid = 'jobs'::regclass")).scalar_one())
    else:
        believed = harness.db.read_sync(job_store._sqlite_row_estimate)
    assert believed >= 0  # ANALYZE ran: the planner now has a row estimate
    assert harness.db.write_sync(job_store.refresh_planner_stats, 1) is False  # small growth: nothing to do


def test_paging_by_a_time_column_keeps_exact_times(alice):
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    created = []
    for batch in range(3):  # three create times, two jobs each
        created += stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[
            job_pb2.Job(app_id=app.id, workdir=f"p{batch}/{i}", parameters={"x": "1"}) for i in range(2)])).jobs
    full = {j.id: stub.GetJob(job_service_pb2.GetJobRequest(id=j.id)).job for j in created}
    seen, token = [], ""
    while True:
        page = stub.ListJobs(job_service_pb2.ListJobsRequest(
            filter=job_pb2.JobFilter(site_ids=[site.id]), order_by="-create_time", page_size=2, page_token=token))
        seen += list(page.jobs)
        token = page.next_page_token
        if not token:
            break
    expected = sorted(full.values(), key=lambda j: (j.create_time.ToNanoseconds(), j.id), reverse=True)
    assert [j.id for j in seen] == [j.id for j in expected]
    assert all(j == full[j.id] for j in seen)  # times (to the microsecond) and every other field




def test_a_refresh_that_was_not_due_is_not_asked_again_at_every_create():
    """Between ANALYZE_MIN_ROWS and a tenth of the table, each single create used to ask
    the database again (one more write transaction per create under load)."""
    import asyncio
    from types import SimpleNamespace

    from balsam_grpc.server.services.jobs import JobServicer
    from balsam_grpc.server.store import jobs as job_store

    asked: list[int] = []

    class Db:
        async def write(self, fn, inserted):
            assert fn is job_store.refresh_planner_stats
            asked.append(inserted)
            return False  # a small share of a big table: not due

    async def scenario() -> None:
        servicer = JobServicer(SimpleNamespace(db=Db()))
        servicer._created(job_store.ANALYZE_MIN_ROWS)
        await servicer._stats_task
        for _ in range(job_store.ANALYZE_MIN_ROWS - 1):
            servicer._created(1)
            if servicer._stats_task is not None:
                await servicer._stats_task
        assert asked == [job_store.ANALYZE_MIN_ROWS]
        servicer._created(1)  # as many again since the last answer: ask once more
        await servicer._stats_task
        assert asked == [job_store.ANALYZE_MIN_ROWS, 2 * job_store.ANALYZE_MIN_ROWS]

    asyncio.run(scenario())


def test_an_update_without_a_state_change_answers_the_whole_job_as_stored(alice, bob):
    """Such an update is one UPDATE ... RETURNING (store.patch_job): its answer is the
    stored job, every field, and another user's job is not found (nor changed)."""
    _, app = make_site_app(alice)
    stub = jobs_stub(alice)
    job = stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
        app_id=app.id, workdir="patched", parameters={"x": "1"}, tags={"a": "1"}, priority=3))).job
    updated = stub.UpdateJob(job_service_pb2.UpdateJobRequest(
        job=job_pb2.Job(id=job.id, tags={"b": "2"}, name="renamed"), update_mask={"paths": ["tags", "name"]})).job
    assert updated == stub.GetJob(job_service_pb2.GetJobRequest(id=job.id)).job
    assert dict(updated.tags) == {"b": "2"} and updated.name == "renamed" and updated.priority == 3
    assert updated.update_time.ToDatetime() >= job.update_time.ToDatetime()
    with pytest.raises(grpc.RpcError) as err:
        jobs_stub(bob).UpdateJob(job_service_pb2.UpdateJobRequest(
            job=job_pb2.Job(id=job.id, tags={"c": "3"}), update_mask={"paths": ["tags"]}))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert dict(stub.GetJob(job_service_pb2.GetJobRequest(id=job.id)).job.tags) == {"b": "2"}


@pytest.mark.parametrize("how", ["fails", "is failed by its own parent"])
def test_a_child_created_while_its_parent_fails_is_not_left_waiting(harness, alice, how):
    """The parent's failure commits while its child is being created: the child must end
    FAILED (its policy), not wait for a parent that will never finish. The create read the
    parent's state without a lock and saw it running or waiting; the failing transaction
    had looked for children before the new link existed: the child stayed
    AWAITING_PARENTS for good. A parent failed by the cascade from its own parent is
    changed by a plain UPDATE, without the FOR UPDATE a report takes first."""
    if harness.backend != "postgres":
        pytest.skip("SQLite runs one writer at a time: the two transactions cannot overlap")
    from sqlalchemy import text

    from balsam_grpc.core.states import Role
    from balsam_grpc.server.convert import utcnow
    from balsam_grpc.server.store import jobs as job_store
    from balsam_grpc.server.store.transitions import Transitioner
    from tests.support.waiting import wait_until

    _, app = make_site_app(alice)
    stub = jobs_stub(alice)
    failing = stub.CreateJob(job_service_pb2.CreateJobRequest(
        job=job_pb2.Job(app_id=app.id, workdir="failing", parameters={"x": "1"}))).job
    parent = failing if how == "fails" else stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
        app_id=app.id, workdir="parent", parameters={"x": "1"}, parent_ids=[failing.id]))).job
    leases.lease(harness, alice.user_id, [failing.id])
    made: list[object] = []

    def create_child() -> None:
        try:
            made.append(stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
                app_id=app.id, workdir="child", parameters={"x": "1"}, parent_ids=[parent.id])), timeout=60).job)
        except grpc.RpcError as exc:
            made.append(exc)

    with harness.db.engine.connect() as conn:
        with conn.begin():
            rows = job_store.select_for_change(conn, job_store.JobQuery(owner_id=alice.user_id, ids=[failing.id]),
                                               with_tags=False)
            engine = Transitioner(conn, utcnow())
            assert not engine.move(rows, job_store.S.RUN_ERROR, Role.SESSION, message="boom")
            engine.flush()
            assert engine.changed == {j: "FAILED" for j in {failing.id, parent.id}}  # no retry policy
            thread = threading.Thread(target=create_child)
            thread.start()
            wait_until(lambda: harness.db.read_sync(lambda c: c.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )).scalar_one()), "the child's create to wait on the parent's transaction", 10, interval=0.01)
        thread.join(60)
    (child,) = made
    assert isinstance(child, job_pb2.Job), child
    got = stub.GetJob(job_service_pb2.GetJobRequest(id=child.id)).job
    assert got.state == S.JOB_STATE_FAILED, job_pb2.JobState.Name(got.state)
