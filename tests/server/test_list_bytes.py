"""ListJobs answers the bytes of the messages written plainly from the stored rows.

The servicer builds a page of jobs on fast paths (row tuples straight from the driver,
binary results on PostgreSQL, templates of shared fields copied in, maps written item
by item, the response serialized once and sent as bytes). Here the expected page is
built the slow, obvious way: each stored row read through SQLAlchemy as a dict and every
field of the view set with protobuf's own constructors. Jobs with every field set and
with none, in both views, pages cut by a page token. A map of one entry serializes one
way, so those pages must be byte-identical; maps of several entries serialize in the
map's own order (protobuf does not fix it), so those are compared as messages (and a
Struct is a map: the full job's data has one key at each level)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import field_mask_pb2, struct_pb2, timestamp_pb2
from sqlalchemy import select, update

from balsam_grpc.server.store.db import make_engine
from balsam_grpc.server.store.tables import jobs
from balsam_grpc.v1 import job_pb2, job_service_pb2

from tests.support.records import jobs_stub, make_batch_job, make_site_app

_RESOURCES = ("num_nodes", "ranks_per_node", "threads_per_rank", "threads_per_core", "gpus_per_rank",
              "node_packing_count", "wall_time_min")


def _ts(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value if value.tzinfo else value.replace(tzinfo=UTC))
    return ts


def _plain(row: dict[str, Any], view: int) -> job_pb2.Job:
    """The Job message of a stored row, every field written out."""
    state = job_pb2.JobState.Value("JOB_STATE_" + row["state"])
    if view == job_service_pb2.JOB_VIEW_BASIC:
        return job_pb2.Job(id=row["id"], state=state, workdir=row["workdir"], app_id=row["app_id"],
                           site_id=row["site_id"])
    job = job_pb2.Job(
        id=row["id"], name=row["name"], app_id=row["app_id"], site_id=row["site_id"], workdir=row["workdir"],
        tags=row["tags"], parameters=row["parameters"], parent_ids=row["parent_ids"], transfers=row["transfers"],
        resources=job_pb2.JobResources(**{n: row[n] for n in _RESOURCES}, launch_params=row["launch_params"]),
        priority=row["priority"], state=state, state_message=row["state_message"], error_tail=row["error_tail"],
        batch_job_id=row["batch_job_id"] or 0, run_count=row["run_count"],
        on_parent_failure=job_pb2.ParentFailurePolicy.Value("PARENT_FAILURE_POLICY_" + row["on_parent_failure"]),
        create_time=_ts(row["create_time"]), update_time=_ts(row["update_time"]), state_time=_ts(row["state_time"]))
    if row["data"]:
        job.data.CopyFrom(struct_pb2.Struct())
        job.data.update(row["data"])
    if row["return_code"] is not None:
        job.return_code = row["return_code"]
    if row["session_id"]:
        job.lease.session_id = row["session_id"]
        job.lease.generation = row["lease_generation"]
        if row["lease_expire_time"] is not None:
            job.lease.expire_time.CopyFrom(_ts(row["lease_expire_time"]))
    return job


def test_a_page_is_the_bytes_of_the_rows_written_plainly(harness, alice):
    site, app = make_site_app(alice)
    batch_job = make_batch_job(alice, site.id)
    stub = jobs_stub(alice)
    tag = {"page": "bytes"}
    # Created together: the same times and resources, two tags alternating (templates of
    # shared fields must not hand one job's tags to another), one tag too long to be kept
    # in a template's key.
    plain = stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[
        job_pb2.Job(app_id=app.id, workdir=f"bytes/{i}", parameters={"x": str(i)},
                    tags={"page": f"bytes-{i % 2}" if i < 6 else "long " * 200}) for i in range(7)])).jobs
    full = stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
        app_id=app.id, workdir="bytes/full/\u00fc\u4e2d", name="every field \u00e9", tags=tag, parameters={"x": "-7"},
        data={"l": [1.5, "two", None, True, {"k": {"deep": False}}]}, priority=-3,
        parent_ids=[plain[0].id, plain[1].id],
        on_parent_failure=job_pb2.PARENT_FAILURE_POLICY_IGNORE,
        resources=job_pb2.JobResources(num_nodes=1, ranks_per_node=64, threads_per_rank=2, threads_per_core=2,
                                       gpus_per_rank=4, node_packing_count=8, wall_time_min=525_600,
                                       launch_params={"cpu_bind": "depth"})))).job
    stub.UpdateJob(job_service_pb2.UpdateJobRequest(
        job=job_pb2.Job(id=full.id, state_message="a message", error_tail="the tail\nof it", return_code=-1),
        update_mask=field_mask_pb2.FieldMask(paths=["state_message", "error_tail", "return_code"])))
    zero_rc = stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
        app_id=app.id, workdir="bytes/zero", parameters={"x": "0"}, tags=tag))).job
    stub.UpdateJob(job_service_pb2.UpdateJobRequest(job=job_pb2.Job(id=zero_rc.id, return_code=0),
                                                    update_mask=field_mask_pb2.FieldMask(paths=["return_code"])))
    several = stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
        app_id=app.id, workdir="bytes/several", parameters={"x": "1"}, tags={**tag, "b": "2", "c": "3"},
        resources=job_pb2.JobResources(launch_params={"a": "1", "b": "2"})))).job
    engine = make_engine(harness.url)
    try:
        with engine.begin() as conn:  # the fields no call of a user's sets
            conn.execute(update(jobs).where(jobs.c.id == full.id).values(
                batch_job_id=batch_job.id, session_id="s" * 32, lease_generation=2**40, run_count=3,
                lease_expire_time=datetime.now(UTC) + timedelta(minutes=5),
                transfers={"input": "globus://ep/path/\u00fc"}))
        with engine.connect() as conn:
            rows = {r["id"]: dict(r) for r in conn.execute(select(jobs).where(jobs.c.owner_id == alice.user_id,
                                                                              jobs.c.site_id == site.id)).mappings()}
    finally:
        engine.dispose()
    assert rows[full.id]["return_code"] == -1 and rows[full.id]["lease_generation"] == 2**40
    one_entry = [i for i in sorted(rows) if i != several.id]
    for view in (job_service_pb2.JOB_VIEW_FULL, job_service_pb2.JOB_VIEW_BASIC):
        for page_size in (100, 3):
            got, token = [], ""
            while True:  # pages cut by the size, the next one from the page token
                page = stub.ListJobs(job_service_pb2.ListJobsRequest(
                    filter=job_pb2.JobFilter(site_ids=[site.id]), view=view, page_size=page_size, page_token=token))
                got += page.jobs
                token = page.next_page_token
                if not token:
                    break
            assert [j.id for j in got] == sorted(rows)
            by_id = {j.id: j for j in got}
            expected = job_service_pb2.ListJobsResponse(jobs=[_plain(rows[i], view) for i in one_entry])
            shown = job_service_pb2.ListJobsResponse(jobs=[by_id[i] for i in one_entry])
            assert shown == expected, view
            assert shown.SerializeToString() == expected.SerializeToString(), (view, page_size)
            assert by_id[several.id] == _plain(rows[several.id], view)
    # Every field of the full job is set (the test covers them all), the zero return code too.
    listed = {j.id: j for j in stub.ListJobs(job_service_pb2.ListJobsRequest(
        filter=job_pb2.JobFilter(site_ids=[site.id]))).jobs}
    assert {f.name for f, _ in listed[full.id].ListFields()} >= set(job_pb2.Job.DESCRIPTOR.fields_by_name) - {"app_name"}
    assert listed[zero_rc.id].HasField("return_code") and listed[zero_rc.id].return_code == 0
    assert not listed[plain[2].id].HasField("return_code") and not listed[plain[2].id].HasField("lease")
