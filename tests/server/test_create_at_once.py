"""CreateJob in one statement (PostgreSQL): the job, its creation event and its request_id
record written together, validated against an app row cached per server process. The
cache is never trusted alone: the statement inserts only while the app's row version is
the one cached, so a change through any replica is seen by the next create."""

from __future__ import annotations

import threading
from typing import Any

import grpc
import pytest
from sqlalchemy import event, func, select, text

from balsam_grpc.server.convert import utcnow
from balsam_grpc.server.embedded import EmbeddedServer
from balsam_grpc.server.state import ServerSettings
from balsam_grpc.server.store import apps as app_store
from balsam_grpc.server.store import jobs as job_store
from balsam_grpc.server.store.tables import events, idempotency_keys, jobs
from balsam_grpc.v1 import app_pb2, app_service_pb2, app_service_pb2_grpc, job_pb2, job_service_pb2
from balsam_grpc.v1 import job_service_pb2_grpc

from tests.support.records import error_reason, jobs_stub, make_site_app
from tests.support.together import sent_together
from tests.support.waiting import wait_until


def _postgres_only(harness: Any) -> None:
    if harness.backend != "postgres":
        pytest.skip("one statement in autocommit is the PostgreSQL path; SQLite creates in a transaction")


def _create(stub: Any, app_id: int, workdir: str, request_id: str = "", **params: str) -> Any:
    return stub.CreateJob(job_service_pb2.CreateJobRequest(
        job=job_pb2.Job(app_id=app_id, workdir=workdir, parameters=params or {"x": "1"}), request_id=request_id))


def _create_one(stub: Any, app_id: int, workdir: str, request_id: str = "", view: int = 0, **params: str) -> Any:
    return stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(
        jobs=[job_pb2.Job(app_id=app_id, workdir=workdir, parameters=params or {"x": "1"})], request_id=request_id,
        view=view))


def _stored_answer(harness: Any, owner_id: int, request_id: str) -> bytes:
    return harness.db.read_sync(lambda conn: conn.execute(
        select(idempotency_keys.c.response).where(idempotency_keys.c.owner_id == owner_id,
                                                  idempotency_keys.c.request_id == request_id)).scalar_one())


def _refusal(call: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


_PLANNER_STATISTICS = ("SELECT reltuples FROM pg_class", "ANALYZE")


class _Statements:
    """The statements a server's database connections run that touch jobs, apps or
    request_id records (the event fanout's reads of events are left out): those of its
    engine, and those it runs on the event loop (Database.statement_now). The planner
    statistics check (store.refresh_planner_stats) is left out too: the server runs it
    in the background once enough jobs were created since the last, which in a full run
    can fall on any create (it failed this test once the session's earlier tests had
    created enough)."""

    def __init__(self, db: Any) -> None:
        self.db = db
        self.engine = db.engine
        self.seen: list[str] = []
        self._lock = threading.Lock()

    def _before(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith(_PLANNER_STATISTICS):
            return
        if any(name in statement for name in ("jobs", "apps", "idempotency_keys")):
            with self._lock:
                self.seen.append(statement)

    def __enter__(self) -> _Statements:
        event.listen(self.engine, "before_cursor_execute", self._before)
        run = self.db.statement_now

        async def statement_now(sql: str, params: Any, **options: Any) -> Any:
            self._before(None, None, sql)
            return await run(sql, params, **options)

        self.db.statement_now = statement_now
        return self

    def __exit__(self, *_: Any) -> None:
        event.remove(self.engine, "before_cursor_execute", self._before)
        del self.db.statement_now


def test_a_create_with_a_request_id_is_one_statement(harness, alice):
    _postgres_only(harness)
    _, app = make_site_app(alice)
    stub = jobs_stub(alice)
    _create(stub, app.id, "first", "req-first")  # reads the app once into the cache
    with _Statements(harness.db) as statements:
        created = _create(stub, app.id, "second", "req-second").job
    assert len(statements.seen) == 1, statements.seen  # was 4: app, request_id, insert, request_id record
    assert created.id


@pytest.mark.parametrize("request_id", ["", "req-exact"])
def test_the_answer_is_stored_and_replayed_exactly(harness, alice, request_id):
    _, app = make_site_app(alice)
    stub = jobs_stub(alice)
    _create(stub, app.id, "warm")
    first = _create(stub, app.id, "exact", request_id, x="7")
    got = stub.GetJob(job_service_pb2.GetJobRequest(id=first.job.id)).job
    assert got == first.job  # the answer built before the id was drawn is the row as stored
    if not request_id:
        return
    assert _create(stub, app.id, "exact", request_id, x="7") == first
    stored = _stored_answer(harness, alice.user_id, request_id)
    assert job_service_pb2.CreateJobResponse.FromString(stored) == first  # the id completed by the database
    err = _refusal(lambda: _create(stub, app.id, "other", request_id, x="7"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(err) == "REQUEST_ID_REUSED"


@pytest.mark.parametrize("create", [_create, _create_one], ids=["CreateJob", "BatchCreateJobs of one"])
def test_the_same_request_sent_twice_at_once_creates_one_job(harness, alice, create):
    _, app = make_site_app(alice)
    stub = jobs_stub(alice)
    create(stub, app.id, "warm")
    answers = sent_together(lambda: create(stub, app.id, "together", "req-together"))
    assert len(answers) == 4 and all(a == answers[0] for a in answers), answers
    listed = stub.ListJobs(job_service_pb2.ListJobsRequest(filter=job_pb2.JobFilter(app_ids=[app.id]))).jobs
    assert sorted(j.workdir for j in listed) == ["together", "warm"]


def test_an_app_changed_or_deleted_through_another_replica_is_seen_by_the_next_create(harness, alice):
    _postgres_only(harness)
    _, app = make_site_app(alice)
    here = jobs_stub(alice)
    _create(here, app.id, "cached")  # this replica now holds the app row
    other = EmbeddedServer(ServerSettings(address="127.0.0.1:0", database_url=harness.url, grace_seconds=0.2))
    channel = grpc.insecure_channel(other.address)
    try:
        there = app_service_pb2_grpc.AppServiceStub(channel)
        params = [app_pb2.AppParameter(name="x", required=True, type=app_pb2.PARAMETER_TYPE_INT),
                  app_pb2.AppParameter(name="y", required=True, type=app_pb2.PARAMETER_TYPE_INT)]
        there.UpdateApp(app_service_pb2.UpdateAppRequest(app=app_pb2.App(id=app.id, parameters=params),
                                                         update_mask={"paths": ["parameters"]}),
                        metadata=alice.metadata, timeout=30)
        # y is now required (the cached row says unknown): refused, as the app is now.
        err = _refusal(lambda: _create(here, app.id, "no-y"))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs parameter 'y'" in err.details()
        # and accepted with it, though the cached row knew no y.
        assert _create(here, app.id, "with-y", x="1", y="2").job.parameters == {"x": "1", "y": "2"}
        there.DeleteApp(app_service_pb2.DeleteAppRequest(id=app.id, force=True), metadata=alice.metadata, timeout=30)
        err = _refusal(lambda: _create(here, app.id, "gone", x="1", y="2"))
        assert err.code() == grpc.StatusCode.NOT_FOUND and error_reason(err) == "REFERENCE_NOT_FOUND"
        remote = job_service_pb2_grpc.JobServiceStub(channel)
        count = remote.CountJobs(job_service_pb2.CountJobsRequest(filter=job_pb2.JobFilter(app_ids=[app.id])),
                                 metadata=alice.metadata, timeout=30)
        assert count.total == 0
    finally:
        channel.close()
        other.stop()


def _versioned_row(harness: Any, owner_id: int, app_id: int, workdir: str) -> tuple[dict, Any, str]:
    from balsam_grpc.server.services.jobs import job_spec

    app = harness.db.read_sync(app_store.read_versioned, owner_id, app_id)
    spec = job_spec(job_pb2.Job(app_id=app_id, workdir=workdir, parameters={"x": "1"}), "jobs[0]",
                    harness.server.state)
    row, data = job_store.new_job_row(owner_id, None, spec, app, utcnow())
    return row, data, app["_version"]


def _wait_until_blocked(harness: Any, what: str) -> None:
    wait_until(lambda: harness.db.read_sync(lambda conn: conn.execute(text(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE :q"),
        {"q": f"%{what}%"}).scalar_one()), "the create to wait on the other transaction", 30, interval=0.01)


def _create_in_thread(stub: Any, *args: Any) -> tuple[threading.Thread, list[Any]]:
    """CreateJob through the server (its one statement on the event loop), from a thread:
    the answer, or the RpcError it raised, in the list."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(_create(stub, *args))
        except grpc.RpcError as exc:
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def _jobs_and_events_at(harness: Any, workdir: str) -> tuple[int, int]:
    def count(conn: Any) -> tuple[int, int]:
        ids = [r.id for r in conn.execute(select(jobs.c.id).where(jobs.c.workdir == workdir))]
        n_events = conn.execute(select(func.count()).select_from(events).where(events.c.job_id.in_(ids or [0]))
                                ).scalar_one()
        return len(ids), n_events
    return harness.db.read_sync(count)


def test_an_app_deleted_while_the_statement_runs_writes_nothing(harness, alice):
    """The statement saw the app (its deletion not committed yet); the job's app check
    then waits for the deletion and fails: the statement writes nothing and the server
    takes the general path, which reports the app missing."""
    _postgres_only(harness)
    _, app = make_site_app(alice)
    stub = jobs_stub(alice)
    _create(stub, app.id, "warm")  # the app row cached: the next create takes the one statement
    with harness.db.engine.connect() as deleter:
        deleter.begin()
        app_store.delete_app(deleter, alice.user_id, app.id, force=True)
        thread, out = _create_in_thread(stub, app.id, "racing")
        _wait_until_blocked(harness, "INSERT INTO jobs")
        deleter.commit()
    thread.join(30)
    assert len(out) == 1 and isinstance(out[0], grpc.RpcError), out
    assert out[0].code() == grpc.StatusCode.NOT_FOUND and error_reason(out[0]) == "REFERENCE_NOT_FOUND"
    assert _jobs_and_events_at(harness, "racing") == (0, 0)


def test_a_request_id_taken_while_the_statement_runs_writes_nothing(harness, alice):
    """Another request with the same request_id commits first: the record's key waits for
    it and fails, and the job and event go with it; the caller then gets REQUEST_ID_REUSED."""
    _postgres_only(harness)
    _, app = make_site_app(alice)
    stub = jobs_stub(alice)
    _create(stub, app.id, "warm")
    with harness.db.engine.connect() as first:
        first.begin()
        first.execute(idempotency_keys.insert().values(owner_id=alice.user_id, method="CreateJob",
                                                        request_id="req-raced", request_hash="b" * 64,
                                                        response=b"", create_time=utcnow()))
        thread, out = _create_in_thread(stub, app.id, "second-use", "req-raced")
        _wait_until_blocked(harness, "idempotency_keys")
        first.commit()
    thread.join(30)
    assert len(out) == 1 and isinstance(out[0], grpc.RpcError), out
    assert out[0].code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(out[0]) == "REQUEST_ID_REUSED"
    assert _jobs_and_events_at(harness, "second-use") == (0, 0)


def test_a_stale_app_version_writes_nothing(harness, alice):
    _postgres_only(harness)
    _, app = make_site_app(alice)
    row, data, version = _versioned_row(harness, alice.user_id, app.id, "stale")
    with harness.db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        sql, params = job_store.at_once_statement(conn.dialect, row, data, str(int(version) + 1), None)  # type: ignore[misc]
        assert job_store.at_once_outcome(conn.exec_driver_sql(sql, params).all(), row, None) is None
    assert _jobs_and_events_at(harness, "stale") == (0, 0)


def test_the_app_cache_forgets_and_expires():
    cache = app_store.AppCache(max_age=10.0)
    by_id, by_name = cache.key(1, 5, 0, ""), cache.key(1, 0, 2, "sim")
    app = {"id": 5, "site_id": 2, "name": "sim"}
    derived = cache.put(by_id, app, now=100.0)
    cache.put(by_name, app, now=100.0)
    assert cache.get(by_id, now=105.0) == (app, derived) and cache.get(by_name, now=105.0)[0] is app
    assert cache.get(by_id, now=111.0) is None  # expired
    cache.forget(5)
    assert cache.get(by_name, now=105.0) is None


def test_a_watcher_on_the_same_replica_gets_the_creation_event(harness, alice):
    """The one-statement create does not poke this replica's fanout itself (that made it
    read the event horizon after every create): the commit's notification wakes it, as
    for another replica's commits, when a stream here is concerned."""
    from balsam_grpc.v1 import event_service_pb2, event_service_pb2_grpc

    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    _create(stub, app.id, "warm")
    watch = alice.stub(event_service_pb2_grpc.EventServiceStub).WatchEvents(
        event_service_pb2.WatchEventsRequest(filter=event_service_pb2.EventFilter(site_ids=[site.id])), timeout=30)
    next(watch)  # the starting cursor: subscribed
    created = _create(stub, app.id, "watched").job
    try:
        for response in watch:
            if any(e.job_id == created.id for e in response.events):
                break
    finally:
        watch.cancel()


def test_a_watch_opened_after_a_create_replays_it(harness, alice):
    """A create that concerned no stream left this replica's fanout behind the horizon,
    and a watch opened afterwards (replaying from the start) took that stale position as
    its end: the create's event reached it only with some later, concerned commit (the
    isolation tests timed out in CI). A new subscription makes the fanout look again."""
    from balsam_grpc.v1 import event_service_pb2, event_service_pb2_grpc

    site, app = make_site_app(alice)
    created = _create(jobs_stub(alice), app.id, "before-the-watch").job
    watch = alice.stub(event_service_pb2_grpc.EventServiceStub).WatchEvents(
        event_service_pb2.WatchEventsRequest(replay_from_start=True), timeout=20)
    try:
        seen = next(e for r in watch for e in r.events if e.job_id == created.id)
    finally:
        watch.cancel()
    assert seen.job_id == created.id


# ---------------------------------------------------------------------------- BatchCreateJobs of one job
@pytest.mark.parametrize("view", [job_service_pb2.JOB_VIEW_BASIC, job_service_pb2.JOB_VIEW_FULL])
def test_a_batch_of_one_job_is_one_statement_and_its_answer_is_replayed_exactly(harness, alice, view):
    _postgres_only(harness)
    _, app = make_site_app(alice)
    stub = jobs_stub(alice)
    _create_one(stub, app.id, "warm")  # reads the app once into the cache
    request_id = f"req-one-{view}"
    with _Statements(harness.db) as statements:
        first = _create_one(stub, app.id, "one", request_id, view, x="7")
    assert len(statements.seen) == 1, statements.seen  # was a transaction of several
    (made,) = first.jobs
    assert made.id and made.workdir == "one"
    if view == job_service_pb2.JOB_VIEW_FULL:
        assert stub.GetJob(job_service_pb2.GetJobRequest(id=made.id)).job == made
    # The answer stored by the statement, its id completed inside the one job.
    assert job_service_pb2.BatchCreateJobsResponse.FromString(_stored_answer(harness, alice.user_id, request_id)) \
        == first
    assert _create_one(stub, app.id, "one", request_id, view, x="7") == first
    err = _refusal(lambda: _create_one(stub, app.id, "other", request_id, view, x="7"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(err) == "REQUEST_ID_REUSED"
    # Two jobs: the general path, which replays the same way.
    two = job_service_pb2.BatchCreateJobsRequest(
        jobs=[job_pb2.Job(app_id=app.id, workdir=f"two/{i}", parameters={"x": "1"}) for i in range(2)],
        request_id=f"req-two-{view}", view=view)
    answer = stub.BatchCreateJobs(two)
    assert len(answer.jobs) == 2 and stub.BatchCreateJobs(two) == answer


def test_one_item_id_tag_completes_the_id_inside_the_item():
    from balsam_grpc.server.idempotency import ID_VARINT_BYTES, one_item_id_tag

    for job in (job_pb2.Job(), job_pb2.Job(workdir="w" * 300, tags={"a": "b"}, state=job_pb2.JOB_STATE_PREPROCESSED)):
        response = job_service_pb2.BatchCreateJobsResponse(jobs=[job])
        answer, tag = one_item_id_tag(response, "jobs")
        for job_id in (1, 300, 2**40 + 5, 2**63 - 1):
            varint = bytes(((job_id >> 7 * i) & 127) | (128 if i < ID_VARINT_BYTES - 1 else 0)
                           for i in range(ID_VARINT_BYTES))  # over-long, as the statement writes it
            expected = job_service_pb2.BatchCreateJobsResponse()
            expected.CopyFrom(response)
            expected.jobs[0].id = job_id
            assert job_service_pb2.BatchCreateJobsResponse.FromString(answer + tag + varint) == expected


def test_the_statement_takes_only_rows_whose_fixed_columns_it_writes_as_literals():
    # The columns every plain new job has the same value in are literals in the statement:
    # a row with another value there is refused (the caller creates the general way),
    # never written with the literal.
    from sqlalchemy.dialects import postgresql

    row = {c: None for c in job_store._JOB_COLUMNS}
    row.update(job_store._AT_ONCE_FIXED, owner_id=1, site_id=2, app_id=3, name="", workdir="w", tags={},
               parameters={}, data={}, launch_params={}, priority=0, state="READY", state_message="",
               on_parent_failure="FAIL", create_time=utcnow())
    dialect = postgresql.psycopg.dialect()
    sql, params = job_store.at_once_statement(dialect, row, None, "7", None)  # type: ignore[misc]
    assert "%(j29)s" not in sql and "CAST('[]' AS JSONB)" in sql  # parent_ids, as a literal
    assert params["owner_id"] == 1 and params["now"] == row["create_time"] and params["hint"] == "1:2"
    for column, other in (("run_count", 1), ("parent_ids", [5]), ("pending_parents", 1), ("transfers", {"a": "b"})):
        assert job_store.at_once_statement(dialect, {**row, column: other}, None, "7", None) is None, column
