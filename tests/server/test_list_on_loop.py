"""ListJobs, GetJob, UpdateJob and CountJobs on PostgreSQL run one statement on the event loop
(store.jobs.select_statement, Database.statement_now) instead of SQLAlchemy on a database
thread (store.jobs.list_job_tuples); on SQLite ListJobs, GetJob and UpdateJob run one
statement straight on the driver (store.jobs.sqlite_select_statement,
Database.sqlite_statement). Both must select and return the same rows for every filter,
order and page."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import pytest
from google.protobuf import field_mask_pb2

from balsam_grpc.server.convert import utcnow
from balsam_grpc.server.services.jobs import BASIC_COLUMNS, FULL_COLUMNS, tuples_to_messages
from balsam_grpc.server.store import job_counts
from balsam_grpc.server.store import jobs as store
from balsam_grpc.server.store.codec import loads
from balsam_grpc.server.store.db import Database
from balsam_grpc.v1 import app_pb2, app_service_pb2, app_service_pb2_grpc, job_pb2, job_service_pb2

from tests.support.records import jobs_stub, make_site_app


# An app name that array literals must quote and escape (store.jobs binds lists as them).
ODD_APP = 'od"d, {a}\\ b'


def _queries(owner_id: int, site_id: int, app_id: int, ids: list[int], parent: int) -> list[store.JobQuery]:
    now = utcnow()
    q = lambda **kw: store.JobQuery(owner_id=owner_id, **kw)  # noqa: E731
    return [
        q(), q(site_scope=site_id), q(site_scope=site_id + 1_000_000), q(ids=ids[:3]), q(ids=[ids[0], 2**62]),
        q(states=["KILLED"]), q(states=["KILLED", "PREPROCESSED", "STAGED_IN", "READY", "CREATED", "AWAITING_PARENTS"]),
        q(exclude_states=["KILLED"]), q(tags={"even": "1"}), q(tags={"even": "1", "k": "v3"}),
        q(tags={"w.e:i/r-d": "x"}), q(exclude_tags={"even": "1"}), q(exclude_tags={"even": "1", "k": "v2"}),
        q(app_ids=[app_id]), q(app_ids=[app_id + 1_000_000]), q(app_names=["sim"]), q(app_names=["nope"]),
        q(app_names=[ODD_APP]), q(app_names=["sim", ODD_APP]), q(states=["KILLED", 'x"{,}\\']),
        q(site_ids=[site_id]), q(parent_ids=[parent]), q(workdir_contains="a%b"), q(workdir_contains="a_b"),
        q(workdir_contains="w\\x"), q(workdir_contains="/"),
        q(create_start=now - timedelta(hours=1)), q(create_end=now - timedelta(hours=1)),
        q(update_start=now - timedelta(hours=1), update_end=now + timedelta(hours=1)),
        q(batch_job_ids=[1]), q(session_id="none"),
        q(states=["CREATED", "KILLED"], tags={"even": "0"}, site_ids=[site_id], exclude_tags={"k": "v1"}),
    ]


_EMPTY = {"tags": {}, "parameters": {}, "data": {}, "transfers": {}, "launch_params": {}, "parent_ids": []}
ORDERS = ["", "-id", "workdir", "-create_time,workdir", "priority,-state_time", "update_time"]


def _stored(name: str, value: Any) -> Any:
    """A value as SQLAlchemy reads it: SQLite's driver-level statement gives times as
    stored text (convert.shared_timestamp reads them), both statements the tags as their
    JSON text (the servicer's template key)."""
    if isinstance(value, str) and name == "tags":
        return loads(value)
    return datetime.fromisoformat(value) if isinstance(value, str) and name.endswith("_time") else value


def test_the_statement_without_sqlalchemy_reads_what_sqlalchemy_reads(harness, alice):
    _, app = make_site_app(alice)
    stub = jobs_stub(alice)
    workdirs = ["a%b", "a_b", "axb", "w\\x", 'q"z', *[f"d/{i}" for i in range(20)]]
    created = stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[
        job_pb2.Job(app_id=app.id, workdir=w, priority=i % 3, parameters={"x": "1"}, tags={"even": str(i % 2), "k": f"v{i % 4}",
                                                                    **({"w.e:i/r-d": "x"} if i == 3 else {})},
                    **({"data": {"n": i}, "resources": job_pb2.JobResources(launch_params={"b": "c"})} if i % 5 == 0
                       else {}))
        for i, w in enumerate(workdirs)])).jobs
    ids = [j.id for j in created]
    odd = alice.stub(app_service_pb2_grpc.AppServiceStub).CreateApp(app_service_pb2.CreateAppRequest(
        app=app_pb2.App(site_id=app.site_id, name=ODD_APP, command_template="echo hi"))).app
    stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(app_id=odd.id, workdir="odd/1")))
    child = stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
        app_id=app.id, workdir="child", parameters={"x": "1"}, parent_ids=ids[:2]))).job
    stub.BatchUpdateJobs(job_service_pb2.BatchUpdateJobsRequest(
        filter=job_pb2.JobFilter(ids=ids[::3]), patch=job_pb2.Job(state=job_pb2.JOB_STATE_KILLED),
        update_mask=field_mask_pb2.FieldMask(paths=["state"])))
    db = Database(harness.url, workers=1)
    compared = 0

    async def on_loop(q: store.JobQuery, order: Any, after: Any, limit: int, names: tuple[str, ...]) -> list[Any]:
        if harness.backend == "postgres":
            return await db.statement_now(*store.select_statement(q, order, after, limit, names))
        rows = await db.sqlite_statement(*store.sqlite_select_statement(q, order, after, limit, names))
        return store.sqlite_rows(names, rows)

    async def scenario() -> None:
        nonlocal compared
        for q in _queries(alice.user_id, app.site_id, app.id, ids, ids[0]):
            for order_by in ORDERS:
                order = store.parse_order(order_by)
                for view_columns in (FULL_COLUMNS, BASIC_COLUMNS):
                    columns = tuple({c.name: c for c in (*view_columns,
                                                         *(store.ORDER_COLUMNS[n] for n, _ in order))}.values())
                    names = tuple(c.name for c in columns)
                    after = None
                    while True:  # page through, 4 rows a page, following the keys of each last row
                        with db.engine.connect() as conn:
                            keys, expected = store.list_job_tuples(conn, q, order, after, 4, columns, True)
                        got = await on_loop(q, order, after, 4, names)
                        assert keys == names
                        # An empty JSON column comes as None (no loader call), shown alike.
                        assert [tuple(_EMPTY.get(n, {}) if v is None and n in _EMPTY else _stored(n, v)
                                      for n, v in zip(names, r, strict=True)) for r in got] \
                            == [tuple(r) for r in expected], (q, order_by, after)
                        view = job_service_pb2.JOB_VIEW_FULL if view_columns is FULL_COLUMNS \
                            else job_service_pb2.JOB_VIEW_BASIC
                        shown, wanted = job_service_pb2.ListJobsResponse(), job_service_pb2.ListJobsResponse()
                        tuples_to_messages(names, got, view, shown.jobs)
                        tuples_to_messages(keys, expected, view, wanted.jobs)
                        assert shown == wanted
                        compared += len(got)
                        if len(got) < 4:
                            break
                        after = store.page_keys_of_tuple(keys, got[-1], order)

    try:
        asyncio.run(scenario())
    finally:
        db.dispose()
    assert compared > 500
    assert child.id


def test_get_job_on_the_loop_answers_as_before(harness, alice, bob):
    _, app = make_site_app(alice)
    stub = jobs_stub(alice)
    job = stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
        app_id=app.id, workdir="get/1", parameters={"x": "1"}, tags={"a": "b"}, data={"x": [1, 2]}))).job
    assert stub.GetJob(job_service_pb2.GetJobRequest(id=job.id)) == job_service_pb2.GetJobResponse(job=job)
    import grpc

    with pytest.raises(grpc.RpcError) as err:
        jobs_stub(bob).GetJob(job_service_pb2.GetJobRequest(id=job.id))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        stub.GetJob(job_service_pb2.GetJobRequest(id=2**62))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_update_job_of_plain_fields_answers_the_job_as_stored(harness, alice, bob):
    import grpc

    _, app = make_site_app(alice)
    stub = jobs_stub(alice)
    job = stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
        app_id=app.id, workdir="upd/1", parameters={"x": "1"}, tags={"a": "b"}))).job
    patch = job_pb2.Job(id=job.id, name="renamed", tags={"c": "d"}, data={"k": [1, "two"]}, priority=7,
                        error_tail="tail", state_message="note",
                        resources=job_pb2.JobResources(num_nodes=2, launch_params={"cpu_bind": "depth"}))
    paths = ["name", "tags", "data", "priority", "error_tail", "state_message", "resources", "return_code"]
    updated = stub.UpdateJob(job_service_pb2.UpdateJobRequest(
        job=patch, update_mask=field_mask_pb2.FieldMask(paths=paths))).job
    assert updated == stub.GetJob(job_service_pb2.GetJobRequest(id=job.id)).job
    assert (updated.name, dict(updated.tags), updated.priority, updated.resources.num_nodes) == ("renamed", {"c": "d"},
                                                                                                   7, 2)
    assert dict(updated.resources.launch_params) == {"cpu_bind": "depth"} and not updated.HasField("return_code")
    assert updated.update_time.ToDatetime() > job.update_time.ToDatetime()
    for caller, job_id in ((bob, job.id), (alice, 2**62)):  # another owner's job, a job that does not exist
        with pytest.raises(grpc.RpcError) as err:
            jobs_stub(caller).UpdateJob(job_service_pb2.UpdateJobRequest(
                job=job_pb2.Job(id=job_id, name="x"), update_mask=field_mask_pb2.FieldMask(paths=["name"])))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert stub.GetJob(job_service_pb2.GetJobRequest(id=job.id)).job.name == "renamed"


def test_counts_from_job_counts_are_those_of_the_jobs(harness, alice):
    (site_a, app_a), (site_b, app_b) = make_site_app(alice), make_site_app(alice)
    stub = jobs_stub(alice)
    for app, n in ((app_a, 5), (app_b, 3)):
        made = stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[
            job_pb2.Job(app_id=app.id, workdir=f"count/{i}", parameters={"x": "1"}) for i in range(n)])).jobs
        stub.BatchUpdateJobs(job_service_pb2.BatchUpdateJobsRequest(
            filter=job_pb2.JobFilter(ids=[made[0].id]), patch=job_pb2.Job(state=job_pb2.JOB_STATE_KILLED),
            update_mask=field_mask_pb2.FieldMask(paths=["state"])))
    db = Database(harness.url, workers=1)
    q = lambda **kw: store.JobQuery(owner_id=alice.user_id, **kw)  # noqa: E731
    queries = [q(), q(site_scope=site_a.id), q(site_ids=[site_a.id, site_b.id]), q(site_ids=[site_b.id]),
               q(states=["KILLED"]), q(exclude_states=["KILLED"]), q(states=["KILLED", "STAGED_IN"], site_ids=[site_b.id]),
               q(site_scope=site_b.id, exclude_states=["KILLED"]), q(states=["RUNNING"])]
    groupings: list[list[str]] = [[], ["state"], ["site"], ["state", "site"], ["site", "state"]]

    async def scenario() -> int:
        compared = 0
        for query in queries:
            for group_by in groupings:
                with db.engine.connect() as conn:
                    expected = store.count_jobs(conn, query, group_by)
                if harness.backend == "postgres":
                    rows = await db.statement_now(*job_counts.count_statement(query, group_by, "postgresql"))
                else:
                    rows = await db.sqlite_statement(*job_counts.count_statement(query, group_by, "sqlite"))
                assert job_counts.count_outcome(rows, group_by)[:2] == expected, (query, group_by)
                compared += expected[0]
        return compared

    try:
        assert asyncio.run(scenario()) > 100
    finally:
        db.dispose()
