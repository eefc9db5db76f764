"""The job lifecycle sealed (issue 13): every (role, from, to) move through the public API
against the one table in core/states, and the behaviours around it, on SQLite and
PostgreSQL."""

from __future__ import annotations

import secrets
import uuid
from datetime import timedelta
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, insert, select

from balsam_grpc.core.states import RETRYABLE_STATES, JobState, Role, restart_point, role_refusal
from balsam_grpc.server.convert import utcnow
from balsam_grpc.server.store.tables import events, jobs, sessions
from balsam_grpc.v1 import (
    app_pb2,
    batch_job_pb2,
    batch_job_service_pb2,
    batch_job_service_pb2_grpc,
    app_service_pb2,
    app_service_pb2_grpc,
    common_pb2,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    site_pb2,
    site_service_pb2,
    site_service_pb2_grpc,
    transfer_item_pb2,
    transfer_item_service_pb2,
    transfer_item_service_pb2_grpc,
)

S = JobState
RETRY_TARGETS = {S.AWAITING_PARENTS, S.READY, S.STAGED_IN, S.POSTPROCESSED, S.RESTART_READY}


class World:
    """A site, an app with no hooks and no transfers, and the owner's user and site stubs."""

    def __init__(self, harness: Any, caller: Any) -> None:
        self.harness, self.caller = harness, caller
        self.site = caller.stub(site_service_pb2_grpc.SiteServiceStub).CreateSite(site_service_pb2.CreateSiteRequest(
            site=site_pb2.Site(name=f"site-{uuid.uuid4().hex[:8]}"))).site
        self.app = caller.stub(app_service_pb2_grpc.AppServiceStub).CreateApp(app_service_pb2.CreateAppRequest(
            app=app_pb2.App(site_id=self.site.id, name="run", command_template="/bin/true"))).app
        site_caller = harness.user(caller.username, scope="SITE", site_id=self.site.id)
        self.stubs = {Role.USER: caller.stub(job_service_pb2_grpc.JobServiceStub),
                      Role.SITE: site_caller.stub(job_service_pb2_grpc.JobServiceStub)}
        self.session_id = ""

    def job_in(self, state: S) -> int:
        """A job resting in `state` (written directly: reaching every state through the API
        would need a launcher and a site for each); a RUNNING one is held by a session."""
        now = utcnow()
        if state is S.RUNNING and not self.session_id:
            self.session_id = secrets.token_hex(16)
            self.harness.db.write_sync(lambda conn: conn.execute(insert(sessions).values(
                id=self.session_id, owner_id=self.caller.user_id, site_id=self.site.id, job_mode="MPI", nodes=[],
                state="ACTIVE", hostname="nid0001", create_time=now, heartbeat_time=now,
                expire_time=now + timedelta(hours=1))))
        values = dict(owner_id=self.caller.user_id, site_id=self.site.id, app_id=self.app.id,
                      workdir=f"w/{secrets.token_hex(6)}", state=str(state), create_time=now, update_time=now,
                      state_time=now, session_id=self.session_id if state is S.RUNNING else None,
                      lease_generation=1 if state is S.RUNNING else 0)
        return self.harness.db.write_sync(lambda conn: conn.execute(insert(jobs).values(**values)).inserted_primary_key[0])

    def snapshot(self, job_id: int) -> tuple[str, Any, int]:
        def read(conn: Any) -> tuple[str, Any, int]:
            row = conn.execute(select(jobs.c.state, jobs.c.update_time).where(jobs.c.id == job_id)).one()
            count = conn.execute(select(func.count()).select_from(events).where(events.c.job_id == job_id)).scalar_one()
            return row.state, row.update_time, count
        return self.harness.db.read_sync(read)

    def job_events(self, job_id: int) -> list[Any]:
        return self.harness.db.read_sync(lambda conn: conn.execute(
            select(events).where(events.c.job_id == job_id).order_by(events.c.id)).all())


def expected_ok(role: Role, src: S, dst: S) -> bool:
    """The oracle: the table, plus the retry guard (a job written in FAILED or KILLED with
    no history restarts from the beginning, READY; RUN_ERROR/RUN_TIMEOUT at RESTART_READY)."""
    if role_refusal(role, src, dst) is not None:
        return False
    if role is Role.USER and src in RETRYABLE_STATES and dst in RETRY_TARGETS:
        failed_from = src if src in (S.RUN_ERROR, S.RUN_TIMEOUT) else S.CREATED
        return dst is restart_point(failed_from, inputs_gone=False, pending_parents=0)
    return True


@pytest.fixture
def world(harness: Any, alice: Any) -> World:
    return World(harness, alice)


_STATES = list(S)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(role=st.sampled_from([Role.USER, Role.SITE]), src=st.sampled_from(_STATES), dst=st.sampled_from(_STATES))
def test_every_move_through_update_job_follows_the_table(world: World, role: Role, src: S, dst: S) -> None:
    """USER (a user token) and SITE (a site token) through UpdateJob. SERVER-only moves are
    refused for both; SESSION moves are the next test's."""
    if src is dst:
        return
    job_id = world.job_in(src)
    before = world.snapshot(job_id)
    request = job_service_pb2.UpdateJobRequest(job=job_pb2.Job(id=job_id, state=job_pb2.JobState.Value(f"JOB_STATE_{dst}")),
                                               update_mask={"paths": ["state"]})
    if expected_ok(role, src, dst):
        job = world.stubs[role].UpdateJob(request).job
        new = world.job_events(job_id)[before[2]:]
        assert len(new) == 1, (role, src, dst, new)  # once, with one event
        event = new[0]
        assert (event.from_state, event.to_state) == (src, job_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_"))
        assert event.to_state == dst or (event.data or {}).get("via", [None])[0] == dst
    else:
        with pytest.raises(grpc.RpcError) as err:
            world.stubs[role].UpdateJob(request)
        assert err.value.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED), \
            (role, src, dst, err.value.details())
        want = grpc.StatusCode.PERMISSION_DENIED if role_refusal(role, src, dst) and \
            role_refusal(role, src, dst)[0] == "ROLE_NOT_ALLOWED" else grpc.StatusCode.FAILED_PRECONDITION
        assert err.value.code() == want, (role, src, dst, err.value.details())
        assert world.snapshot(job_id) == before  # nothing changed, no event


def test_every_move_a_session_reports_follows_the_table(world: World, alice: Any) -> None:
    """SESSION through the launcher's stream: it can only report on a job it holds (in
    RUNNING; any other job is a lost lease, ABORTED), so every target from RUNNING."""
    from tests.support.launcher import Launcher

    launcher = Launcher(alice)
    launcher.open(world.site.id)
    try:
        for dst in _STATES:
            job = world.stubs[Role.USER].CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
                app_id=world.app.id, workdir=f"s/{secrets.token_hex(4)}"))).job
            launcher.credit(max_jobs=1)
            (leased,) = launcher.leased(1)
            assert leased.job.id == job.id
            before = world.snapshot(job.id)
            ack = launcher.report(launcher.transition(leased, job_pb2.JobState.Value(f"JOB_STATE_{dst}")))
            why = role_refusal(Role.SESSION, S.RUNNING, dst)
            if why is None:
                assert not ack.rejections, (dst, ack)
                new = world.job_events(job.id)[before[2]:]
                assert len(new) == 1 and new[0].from_state == S.RUNNING, (dst, new)
                assert new[0].to_state == dst or new[0].data["via"][0] == dst
            else:
                (rejection,) = ack.rejections
                code = grpc.StatusCode.PERMISSION_DENIED if why[0] == "ROLE_NOT_ALLOWED" else \
                    grpc.StatusCode.FAILED_PRECONDITION
                assert (rejection.code, rejection.reason) == (code.value[0], why[0]), (dst, rejection)
                assert world.snapshot(job.id) == before
            if world.snapshot(job.id)[0] not in ("JOB_FINISHED", "FAILED", "KILLED"):
                world.stubs[Role.USER].UpdateJob(job_service_pb2.UpdateJobRequest(  # out of the launcher's way
                    job=job_pb2.Job(id=job.id, state=job_pb2.JOB_STATE_KILLED), update_mask={"paths": ["state"]}))
    finally:
        launcher.cancel()


# ---------------------------------------------------------------------------- behaviours


def _state(world: World, job_id: int) -> str:
    return world.snapshot(job_id)[0]


def _launcher(world: World) -> Any:
    from tests.support.launcher import Launcher

    launcher = Launcher(world.caller)
    launcher.open(world.site.id)
    return launcher


def _run(launcher: Any, job_id: int, state: int = job_pb2.JOB_STATE_RUN_DONE) -> None:
    """Lease the job to the launcher and report how its run ended."""
    launcher.credit(max_jobs=1)
    (leased,) = launcher.leased(1)
    assert leased.job.id == job_id
    ack = launcher.report(launcher.transition(leased, state))
    assert not ack.rejections, ack


def _set_state(world: World, job_id: int, state: int) -> Any:
    return world.stubs[Role.USER].UpdateJob(job_service_pb2.UpdateJobRequest(
        job=job_pb2.Job(id=job_id, state=state), update_mask={"paths": ["state"]})).job


def _items(world: World, job_id: int) -> dict[str, Any]:
    stub = world.caller.stub(transfer_item_service_pb2_grpc.TransferServiceStub)
    got = stub.ListTransferItems(transfer_item_service_pb2.ListTransferItemsRequest(
        filter=transfer_item_service_pb2.TransferItemFilter(job_ids=[job_id]))).transfer_items
    return {i.slot: i for i in got}


def _stage_out_app(world: World) -> Any:
    slot = app_pb2.TransferSlot(name="result", direction=common_pb2.TRANSFER_DIRECTION_OUT, local_path="out.h5")
    return world.caller.stub(app_service_pb2_grpc.AppServiceStub).CreateApp(app_service_pb2.CreateAppRequest(
        app=app_pb2.App(site_id=world.site.id, name=f"out-{secrets.token_hex(3)}", command_template="/bin/true",
                        transfers=[slot]))).app


def test_a_job_enters_running_only_by_being_leased(world: World) -> None:
    job = world.stubs[Role.USER].CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
        app_id=world.app.id, workdir="unleased"))).job
    before = world.snapshot(job.id)
    with pytest.raises(grpc.RpcError) as err:
        _set_state(world, job.id, job_pb2.JOB_STATE_RUNNING)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "lease" in err.value.details()
    assert world.snapshot(job.id) == before


def test_stage_out_is_released_with_the_transition_and_staged_out_waits_for_it(world: World) -> None:
    """No site daemon is connected: the stage-out item becomes PENDING in the same
    transaction as POSTPROCESSED, and nobody can declare the job STAGED_OUT meanwhile."""
    app = _stage_out_app(world)
    job = world.stubs[Role.USER].CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
        app_id=app.id, workdir=f"out/{secrets.token_hex(3)}", transfers={"result": "results:/r/out.h5"}))).job
    launcher = _launcher(world)
    try:
        _run(launcher, job.id)
    finally:
        launcher.cancel()
    assert _state(world, job.id) == "POSTPROCESSED"
    assert _items(world, job.id)["result"].state == transfer_item_pb2.TRANSFER_STATE_PENDING
    released = [e for e in world.job_events(job.id) if e.kind == "transfer_state"]
    assert [(e.from_state, e.to_state) for e in released] == [("AWAITING_JOB", "PENDING")]
    before = world.snapshot(job.id)
    with pytest.raises(grpc.RpcError) as err:
        _set_state(world, job.id, job_pb2.JOB_STATE_STAGED_OUT)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert world.snapshot(job.id) == before
    assert _items(world, job.id)["result"].state == transfer_item_pb2.TRANSFER_STATE_PENDING


def test_staged_out_is_refused_to_the_server_itself_while_items_wait(world: World, harness: Any) -> None:
    """The guard holds below the role check too: even the server's own move is refused."""
    from balsam_grpc.server.store.transitions import ENGINE_COLUMNS, Transitioner

    app = _stage_out_app(world)
    job = world.stubs[Role.USER].CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
        app_id=app.id, workdir=f"out/{secrets.token_hex(3)}", transfers={"result": "results:/r/out.h5"}))).job
    launcher = _launcher(world)
    try:
        _run(launcher, job.id)
    finally:
        launcher.cancel()

    def work(conn: Any) -> Any:
        row = dict(conn.execute(select(*ENGINE_COLUMNS).where(jobs.c.id == job.id)).one()._mapping)
        return Transitioner(conn, utcnow()).move([row], S.STAGED_OUT, Role.SERVER)

    refused = harness.db.write_sync(work)
    assert refused[job.id].reason == "TRANSFERS_PENDING"
    assert _state(world, job.id) == "POSTPROCESSED"


def _create(world: World, workdir: str, parents: list[int] = (), policy: int = 0) -> int:
    return world.stubs[Role.USER].CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
        app_id=world.app.id, workdir=workdir, parent_ids=list(parents), on_parent_failure=policy))).job.id


def _error_reason(err: grpc.RpcError) -> str:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    info = error_details_pb2.ErrorInfo()
    rpc_status.from_call(err).details[0].Unpack(info)
    return info.reason


def test_deleting_a_parent_children_wait_on_is_refused_unless_it_cascades(world: World) -> None:
    stub = world.stubs[Role.USER]
    tag = secrets.token_hex(3)
    parent = _create(world, f"del/{tag}/p")
    strict = _create(world, f"del/{tag}/strict", [parent])
    lenient = _create(world, f"del/{tag}/lenient", [parent], job_pb2.PARENT_FAILURE_POLICY_IGNORE)
    before = [world.snapshot(j) for j in (parent, strict, lenient)]
    with pytest.raises(grpc.RpcError) as err:
        stub.DeleteJob(job_service_pb2.DeleteJobRequest(id=parent))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and _error_reason(err.value) == "CHILDREN_WAITING"
    assert f"jobs {strict}, {lenient}" in err.value.details()
    bulk = stub.BatchDeleteJobs(job_service_pb2.BatchDeleteJobsRequest(filter=job_pb2.JobFilter(ids=[parent])))
    assert bulk.deleted_count == 0 and [o.reason for o in bulk.outcomes] == ["CHILDREN_WAITING"]
    assert [world.snapshot(j) for j in (parent, strict, lenient)] == before

    stub.DeleteJob(job_service_pb2.DeleteJobRequest(id=parent, cascade=True))
    assert world.harness.db.read_sync(lambda c: c.execute(select(jobs.c.id).where(jobs.c.id == parent)).first()) is None
    assert _state(world, strict) == "FAILED" and _state(world, lenient) == "PREPROCESSED"
    failed = world.job_events(strict)[-1]
    assert failed.data == {"parent_id": parent, "parent_state": "DELETED"}
    assert failed.message == f"parent job {parent} is DELETED"


def test_retry_restarts_a_failed_parent_and_the_children_it_failed(world: World) -> None:
    stub = world.stubs[Role.USER]
    tag = secrets.token_hex(3)
    parent = _create(world, f"retry/{tag}/p")
    children = [_create(world, f"retry/{tag}/c{i}", [parent]) for i in range(2)]
    bystander = _create(world, f"retry/{tag}/other")
    launcher = _launcher(world)
    try:
        _run(launcher, parent, job_pb2.JOB_STATE_RUN_ERROR)  # no retry policy: FAILED
        assert _state(world, parent) == "FAILED"
        for child in children:  # the failure names its cause
            event = world.job_events(child)[-1]
            assert (event.to_state, event.message) == ("FAILED", f"parent job {parent} is FAILED")
            assert event.data == {"parent_id": parent, "parent_state": "FAILED"}

        result = stub.RetryJobs(job_service_pb2.RetryJobsRequest(
            filter=job_pb2.JobFilter(ids=[parent, bystander]), reset_run_count=True))
        assert (result.retried_count, result.failed_count) == (1, 1)
        by_id = {o.id: o for o in result.outcomes}
        assert by_id[parent].code == 0
        assert (by_id[bystander].code, by_id[bystander].reason) == (9, "NOT_RETRYABLE")
        assert _state(world, parent) == "RESTART_READY" and _state(world, bystander) == "PREPROCESSED"
        assert stub.GetJob(job_service_pb2.GetJobRequest(id=parent)).job.run_count == 0
        for child in children:
            assert _state(world, child) == "AWAITING_PARENTS"
            assert world.job_events(child)[-1].message == "a parent job was retried"

        _run(launcher, parent)  # the rerun succeeds: the children are released
        assert _state(world, parent) == "JOB_FINISHED"
        assert {_state(world, c) for c in children} == {"PREPROCESSED"}
    finally:
        launcher.cancel()
    again = stub.RetryJobs(job_service_pb2.RetryJobsRequest(filter=job_pb2.JobFilter(ids=[parent])))
    assert again.failed_count == 1 and again.outcomes[0].reason == "NOT_RETRYABLE"  # finished: nothing to retry


def test_one_report_ends_a_parent_and_a_childless_job_and_releases_the_children(world: World) -> None:
    """A report's jobs are read (SQLite) or written (PostgreSQL) with whether they have
    children, and the cascade looks for none of a childless job's; a parent in the same
    report still releases its."""
    from datetime import UTC, datetime, timedelta

    from google.protobuf import timestamp_pb2

    tag = secrets.token_hex(3)
    lone = _create(world, f"mixed/{tag}/lone")
    parent = _create(world, f"mixed/{tag}/p")
    child = _create(world, f"mixed/{tag}/c", [parent])
    launcher = _launcher(world)
    try:
        launcher.credit(max_jobs=2)
        leased = {lj.job.id: lj for lj in launcher.leased(2)}
        assert set(leased) == {lone, parent}
        # Each with its own end time: one statement writes both (Transitioner._write), and
        # on PostgreSQL it tells which of them have children.
        times = []
        for ms in (1, 2):
            ts = timestamp_pb2.Timestamp()
            ts.FromDatetime(datetime.now(UTC) - timedelta(milliseconds=ms))
            times.append(ts)
        ack = launcher.report(*(launcher.transition(leased[j], job_pb2.JOB_STATE_RUN_DONE, time=t)
                                for j, t in zip((lone, parent), times, strict=True)))
        assert not ack.rejections, ack
    finally:
        launcher.cancel()
    assert {_state(world, j) for j in (lone, parent)} == {"JOB_FINISHED"}
    assert _state(world, child) == "PREPROCESSED"
    assert world.job_events(child)[-1].message == "all parents finished"


def test_a_parameter_both_required_and_defaulted_is_refused(world: World) -> None:
    apps = world.caller.stub(app_service_pb2_grpc.AppServiceStub)
    app = app_pb2.App(site_id=world.site.id, name=f"both-{secrets.token_hex(3)}", command_template="echo {{ n }}",
                      parameters=[app_pb2.AppParameter(name="n", required=True, default_value="1")])
    with pytest.raises(grpc.RpcError) as err:
        apps.CreateApp(app_service_pb2.CreateAppRequest(app=app))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "app.parameters[0]" in err.value.details() and "required and has a default" in err.value.details()
    listed = apps.ListApps(app_service_pb2.ListAppsRequest()).apps
    assert app.name not in {a.name for a in listed}


def _transfer_app(world: World) -> Any:
    slots = [app_pb2.TransferSlot(name="data", direction=common_pb2.TRANSFER_DIRECTION_IN, local_path="in.dat",
                                  required=True),
             app_pb2.TransferSlot(name="result", direction=common_pb2.TRANSFER_DIRECTION_OUT, local_path="out.h5")]
    return world.caller.stub(app_service_pb2_grpc.AppServiceStub).CreateApp(app_service_pb2.CreateAppRequest(
        app=app_pb2.App(site_id=world.site.id, name=f"io-{secrets.token_hex(3)}", command_template="/bin/true",
                        transfers=slots))).app


@pytest.mark.parametrize(("transfers", "field", "needle"), [
    ({"result": "results:/r/out.h5"}, "job.transfers", "slot 'data' is required"),
    ({"data": "aps:relative/in.dat"}, "job.transfers.data", "must be absolute"),
    ({"data": "Elsewhere:/x"}, "job.transfers.data", "has no transfer location 'Elsewhere'; it has aps, results"),
    ({"data": "aps:/in.dat", "result": "nowhere:/o"}, "job.transfers.result", "no transfer location 'nowhere'"),
])
def test_transfers_are_checked_against_slots_and_site_locations_at_creation(
        world: World, transfers: dict[str, str], field: str, needle: str) -> None:
    from google.protobuf import field_mask_pb2

    world.caller.stub(site_service_pb2_grpc.SiteServiceStub).UpdateSite(site_service_pb2.UpdateSiteRequest(
        site=site_pb2.Site(id=world.site.id, transfer_locations=[
            site_pb2.TransferLocation(alias="aps", url="file:///data/aps"),
            site_pb2.TransferLocation(alias="results", url="file:///data/results")]),
        update_mask=field_mask_pb2.FieldMask(paths=["transfer_locations"])))
    app = _transfer_app(world)
    stub = world.stubs[Role.USER]
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
            app_id=app.id, workdir=f"io/{secrets.token_hex(3)}", transfers=transfers)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    info = error_details_pb2.ErrorInfo()
    rpc_status.from_call(err.value).details[0].Unpack(info)
    assert info.metadata["field"] == field
    assert stub.CountJobs(job_service_pb2.CountJobsRequest(filter=job_pb2.JobFilter(app_ids=[app.id]))).total == 0
    ok = stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
        app_id=app.id, workdir=f"io/{secrets.token_hex(3)}", transfers={"data": "aps:/in.dat"}))).job
    assert ok.state == job_pb2.JOB_STATE_READY  # waits for its stage-in



def test_cancelling_the_pilot_ends_its_sessions_and_times_out_their_jobs_at_once(world: World) -> None:
    """The batch job of a running launcher is cancelled: in the same transaction its
    session closes and its jobs time out and follow the timeout policy (RESTART_READY),
    not a lease timeout later; the events name the pilot, and the launcher is told to
    kill them."""
    from google.protobuf import field_mask_pb2

    from balsam_grpc.v1 import session_pb2, session_service_pb2, session_service_pb2_grpc

    batch = world.caller.stub(batch_job_service_pb2_grpc.BatchJobServiceStub)
    bj = batch.CreateBatchJob(batch_job_service_pb2.CreateBatchJobRequest(batch_job=batch_job_pb2.BatchJob(
        site_id=world.site.id, num_nodes=1, wall_time_min=10))).batch_job
    held = [_create(world, f"pilot/{secrets.token_hex(3)}") for _ in range(2)]
    launcher = _launcher_of(world, bj.id)
    try:
        launcher.credit(max_jobs=2)
        assert sorted(lj.job.id for lj in launcher.leased(2)) == held
        batch.UpdateBatchJob(batch_job_service_pb2.UpdateBatchJobRequest(
            batch_job=batch_job_pb2.BatchJob(id=bj.id, state=batch_job_pb2.BATCH_JOB_STATE_PENDING_DELETION),
            update_mask=field_mask_pb2.FieldMask(paths=["state"])))
        # Already done when the cancellation returns: no waiting for a lease to run out.
        assert {_state(world, j) for j in held} == {"RESTART_READY"}
        for job_id in held:
            event = world.job_events(job_id)[-1]
            assert (event.from_state, event.to_state) == ("RUNNING", "RESTART_READY")
            assert event.data["via"] == ["RUN_TIMEOUT"] and event.data["batch_job_id"] == bj.id
            assert f"ended with its pilot: batch job {bj.id} was cancelled" in event.message
        sessions = world.caller.stub(session_service_pb2_grpc.SessionServiceStub).ListSessions(
            session_service_pb2.ListSessionsRequest()).sessions
        (mine,) = [s for s in sessions if s.batch_job_id == bj.id]
        assert mine.state == session_pb2.SESSION_STATE_CLOSED
        kill = launcher.next("kill")
        assert sorted(kill.job_ids) == held
    finally:
        launcher.cancel()
    # A launcher reconnecting for the cancelled pilot gets no new session (and no jobs).
    from tests.support.launcher import Launcher

    again = Launcher(world.caller)
    again.requests.put(session_service_pb2.SessionServiceConnectRequest(open=session_service_pb2.SessionOpen(
        site_id=world.site.id, batch_job_id=bj.id, hostname="nid0001")))
    assert again.done.wait(30) and again.error is not None
    assert again.error.code() == grpc.StatusCode.FAILED_PRECONDITION and "PENDING_DELETION" in again.error.details()
    assert _error_reason(again.error) == "PILOT_ENDED"


def _launcher_of(world: World, batch_job_id: int) -> Any:
    from tests.support.launcher import Launcher

    launcher = Launcher(world.caller)
    launcher.open(world.site.id, batch_job_id=batch_job_id)
    return launcher


@pytest.mark.parametrize("reported", ["FINISHED", "SUBMIT_FAILED"])
def test_a_pilot_that_ends_ends_its_sessions(world: World, harness: Any, reported: str) -> None:
    """The site daemon reports the batch job ended (or never submitted): its sessions
    close in that transaction and their jobs time out and restart."""
    from balsam_grpc.server.store import batch_jobs as batch_store
    from tests.support import leases

    batch = world.caller.stub(batch_job_service_pb2_grpc.BatchJobServiceStub)
    bj = batch.CreateBatchJob(batch_job_service_pb2.CreateBatchJobRequest(batch_job=batch_job_pb2.BatchJob(
        site_id=world.site.id, num_nodes=1, wall_time_min=10))).batch_job
    job = _create(world, f"ended/{secrets.token_hex(3)}")
    session_id = leases.lease(harness, world.caller.user_id, [job], batch_job_id=bj.id)

    def report(conn: Any) -> bool:
        row = batch_store.get_batch_job(conn, world.caller.user_id, bj.id, for_update=True)
        return batch_store.site_report(conn, row, reported, scheduler_id="" if reported == "SUBMIT_FAILED" else "42",
                                       now=utcnow())

    assert harness.embedded.loop.run(harness.db.write(report))
    assert _state(world, job) == "RESTART_READY"
    state = harness.db.read_sync(lambda c: c.execute(select(sessions.c.state).where(sessions.c.id == session_id))
                                 .scalar_one())
    assert state == "CLOSED"
    assert world.job_events(job)[-1].data["batch_job_state"] == reported


def test_reported_times_are_kept_bounded_and_the_receive_time_too(world: World) -> None:
    """A launcher's transition carries when it happened: the event's time is that (used by
    analytics), not before the job's previous event, not later than the server's clock
    plus a second; receive_time is the server's clock."""
    from datetime import UTC, datetime, timedelta

    from google.protobuf import timestamp_pb2

    from balsam_grpc.v1 import event_service_pb2, event_service_pb2_grpc

    jobs_ = [_create(world, f"times/{secrets.token_hex(3)}") for _ in range(3)]
    launcher = _launcher(world)
    try:
        launcher.credit(max_jobs=3)
        leased = {lj.job.id: lj for lj in launcher.leased(3)}
        lease_time = {j: world.job_events(j)[-1].time for j in jobs_}
        now = datetime.now(UTC)
        reported = {jobs_[0]: _aware(lease_time[jobs_[0]]) + timedelta(milliseconds=1),  # kept as reported
                    jobs_[1]: now - timedelta(days=1),  # before its lease: bounded by that event
                    jobs_[2]: now + timedelta(hours=1)}  # the future: bounded by the server's clock
        transitions = []
        for job_id, when in reported.items():
            ts = timestamp_pb2.Timestamp()
            ts.FromDatetime(when)
            transitions.append(launcher.transition(leased[job_id], job_pb2.JOB_STATE_RUN_DONE, time=ts))
        before_report = datetime.now(UTC)
        ack = launcher.report(*transitions)
        after_report = datetime.now(UTC)
        assert not ack.rejections
    finally:
        launcher.cancel()
    events = world.caller.stub(event_service_pb2_grpc.EventServiceStub).ListEvents(
        event_service_pb2.ListEventsRequest(filter=event_service_pb2.EventFilter(
            job_ids=jobs_, to_states=[job_pb2.JOB_STATE_JOB_FINISHED]))).events
    by_job = {e.job_id: e for e in events}
    for job_id in jobs_:
        received = by_job[job_id].receive_time.ToDatetime(tzinfo=UTC)
        assert before_report - timedelta(seconds=1) <= received <= after_report + timedelta(seconds=1)
    assert by_job[jobs_[0]].time.ToDatetime(tzinfo=UTC) == reported[jobs_[0]]
    assert by_job[jobs_[1]].time.ToDatetime(tzinfo=UTC) == _aware(lease_time[jobs_[1]])
    future = by_job[jobs_[2]]
    assert future.time.ToDatetime(tzinfo=UTC) == future.receive_time.ToDatetime(tzinfo=UTC) + timedelta(seconds=1)
    # Each row keeps its own time (a report's jobs with different times are written by one
    # statement: Transitioner._write).
    for job_id in jobs_:
        job = world.stubs[Role.USER].GetJob(job_service_pb2.GetJobRequest(id=job_id)).job
        assert job.state_time == by_job[job_id].time
    assert by_job[jobs_[0]].time.ToDatetime(tzinfo=UTC) == reported[jobs_[0]]


def _aware(dt: Any) -> Any:
    from datetime import UTC

    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt
