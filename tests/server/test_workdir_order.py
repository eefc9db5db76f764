"""Workdirs compare byte by byte (code point order) on both databases: SQLite's BINARY
collation, and on PostgreSQL the column's COLLATE "C" (revision 0016: the unique index
on (site_id, workdir) compares with memcmp instead of the database collation's strcoll),
whatever the database's own collation is."""

from __future__ import annotations

from sqlalchemy import text

from balsam_grpc.v1 import job_pb2, job_service_pb2
from tests.support.records import jobs_stub, make_site_app

WORKDIRS = ["b", "B", "a/x", "a-x", "A", "é", "Z", "_x", "a"]


def test_list_ordered_by_workdir_is_code_point_order(alice):
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)
    stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(
        jobs=[job_pb2.Job(app_id=app.id, workdir=w, parameters={"x": "1"}) for w in WORKDIRS]))
    for order_by, expected in (("workdir", sorted(WORKDIRS)), ("-workdir", sorted(WORKDIRS, reverse=True))):
        seen, token = [], ""
        while True:  # pages of 2: the page token's comparison follows the same order
            page = stub.ListJobs(job_service_pb2.ListJobsRequest(filter=job_pb2.JobFilter(site_ids=[site.id]),
                                                                 order_by=order_by, page_size=2, page_token=token))
            seen += [j.workdir for j in page.jobs]
            token = page.next_page_token
            if not token:
                break
        assert seen == expected, order_by


def test_postgresql_workdir_collation_is_c(harness):
    if harness.backend != "postgres":
        return
    with harness.db.engine.connect() as conn:
        assert conn.execute(text(
            "SELECT collation_name FROM information_schema.columns WHERE table_schema = current_schema() "
            "AND table_name = 'jobs' AND column_name = 'workdir'")).scalar_one() == "C"
