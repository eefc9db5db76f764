"""SiteService.Connect, the site daemon's work stream, through the generated stubs on
SQLite and PostgreSQL (contract: notes/site_stream.md).

A test client (tests/support/site_stream.py) plays the daemon: it sends SiteHello, takes
WorkItems, answers with WorkResults and checks what the server pushes and what the other
services then show.
"""

from __future__ import annotations

import itertools
import secrets
import statistics
import time
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2, struct_pb2

from balsam_grpc.v1 import (
    app_pb2,
    batch_job_pb2,
    batch_job_service_pb2,
    batch_job_service_pb2_grpc,
    event_service_pb2,
    event_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    site_pb2,
    site_service_pb2,
    site_service_pb2_grpc,
)
from tests.support.leases import move
from tests.support.records import get_job, get_site, make_app, make_batch_job, make_jobs, make_site
from tests.support.site_stream import SiteClient, kinds_scanned
from tests.support.waiting import wait_until

pb = site_service_pb2
BJ = batch_job_pb2
JS = job_pb2
Code = grpc.StatusCode


@pytest.fixture
def clients() -> Any:
    opened: list[SiteClient] = []
    yield opened
    for c in opened:
        c.close()


def _get_batch_job(caller: Any, bj_id: int) -> BJ.BatchJob:
    stub = caller.stub(batch_job_service_pb2_grpc.BatchJobServiceStub)
    return stub.GetBatchJob(batch_job_service_pb2.GetBatchJobRequest(id=bj_id)).batch_job


def _connect(caller: Any, site_id: int, clients: list[SiteClient], **kw: Any) -> SiteClient:
    client = SiteClient(caller, site_id, **kw)
    clients.append(client)
    return client


def _job_events(caller: Any, job_id: int) -> list[Any]:
    stub = caller.stub(event_service_pb2_grpc.EventServiceStub)
    return list(stub.ListEvents(event_service_pb2.ListEventsRequest(
        filter=event_service_pb2.EventFilter(job_ids=[job_id]))).events)


# ---------------------------------------------------------------------------- tests

def test_welcome_backlog_and_liveness(alice: Any, clients: list[SiteClient]) -> None:
    site = make_site(alice)
    app = make_app(alice, site.id)
    make_jobs(alice, app, 3, resources=JS.JobResources(num_nodes=2, wall_time_min=20))
    make_jobs(alice, app, 2, resources=JS.JobResources(num_nodes=1, node_packing_count=4, wall_time_min=5))
    client = _connect(alice, site.id, clients)
    welcome = client.welcome()
    assert welcome.site.id == site.id and welcome.server_version
    assert welcome.site.liveness.connected and welcome.site.liveness.daemon_hostname == "login1"
    backlog = client.next("backlog")
    assert backlog.runnable_jobs == 5
    assert backlog.runnable_node_footprint == pytest.approx(3 * 2 + 2 * 0.25)
    assert backlog.max_job_nodes == 2 and backlog.max_wall_time_min == 20
    assert backlog.pending_jobs == 0 and backlog.running_jobs == 0
    # The backlog follows the jobs: one more runnable job, one running.
    new = make_jobs(alice, app, 1)[0]
    wait_until(lambda: client.next("backlog").runnable_jobs == 6, "backlog with 6 runnable jobs")
    move(alice, new.id, JS.JOB_STATE_RUNNING)
    wait_until(lambda: client.next("backlog").running_jobs == 1, "backlog with a running job")
    # A snapshot is stored on the site; liveness is visible through GetSite and ListSites.
    snap = site_pb2.SchedulerSnapshot(queues=[site_pb2.QueueStatus(queue="debug", idle_nodes=3, total_nodes=4)],
                                      backfill_windows=[site_pb2.BackfillWindow(queue="debug", num_nodes=3,
                                                                                wall_time_min=45)])
    snap.time.GetCurrentTime()
    client.send(snapshot=snap)
    client.barrier()
    got = get_site(alice, site.id)
    assert got.liveness.connected and got.liveness.daemon_version == "test"
    assert got.scheduler_snapshot.backfill_windows[0].wall_time_min == 45
    sites = alice.stub(site_service_pb2_grpc.SiteServiceStub)
    listed = sites.ListSites(pb.ListSitesRequest(filter=pb.SiteFilter(ids=[site.id], connected=True))).sites
    assert [s.id for s in listed] == [site.id]
    client.close()
    wait_until(lambda: not get_site(alice, site.id).liveness.connected, "site marked disconnected")


def test_pending_batch_job_is_pushed_at_once(alice: Any, clients: list[SiteClient], harness: Any) -> None:
    site = make_site(alice)
    client = _connect(alice, site.id, clients)
    client.welcome()
    client.barrier()
    latencies = []
    for _ in range(10):
        start = time.perf_counter()
        bj = make_batch_job(alice, site.id)
        item = client.next("work")
        latencies.append((time.perf_counter() - start) * 1000)
        assert item.id == f"submit:{bj.id}" and item.attempt == 0
        assert item.submit_batch_job.batch_job.id == bj.id
        assert item.submit_batch_job.batch_job.state == BJ.BATCH_JOB_STATE_PENDING_SUBMISSION
        client.send(credit=pb.SiteCredit(items=1))
    print(f"\n[{harness.backend}] CreateBatchJob -> SubmitBatchJob at the site: median "
          f"{statistics.median(latencies):.1f} ms, max {max(latencies):.1f} ms (n={len(latencies)}, includes the "
          "CreateBatchJob round trip)")


def test_batch_job_results_update_the_batch_job(alice: Any, clients: list[SiteClient]) -> None:
    site = make_site(alice)
    ok, bad = make_batch_job(alice, site.id), make_batch_job(alice, site.id)
    client = _connect(alice, site.id, clients)
    client.welcome()
    items = {client.next("work").id for _ in range(2)}
    assert items == {f"submit:{ok.id}", f"submit:{bad.id}"}
    ack = client.result(work_id=f"submit:{ok.id}", batch_job=pb.BatchJobUpdate(
        batch_job_id=ok.id, state=BJ.BATCH_JOB_STATE_QUEUED, scheduler_id="4242"))
    assert list(ack.work_ids) == [f"submit:{ok.id}"] and not ack.errors
    got = _get_batch_job(alice, ok.id)
    assert got.state == BJ.BATCH_JOB_STATE_QUEUED and got.scheduler_id == "4242"
    # The same result again (resent after a reconnect): acknowledged, applied once.
    ack = client.result(work_id=f"submit:{ok.id}", batch_job=pb.BatchJobUpdate(
        batch_job_id=ok.id, state=BJ.BATCH_JOB_STATE_QUEUED, scheduler_id="4242"))
    assert list(ack.work_ids) == [f"submit:{ok.id}"] and not ack.errors
    # Unsolicited scheduler state changes: running (start time), finished (end time).
    ack = client.result(batch_job=pb.BatchJobUpdate(batch_job_id=ok.id, state=BJ.BATCH_JOB_STATE_RUNNING))
    assert not ack.errors
    got = _get_batch_job(alice, ok.id)
    assert got.state == BJ.BATCH_JOB_STATE_RUNNING and got.HasField("start_time") and not got.HasField("end_time")
    # A late, older report changes nothing and is no error.
    ack = client.result(batch_job=pb.BatchJobUpdate(batch_job_id=ok.id, state=BJ.BATCH_JOB_STATE_QUEUED))
    assert not ack.errors and _get_batch_job(alice, ok.id).state == BJ.BATCH_JOB_STATE_RUNNING
    client.result(batch_job=pb.BatchJobUpdate(batch_job_id=ok.id, state=BJ.BATCH_JOB_STATE_FINISHED))
    got = _get_batch_job(alice, ok.id)
    assert got.state == BJ.BATCH_JOB_STATE_FINISHED and got.HasField("end_time")
    assert got.end_time.ToDatetime() >= got.start_time.ToDatetime()
    # The daemon may not move a finished batch job back, nor set user states.
    ack = client.result(batch_job=pb.BatchJobUpdate(batch_job_id=ok.id, state=BJ.BATCH_JOB_STATE_PENDING_DELETION))
    assert ack.errors and "cannot set state PENDING_DELETION" in ack.errors[0]
    # Submit errors are visible to the user.
    ack = client.result(work_id=f"submit:{bad.id}", batch_job=pb.BatchJobUpdate(
        batch_job_id=bad.id, state=BJ.BATCH_JOB_STATE_SUBMIT_FAILED,
        status_info="sbatch: error: invalid partition specified: nope"))
    assert list(ack.work_ids) == [f"submit:{bad.id}"] and not ack.errors
    got = _get_batch_job(alice, bad.id)
    assert got.state == BJ.BATCH_JOB_STATE_SUBMIT_FAILED and "invalid partition" in got.status_info
    # Each state change is an event.
    stub = alice.stub(event_service_pb2_grpc.EventServiceStub)
    evs = stub.ListEvents(event_service_pb2.ListEventsRequest(
        filter=event_service_pb2.EventFilter(batch_job_ids=[ok.id]))).events
    assert [e.batch_job_state.to_state for e in evs] == [
        BJ.BATCH_JOB_STATE_PENDING_SUBMISSION, BJ.BATCH_JOB_STATE_QUEUED, BJ.BATCH_JOB_STATE_RUNNING,
        BJ.BATCH_JOB_STATE_FINISHED]


def _queued_then_pending_deletion(alice: Any, clients: list[SiteClient],
                                  scheduler_id: str) -> tuple[SiteClient, BJ.BatchJob]:
    """A batch job the daemon submitted (QUEUED as `scheduler_id`) that its user then
    asked to delete."""
    site = make_site(alice)
    bj = make_batch_job(alice, site.id)
    client = _connect(alice, site.id, clients)
    client.welcome()
    assert client.next("work").id == f"submit:{bj.id}"
    client.result(work_id=f"submit:{bj.id}", batch_job=pb.BatchJobUpdate(
        batch_job_id=bj.id, state=BJ.BATCH_JOB_STATE_QUEUED, scheduler_id=scheduler_id))
    alice.stub(batch_job_service_pb2_grpc.BatchJobServiceStub).UpdateBatchJob(
        batch_job_service_pb2.UpdateBatchJobRequest(
            batch_job=BJ.BatchJob(id=bj.id, state=BJ.BATCH_JOB_STATE_PENDING_DELETION),
            update_mask=field_mask_pb2.FieldMask(paths=["state"])))
    return client, bj


def test_cancel_work_for_pending_deletion(alice: Any, clients: list[SiteClient]) -> None:
    client, bj = _queued_then_pending_deletion(alice, clients, "77")
    item = client.next("work")
    assert item.id == f"cancel:{bj.id}" and item.cancel_batch_job.batch_job.scheduler_id == "77"
    ack = client.result(work_id=item.id, batch_job=pb.BatchJobUpdate(batch_job_id=bj.id,
                                                                     state=BJ.BATCH_JOB_STATE_FINISHED))
    assert list(ack.work_ids) == [item.id] and not ack.errors
    assert _get_batch_job(alice, bj.id).state == BJ.BATCH_JOB_STATE_FINISHED


def test_running_report_for_a_batch_job_pending_deletion_is_acknowledged_as_refused(
        alice: Any, clients: list[SiteClient]) -> None:
    client, bj = _queued_then_pending_deletion(alice, clients, "78")
    ack = client.result(batch_job=pb.BatchJobUpdate(batch_job_id=bj.id, state=BJ.BATCH_JOB_STATE_RUNNING))
    assert len(ack.errors) == 1 and "is PENDING_DELETION" in ack.errors[0] and "RUNNING" in ack.errors[0]
    got = _get_batch_job(alice, bj.id)
    assert got.state == BJ.BATCH_JOB_STATE_PENDING_DELETION and got.HasField("start_time")  # times recorded


def test_postprocess_hook_work_and_result(alice: Any, clients: list[SiteClient]) -> None:
    site = make_site(alice)
    app = make_app(alice, site.id, hooks=app_pb2.AppHooks(postprocess=True))
    job = make_jobs(alice, app, 1)[0]
    client = _connect(alice, site.id, clients)
    client.welcome()
    work, _ = client.barrier()
    assert work == []  # PREPROCESSED: nothing for the site to do
    move(alice, job.id, JS.JOB_STATE_RUNNING, JS.JOB_STATE_RUN_DONE)
    item = client.next("work")
    assert item.id == f"hook:{job.id}:RUN_DONE:1"
    assert item.run_hook.hook == pb.HOOK_KIND_POSTPROCESS
    assert item.run_hook.job.id == job.id and item.run_hook.app.id == app.id and item.run_hook.app.hooks.postprocess
    client.send(ack=pb.WorkAck(work_ids=[item.id]))
    data = struct_pb2.Struct()
    data.update({"energy": -1.5})
    ack = client.result(work_id=item.id, hook=pb.HookResult(
        job_id=job.id, hook=pb.HOOK_KIND_POSTPROCESS, job_changes=JS.Job(data=data, tags={"checked": "yes"}),
        job_mask=field_mask_pb2.FieldMask(paths=["data", "tags"])))
    assert list(ack.work_ids) == [item.id] and not ack.errors
    got = get_job(alice, job.id)
    assert got.state == JS.JOB_STATE_JOB_FINISHED  # POSTPROCESSED, then no stage-out: finished
    assert got.data["energy"] == -1.5 and got.tags["checked"] == "yes"


def test_hook_creates_jobs_and_fails_with_traceback(alice: Any, clients: list[SiteClient]) -> None:
    site = make_site(alice)
    app = make_app(alice, site.id, hooks=app_pb2.AppHooks(preprocess=True))
    parent, doomed = make_jobs(alice, app, 2)
    assert parent.state == JS.JOB_STATE_STAGED_IN  # waits for its preprocess hook
    client = _connect(alice, site.id, clients)
    client.welcome()
    items = {client.next("work").id for _ in range(2)}
    assert items == {f"hook:{parent.id}:STAGED_IN:0", f"hook:{doomed.id}:STAGED_IN:0"}
    children = [JS.Job(app_id=app.id, workdir=f"child/{i}-{secrets.token_hex(3)}", parent_ids=[parent.id])
                for i in range(2)]
    ack = client.result(work_id=f"hook:{parent.id}:STAGED_IN:0", hook=pb.HookResult(
        job_id=parent.id, hook=pb.HOOK_KIND_PREPROCESS, new_jobs=children))
    assert not ack.errors, ack.errors
    assert get_job(alice, parent.id).state == JS.JOB_STATE_PREPROCESSED
    stub = alice.stub(job_service_pb2_grpc.JobServiceStub)
    kids = stub.ListJobs(job_service_pb2.ListJobsRequest(filter=JS.JobFilter(parent_ids=[parent.id]))).jobs
    assert len(kids) == 2 and all(k.state == JS.JOB_STATE_AWAITING_PARENTS for k in kids)
    trace = 'Traceback (most recent call last):\n  File "apps.py", line 3\nValueError: bad input'
    ack = client.result(work_id=f"hook:{doomed.id}:STAGED_IN:0", hook=pb.HookResult(
        job_id=doomed.id, hook=pb.HOOK_KIND_PREPROCESS, next_state=JS.JOB_STATE_FAILED, state_message=trace))
    assert not ack.errors
    got = get_job(alice, doomed.id)
    assert got.state == JS.JOB_STATE_FAILED and "ValueError: bad input" in got.state_message
    assert "ValueError" in _job_events(alice, doomed.id)[-1].message


def test_refused_hook_result_fails_the_job(alice: Any, clients: list[SiteClient]) -> None:
    site = make_site(alice)
    app = make_app(alice, site.id, hooks=app_pb2.AppHooks(handle_error=True))
    job = make_jobs(alice, app, 1)[0]
    client = _connect(alice, site.id, clients)
    client.welcome()
    move(alice, job.id, JS.JOB_STATE_RUNNING, JS.JOB_STATE_RUN_ERROR)
    item = client.next("work")
    assert item.id == f"hook:{job.id}:RUN_ERROR:1" and item.run_hook.hook == pb.HOOK_KIND_HANDLE_ERROR
    ack = client.result(work_id=item.id, hook=pb.HookResult(job_id=job.id, next_state=JS.JOB_STATE_JOB_FINISHED))
    assert list(ack.work_ids) == [item.id]
    assert ack.errors and "JOB_FINISHED" in ack.errors[0]
    got = get_job(alice, job.id)
    assert got.state == JS.JOB_STATE_FAILED and "RUN_ERROR to JOB_FINISHED" in got.state_message


def test_duplicate_result_is_applied_once(alice: Any, clients: list[SiteClient]) -> None:
    site = make_site(alice)
    app = make_app(alice, site.id, hooks=app_pb2.AppHooks(handle_timeout=True))
    job = make_jobs(alice, app, 1)[0]
    client = _connect(alice, site.id, clients)
    client.welcome()
    move(alice, job.id, JS.JOB_STATE_RUNNING, JS.JOB_STATE_RUN_TIMEOUT)
    item = client.next("work")
    result = pb.HookResult(job_id=job.id, hook=pb.HOOK_KIND_HANDLE_TIMEOUT,
                           new_jobs=[JS.Job(app_id=app.id, workdir=f"retry/{secrets.token_hex(3)}")])
    first = client.result(work_id=item.id, hook=result)
    second = client.result(work_id=item.id, hook=result)
    assert list(first.work_ids) == list(second.work_ids) == [item.id]
    assert not first.errors and not second.errors  # the repeat is acknowledged as already applied
    assert get_job(alice, job.id).state == JS.JOB_STATE_RESTART_READY
    restarts = [e for e in _job_events(alice, job.id) if e.job_state.to_state == JS.JOB_STATE_RESTART_READY]
    assert len(restarts) == 1
    stub = alice.stub(job_service_pb2_grpc.JobServiceStub)
    count = stub.CountJobs(job_service_pb2.CountJobsRequest(filter=JS.JobFilter(app_ids=[app.id]))).total
    assert count == 2  # the hook's new job was created once


def test_reconnect_offers_unresolved_work_again(alice: Any, clients: list[SiteClient]) -> None:
    site = make_site(alice)
    bjs = [make_batch_job(alice, site.id) for _ in range(3)]
    first = _connect(alice, site.id, clients)
    first.welcome()
    ids = {first.next("work").id for _ in bjs}
    assert ids == {f"submit:{b.id}" for b in bjs}
    first.send(ack=pb.WorkAck(work_ids=sorted(ids)))
    first.result(work_id=f"submit:{bjs[0].id}", batch_job=pb.BatchJobUpdate(
        batch_job_id=bjs[0].id, state=BJ.BATCH_JOB_STATE_QUEUED, scheduler_id="1"))
    first.close()
    second = _connect(alice, site.id, clients)
    second.welcome()
    again = [second.next("work") for _ in range(2)]
    assert {w.id for w in again} == {f"submit:{bjs[1].id}", f"submit:{bjs[2].id}"}
    assert all(w.attempt >= 1 for w in again)
    extra, _ = second.barrier()
    assert extra == []  # the resolved one is not offered again


def test_credit_limits_outstanding_work(alice: Any, clients: list[SiteClient]) -> None:
    site = make_site(alice)
    bjs = [make_batch_job(alice, site.id) for _ in range(5)]
    client = _connect(alice, site.id, clients, max_in_flight=2)
    client.welcome()
    sent, _ = client.barrier()
    assert len(sent) == 2
    more = make_batch_job(alice, site.id)  # new work while the daemon has no credit left
    sent, _ = client.barrier()
    assert sent == []
    client.send(credit=pb.SiteCredit(items=1))
    sent, _ = client.barrier()
    assert len(sent) == 1
    client.send(credit=pb.SiteCredit(items=10))
    sent, _ = client.barrier()
    assert len(sent) == 3
    offered = [w.id for w in client.work]
    assert sorted(offered) == sorted(f"submit:{b.id}" for b in [*bjs, more])
    assert len(set(offered)) == len(offered)  # nothing offered twice on one stream


def test_daemon_without_credit_gets_nothing(alice: Any, clients: list[SiteClient]) -> None:
    site = make_site(alice)
    make_batch_job(alice, site.id)
    client = _connect(alice, site.id, clients, max_in_flight=0)
    client.welcome()
    sent, _ = client.barrier()
    assert sent == []


def test_second_connection_replaces_the_first(alice: Any, clients: list[SiteClient]) -> None:
    site = make_site(alice)
    old = _connect(alice, site.id, clients)
    old.welcome()
    new = _connect(alice, site.id, clients)
    new.welcome()
    err = old.ended()
    assert err is not None and err.code() == Code.ABORTED and "replaced by a newer connection" in err.details()
    new.barrier()  # the new stream is alive
    assert get_site(alice, site.id).liveness.connected


def test_hello_is_validated(alice: Any, bob: Any, harness: Any, clients: list[SiteClient]) -> None:
    mine, other = make_site(alice), make_site(alice)
    token = harness.user(alice.username, scope="SITE", site_id=mine.id).token
    client = _connect(alice, other.id, clients, token=token)
    err = client.ended()
    assert err is not None and err.code() == Code.PERMISSION_DENIED
    assert not get_site(alice, other.id).liveness.connected
    # The site token works for its own site.
    ok = _connect(alice, mine.id, clients, token=token)
    assert ok.welcome().site.id == mine.id
    # Another user's site does not exist for the caller.
    err = _connect(bob, mine.id, clients).ended()
    assert err is not None and err.code() == Code.NOT_FOUND
    err = _connect(alice, mine.id, clients, capabilities=("batch_jobs", "teleport")).ended()
    assert err is not None and err.code() == Code.INVALID_ARGUMENT and "teleport" in err.details()
    err = _connect(alice, mine.id, clients, max_in_flight=-1).ended()
    assert err is not None and err.code() == Code.INVALID_ARGUMENT


def test_only_declared_capabilities_get_work(alice: Any, clients: list[SiteClient]) -> None:
    site = make_site(alice)
    app = make_app(alice, site.id, hooks=app_pb2.AppHooks(preprocess=True))
    job = make_jobs(alice, app, 1)[0]
    bj = make_batch_job(alice, site.id)
    hooks_only = _connect(alice, site.id, clients, capabilities=("hooks",))
    hooks_only.welcome()
    sent, _ = hooks_only.barrier()
    assert [w.id for w in sent] == [f"hook:{job.id}:STAGED_IN:0"]
    batch_only = _connect(alice, site.id, clients, capabilities=("batch_jobs",))
    batch_only.welcome()
    sent, _ = batch_only.barrier()
    assert [w.id for w in sent] == [f"submit:{bj.id}"]


def test_cleanup_work_for_finished_jobs(alice: Any, clients: list[SiteClient]) -> None:
    site = make_site(alice)
    app = make_app(alice, site.id, cleanup_globs=["*.tmp", "scratch/**"])
    plain = make_app(alice, site.id)
    job = make_jobs(alice, app, 1)[0]
    other = make_jobs(alice, plain, 1)[0]
    client = _connect(alice, site.id, clients)
    client.welcome()
    move(alice, job.id, JS.JOB_STATE_RUNNING, JS.JOB_STATE_RUN_DONE)
    move(alice, other.id, JS.JOB_STATE_RUNNING, JS.JOB_STATE_RUN_DONE)
    assert get_job(alice, job.id).state == JS.JOB_STATE_JOB_FINISHED
    item = client.next("work")
    assert item.id == f"cleanup:{job.id}"
    assert item.cleanup.workdir == job.workdir and list(item.cleanup.globs) == ["*.tmp", "scratch/**"]
    sent, _ = client.barrier()
    assert sent == []  # the app without globs has nothing to clean
    ack = client.result(work_id=item.id, cleanup=pb.CleanupResult(job_id=job.id, removed_files=3))
    assert list(ack.work_ids) == [item.id] and not ack.errors
    client.close()
    again = _connect(alice, site.id, clients)
    again.welcome()
    sent, _ = again.barrier()
    assert sent == []  # cleaned once, never offered again


def test_cleanups_of_jobs_finishing_together_are_all_offered(alice: Any, clients: list[SiteClient]) -> None:
    """Cleanups are looked for at most every CLEANUP_MIN_INTERVAL: jobs that finish right
    after a look are left for the next one, not forgotten."""
    site = make_site(alice)
    app = make_app(alice, site.id, cleanup_globs=["*.tmp"])
    jobs = make_jobs(alice, app, 3)
    client = _connect(alice, site.id, clients)
    client.welcome()
    for job in jobs:
        move(alice, job.id, JS.JOB_STATE_RUNNING, JS.JOB_STATE_RUN_DONE)
    offered = {client.next("work").id for _ in jobs}
    assert offered == {f"cleanup:{job.id}" for job in jobs}


def test_a_finished_job_looks_for_cleanups_only(alice: Any, clients: list[SiteClient],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The event says what work it may have made: a job that finished makes the stream ask
    for cleanups, not for batch jobs, hooks and transfers as well (each a query); a job
    that merely started asks for nothing."""
    from balsam_grpc.server.store import site_work

    site = make_site(alice)
    app = make_app(alice, site.id)
    job = make_jobs(alice, app, 1)[0]
    client = _connect(alice, site.id, clients)
    client.welcome()
    client.barrier()
    asked = kinds_scanned(monkeypatch, site.id)
    move(alice, job.id, JS.JOB_STATE_RUNNING)
    move(alice, job.id, JS.JOB_STATE_RUN_DONE)
    wait_until(lambda: {site_work.CLEANUP} in asked, "the stream to look for cleanups after the job finished")
    assert not any(kinds & {site_work.HOOK, site_work.TRANSFER} for kinds in asked), asked
    for kind in ("job_state", "batch_job_state", "transfer_state"):
        for state in ("RUNNING", "JOB_FINISHED", "READY", "POSTPROCESSED", "RUN_DONE", "PENDING", "QUEUED"):
            assert bool(site_work.kinds_made(kind, state)) == site_work.may_make_work(kind, state)


def test_submission_without_state_fails_the_pilot_not_resubmits(alice: Any, clients: list[SiteClient]) -> None:
    site = make_site(alice)
    bj = make_batch_job(alice, site.id)
    client = _connect(alice, site.id, clients)
    client.welcome()
    item = client.next("work")
    ack = client.result(work_id=item.id, batch_job=pb.BatchJobUpdate(batch_job_id=bj.id))
    assert list(ack.work_ids) == [item.id]
    got = _get_batch_job(alice, bj.id)
    assert got.state == BJ.BATCH_JOB_STATE_SUBMIT_FAILED and "no state" in got.status_info
    sent, _ = client.barrier()
    assert sent == []


def test_cancellation_refused_by_the_scheduler_is_not_retried_in_a_loop(alice: Any, clients: list[SiteClient]) -> None:
    site = make_site(alice)
    bj = make_batch_job(alice, site.id)
    stub = alice.stub(batch_job_service_pb2_grpc.BatchJobServiceStub)
    client = _connect(alice, site.id, clients)
    client.welcome()
    submit = client.next("work")
    # The user cancels while the submission is in flight: the scheduler id is still recorded.
    stub.UpdateBatchJob(batch_job_service_pb2.UpdateBatchJobRequest(
        batch_job=BJ.BatchJob(id=bj.id, state=BJ.BATCH_JOB_STATE_PENDING_DELETION),
        update_mask=field_mask_pb2.FieldMask(paths=["state"])))
    ack = client.result(work_id=submit.id, batch_job=pb.BatchJobUpdate(
        batch_job_id=bj.id, state=BJ.BATCH_JOB_STATE_QUEUED, scheduler_id="99"))
    assert not ack.errors
    got = _get_batch_job(alice, bj.id)
    assert got.state == BJ.BATCH_JOB_STATE_PENDING_DELETION and got.scheduler_id == "99"
    sent, _ = client.barrier()
    # Held back while the submission was in flight, offered with the scheduler id it needs.
    assert [w.id for w in sent] == [f"cancel:{bj.id}"]
    cancel = sent[0]
    assert cancel.cancel_batch_job.batch_job.scheduler_id == "99"
    ack = client.result(work_id=cancel.id, batch_job=pb.BatchJobUpdate(
        batch_job_id=bj.id, state=BJ.BATCH_JOB_STATE_RUNNING, status_info="qdel: server busy"))
    assert not ack.errors
    got = _get_batch_job(alice, bj.id)
    assert got.state == BJ.BATCH_JOB_STATE_PENDING_DELETION and "busy" in got.status_info
    client.send(credit=pb.SiteCredit(items=2))
    sent, _ = client.barrier()
    assert sent == []  # not offered again on this stream...
    client.close()
    again = _connect(alice, site.id, clients)
    again.welcome()
    assert again.next("work").id == f"cancel:{bj.id}"  # ...but after a reconnect


def test_hook_result_with_bad_new_jobs_fails_the_job_and_creates_nothing(alice: Any,
                                                                          clients: list[SiteClient]) -> None:
    site = make_site(alice)
    app = make_app(alice, site.id, hooks=app_pb2.AppHooks(postprocess=True))
    job = make_jobs(alice, app, 1)[0]
    client = _connect(alice, site.id, clients)
    client.welcome()
    move(alice, job.id, JS.JOB_STATE_RUNNING, JS.JOB_STATE_RUN_DONE)
    item = client.next("work")
    new_jobs = [JS.Job(app_id=app.id, workdir=f"ok/{secrets.token_hex(3)}"),
                JS.Job(app_name="no-such-app", workdir=f"bad/{secrets.token_hex(3)}")]
    ack = client.result(work_id=item.id, hook=pb.HookResult(job_id=job.id, new_jobs=new_jobs))
    assert ack.errors and "no-such-app" in ack.errors[0]
    got = get_job(alice, job.id)
    assert got.state == JS.JOB_STATE_FAILED and "no-such-app" in got.state_message
    stub = alice.stub(job_service_pb2_grpc.JobServiceStub)
    assert stub.CountJobs(job_service_pb2.CountJobsRequest(filter=JS.JobFilter(app_ids=[app.id]))).total == 1
    # The job's history is RUN_DONE -> FAILED with nothing of the rolled-back attempt.
    assert [e.job_state.to_state for e in _job_events(alice, job.id)][-2:] == [JS.JOB_STATE_RUN_DONE,
                                                                              JS.JOB_STATE_FAILED]
    # An unsolicited hook result is refused without touching anything.
    ack = client.result(hook=pb.HookResult(job_id=job.id, next_state=JS.JOB_STATE_RESTART_READY))
    assert ack.errors and not ack.work_ids
    assert get_job(alice, job.id).state == JS.JOB_STATE_FAILED


@pytest.mark.edge("site stream results over FIELD_LIMITS (a hook's 40 KB tags, new job's 5 KB workdir, 100 KB status_info)",
                   "refused naming the field; nothing stored; the hook's job FAILED with the reason")
def test_results_over_the_field_limits_are_refused_by_name(alice: Any, clients: list[SiteClient]) -> None:
    """The unary calls refuse a field over its limit; results on the site stream used to
    store whatever came (a hook's job_changes.tags had no limit at all)."""
    site = make_site(alice)
    app = make_app(alice, site.id, hooks=app_pb2.AppHooks(postprocess=True))
    job, other = make_jobs(alice, app, 2)
    bj = make_batch_job(alice, site.id)
    client = _connect(alice, site.id, clients)
    client.welcome()
    submit = client.next("work")
    assert submit.id == f"submit:{bj.id}"
    move(alice, job.id, JS.JOB_STATE_RUNNING, JS.JOB_STATE_RUN_DONE)
    move(alice, other.id, JS.JOB_STATE_RUNNING, JS.JOB_STATE_RUN_DONE)
    items = {client.next("work").id for _ in range(2)}
    hook_ids = {j.id: f"hook:{j.id}:RUN_DONE:1" for j in (job, other)}  # run 1
    assert items == set(hook_ids.values())

    changes = JS.Job(tags={"big": "x" * 40_000})
    ack = client.result(work_id=hook_ids[job.id], hook=pb.HookResult(
        job_id=job.id, job_changes=changes, job_mask=field_mask_pb2.FieldMask(paths=["tags"])))
    assert ack.errors and "result.hook.job_changes.tags" in ack.errors[0] and "32,768 bytes" in ack.errors[0]
    got = get_job(alice, job.id)
    assert got.state == JS.JOB_STATE_FAILED and "result.hook.job_changes.tags" in got.state_message
    assert "big" not in got.tags

    child = JS.Job(app_id=app.id, workdir="w/" + "d" * 5000)
    ack = client.result(work_id=hook_ids[other.id], hook=pb.HookResult(job_id=other.id, new_jobs=[child]))
    assert ack.errors and "result.hook.new_jobs[0].workdir" in ack.errors[0]
    assert get_job(alice, other.id).state == JS.JOB_STATE_FAILED
    stub = alice.stub(job_service_pb2_grpc.JobServiceStub)
    assert stub.CountJobs(job_service_pb2.CountJobsRequest(filter=JS.JobFilter(app_ids=[app.id]))).total == 2

    ack = client.result(work_id=submit.id, batch_job=pb.BatchJobUpdate(
        batch_job_id=bj.id, state=BJ.BATCH_JOB_STATE_QUEUED, scheduler_id="7", status_info="y" * 100_000))
    assert ack.errors and "result.batch_job.status_info" in ack.errors[0] and "4,096 bytes" in ack.errors[0]
    got_bj = _get_batch_job(alice, bj.id)
    assert got_bj.state == BJ.BATCH_JOB_STATE_PENDING_SUBMISSION and len(got_bj.status_info) < 1000
    # Within the limits the same results are applied.
    ack = client.result(work_id=submit.id, batch_job=pb.BatchJobUpdate(
        batch_job_id=bj.id, state=BJ.BATCH_JOB_STATE_QUEUED, scheduler_id="7", status_info="queued"))
    assert not ack.errors, ack.errors
    assert _get_batch_job(alice, bj.id).state == BJ.BATCH_JOB_STATE_QUEUED


def test_work_stays_with_its_site(alice: Any, bob: Any, clients: list[SiteClient]) -> None:
    mine, other = make_site(alice), make_site(alice)
    bobs = make_site(bob)
    make_batch_job(alice, other.id)
    make_batch_job(bob, bobs.id)
    app = make_app(alice, other.id, hooks=app_pb2.AppHooks(preprocess=True))
    make_jobs(alice, app, 2)
    client = _connect(alice, mine.id, clients)
    client.welcome()
    assert client.next("backlog").pending_jobs == 0  # the other site's STAGED_IN jobs are not ours
    sent, _ = client.barrier()
    assert sent == []
    with pytest.raises(AssertionError):  # a result for another site's batch job is refused
        bj = make_batch_job(alice, other.id)
        ack = client.result(batch_job=pb.BatchJobUpdate(batch_job_id=bj.id, state=BJ.BATCH_JOB_STATE_QUEUED))
        assert not ack.errors
    assert _get_batch_job(alice, bj.id).state == BJ.BATCH_JOB_STATE_PENDING_SUBMISSION


def test_hook_work_latency(alice: Any, clients: list[SiteClient], harness: Any) -> None:
    """Prints how soon a job that reaches RUN_DONE is offered to its site's postprocess hook."""
    site = make_site(alice)
    app = make_app(alice, site.id, hooks=app_pb2.AppHooks(postprocess=True))
    jobs = make_jobs(alice, app, 10)
    client = _connect(alice, site.id, clients)
    client.welcome()
    latencies = []
    for job in jobs:
        move(alice, job.id, JS.JOB_STATE_RUNNING)
        start = time.perf_counter()
        move(alice, job.id, JS.JOB_STATE_RUN_DONE)
        item = client.next("work")
        latencies.append((time.perf_counter() - start) * 1000)
        assert item.id == f"hook:{job.id}:RUN_DONE:1"
    print(f"\n[{harness.backend}] UpdateJob(RUN_DONE) -> RunHook at the site: median "
          f"{statistics.median(latencies):.1f} ms, max {max(latencies):.1f} ms (n={len(latencies)})")


def test_server_failure_on_a_result_is_refused_and_not_retried_here(alice: Any, clients: list[SiteClient],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from balsam_grpc.server.store import site_work

    site = make_site(alice)
    app = make_app(alice, site.id, hooks=app_pb2.AppHooks(preprocess=True))
    job = make_jobs(alice, app, 1)[0]
    client = _connect(alice, site.id, clients)
    client.welcome()
    item = client.next("work")

    def broken(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("simulated server bug")

    monkeypatch.setattr(site_work, "apply_hook_result", broken)
    ack = client.result(work_id=item.id, hook=pb.HookResult(job_id=job.id))
    assert list(ack.work_ids) == [item.id] and "internal server error (incident" in ack.errors[0]
    assert "simulated" not in ack.errors[0]  # no server internals leak to the daemon
    sent, _ = client.barrier()  # the stream survives, and the work is not offered again here
    assert sent == []
    assert get_job(alice, job.id).state == JS.JOB_STATE_STAGED_IN
    monkeypatch.undo()
    client.close()
    again = _connect(alice, site.id, clients)
    again.welcome()
    assert again.next("work").id == item.id  # a reconnect offers it again


def test_a_sites_backlog_counts_held_jobs_as_running(alice: Any, harness: Any) -> None:
    """A site's backlog, read in one statement in the driver's terms (on the event loop on
    PostgreSQL): runnable jobs of several sizes, one held ahead by a session (it waits for
    that launcher, so it counts as running), a running one, pending ones, and a site with
    nothing."""
    import asyncio

    from sqlalchemy import update

    from balsam_grpc.server.store import site_work
    from balsam_grpc.server.store.db import Database
    from balsam_grpc.server.store.tables import jobs

    site, empty = make_site(alice), make_site(alice)
    app = make_app(alice, site.id)
    make_jobs(alice, app, 3, resources=JS.JobResources(num_nodes=2, wall_time_min=20))
    small = make_jobs(alice, app, 2, resources=JS.JobResources(num_nodes=1, node_packing_count=4, wall_time_min=5))
    (parent,) = make_jobs(alice, app, 1)
    make_jobs(alice, app, 2, parent_ids=[parent.id])
    move(alice, parent.id, JS.JOB_STATE_RUNNING)  # by a launcher session: the site's one active session
    harness.db.write_sync(lambda conn: conn.execute(
        update(jobs).where(jobs.c.id == small[0].id).values(session_id="held-ahead")))

    # A Database of its own: the server's event-loop connections belong to its loop.
    db = Database(harness.db.url, workers=2)
    try:
        full, nothing = (asyncio.run(site_work.site_backlog(db, alice.user_id, s.id)) for s in (site, empty))
    finally:
        db.dispose()
    assert full == {"runnable_jobs": 4, "runnable_node_footprint": 6.25, "max_job_nodes": 2,
                    "max_wall_time_min": 20, "pending_jobs": 2, "running_jobs": 2, "active_sessions": 1}
    assert nothing == {"runnable_jobs": 0, "runnable_node_footprint": 0.0, "max_job_nodes": 0,
                       "max_wall_time_min": 0, "pending_jobs": 0, "running_jobs": 0, "active_sessions": 0}


def _backlog_reads_while_jobs_arrive(alice: Any, clients: list[SiteClient], monkeypatch: pytest.MonkeyPatch,
                                     read_seconds: float = 0.0) -> list[float]:
    """A site stream while a job arrives every 50 ms for 2.5 s, each leaving the backlog
    to be read again (each read taking `read_seconds` more): when its reads started. The
    last backlog still arrives."""
    import asyncio

    from balsam_grpc.server.store import site_work

    real = site_work.site_backlog
    reads: list[float] = []

    async def counted(db: Any, owner_id: int, site_id: int) -> dict[str, Any]:
        if site_id == site.id:
            reads.append(time.monotonic())
            await asyncio.sleep(read_seconds)  # a site with a large backlog
        return await real(db, owner_id, site_id)

    monkeypatch.setattr(site_work, "site_backlog", counted)
    site = make_site(alice)
    app = make_app(alice, site.id)
    make_jobs(alice, app, 1)
    client = _connect(alice, site.id, clients)
    client.welcome()
    assert client.next("backlog").runnable_jobs == 1
    created = 1
    end = time.monotonic() + 2.5
    while time.monotonic() < end:
        make_jobs(alice, app, 1)
        created += 1
        time.sleep(0.05)
    counted_reads = list(reads)
    wait_until(lambda: client.next("backlog").runnable_jobs == created, f"the backlog with {created} runnable jobs")
    return counted_reads


def test_a_busy_sites_backlog_is_read_and_sent_once_a_second(alice: Any, clients: list[SiteClient],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Each backlog message makes the daemon list its pilots and plan (a ListBatchJobs
    call). While jobs keep arriving, the stream reads and sends the backlog at most once
    per BACKLOG_MIN_INTERVAL (1 s; it was 0.2 s: 50 busy sites sent ~190 a second)."""
    reads = _backlog_reads_while_jobs_arrive(alice, clients, monkeypatch)
    gaps = [b - a for a, b in itertools.pairwise(reads)]
    # A timer may fire a millisecond early by the loop's clock (uvloop's counts whole
    # milliseconds). At 0.2 s there were 14 reads, 0.2 s apart.
    assert len(reads) >= 2 and min(gaps) >= 0.99, gaps


def test_a_slow_backlog_read_is_repeated_less_often(alice: Any, clients: list[SiteClient],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A backlog read scans the site's waiting jobs (0.25-0.4 s at 300,000 on PostgreSQL).
    Read at most 5 times a second while jobs keep arriving, a large backlog kept the
    database busy with nothing else; now a stream waits BACKLOG_COST_RATIO times its last
    read's duration before the next, and still sends the backlog as it ends up."""
    from balsam_grpc.server.services import site_stream

    read_seconds = 0.1
    assert site_stream.backlog_gap(0.001) == site_stream.BACKLOG_MIN_INTERVAL
    assert site_stream.backlog_gap(read_seconds) == pytest.approx(site_stream.BACKLOG_COST_RATIO * read_seconds)
    reads = _backlog_reads_while_jobs_arrive(alice, clients, monkeypatch, read_seconds)
    # The first read, then at most one per 2 s gap (before: one every ~0.3 s, 8 or more).
    assert len(reads) <= 3, reads
