"""PostgreSQL's plan of a ListJobs page of one state (store.jobs.select_statement): it
reads the page's own rows, not every job of the owner before them. With the state bound
as a list (`state = ANY(...)`) and no index of (owner, state, id), PostgreSQL walked the
primary key in id order and filtered: a first page read every job of the owner in other
states before the first one listed (bench_load: 13,500 rows for a page of 100 on a
50,000-job database whose first 12,000 jobs were leased)."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy import text

from balsam_grpc.server.services.jobs import FULL_COLUMNS
from balsam_grpc.server.store import jobs as store
from balsam_grpc.server.store.db import make_engine
from balsam_grpc.v1 import job_pb2, job_service_pb2

from tests.support.records import jobs_stub, make_site_app


def _scans(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan] if "Relation Name" in plan else []
    for child in plan.get("Plans", []):
        found += _scans(child)
    return found


def test_a_page_of_one_state_reads_that_state_only(harness, alice):
    if harness.backend != "postgres":
        pytest.skip("PostgreSQL's plan")
    _, app = make_site_app(alice)
    stub = jobs_stub(alice)
    made = stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[
        job_pb2.Job(app_id=app.id, workdir=f"plan/{i}", parameters={"x": "1"}, tags={"shard": str(i % 4)})
        for i in range(3000)], view=job_service_pb2.JOB_VIEW_BASIC)).jobs
    # The owner's first 2,400 jobs leave the state listed: they come first in id order.
    stub.BatchUpdateJobs(job_service_pb2.BatchUpdateJobsRequest(
        filter=job_pb2.JobFilter(ids=[j.id for j in made[:2400]]), patch=job_pb2.Job(state=job_pb2.JOB_STATE_KILLED),
        update_mask=field_mask_pb2.FieldMask(paths=["state"])))
    state = job_pb2.JobState.Name(made[-1].state).removeprefix("JOB_STATE_")
    names = tuple(c.name for c in FULL_COLUMNS)
    engine = make_engine(harness.url)
    try:
        with engine.connect() as conn:
            conn.execute(text("ANALYZE jobs"))
            for tags in ({}, {"shard": "1"}):
                q = store.JobQuery(owner_id=alice.user_id, states=[state], tags=tags)
                sql, params = store.select_statement(q, store.parse_order(""), None, 101, names)
                plan = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params).scalar()[0]["Plan"]
                (scan,) = _scans(plan)
                read = scan["Actual Rows"] + scan.get("Rows Removed by Filter", 0)
                # Not the 2,400 jobs in other states first: the state's own rows in id order
                # (up to 4 per row listed for a tag one in 4 carries), or those of the tag.
                assert read < 1000, (tags, read, scan["Node Type"], scan.get("Index Name"))
                if not tags:
                    assert scan.get("Index Name") == "ix_jobs_owner_id_state_id" and read == 101, scan
    finally:
        engine.dispose()
