"""ListJobs of some states in id order (store.jobs.select_statement and
sqlite_select_statement) reads the listed states' jobs only, not every older job of the
owner in another state. With the state compared by `= ANY(...)` (or `IN`) and ORDER BY
id, the primary key was an ordered plan too, and the planners took it whenever they rated
the state common: bench_load's lists (tags + state, page of 100) read ~13,500 rows for
a page, walking past the 12,000 oldest seeded jobs a session had leased.

What the statements guarantee, whatever the statistics and whatever else the shared test
database holds: on PostgreSQL the only plan that yields the order without sorting walks
ix_jobs_owner_id_state_id_site_id from (owner, state, page token); with sorting off it is
the plan taken (sorting every job of the state, which PostgreSQL may prefer when it rates
the state rare, reads none of other states either). SQLite is told the index."""

from __future__ import annotations

from typing import Any

from google.protobuf import field_mask_pb2
from sqlalchemy import text

from balsam_grpc.server.services.jobs import FULL_COLUMNS
from balsam_grpc.server.store import jobs as store
from balsam_grpc.server.store.db import make_engine
from balsam_grpc.v1 import job_pb2, job_service_pb2

from tests.support.records import jobs_stub, make_site_app

OLDER, NEWER, PAGE = 2000, 1000, 101  # jobs in another state first, then jobs of the listed state


def _owner_with_older_jobs_elsewhere(caller: Any) -> tuple[list[int], str]:
    """The caller's jobs (ids in order; tags shard i % 4): the first OLDER moved to KILLED,
    the NEWER after them in their first state, whose name is returned."""
    _, app = make_site_app(caller)
    stub = jobs_stub(caller)
    made = stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[
        job_pb2.Job(app_id=app.id, workdir=f"plan/{i}", parameters={"x": "1"}, tags={"shard": str(i % 4)})
        for i in range(OLDER + NEWER)], view=job_service_pb2.JOB_VIEW_BASIC)).jobs
    stub.BatchUpdateJobs(job_service_pb2.BatchUpdateJobsRequest(
        filter=job_pb2.JobFilter(ids=[j.id for j in made[:OLDER]]), patch=job_pb2.Job(state=job_pb2.JOB_STATE_KILLED),
        update_mask=field_mask_pb2.FieldMask(paths=["state"])))
    return [j.id for j in made], job_pb2.JobState.Name(made[-1].state).removeprefix("JOB_STATE_")


def _without_sorting(harness: Any, conn: Any) -> None:
    """PostgreSQL, this transaction: the plans that need no sort, what a LIMIT makes it
    prefer for a state it rates common (before, the primary key's walk was one)."""
    if harness.backend == "postgres":
        conn.execute(text("SET LOCAL enable_sort = off"))
        conn.execute(text("SET LOCAL enable_incremental_sort = off"))


def _rows_read(plan: dict[str, Any]) -> int:
    """Rows the plan's scans of tables read: returned, or removed by a filter or recheck."""
    read = 0
    if "Relation Name" in plan:
        read += plan["Actual Rows"] * plan["Actual Loops"] + plan.get("Rows Removed by Filter", 0) \
            + plan.get("Rows Removed by Index Recheck", 0)
    return read + sum(_rows_read(child) for child in plan.get("Plans", []))


def test_a_page_of_a_state_reads_that_states_jobs_only(harness, alice):
    ids, state = _owner_with_older_jobs_elsewhere(alice)
    names = tuple(c.name for c in FULL_COLUMNS)
    order = store.parse_order("")
    shard = {"shard": "1"}
    expected = [i for n, i in enumerate(ids) if n >= OLDER and n % 4 == 1]
    engine = make_engine(harness.url)
    try:
        with engine.connect() as conn, conn.begin():
            _without_sorting(harness, conn)
            for tags, after in (({}, None), (shard, None), (shard, [expected[PAGE - 1]])):
                q = store.JobQuery(owner_id=alice.user_id, states=[state], tags=tags)
                if harness.backend == "postgres":
                    sql, params = store.select_statement(q, order, after, PAGE, names)
                    plan = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params).scalar()[0]["Plan"]
                    rows = conn.exec_driver_sql(sql, params).all()
                    # The state's own jobs, up to 4 per job listed (one in 4 carries the tag);
                    # not the OLDER jobs in another state before them.
                    assert _rows_read(plan) <= 4 * PAGE, (tags, after, plan)
                else:
                    sql, params = store.sqlite_select_statement(q, order, after, PAGE, names)
                    steps = [r[3] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, params).all()]
                    assert steps == [f"SEARCH jobs USING INDEX ix_jobs_owner_id_state_id_site_id "
                                     f"(owner_id=? AND state=?{' AND id>?' if after else ''})"], steps
                    rows = conn.exec_driver_sql(sql, params).all()
                want = expected if tags else ids[OLDER:]
                start = want.index(after[0]) + 1 if after else 0
                assert [r[0] for r in rows] == want[start:start + PAGE]
    finally:
        engine.dispose()


def test_pages_of_several_states_either_way(alice):
    """Several states are one ordered branch each, merged: the pages follow each other in
    id order (and backwards for -id) with the same tokens as before."""
    ids, state = _owner_with_older_jobs_elsewhere(alice)
    position = {job_id: n for n, job_id in enumerate(ids)}
    stub = jobs_stub(alice)
    for order_by, want in (("", ids), ("-id", ids[::-1])):
        for states in ([state, "KILLED"], [state, "KILLED", state], ["KILLED"]):
            got, token = [], ""
            while True:
                page = stub.ListJobs(job_service_pb2.ListJobsRequest(
                    filter=job_pb2.JobFilter(states=[job_pb2.JobState.Value(f"JOB_STATE_{s}") for s in states],
                                             tags={"shard": "2"}),
                    order_by=order_by, page_size=150, page_token=token, view=job_service_pb2.JOB_VIEW_BASIC))
                got += [j.id for j in page.jobs]
                token = page.next_page_token
                if not token:
                    break
            listed = set(range(OLDER)) if states == ["KILLED"] else set(range(OLDER + NEWER))
            assert got == [i for i in want if position[i] in listed and position[i] % 4 == 2], (order_by, states)


def test_hook_work_reads_the_jobs_of_its_states_only(harness, alice):
    """The site stream's hook work (store.site_work.hook_jobs_statement): the oldest jobs
    in the hook states, not a walk past every older job of the owner in another state
    (PostgreSQL read 240,024 rows for 100 behind 300,000 finished jobs; SQLite read all the
    owner's jobs and sorted them). One state, and two merged, either way in id order."""
    from balsam_grpc.server.store import site_work

    ids, state = _owner_with_older_jobs_elsewhere(alice)
    site_id, app_id = (harness.db.read_sync(lambda c: c.exec_driver_sql(
        f"SELECT site_id, app_id FROM jobs WHERE id = {ids[-1]}").one()))
    engine = make_engine(harness.url)
    try:
        with engine.connect() as conn, conn.begin():
            _without_sorting(harness, conn)
            for per_state, want in (({state: [app_id]}, ids[OLDER:OLDER + PAGE]),
                                    ({"RUN_DONE": [app_id], state: [app_id]}, ids[OLDER:OLDER + PAGE]),
                                    ({state: [app_id], "RUN_DONE": [app_id, app_id + 1]}, ids[OLDER:OLDER + PAGE])):
                stmt = site_work.hook_jobs_statement(conn.dialect.name, alice.user_id, site_id, per_state, PAGE)
                compiled = stmt.compile(conn, compile_kwargs={"literal_binds": True})
                if harness.backend == "postgres":
                    plan = conn.exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT JSON) {compiled}").scalar()[0]["Plan"]
                    assert _rows_read(plan) <= 2 * PAGE, (per_state, plan)
                else:
                    steps = [r[3] for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}").all()]
                    reads = [s for s in steps if s.startswith(("SEARCH jobs", "SCAN jobs"))]
                    # Each branch walks the index from (owner, state); only a merged page is sorted.
                    assert reads == ["SEARCH jobs USING INDEX ix_jobs_owner_id_state_id_site_id "
                                     "(owner_id=? AND state=?)"] * len(per_state), steps
                assert [r.id for r in conn.execute(stmt)] == want
    finally:
        engine.dispose()
