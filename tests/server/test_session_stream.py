"""SessionService.Connect, the launcher's stream, through the generated stubs against an
embedded server with a 2 s lease timeout, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import select

from balsam_grpc.server.store.tables import events, jobs
from balsam_grpc.v1 import (
    app_pb2,
    common_pb2,
    job_pb2,
    session_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
)
from tests.conftest import POSTGRES_URL, Caller, Harness, database_params
from tests.support.databases import fresh_postgres
from tests.support.launcher import WAIT, Launcher
from tests.support.records import World
from tests.support.waiting import wait_until

S = job_pb2
Req = session_service_pb2.SessionServiceConnectRequest
LEASE_TIMEOUT = 2


class ShortLeaseHarness(Harness):
    """The shared Harness, with a short lease timeout."""

    def __init__(self, backend: str, url: str) -> None:
        from balsam_grpc.server.embedded import EmbeddedServer
        from balsam_grpc.server.state import ServerSettings

        self.backend = backend
        self.url = url
        self.embedded = EmbeddedServer(ServerSettings(address="127.0.0.1:0", database_url=url, grace_seconds=0.5,
                                                      lease_timeout_seconds=LEASE_TIMEOUT))
        self.server = self.embedded.server
        self.port = self.embedded.port
        self.address = self.embedded.address
        self.channel = grpc.insecure_channel(self.address)


@pytest.fixture(scope="module", params=database_params())
def short(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ShortLeaseHarness]:
    if request.param == "postgres":
        url = fresh_postgres(POSTGRES_URL, "sessions")
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('sessions') / 'balsam.db'}"
    h = ShortLeaseHarness(request.param, url)
    yield h
    h.close()


@pytest.fixture
def user(short: ShortLeaseHarness) -> Caller:
    return short.user()


def status_reason(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    return info.reason


def job_events(h: ShortLeaseHarness, job_id: int) -> list[tuple[str, str]]:
    rows = h.db.read_sync(lambda conn: conn.execute(
        select(events.c.from_state, events.c.to_state).where(events.c.job_id == job_id).order_by(events.c.id)).all())
    return [(r[0], r[1]) for r in rows]


def ids(leased: list[session_service_pb2.LeasedJob]) -> list[int]:
    return [lj.job.id for lj in leased]


# ---------------------------------------------------------------------------- leasing


def test_open_then_credit_leases_existing_runnable_jobs(short: ShortLeaseHarness, user: Caller) -> None:
    w = World(user)
    created = w.create(3)
    launcher = Launcher(user)
    opened = launcher.open(w.site.id)
    assert opened.lease_timeout_seconds == LEASE_TIMEOUT
    assert opened.session.state == session_pb2.SESSION_STATE_ACTIVE and opened.session.site_id == w.site.id
    assert opened.applied_through_seq == 0 and not opened.leased_jobs
    launcher.credit(max_jobs=10)
    leased = launcher.leased(3)
    assert sorted(ids(leased)) == sorted(j.id for j in created)
    for lj in leased:
        assert lj.job.state == S.JOB_STATE_RUNNING and lj.lease_generation == 1 and lj.app.id == w.app.id
        assert lj.job.lease.session_id == opened.session.id and lj.job.run_count == 1
        assert job_events(short, lj.job.id)[-1] == ("PREPROCESSED", "RUNNING")
    launcher.close()
    launcher.done.wait(WAIT)
    assert launcher.error is None


def test_job_created_later_is_leased_without_a_new_credit(short: ShortLeaseHarness, user: Caller) -> None:
    w = World(user)
    launcher = Launcher(user)
    launcher.open(w.site.id)
    launcher.credit(max_jobs=5)
    launcher.nothing("leases", 0.3)
    (job,) = w.create(1)
    (leased,) = launcher.leased(1)
    assert leased.job.id == job.id
    # A job released later (a restart) is leased again too: the credit still has room.
    (job2,) = w.create(1)
    assert ids(launcher.leased(1)) == [job2.id]
    launcher.cancel()


def test_credit_limits_jobs_and_node_footprint(short: ShortLeaseHarness, user: Caller) -> None:
    w = World(user)
    packed = w.create(6, node_packing_count=4)  # a quarter node each
    launcher = Launcher(user)
    launcher.open(w.site.id)
    launcher.credit(max_jobs=3, free_nodes=10)
    assert len(launcher.leased(3)) == 3  # max_jobs
    launcher.nothing("leases", 0.3)
    launcher.credit(max_jobs=10, free_nodes=0.5)
    assert len(launcher.leased(2)) == 2  # 2 x 1/4 node fill half a node
    launcher.nothing("leases", 0.3)
    launcher.credit(max_jobs=10, free_nodes=1.0)
    assert len(launcher.leased(1)) == 1  # the last one
    held = {j.id for j in packed}
    assert all(w.get(i).state == S.JOB_STATE_RUNNING for i in held)
    launcher.cancel()


def test_credit_filters_size_wall_time_serial_tags_and_apps(short: ShortLeaseHarness, user: Caller) -> None:
    w = World(user)
    other_app = w.make_app("other")
    big = w.create(1, num_nodes=4)[0]
    mpi1 = w.create(1, num_nodes=1, ranks_per_node=8)[0]
    long = w.create(1, wall_time_min=120)[0]
    tagged = w.create(1, tags={"beam": "A", "run": "7"})[0]
    other = w.create(1, app=other_app)[0]
    plain = w.create(1)[0]
    launcher = Launcher(user)
    launcher.open(w.site.id)
    # Tags: containment of every pair.
    launcher.credit(max_jobs=10, filter_tags={"beam": "A"})
    assert ids(launcher.leased(1)) == [tagged.id]
    launcher.nothing("leases", 0.2)
    # Apps.
    launcher.credit(max_jobs=10, app_ids=[other_app.id])
    assert ids(launcher.leased(1)) == [other.id]
    # Serial only: one node and one rank; wall time: only jobs that fit the time left.
    launcher.credit(max_jobs=10, serial_only=True, wall_time_remaining_min=60)
    assert ids(launcher.leased(1)) == [plain.id]
    # Per-job node limit: the 4-node job stays, the 8-rank and the long job come.
    launcher.credit(max_jobs=10, max_nodes_per_job=2)
    assert sorted(ids(launcher.leased(2))) == sorted([mpi1.id, long.id])
    launcher.nothing("leases", 0.2)
    launcher.credit(max_jobs=10, free_nodes=3)
    launcher.nothing("leases", 0.3)
    launcher.credit(max_jobs=10, free_nodes=4)
    assert ids(launcher.leased(1)) == [big.id]
    launcher.cancel()


def test_serial_mode_session_gets_only_single_process_jobs(short: ShortLeaseHarness, user: Caller) -> None:
    w = World(user)
    w.create(1, num_nodes=2)
    w.create(1, ranks_per_node=4)
    (serial,) = w.create(1)
    launcher = Launcher(user)
    launcher.open(w.site.id, job_mode=common_pb2.JOB_MODE_SERIAL)
    launcher.credit(max_jobs=10)
    assert ids(launcher.leased(1)) == [serial.id]
    launcher.nothing("leases", 0.3)
    launcher.cancel()


def test_lease_order_priority_then_bigger_first(short: ShortLeaseHarness, user: Caller) -> None:
    w = World(user)
    small = w.create(1)[0]
    short_big = w.create(1, num_nodes=2, wall_time_min=10)[0]
    long_big = w.create(1, num_nodes=2, wall_time_min=30)[0]
    urgent = w.create(1, priority=5)[0]
    huge = w.create(1, num_nodes=8)[0]
    small2 = w.create(1)[0]
    launcher = Launcher(user)
    launcher.open(w.site.id)
    launcher.credit(max_jobs=6)
    leased = launcher.leased(6)
    assert ids(leased) == [urgent.id, huge.id, long_big.id, short_big.id, small.id, small2.id]
    launcher.cancel()


def test_in_flight_leases_are_not_counted_twice(short: ShortLeaseHarness, user: Caller) -> None:
    w = World(user)
    w.create(4)
    launcher = Launcher(user)
    launcher.open(w.site.id)
    launcher.credit(max_jobs=2, leases_received=0)
    assert len(launcher.leased(2)) == 2
    # Computed before the launcher saw that lease: the 2 jobs already sent are subtracted.
    launcher.credit(max_jobs=2, leases_received=0)
    launcher.nothing("leases", 0.4)
    launcher.credit(max_jobs=2, leases_received=1)
    assert len(launcher.leased(2)) == 2
    launcher.cancel()


# ---------------------------------------------------------------------------- reports


def test_run_done_finishes_the_job_with_events(short: ShortLeaseHarness, user: Caller) -> None:
    w = World(user)
    w.create(1)
    launcher = Launcher(user)
    launcher.open(w.site.id)
    launcher.credit(max_jobs=1)
    (lj,) = launcher.leased(1)
    data = {"result": 42.0}
    t = launcher.transition(lj, S.JOB_STATE_RUN_DONE, return_code=0)
    t.data.update(data)
    ack = launcher.report(t)
    assert ack.applied_through_seq == t.seq and not ack.rejections
    job = w.get(lj.job.id)
    assert job.state == S.JOB_STATE_JOB_FINISHED and job.return_code == 0 and not job.lease.session_id
    assert dict(job.data) == data
    assert job_events(short, lj.job.id)[-2:] == [("PREPROCESSED", "RUNNING"), ("RUNNING", "JOB_FINISHED")]
    launcher.cancel()


def test_report_with_credit_refills_the_slot_in_its_own_transaction(short: ShortLeaseHarness,
                                                                    user: Caller) -> None:
    """A report carrying the launcher's new credit is answered by its ack and the leases
    under that credit, taken in the report's transaction (one `now`: the finished job's
    event and the new lease's event have the same time), with no credit message."""
    w = World(user)
    first, second = w.create(2)
    launcher = Launcher(user)
    launcher.open(w.site.id)
    launcher.credit(max_jobs=1, leases_received=0)
    (lj,) = launcher.leased(1)
    assert lj.job.id == first.id
    report = session_service_pb2.TransitionReport(
        transitions=[launcher.transition(lj, S.JOB_STATE_RUN_DONE, return_code=0)],
        credit=session_service_pb2.SessionCredit(max_jobs=1, free_nodes=1000.0, leases_received=1))
    launcher.requests.put(Req(report=report))
    assert launcher.next("ack").applied_through_seq == 1
    (refill,) = launcher.leased(1)
    assert refill.job.id == second.id and refill.lease_generation == 1

    def event_time(job_id: int, to_state: str) -> Any:
        return short.db.read_sync(lambda conn: conn.execute(select(events.c.time).where(
            events.c.job_id == job_id, events.c.to_state == to_state)).scalar_one())

    assert event_time(first.id, "JOB_FINISHED") == event_time(second.id, "RUNNING")
    # The credit rode on the report: it was used up by the refill, nothing more is leased.
    w.create(1)
    launcher.nothing("leases", 0.3)
    launcher.cancel()


def test_jobs_held_ahead_stay_runnable_until_started_and_are_released_on_close(short: ShortLeaseHarness,
                                                                               user: Caller) -> None:
    """reserve_jobs leases jobs ahead of the free capacity without making them RUNNING: no
    other session gets them, only the holder's RUNNING report (with its generation) starts
    one, a start and an end may share a report, and a close releases the rest with an event
    that wakes a session with credit."""
    w = World(user)
    created = w.create(4)
    launcher = Launcher(user)
    launcher.open(w.site.id)
    launcher.credit(max_jobs=1, free_nodes=1.0, reserve_jobs=2, reserve_nodes=2.0, leases_received=0)
    leased = launcher.leased(3)
    running = [lj for lj in leased if lj.job.state == S.JOB_STATE_RUNNING]
    ahead = [lj for lj in leased if lj.job.state == S.JOB_STATE_PREPROCESSED]
    assert len(running) == 1 and len(ahead) == 2
    for lj in ahead:
        job = w.get(lj.job.id)
        assert job.state == S.JOB_STATE_PREPROCESSED and job.lease.session_id == running[0].job.lease.session_id
        assert lj.lease_generation == 1 and job.run_count == 0
        assert job_events(short, lj.job.id)[-1][1] == "PREPROCESSED"  # no event for the lease itself
    other = Launcher(user)
    other.open(w.site.id)
    other.credit(max_jobs=10)
    (fourth,) = other.leased(1)  # the one job nobody holds
    assert fourth.job.id not in ids(leased)
    other.nothing("leases", 0.3)
    # A stale generation cannot start a held job; the right one can, and may end it in the same report.
    stale = launcher.transition(ahead[0], S.JOB_STATE_RUNNING)
    stale.lease_generation = 7
    assert launcher.report(stale).rejections[0].reason == "LEASE_LOST"
    assert w.get(ahead[0].job.id).state == S.JOB_STATE_PREPROCESSED
    ahead[0].lease_generation = 1
    ack = launcher.report(launcher.transition(ahead[0], S.JOB_STATE_RUNNING),
                          launcher.transition(ahead[0], S.JOB_STATE_RUN_DONE, return_code=0))
    assert not ack.rejections
    done = w.get(ahead[0].job.id)
    assert done.state == S.JOB_STATE_JOB_FINISHED and done.run_count == 1
    assert job_events(short, done.id)[-2:] == [("PREPROCESSED", "RUNNING"), ("RUNNING", "JOB_FINISHED")]
    # Close: the one never started is released (not RUNNING at any point), and the other
    # session, which has credit left, is woken by its event and leases it.
    launcher.close()
    launcher.done.wait(WAIT)
    # (the RUNNING one it never reported timed out and restarts: the other session takes it too)
    taken = {lj.job.id: lj for lj in other.leased(2)}
    assert sorted(taken) == sorted([ahead[1].job.id, running[0].job.id])
    assert taken[ahead[1].job.id].lease_generation == 3  # held, released, leased again
    assert ("PREPROCESSED", "PREPROCESSED") in job_events(short, ahead[1].job.id)
    assert [e for e in job_events(short, ahead[1].job.id) if e[1] == "RUNNING"] == [("PREPROCESSED", "RUNNING")]
    assert sorted(ids(leased) + [fourth.job.id]) == sorted(j.id for j in created)
    other.cancel()


def test_a_held_job_started_and_ended_in_one_report_is_written_once(short: ShortLeaseHarness,
                                                                     user: Caller) -> None:
    """A job held ahead that starts and ends in one report: its row is written once, with
    the end of a job already RUNNING (one UPDATE of jobs in all), and both events kept in
    order. A start whose end is refused in the same report is still written RUNNING."""
    from sqlalchemy import event

    w = World(user)
    w.create(3)
    launcher = Launcher(user)
    launcher.open(w.site.id)
    launcher.credit(max_jobs=1, free_nodes=1.0, reserve_jobs=2, reserve_nodes=2.0, leases_received=0)
    leased = launcher.leased(3)
    (running,) = [lj for lj in leased if lj.job.state == S.JOB_STATE_RUNNING]
    first, second = [lj for lj in leased if lj.job.state == S.JOB_STATE_PREPROCESSED]
    mine = {lj.job.id for lj in leased}
    updates: list[str] = []

    def ids_in(params: Any) -> set[int]:
        found: set[int] = set()
        for p in params if isinstance(params, (list, tuple)) else [params]:
            for v in (p.values() if isinstance(p, dict) else [p]):
                if isinstance(v, str) and v.startswith("["):  # SQLite: an id list as JSON
                    v = json.loads(v)
                elif isinstance(v, str) and v.startswith("{"):  # PostgreSQL: an array literal (codec.array_text)
                    v = [int(x) for x in v[1:-1].split(",") if x.isdigit()]
                found.update(v if isinstance(v, (list, tuple)) else [v])
        return {v for v in found if isinstance(v, int)}

    def seen(_conn: Any, _cursor: Any, statement: str, params: Any, _context: Any, _many: bool) -> None:
        # A session's writes start with a comment on PostgreSQL (leases.SESSION_TAG).
        if re.sub(r"^\s*/\*.*?\*/", "", statement).lstrip().upper().startswith("UPDATE JOBS") \
                and ids_in(params) & mine:
            updates.append(statement)

    event.listen(short.db.engine, "before_cursor_execute", seen)
    try:
        ack = launcher.report(launcher.transition(first, S.JOB_STATE_RUNNING),
                              launcher.transition(running, S.JOB_STATE_RUN_DONE, return_code=0),
                              launcher.transition(first, S.JOB_STATE_RUN_DONE, return_code=0))
    finally:
        event.remove(short.db.engine, "before_cursor_execute", seen)
    assert not ack.rejections
    assert len(updates) == 1, updates
    for lj in (first, running):
        done = w.get(lj.job.id)
        assert done.state == S.JOB_STATE_JOB_FINISHED and done.run_count == 1 and not done.lease.session_id
        assert done.return_code == 0
        assert job_events(short, lj.job.id)[-2:] == [("PREPROCESSED", "RUNNING"), ("RUNNING", "JOB_FINISHED")]
    # The end is fenced (a stale generation): the start stands.
    end = launcher.transition(second, S.JOB_STATE_RUN_DONE, return_code=0)
    end.lease_generation = 9
    ack = launcher.report(launcher.transition(second, S.JOB_STATE_RUNNING), end)
    assert [r.reason for r in ack.rejections] == ["LEASE_LOST"]
    started = w.get(second.job.id)
    assert started.state == S.JOB_STATE_RUNNING and started.run_count == 1
    assert started.lease.session_id == running.job.lease.session_id
    assert job_events(short, second.job.id)[-1] == ("PREPROCESSED", "RUNNING")
    launcher.cancel()


def test_run_error_keeps_return_code_and_tail(short: ShortLeaseHarness, user: Caller) -> None:
    w = World(user)
    restarting = w.make_app("restarting", on_error=app_pb2.RETRY_ACTION_RESTART)
    (failing,) = w.create(1)
    (retried,) = w.create(1, app=restarting)
    launcher = Launcher(user)
    launcher.open(w.site.id)
    launcher.credit(max_jobs=2)
    by_id = {lj.job.id: lj for lj in launcher.leased(2)}
    ack = launcher.report(
        launcher.transition(by_id[failing.id], S.JOB_STATE_RUN_ERROR, return_code=3, error_tail="boom\nline 2"),
        launcher.transition(by_id[retried.id], S.JOB_STATE_RUN_ERROR, return_code=1, error_tail="oops"))
    assert ack.applied_through_seq == 2 and not ack.rejections
    job = w.get(failing.id)
    assert job.state == S.JOB_STATE_FAILED and job.return_code == 3 and job.error_tail == "boom\nline 2"
    again = w.get(retried.id)
    assert again.state == S.JOB_STATE_RESTART_READY and again.return_code == 1 and again.error_tail == "oops"
    # The credit was used up by the two leases; the launcher's next credit gets the retry.
    launcher.nothing("leases", 0.2)
    launcher.credit(max_jobs=2)
    (relj,) = launcher.leased(1)
    assert relj.job.id == retried.id and relj.lease_generation == 2 and relj.job.run_count == 2
    launcher.cancel()


@pytest.mark.edge("a launcher's report with a 16 KiB message and a 210 KB error tail (multi-byte text)",
                   "state change kept; text cut to the byte limits of FIELD_LIMITS, noted in the data")
def test_report_text_is_cut_to_the_field_limits_in_bytes(short: ShortLeaseHarness, user: Caller) -> None:
    """The session stream used to cut by characters (4,096 of them, 64 Ki of them): a
    message of 4-byte characters stored 16 KiB, a tail of 3-byte ones 192 KiB."""
    w = World(user)
    (job,) = w.create(1)
    launcher = Launcher(user)
    launcher.open(w.site.id)
    launcher.credit(max_jobs=1)
    (lj,) = launcher.leased(1)
    message = "\U0001F600" * 4096  # 16 KiB of UTF-8
    tail = "start " + "\u20ac" * 70_000 + " the end"  # 210 KB
    ack = launcher.report(launcher.transition(lj, S.JOB_STATE_RUN_ERROR, return_code=2, message=message,
                                              error_tail=tail))
    assert ack.applied_through_seq == 1 and not ack.rejections
    got = w.get(job.id)
    assert got.state == S.JOB_STATE_FAILED and got.return_code == 2  # the state change is kept
    assert len(got.error_tail.encode()) <= 64 * 1024 and got.error_tail.endswith(" the end")
    assert len(got.state_message.encode()) <= 4 * 1024 and got.state_message.startswith("\U0001F600")
    assert set(got.data["cut_by_server"]) == {"error_tail", "message"}
    launcher.cancel()


def test_stale_generation_and_bad_states_are_rejected_and_change_nothing(short: ShortLeaseHarness,
                                                                       user: Caller) -> None:
    w = World(user)
    w.create(1)
    launcher = Launcher(user)
    launcher.open(w.site.id)
    launcher.credit(max_jobs=1)
    (lj,) = launcher.leased(1)
    stale = launcher.transition(lj, S.JOB_STATE_RUN_DONE)
    stale.lease_generation = lj.lease_generation - 1
    illegal = launcher.transition(lj, S.JOB_STATE_JOB_FINISHED)
    before = job_events(short, lj.job.id)
    ack = launcher.report(stale, illegal)
    assert ack.applied_through_seq == illegal.seq
    codes = {r.seq: (r.code, r.reason) for r in ack.rejections}
    assert codes == {stale.seq: (grpc.StatusCode.ABORTED.value[0], "LEASE_LOST"),
                     illegal.seq: (grpc.StatusCode.FAILED_PRECONDITION.value[0], "ILLEGAL_TRANSITION")}
    assert w.get(lj.job.id).state == S.JOB_STATE_RUNNING
    assert job_events(short, lj.job.id) == before
    launcher.cancel()


def test_resent_transitions_are_applied_once(short: ShortLeaseHarness, user: Caller) -> None:
    w = World(user, on_error=app_pb2.RETRY_ACTION_RESTART)
    w.create(2)
    launcher = Launcher(user)
    launcher.open(w.site.id)
    launcher.credit(max_jobs=2)
    a, b = launcher.leased(2)
    ta = launcher.transition(a, S.JOB_STATE_RUN_ERROR, return_code=1)
    assert launcher.report(ta).applied_through_seq == ta.seq
    tb = launcher.transition(b, S.JOB_STATE_RUN_DONE)
    # The first one again (its ack was "lost"), with the new one.
    ack = launcher.report(ta, tb)
    assert ack.applied_through_seq == tb.seq and not ack.rejections
    assert [e for e in job_events(short, a.job.id) if e[0] == "RUNNING"] == [("RUNNING", "RESTART_READY")]
    assert w.get(b.job.id).state == S.JOB_STATE_JOB_FINISHED
    ack = launcher.report(ta, tb)
    assert ack.applied_through_seq == tb.seq and not ack.rejections
    assert len([e for e in job_events(short, b.job.id) if e[0] == "RUNNING"]) == 1
    launcher.cancel()


# ---------------------------------------------------------------------------- concurrency


def test_concurrent_sessions_never_share_a_job(short: ShortLeaseHarness, user: Caller) -> None:
    w = World(user)
    total = 600
    launchers = [Launcher(user) for _ in range(3)]
    for launcher in launchers:
        launcher.open(w.site.id)
        launcher.credit(max_jobs=total, free_nodes=total)
    for i in range(0, total, 100):
        w.create(100)
    got: dict[int, list[int]] = {}

    def count() -> bool:
        for n, launcher in enumerate(launchers):
            while not launcher.inbox["leases"].empty():
                got.setdefault(n, []).extend(ids(list(launcher.inbox["leases"].get().jobs)))
        return sum(len(v) for v in got.values()) >= total

    wait_until(count, what=f"{total} leases")
    every = [j for v in got.values() for j in v]
    assert len(every) == total and len(set(every)) == total
    rows = short.db.read_sync(lambda conn: conn.execute(
        select(jobs.c.session_id, jobs.c.state).where(jobs.c.site_id == w.site.id)).all())
    assert {r.state for r in rows} == {"RUNNING"} and all(r.session_id for r in rows)
    for launcher in launchers:
        launcher.cancel()


# ---------------------------------------------------------------------------- liveness


def test_broken_stream_times_out_jobs_and_another_session_takes_them(short: ShortLeaseHarness, user: Caller) -> None:
    w = World(user)
    w.create(3)
    first = Launcher(user)
    opened = first.open(w.site.id)
    first.credit(max_jobs=3)
    old = first.leased(3)
    first.cancel()  # the launcher dies: no close, no report
    second = Launcher(user)
    second.open(w.site.id)
    second.credit(max_jobs=3)
    again = second.leased(3, timeout=LEASE_TIMEOUT + WAIT)
    assert sorted(ids(again)) == sorted(ids(old))
    assert all(lj.lease_generation == 3 for lj in again)  # leased, released (bumped), leased again
    for lj in old:
        path = [e for e in job_events(short, lj.job.id) if e[0] == "RUNNING"]
        assert path == [("RUNNING", "RESTART_READY")]  # RUN_TIMEOUT, then the default timeout policy
    session = user.stub(session_service_pb2_grpc.SessionServiceStub).GetSession(
        session_service_pb2.GetSessionRequest(id=opened.session.id)).session
    assert session.state == session_pb2.SESSION_STATE_EXPIRED
    # The dead session cannot be resumed: a clear error, open a new one.
    zombie = Launcher(user)
    with pytest.raises(AssertionError):
        zombie.open(w.site.id, resume_session_id=opened.session.id)
    assert zombie.error is not None and zombie.error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert status_reason(zombie.error) == "SESSION_EXPIRED"
    second.cancel()


def test_resume_within_the_timeout_keeps_the_leases(short: ShortLeaseHarness, user: Caller) -> None:
    w = World(user)
    w.create(2)
    first = Launcher(user)
    opened = first.open(w.site.id)
    first.credit(max_jobs=2)
    a, b = first.leased(2)
    ta = first.transition(a, S.JOB_STATE_RUN_DONE)
    assert first.report(ta).applied_through_seq == ta.seq
    first.cancel()
    resumed = Launcher(user)
    again = resumed.open(0, resume_session_id=opened.session.id)
    assert again.session.id == opened.session.id and again.applied_through_seq == ta.seq
    assert [(lj.job.id, lj.lease_generation) for lj in again.leased_jobs] == [(b.job.id, b.lease_generation)]
    time.sleep(LEASE_TIMEOUT + 0.5)  # past the old deadline: the resumed stream keeps it alive
    resumed.seq = ta.seq
    tb = resumed.transition(b, S.JOB_STATE_RUN_DONE)
    ack = resumed.report(tb)
    assert ack.applied_through_seq == tb.seq and not ack.rejections
    assert w.get(b.job.id).state == S.JOB_STATE_JOB_FINISHED
    resumed.cancel()


def test_user_kill_reaches_the_launcher(short: ShortLeaseHarness, user: Caller) -> None:
    w = World(user)
    w.create(2)
    launcher = Launcher(user)
    launcher.open(w.site.id)
    launcher.credit(max_jobs=2)
    a, b = launcher.leased(2)
    w.kill(a.job.id)
    kill = launcher.next("kill")
    assert list(kill.job_ids) == [a.job.id] and "killed" in kill.reason
    # Its late report is fenced; the other job is untouched.
    ack = launcher.report(launcher.transition(a, S.JOB_STATE_RUN_DONE))
    assert [r.reason for r in ack.rejections] == ["LEASE_LOST"]
    assert w.get(a.job.id).state == S.JOB_STATE_KILLED and w.get(b.job.id).state == S.JOB_STATE_RUNNING
    launcher.cancel()


def test_delete_session_kills_its_jobs_and_they_follow_the_policy(short: ShortLeaseHarness, user: Caller) -> None:
    w = World(user)
    w.create(1)
    launcher = Launcher(user)
    opened = launcher.open(w.site.id)
    launcher.credit(max_jobs=1)
    (lj,) = launcher.leased(1)
    user.stub(session_service_pb2_grpc.SessionServiceStub).DeleteSession(
        session_service_pb2.DeleteSessionRequest(id=opened.session.id))
    kill = launcher.next("kill")
    assert list(kill.job_ids) == [lj.job.id] and "lease lost" in kill.reason
    job = w.get(lj.job.id)
    assert job.state == S.JOB_STATE_RESTART_READY and not job.lease.session_id
    # Then the stream ends: the launcher opens a new session if it wants more work.
    assert launcher.done.wait(WAIT) and launcher.error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert status_reason(launcher.error) == "SESSION_CLOSED"


def test_close_then_half_close_closes_the_session(short: ShortLeaseHarness, user: Caller) -> None:
    w = World(user)
    w.create(1)
    launcher = Launcher(user)
    opened = launcher.open(w.site.id)
    launcher.credit(max_jobs=1)
    (lj,) = launcher.leased(1)
    launcher.close()
    assert launcher.done.wait(WAIT) and launcher.error is None
    session = user.stub(session_service_pb2_grpc.SessionServiceStub).GetSession(
        session_service_pb2.GetSessionRequest(id=opened.session.id)).session
    assert session.state == session_pb2.SESSION_STATE_CLOSED
    assert w.get(lj.job.id).state == S.JOB_STATE_RESTART_READY


def test_requests_ending_without_close_keep_the_session_resumable(short: ShortLeaseHarness, user: Caller) -> None:
    """A lost connection can end the request stream like a half-close: without an explicit
    close the session stays ACTIVE with its leases, and a resume gets them back."""
    w = World(user)
    w.create(1)
    launcher = Launcher(user)
    opened = launcher.open(w.site.id)
    launcher.credit(max_jobs=1)
    (lj,) = launcher.leased(1)
    launcher.half_close()
    assert launcher.done.wait(WAIT)
    sessions = user.stub(session_service_pb2_grpc.SessionServiceStub)
    session = sessions.GetSession(session_service_pb2.GetSessionRequest(id=opened.session.id)).session
    assert session.state == session_pb2.SESSION_STATE_ACTIVE
    assert w.get(lj.job.id).state == S.JOB_STATE_RUNNING
    again = Launcher(user)
    resumed = again.open(w.site.id, resume_session_id=opened.session.id)
    assert [j.job.id for j in resumed.leased_jobs] == [lj.job.id]
    again.close()
    assert again.done.wait(WAIT) and again.error is None


# ---------------------------------------------------------------------------- access


def test_site_token_of_another_site_is_refused(short: ShortLeaseHarness, user: Caller) -> None:
    mine, other = World(user), World(user)
    token = short.user(user.username, scope="SITE", site_id=mine.site.id)
    launcher = Launcher(token)
    with pytest.raises(AssertionError):
        launcher.open(other.site.id)
    assert launcher.error is not None and launcher.error.code() == grpc.StatusCode.PERMISSION_DENIED
    ok = Launcher(token)
    assert ok.open(mine.site.id).session.site_id == mine.site.id
    ok.cancel()


def test_bad_first_message_and_unknown_site(short: ShortLeaseHarness, user: Caller) -> None:
    launcher = Launcher(user)
    launcher.credit(max_jobs=1)
    assert launcher.done.wait(WAIT) and launcher.error.code() == grpc.StatusCode.INVALID_ARGUMENT
    stranger = Launcher(short.user())
    with pytest.raises(AssertionError):
        stranger.open(World(user).site.id)
    assert stranger.error is not None and stranger.error.code() == grpc.StatusCode.NOT_FOUND


def test_sessions_left_active_by_a_dead_server_are_expired_after_a_grace(short: ShortLeaseHarness,
                                                                         user: Caller) -> None:
    from datetime import timedelta

    from sqlalchemy import insert, update

    from balsam_grpc.server.convert import utcnow
    from balsam_grpc.server.embedded import EmbeddedServer
    from balsam_grpc.server.state import ServerSettings
    from balsam_grpc.server.store.tables import sessions

    w = World(user)
    (job,) = w.create(1)
    long_ago = utcnow() - timedelta(hours=1)
    sid = uuid.uuid4().hex

    def crash_leftovers(conn: Any) -> None:
        conn.execute(insert(sessions).values(
            id=sid, owner_id=user.user_id, site_id=w.site.id, job_mode="MPI", nodes=[], state="ACTIVE", hostname="x",
            applied_through_seq=0, create_time=long_ago, heartbeat_time=long_ago, expire_time=long_ago))
        conn.execute(update(jobs).where(jobs.c.id == job.id).values(state="RUNNING", session_id=sid,
                                                                    lease_generation=1))

    short.db.write_sync(crash_leftovers)
    started = utcnow()
    restarted = EmbeddedServer(ServerSettings(address="127.0.0.1:0", database_url=short.url, grace_seconds=0.2,
                                              lease_timeout_seconds=LEASE_TIMEOUT))
    try:
        def state() -> tuple[str, str, Any]:
            s = short.db.read_sync(lambda conn: conn.execute(
                select(sessions.c.state, sessions.c.expire_time).where(sessions.c.id == sid)).one())
            return s.state, w.get(job.id).state, s.expire_time

        session_state, _, expire = state()
        if session_state == "ACTIVE":  # still in its grace: one lease timeout from the restart
            assert expire.replace(tzinfo=expire.tzinfo or started.tzinfo) >= started
        wait_until(lambda: state()[:2] == ("EXPIRED", S.JOB_STATE_RESTART_READY), "the recovered session to expire",
                   LEASE_TIMEOUT + WAIT)
        assert [e for e in job_events(short, job.id) if e[0] == "RUNNING"] == [("RUNNING", "RESTART_READY")]
    finally:
        restarted.stop()


def test_no_acquisition_for_unrelated_events_or_without_credit(short: ShortLeaseHarness, user: Caller,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from balsam_grpc.server.store import leases

    calls = {"acquire": 0, "runnable_since": 0}
    for name in calls:
        real = getattr(leases, name)

        def counted(*args: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
            calls[_name] += 1
            return _real(*args, **kw)

        monkeypatch.setattr(leases, name, counted)
    w, elsewhere = World(user), World(user)
    launcher = Launcher(user)
    launcher.open(w.site.id)
    launcher.credit(max_jobs=1)
    w.create(1)
    (lj,) = launcher.leased(1)
    # Credit used up: new runnable jobs of its own site do not make it look or acquire.
    before = dict(calls)
    for _ in range(5):
        w.create(2)
    launcher.nothing("leases", 0.5)
    assert calls == before
    # Credit again: one acquisition at once; events of another site never reach this
    # session (the fanout routes by site): no look at the event log, no acquisition.
    launcher.credit(max_jobs=100)
    assert len(launcher.leased(10)) == 10
    after_credit = dict(calls)
    for _ in range(5):
        elsewhere.create(2)
    launcher.nothing("leases", 0.5)
    assert calls == after_credit
    launcher.cancel()
