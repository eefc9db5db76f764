"""CountJobs from the job_counts table (revision 0010): the counts the triggers keep stay
exact under concurrent writers, retried requests, rolled-back calls, deletes and
cascades, with compactions running among them, on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from sqlalchemy import func, select

from balsam_grpc.server.store import job_counts
from balsam_grpc.server.store.tables import job_counts as counts_table
from balsam_grpc.server.store.tables import jobs
from balsam_grpc.v1 import (
    app_service_pb2,
    app_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    site_service_pb2,
    site_service_pb2_grpc,
)
from tests.support.records import jobs_stub, make_site_app

BY_STATE_SITE = [job_service_pb2.JOB_GROUP_BY_STATE, job_service_pb2.JOB_GROUP_BY_SITE]


def truth(harness, owner_id: int) -> dict[tuple[str, int], int]:
    """(state, site) -> jobs, counted from the jobs table itself."""
    with harness.db.engine.connect() as conn:
        rows = conn.execute(select(jobs.c.state, jobs.c.site_id, func.count()).where(jobs.c.owner_id == owner_id)
                            .group_by(jobs.c.state, jobs.c.site_id)).all()
    return {(state, site): n for state, site, n in rows}


def answered(stub, **filter_fields) -> dict[tuple[str, int], int]:
    response = stub.CountJobs(job_service_pb2.CountJobsRequest(filter=job_pb2.JobFilter(**filter_fields),
                                                               group_by=BY_STATE_SITE))
    groups = {(job_pb2.JobState.Name(g.state).removeprefix("JOB_STATE_"), g.site_id): g.count for g in response.groups}
    assert response.total == sum(groups.values())
    return groups


def test_counts_stay_exact_under_concurrent_writers(harness, alice):
    stub = jobs_stub(alice)
    (site_a, app_a), (site_b, app_b) = make_site_app(alice), make_site_app(alice)
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            for round_ in range(3):
                app = app_a if (w + round_) % 2 else app_b
                tag = f"w{w}r{round_}"
                made = stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[
                    job_pb2.Job(app_id=app.id, workdir=f"{tag}/{i}", parameters={"x": "1"}, tags={"t": tag})
                    for i in range(70 if round_ == 0 else 5)])).jobs  # 70: the COPY path on PostgreSQL
                # A retried create (same request_id) answers the first result, counted once.
                once = job_service_pb2.CreateJobRequest(
                    job=job_pb2.Job(app_id=app.id, workdir=f"{tag}/once", parameters={"x": "2"}),
                    request_id=uuid.uuid4().hex)
                assert stub.CreateJob(once).job.id == stub.CreateJob(once).job.id
                # A call that fails part-way (a workdir taken) changes no count.
                with pytest.raises(grpc.RpcError) as taken:
                    stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[
                        job_pb2.Job(app_id=app.id, workdir=f"{tag}/new", parameters={"x": "1"}),
                        job_pb2.Job(app_id=app.id, workdir=f"{tag}/0", parameters={"x": "1"})]))
                assert taken.value.code() == grpc.StatusCode.ALREADY_EXISTS
                stub.BatchUpdateJobs(job_service_pb2.BatchUpdateJobsRequest(
                    filter=job_pb2.JobFilter(ids=[j.id for j in made[:3]]),
                    patch=job_pb2.Job(state=job_pb2.JOB_STATE_KILLED), update_mask={"paths": ["state"]}))
                stub.RetryJobs(job_service_pb2.RetryJobsRequest(filter=job_pb2.JobFilter(ids=[made[0].id])))
                stub.DeleteJob(job_service_pb2.DeleteJobRequest(id=made[1].id))
                # A parent deleted with cascade: its waiting child moves by its failure policy.
                parent = made[3]
                stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
                    app_id=app.id, workdir=f"{tag}/child", parameters={"x": "1"}, parent_ids=[parent.id])))
                stub.DeleteJob(job_service_pb2.DeleteJobRequest(id=parent.id, cascade=True))
                harness.db.write_sync(job_counts.compact, alice.user_id)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors[0]
    expected = truth(harness, alice.user_id)
    assert sum(expected.values()) > 200 and len({state for state, _ in expected}) >= 3
    assert answered(stub) == expected

    # Narrowed by site and by state, still from the table; a tag filter counts the jobs.
    assert answered(stub, site_ids=[site_a.id]) == {k: n for k, n in expected.items() if k[1] == site_a.id}
    assert answered(stub, states=[job_pb2.JOB_STATE_KILLED]) == {k: n for k, n in expected.items() if k[0] == "KILLED"}
    assert answered(stub, exclude_states=[job_pb2.JOB_STATE_KILLED], site_ids=[site_a.id, site_b.id]) == {
        k: n for k, n in expected.items() if k[0] != "KILLED"}
    assert answered(stub, tags={"t": "w0r0"}) == truth_of_tag(harness, alice.user_id, "w0r0")

    # Cascades: an app and a site deleted with their jobs take their counts along.
    alice.stub(app_service_pb2_grpc.AppServiceStub).DeleteApp(app_service_pb2.DeleteAppRequest(id=app_a.id, force=True))
    alice.stub(site_service_pb2_grpc.SiteServiceStub).DeleteSite(site_service_pb2.DeleteSiteRequest(id=site_b.id))
    harness.db.write_sync(job_counts.compact, alice.user_id)
    assert answered(stub) == truth(harness, alice.user_id) == {}


def truth_of_tag(harness, owner_id: int, tag: str) -> dict[tuple[str, int], int]:
    with harness.db.engine.connect() as conn:
        rows = conn.execute(select(jobs.c.state, jobs.c.site_id, jobs.c.tags).where(jobs.c.owner_id == owner_id)).all()
    out: dict[tuple[str, int], int] = {}
    for state, site, tags in rows:
        if tags.get("t") == tag:
            out[(state, site)] = out.get((state, site), 0) + 1
    return out


def test_compaction_folds_rows_and_keeps_the_sums(harness, alice):
    """PostgreSQL writes a row per transaction and group; a read that meets many asks for
    a compaction, after which the owner has one row per group."""
    stub = jobs_stub(alice)
    _, app = make_site_app(alice)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: stub.CreateJob(job_service_pb2.CreateJobRequest(
            job=job_pb2.Job(app_id=app.id, workdir=f"c/{i}", parameters={"x": "1"}))), range(job_counts.COMPACT_AFTER_ROWS + 10)))
    before = answered(stub)
    assert sum(before.values()) == job_counts.COMPACT_AFTER_ROWS + 10
    harness.db.write_sync(job_counts.compact, alice.user_id)
    with harness.db.engine.connect() as conn:
        rows = conn.execute(select(counts_table.c.state).where(
            counts_table.c.owner_id == alice.user_id)).all()
    assert len(rows) == len(before)
    assert answered(stub) == before == truth(harness, alice.user_id)
