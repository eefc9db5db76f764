"""A large BatchCreateJobs on PostgreSQL converts each chunk of jobs while the database
takes in the one before (services.jobs._create_streamed, store.jobs.create_jobs_streamed).
It must answer exactly as the one-piece create does: an invalid, conflicting or unknown
job in any chunk fails the whole call, naming that job, with nothing written; chunks
that lay their COPY out differently (store.bulk.CopyStream) read back as sent. The chunk
is made small here so a few hundred jobs span several (both databases run these; SQLite
takes the one-piece path, which must answer the same)."""

from __future__ import annotations

import random

import grpc
import pytest

from balsam_grpc.server.services import jobs as job_service
from balsam_grpc.v1 import (
    auth_service_pb2,
    auth_service_pb2_grpc,
    event_service_pb2,
    event_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
)
from tests.conftest import Caller
from tests.support.records import jobs_stub, make_site_app

CHUNK = 40
SIZE = 5 * CHUNK + 7


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(job_service, "STREAM_CHUNK", CHUNK)


def batch(app_id: int, prefix: str, size: int = SIZE) -> list[job_pb2.Job]:
    return [job_pb2.Job(app_id=app_id, workdir=f"{prefix}/{i}", parameters={"x": str(i)}, tags={"k": str(i % 3)})
            for i in range(size)]


def count(stub, site_id: int) -> int:
    return stub.CountJobs(job_service_pb2.CountJobsRequest(filter=job_pb2.JobFilter(site_ids=[site_id]))).total


def refused(stub, jobs: list[job_pb2.Job]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=jobs))
    return err.value


def test_chunks_laid_out_differently_read_back_as_sent(alice):
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    sent = batch(app.id, "layout")
    for i in range(CHUNK, 2 * CHUNK):  # the second chunk names its jobs, the first does not
        sent[i].name = f"named {i}"
    sent[3 * CHUNK + 1].priority = 7  # one job in the fourth chunk differs from the rest
    sent[3 * CHUNK + 2].resources.num_nodes = 3
    created = list(stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(
        jobs=sent, view=job_service_pb2.JOB_VIEW_FULL)).jobs)
    assert [j.workdir for j in created] == [j.workdir for j in sent]
    ids = [j.id for j in created]
    assert ids == sorted(ids) and len(set(ids)) == SIZE
    listed = stub.ListJobs(job_service_pb2.ListJobsRequest(filter=job_pb2.JobFilter(site_ids=[site.id]),
                                                           page_size=1000)).jobs
    assert list(listed) == created
    for want, back in zip(sent, listed, strict=True):
        assert (back.name, back.workdir, dict(back.tags), dict(back.parameters), back.priority) == (
            want.name, want.workdir, dict(want.tags), dict(want.parameters), want.priority)
        assert back.resources.num_nodes == (want.resources.num_nodes or 1)
    events = alice.stub(event_service_pb2_grpc.EventServiceStub).ListEvents(event_service_pb2.ListEventsRequest(
        filter=event_service_pb2.EventFilter(job_ids=ids), page_size=1000)).events
    assert [e.job_id for e in events] == ids  # one creation event each, in the jobs' order
    counts = stub.CountJobs(job_service_pb2.CountJobsRequest(filter=job_pb2.JobFilter(site_ids=[site.id]),
                                                             group_by=[job_service_pb2.JOB_GROUP_BY_STATE]))
    assert counts.total == SIZE and [g.count for g in counts.groups] == [SIZE]


@pytest.mark.parametrize("where", [0, 3 * CHUNK + 5, SIZE - 1])
def test_an_invalid_job_in_any_chunk_fails_the_call_and_writes_nothing(alice, where):
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    jobs = batch(app.id, "invalid")
    jobs[where].resources.num_nodes = 10**6
    err = refused(stub, jobs)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and f"jobs[{where}].resources.num_nodes" in err.details()
    assert count(stub, site.id) == 0
    jobs[where].resources.num_nodes = 1
    jobs[where].parameters["x"] = "not a number"
    err = refused(stub, jobs)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and f"jobs[{where}].parameters" in err.details()
    assert count(stub, site.id) == 0
    jobs[where].parameters["x"] = "1"
    assert len(stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=jobs)).jobs) == SIZE


def test_a_workdir_repeated_across_chunks_or_already_taken_names_the_job(alice):
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    jobs = batch(app.id, "dup")
    jobs[4 * CHUNK + 1].workdir = jobs[2].workdir
    err = refused(stub, jobs)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and f"jobs[{4 * CHUNK + 1}].workdir" in err.details()
    assert "repeats jobs[2]" in err.details()
    stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(app_id=app.id, workdir="dup/150",
                                                                     parameters={"x": "1"})))
    err = refused(stub, batch(app.id, "dup"))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "jobs[150].workdir" in err.details()
    assert count(stub, site.id) == 1


def test_an_unknown_app_or_parent_in_a_later_chunk_is_not_found(alice):
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    jobs = batch(app.id, "missing")
    jobs[2 * CHUNK + 3].app_id = app.id + 10_000
    err = refused(stub, jobs)
    assert err.code() == grpc.StatusCode.NOT_FOUND and f"jobs[{2 * CHUNK + 3}]" in err.details()
    jobs = batch(app.id, "missing")
    jobs[SIZE - 2].parent_ids.append(10**12)
    err = refused(stub, jobs)
    assert err.code() == grpc.StatusCode.NOT_FOUND and f"jobs[{SIZE - 2}].parent_ids" in err.details()
    assert count(stub, site.id) == 0


def test_parents_and_app_names_resolve_in_every_chunk(alice):
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    parent = stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
        app_id=app.id, workdir="parent", parameters={"x": "1"}))).job
    jobs = batch(app.id, "children")
    for i in range(0, SIZE, 7):
        jobs[i].parent_ids.append(parent.id)
    for i in range(1, SIZE, 5):
        jobs[i].ClearField("app_id")
        jobs[i].app_name, jobs[i].site_id = app.name, site.id
    created = stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=jobs)).jobs
    assert len(created) == SIZE and all(j.app_id == app.id for j in created)
    waiting = [j.id for i, j in enumerate(created) if i % 7 == 0]
    assert {j.state for j in created if j.id in waiting} == {job_pb2.JOB_STATE_AWAITING_PARENTS}
    assert {j.state for j in created if j.id not in waiting} == {job_pb2.JOB_STATE_PREPROCESSED}


def test_a_job_with_too_many_parents_is_refused_before_anything_is_read(alice):
    # The streamed create reads every parent up front; past MAX_PARENTS on one job the
    # one-piece path refuses the call first, as it always did.
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    jobs = batch(app.id, "parents")
    jobs[2 * CHUNK + 1].parent_ids.extend(range(1, job_service.MAX_PARENTS + 2))
    err = refused(stub, jobs)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"jobs[{2 * CHUNK + 1}].parent_ids has more than" in err.details()
    assert count(stub, site.id) == 0


def test_creation_events_carry_each_jobs_path_state_and_message(alice):
    """The creation events (on PostgreSQL written by the database from the new rows,
    store.jobs._CREATION_EVENTS) say what the one-piece create's say: CREATED ->
    the job's state, the steps taken on the way as data, the job's state message, the
    creation time; one per job, in the jobs' order, mixed paths in one call."""
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    pending = stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(app_id=app.id, workdir="p/pending", parameters={"x": "1"}))).job
    killed = stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(app_id=app.id, workdir="p/killed", parameters={"x": "1"}))).job
    stub.UpdateJob(job_service_pb2.UpdateJobRequest(job=job_pb2.Job(id=killed.id, state=job_pb2.JOB_STATE_KILLED),
                                                    update_mask={"paths": ["state"]}))
    sent = batch(app.id, "paths")
    for i in range(CHUNK + 1, SIZE, 5):
        sent[i].parent_ids.append(pending.id)
    for i in range(2 * CHUNK + 3, SIZE, 7):
        del sent[i].parent_ids[:]
        sent[i].parent_ids.append(killed.id)
    created = list(stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(
        jobs=sent, view=job_service_pb2.JOB_VIEW_FULL)).jobs)
    ids = [j.id for j in created]
    states = {j.state for j in created}
    assert states == {job_pb2.JOB_STATE_PREPROCESSED, job_pb2.JOB_STATE_AWAITING_PARENTS, job_pb2.JOB_STATE_FAILED}
    events = list(alice.stub(event_service_pb2_grpc.EventServiceStub).ListEvents(event_service_pb2.ListEventsRequest(
        filter=event_service_pb2.EventFilter(job_ids=ids), page_size=1000)).events)
    assert [e.job_id for e in events] == ids
    ids_seen = [e.id for e in events]
    assert ids_seen == sorted(ids_seen) and len(set(ids_seen)) == len(ids)
    for job, event in zip(created, events, strict=True):
        assert (event.site_id, event.job_state.from_state, event.job_state.to_state, event.message) == (
            site.id, job_pb2.JOB_STATE_CREATED, job.state, job.state_message)
        assert event.time == job.create_time and event.receive_time == job.create_time
        via = list(event.data["via"]) if "via" in event.data else []
        if job.state == job_pb2.JOB_STATE_PREPROCESSED:
            assert via == ["READY", "STAGED_IN"]
        else:
            assert via == [] and not event.data
    assert any("failed" in e.message for e in events)


@pytest.mark.parametrize("total", [1, 39, 70, 71, 207, 1000])
def test_stream_chunks_cover_the_jobs_once_in_order_with_small_ends(total):
    bounds = job_service.stream_chunks(total, CHUNK)
    assert [b[0] for b in bounds] == [0, *(b[1] for b in bounds[:-1])] and bounds[-1][1] == total
    sizes = [stop - start for start, stop in bounds]
    assert min(sizes) > 0 and max(sizes) <= CHUNK
    assert sizes[0] <= CHUNK // 8
    if total > 2 * CHUNK:
        assert sizes[-1] <= CHUNK // 8


def test_creation_events_written_before_the_jobs_say_what_the_jobs_became(alice):
    """One app by id, no parents, no transfers: the events are known before any job is
    converted, and PostgreSQL writes them while the server converts the first chunks
    (store.jobs.create_jobs_streamed). They must be the events the jobs' own path gives,
    one per job, in the jobs' order; a call that then fails leaves none behind."""
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    events_stub = alice.stub(event_service_pb2_grpc.EventServiceStub)
    created = list(stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(
        jobs=batch(app.id, "ahead"), view=job_service_pb2.JOB_VIEW_FULL)).jobs)
    ids = [j.id for j in created]
    events = list(events_stub.ListEvents(event_service_pb2.ListEventsRequest(
        filter=event_service_pb2.EventFilter(job_ids=ids), page_size=1000)).events)
    assert [e.job_id for e in events] == ids
    assert [e.id for e in events] == sorted(e.id for e in events)
    for job, event in zip(created, events, strict=True):
        assert job.state == job_pb2.JOB_STATE_PREPROCESSED
        assert (event.site_id, event.job_state.from_state, event.job_state.to_state, event.message) == (
            site.id, job_pb2.JOB_STATE_CREATED, job.state, "")
        assert event.time == job.create_time and event.receive_time == job.create_time
        assert list(event.data["via"]) == ["READY", "STAGED_IN"]
    before = len(list(events_stub.ListEvents(event_service_pb2.ListEventsRequest(page_size=1000)).events))
    failing = batch(app.id, "ahead-fails")
    failing[SIZE - 1].workdir = "ahead/0"  # taken: the COPY fails after the events were written
    err = refused(stub, failing)
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and f"jobs[{SIZE - 1}].workdir" in err.details()
    after = len(list(events_stub.ListEvents(event_service_pb2.ListEventsRequest(page_size=1000)).events))
    assert after == before and count(stub, site.id) == SIZE


def test_jobs_that_differ_from_the_events_written_up_front_fail_the_call(alice, harness, monkeypatch):
    """The check behind writing events first: were the foresight ever wrong (here made
    wrong on purpose), the call fails with nothing written rather than leave events that
    say something else than the jobs."""
    from balsam_grpc.server.store import jobs as job_store

    if harness.backend != "postgres":
        pytest.skip("SQLite takes the one-piece path")
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    real = job_store._Creation.foreseen_event

    def wrong(self, references):
        kind = real(self, references)
        return None if kind is None else (kind[0], "RUNNING", *kind[2:])

    monkeypatch.setattr(job_store._Creation, "foreseen_event", wrong)
    err = refused(stub, batch(app.id, "wrong"))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert count(stub, site.id) == 0
    events = alice.stub(event_service_pb2_grpc.EventServiceStub).ListEvents(event_service_pb2.ListEventsRequest(
        filter=event_service_pb2.EventFilter(site_ids=[site.id]), page_size=1000)).events
    assert [e for e in events if e.HasField("job_state")] == []


# One job of a later chunk given differently from the rest: a chunk read as columns
# (services.jobs.plain_columns) must be answered as the general way answers it.
ODD = {
    "a workdir with a dot part": lambda j: setattr(j, "workdir", j.workdir.replace("/", "/./")),
    "a name of 256 characters": lambda j: setattr(j, "name", "n" * 256),
    "a name": lambda j: setattr(j, "name", "named"),
    "a tag key never seen": lambda j: j.tags.__setitem__("fresh_key", "v"),
    "an invalid tag key": lambda j: j.tags.__setitem__("bad key!", "v"),
    "a tag value too long": lambda j: j.tags.__setitem__("k", "v" * 5000),
    "data": lambda j: j.data.update({"a": 1}),
    "a parent-failure policy": lambda j: setattr(j, "on_parent_failure", job_pb2.PARENT_FAILURE_POLICY_IGNORE),
    "an unknown parent-failure policy": lambda j: setattr(j, "on_parent_failure", 99),
    "an undeclared parameter": lambda j: j.parameters.__setitem__("y", "1"),
    "no parameters": lambda j: j.parameters.clear(),
    "a priority": lambda j: setattr(j, "priority", -5),
    "resources": lambda j: j.resources.MergeFrom(job_pb2.JobResources(num_nodes=2, launch_params={"a": "b"})),
    "invalid resources": lambda j: j.resources.MergeFrom(job_pb2.JobResources(num_nodes=2, node_packing_count=2)),
    "another site's id beside the app's id": lambda j: setattr(j, "site_id", 10**9),
    "the workdir of an earlier job": lambda j: setattr(j, "workdir", j.workdir.rsplit("/", 1)[0] + "/1"),
}


@pytest.mark.parametrize(("odd", "scope"), [*((odd, "user") for odd in sorted(ODD)),
                                            ("a name", "site"), ("another site's id beside the app's id", "site")])
def test_a_chunk_read_as_columns_is_answered_as_the_general_way_answers_it(alice, harness, monkeypatch, odd, scope):
    if harness.backend != "postgres":
        pytest.skip("SQLite takes the one-piece path")
    site, app = make_site_app(alice)
    caller = alice
    if scope == "site":  # a site's token: a job naming another site is refused
        token = alice.stub(auth_service_pb2_grpc.AuthServiceStub).CreateToken(auth_service_pb2.CreateTokenRequest(
            scope=auth_service_pb2.TOKEN_SCOPE_SITE, site_id=site.id, ttl_seconds=3600)).token
        caller = Caller(harness, alice.user_id, alice.username, token)
    stub = jobs_stub(caller)
    read_as_columns = []
    real = job_service.plain_columns

    def spy(*args, **kwargs):
        columns = real(*args, **kwargs)
        read_as_columns.append(columns is not None)
        return columns

    def outcome(prefix: str):
        jobs = batch(app.id, prefix)
        ODD[odd](jobs[2 * CHUNK + 3])
        jobs[3 * CHUNK].resources.num_nodes = 3  # a JobResources in a chunk of plain jobs
        before = count(stub, site.id)
        try:
            created = stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(
                jobs=jobs, view=job_service_pb2.JOB_VIEW_FULL)).jobs
        except grpc.RpcError as err:
            assert count(stub, site.id) == before
            return err.code(), err.details().replace(prefix, "")
        shown = []
        for job in created:
            job = job_pb2.Job.FromString(job.SerializeToString())
            job.workdir = job.workdir.removeprefix(prefix)
            for name in ("id", "create_time", "update_time", "state_time"):
                job.ClearField(name)
            shown.append(job)
        return shown

    monkeypatch.setattr(job_service, "plain_columns", spy)
    as_columns = outcome("columns")
    assert any(read_as_columns)
    monkeypatch.setattr(job_service, "plain_columns", lambda *args, **kwargs: None)
    assert outcome("general") == as_columns


def test_what_the_copy_leaves_to_postgresql_is_a_new_jobs_value(harness):
    """A streamed create's COPY leaves out the columns whose value is store.jobs.
    INSERT_DEFAULTS' in every job: the table's defaults (revision 0012) must give those."""
    from sqlalchemy import text

    from balsam_grpc.server.store.jobs import INSERT_DEFAULTS, TIME_DEFAULTS

    if harness.backend != "postgres":
        pytest.skip("only PostgreSQL's COPY leaves columns out")
    with harness.db.engine.connect() as conn:
        defaults = dict(conn.execute(text(
            "SELECT column_name, column_default FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = 'jobs'")).all())
        for name, value in INSERT_DEFAULTS.items():
            if value is None:
                assert defaults[name] is None, name
            else:
                assert conn.execute(text(f"SELECT {defaults[name]}")).scalar_one() == value, name
        # The times: the transaction's start, which the server reads and reports (revision 0017).
        for name in TIME_DEFAULTS:
            assert conn.execute(text(f"SELECT {defaults[name]} = now()")).scalar_one() is True, name


def test_a_streamed_create_reports_the_times_it_stored(alice):
    """The COPY leaves the times to PostgreSQL (the transaction's now()); the answer and
    the creation events give that same instant, in every time field."""
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    created = list(stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(
        jobs=batch(app.id, "times"), view=job_service_pb2.JOB_VIEW_FULL)).jobs)
    times = {(j.create_time.seconds, j.create_time.nanos) for j in created}
    assert len(times) == 1 and created[0].create_time.seconds > 0
    assert all(j.update_time == j.create_time and j.state_time == j.create_time for j in created)
    for job in (created[0], created[-1]):
        assert stub.GetJob(job_service_pb2.GetJobRequest(id=job.id)) == job_service_pb2.GetJobResponse(job=job)
    events = alice.stub(event_service_pb2_grpc.EventServiceStub).ListEvents(event_service_pb2.ListEventsRequest(
        filter=event_service_pb2.EventFilter(job_ids=[created[0].id]), page_size=10)).events
    assert [e.time for e in events] == [created[0].create_time]


def test_the_column_tests_accept_what_the_per_job_tests_accept() -> None:
    """plain_columns tests a chunk a field at a time (job_service._plain_workdirs,
    _all_surely_valid): they must pass exactly the chunks whose every job passes the
    per-job tests, or a job would be stored without job_spec's checks."""
    rng = random.Random(15)
    alphabet = ["a", "b", "/", ".", "~", " ", "\t", "\x00", "\x1c", "é", "\u2003", "//", "/."]
    for _ in range(20_000):
        workdirs = ["".join(rng.choices(alphabet, k=rng.randrange(0, 5))) for _ in range(rng.randrange(1, 5))]
        assert job_service._plain_workdirs(workdirs) == all(map(job_service._plain_workdir, workdirs)), workdirs
    assert job_service._plain_workdirs(["a" * job_service.MAX_WORKDIR, "b"])
    assert not job_service._plain_workdirs(["b", "a" * (job_service.MAX_WORKDIR + 1)])
    known = {"k1", "k2"}
    for _ in range(20_000):
        column = [{rng.choice(["k1", "k2", "k3"]): "v" * rng.choice([0, 1, 3, 4, 5]) for _ in range(rng.randrange(0, 4))}
                  for _ in range(rng.randrange(1, 4))]
        for keys in (known, None):
            expected = all(job_service._surely_valid(d, 2, 16, keys) for d in column if d)
            assert job_service._all_surely_valid(column, 2, 16, keys) == expected, (column, keys)
