"""The launcher's per-job path without a server: the master's queue and credit, the runner's
CPU binding, the job watchdog's bookkeeping (real processes, no MPI)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balsam_grpc.launcher.config import LauncherConfig
from balsam_grpc.launcher.master import (
    FOLLOW_WAIT_MAX_S,
    PREFETCH_MAX,
    JobQueue,
    LocalJob,
    Master,
    auto_prefetch,
)
from balsam_grpc.launcher.node_manager import Resources
from balsam_grpc.launcher.nodes import NodeSpec
from balsam_grpc.launcher.process_spec import ProcessSpec, RunContext
from balsam_grpc.launcher.reaper import Reaper
from balsam_grpc.launcher.runner import WITHDRAWN, ProcessResult, ProcessRunner
from balsam_grpc.v1 import app_pb2, job_pb2, session_service_pb2

S = job_pb2


def local_job(job_id: int, *, held: bool, packing: int = 1, num_nodes: int = 1) -> LocalJob:
    state = S.JOB_STATE_PREPROCESSED if held else S.JOB_STATE_RUNNING
    job = job_pb2.Job(id=job_id, state=state, workdir=f"w/{job_id}",
                      resources=job_pb2.JobResources(node_packing_count=packing, num_nodes=num_nodes))
    res = Resources.from_pb(job.resources)
    lj = session_service_pb2.LeasedJob(job=job, app=app_pb2.App(id=1, command_template="/bin/true"),
                                       lease_generation=1)
    return LocalJob(lj, res, footprint=float(res.occupancy * res.num_nodes))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans(), st.integers(1, 6), st.integers(0, 60)), max_size=80))
def test_the_queues_sums_match_a_recount(ops):
    """The credit reads these sums at every wake-up instead of walking the queue."""
    queue = JobQueue()
    next_id = 1
    for add, held, packing, pick in ops:
        if add or not queue:
            queue.add(local_job(next_id, held=held, packing=packing))
            next_id += 1
        else:
            queue.pop(list(queue)[pick % len(queue)])
        jobs = list(queue.jobs.values())
        assert queue.ahead == sum(j.held_ahead for j in jobs)
        assert queue.leased == sum(not j.held_ahead for j in jobs)
        assert queue.ahead_nodes == pytest.approx(sum(j.footprint for j in jobs if j.held_ahead), abs=1e-9)
        assert queue.leased_nodes == pytest.approx(sum(j.footprint for j in jobs if not j.held_ahead), abs=1e-9)
        if not queue.ahead:
            assert queue.ahead_nodes == 0.0


class _Client:
    def __init__(self) -> None:
        self.reports: list[session_service_pb2.JobTransition] = []

    def report(self, tr: session_service_pb2.JobTransition) -> int:
        self.reports.append(tr)
        return len(self.reports)

    def wake(self) -> None:
        pass


class _Dispatcher:
    """Starts nothing; remembers what it was asked to start."""

    def __init__(self) -> None:
        self.started: list[int] = []

    def has_runner(self, node_index: int) -> bool:
        return True

    def start(self, node_index: int | None, spec: ProcessSpec) -> ProcessResult | None:
        self.started.append(spec.job_id)
        return None


class _Channel:
    def __getattr__(self, _name):
        return lambda *args, **kwargs: None


def master(tmp_path: Path, cpus: int = 2, prefetch: int = 8) -> Master:
    cfg = LauncherConfig(mode="serial", site_dir=tmp_path, site_id=1, batch_job_id=1, lease_prefetch=prefetch)
    ctx = RunContext(data_dir=tmp_path / "data", apps_dir=tmp_path / "apps")
    m = Master(cfg, [NodeSpec(hostname="h", cpus=cpus, gpus=0)], _Dispatcher(), _Channel(), (), ctx)
    m.client = _Client()  # type: ignore[assignment]
    return m


def lease(m: Master, *jobs: LocalJob) -> None:
    m._on_leases(session_service_pb2.JobLeases(jobs=[j.leased for j in jobs]))


def test_a_full_launcher_still_reports_a_job_that_can_never_run_here(tmp_path):
    """Placing stops at the first job that finds the nodes full; a job that can never run
    (here: 2 nodes in a 1-node allocation) is reported all the same, wherever it queues."""
    m = master(tmp_path)
    lease(m, *(local_job(i, held=i > 2, packing=2) for i in range(1, 6)))
    lease(m, local_job(9, held=True, num_nodes=2))
    m._schedule()
    assert m.dispatcher.started == [1, 2]
    refused = [tr for tr in m.client.reports if tr.job_id == 9]
    assert [tr.state for tr in refused] == [S.JOB_STATE_RUNNING, S.JOB_STATE_RUN_ERROR]
    assert "cannot run in this launcher" in refused[1].message
    assert 9 not in m.jobs and list(m.queue) == [3, 4, 5]
    m._schedule()  # reported once
    assert [tr.job_id for tr in m.client.reports].count(9) == 2


def test_the_credit_counts_what_is_queued_and_held_ahead(tmp_path):
    m = master(tmp_path, cpus=4, prefetch=8)
    assert (m._credit().max_jobs, m._credit().reserve_jobs) == (4, 8)
    lease(m, local_job(1, held=False, packing=4), *(local_job(i, held=True, packing=4) for i in range(2, 5)))
    credit = m._credit()
    assert credit.max_jobs == 3 and credit.free_nodes == pytest.approx(0.75)
    assert credit.reserve_jobs == 5 and credit.reserve_nodes == pytest.approx(8 - 0.75)
    m._schedule()  # starts all four; none queued
    credit = m._credit()
    assert m.dispatcher.started == [1, 2, 3, 4] and credit.max_jobs == 0 and credit.reserve_jobs == 8
    lease(m, *(local_job(i, held=True, packing=4) for i in range(5, 10)))
    assert m._credit().reserve_jobs == 0  # more than half of the 8 held: asked for again later
    m._drop(5, "the server asked")
    m._drop(6, "the server asked")
    assert m._credit().reserve_jobs == 5 and m.queue.ahead == 3


def test_the_horizon_covers_the_refill_wait_up_to_a_second():
    assert auto_prefetch(2) == 0  # no run time known yet
    assert auto_prefetch(2, 0.01) == 50  # a quarter second of two slots
    assert auto_prefetch(2, 0.01, refill_s=0.05) == 50  # half of it covers the wait twice
    assert auto_prefetch(2, 0.01, refill_s=0.15) == 120  # 4 x 0.15 s
    assert auto_prefetch(2, 0.01, refill_s=30.0) == 200  # a server with nothing to lease: 1 s at most
    assert auto_prefetch(2, 0.0001, refill_s=0.15) == PREFETCH_MAX


def test_a_slow_refill_makes_the_launcher_hold_more_ahead(tmp_path):
    """The held jobs are asked for again at half; when the refill takes longer than half
    of them lasts, the slots run dry. The launcher measures the wait and holds enough
    that half covers it twice; the longest wait decays as refills come faster."""
    m = master(tmp_path, cpus=2, prefetch=-1)
    now = [100.0]
    m.clock = lambda: now[0]
    m.mean_run_s = 0.01
    m.prefetch = auto_prefetch(m.slots, m.mean_run_s)
    assert m.prefetch == 50 and m._credit().reserve_jobs == 50  # nothing held: asked for now
    now[0] += 0.15
    lease(m, *(local_job(i, held=True) for i in range(1, 51)))
    assert m.refill_s == pytest.approx(0.15) and m.prefetch == 120
    assert m._credit().reserve_jobs == 70  # 50 of 120 held: below half, asked for again
    now[0] += 0.01
    lease(m, *(local_job(i, held=True) for i in range(51, 121)))
    assert m.refill_s == pytest.approx(0.8 * 0.15) and m.prefetch == 96  # decayed, not dropped
    assert m._credit().reserve_jobs == 0  # 120 held: more than enough, nothing asked
    now[0] += 5.0  # no refill was wanted meanwhile: this wait is not one
    lease(m, local_job(200, held=True))
    assert m.refill_s == pytest.approx(0.12)


# -- the runner ---------------------------------------------------------------------------------


def run_to_end(runner: ProcessRunner, spec: ProcessSpec, argv) -> ProcessResult:
    assert runner.start(spec) is None
    assert argv() == spec.argv  # the job itself: no program in between
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done = runner.poll()
        if done:
            return done[0]
        time.sleep(0.01)
    raise AssertionError("the job did not end")


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two CPUs to bind to one")
def test_a_directly_started_job_runs_bound_to_its_cpus_and_the_launcher_is_not(tmp_path):
    mine = sorted(os.sched_getaffinity(0))
    (tmp_path / "data").mkdir()
    runner = ProcessRunner()
    try:
        spec = ProcessSpec(job_id=1, argv=[sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                           cwd=str(tmp_path / "data" / "w1"), cpu_ids=[mine[-1]], root=str(tmp_path / "data"))
        result = run_to_end(runner, spec, lambda: runner.running[1].proc.args)
        assert result.return_code == 0
        assert (tmp_path / "data" / "w1" / "job.out").read_text().strip() == str([mine[-1]])
        assert sorted(os.sched_getaffinity(0)) == mine
    finally:
        runner.shutdown()


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two CPUs to bind to one")
def test_jobs_bound_to_different_cpus_in_turn_each_get_their_own_and_no_binding_outlives_the_runner(tmp_path):
    """Jobs alternate between two CPU sets (as two slots of one CPU do): each gets its own
    set, a failed bind is a spawn_error naming the CPUs, and shutdown leaves no thread
    bound to a job's CPUs behind."""
    import threading

    mine = sorted(os.sched_getaffinity(0))
    (tmp_path / "data").mkdir()
    runner = ProcessRunner()
    runner.host_cpus = mine[-1] + 2  # a CPU this machine has not: the kernel refuses the bind
    try:
        for job_id, cpu in enumerate([mine[0], mine[-1], mine[0], mine[-1]], 1):
            spec = ProcessSpec(job_id=job_id, argv=[sys.executable, "-c",
                                                    "import os; print(sorted(os.sched_getaffinity(0)))"],
                               cwd=str(tmp_path / "data" / f"w{job_id}"), cpu_ids=[cpu], root=str(tmp_path / "data"))
            assert run_to_end(runner, spec, lambda j=job_id: runner.running[j].proc.args).return_code == 0
            assert (tmp_path / "data" / f"w{job_id}" / "job.out").read_text().strip() == str([cpu])
        refused = runner.start(ProcessSpec(job_id=9, argv=["/bin/true"], cwd=str(tmp_path / "data" / "w9"),
                                           cpu_ids=[mine[-1] + 1], root=str(tmp_path / "data")))
        assert refused is not None and refused.outcome == "spawn_error"
        assert f"cannot bind to CPUs {mine[-1] + 1}" in refused.message
        assert sorted(os.sched_getaffinity(0)) == mine
    finally:
        runner.shutdown()
    assert not [t for t in threading.enumerate() if t.name.startswith("spawn on CPUs")]


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_watchdog_learns_ended_groups_late_and_is_replaced_when_it_died():
    """A group that ended is told with the next start (or a flush); a watchdog that died is
    noticed at the next write and its successor told every group still running."""
    sleepers = [subprocess.Popen(["sleep", "60"], start_new_session=True) for _ in range(3)]
    reaper = Reaper()
    try:
        a, b, c = (p.pid for p in sleepers)
        reaper.watch(a)
        reaper.watch(b)
        reaper.forget(a)  # as if a's group had ended: a must be spared from here on
        assert reaper._ended == [f"-{a}\n"]
        reaper.flush()
        assert reaper._ended == []
        first = reaper.proc
        assert first is not None
        first.kill()
        first.wait(10)
        reaper.watch(c)  # the write fails: a new watchdog with b and c
        assert reaper.proc is not None and reaper.proc.pid != first.pid
        reaper.close()  # the watchdog kills what is registered
        deadline = time.monotonic() + 10
        while (_alive(b) or _alive(c)) and time.monotonic() < deadline:
            for p in sleepers:
                p.poll()
            time.sleep(0.05)
        assert not _alive(b) and not _alive(c)
        assert _alive(a)
    finally:
        for p in sleepers:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(10)
        reaper.close()


def test_the_watchdog_reads_a_line_written_in_pieces():
    """It reads what gathered in the pipe between its pauses, so a line may come in two."""
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    dog = subprocess.Popen([sys.executable, "-m", "balsam_grpc.launcher.reaper"], stdin=subprocess.PIPE,
                           start_new_session=True)
    try:
        assert dog.stdin is not None
        text = f"+{sleeper.pid}\n".encode()
        dog.stdin.write(text[:2])
        dog.stdin.flush()
        time.sleep(0.2)  # it reads the first piece alone
        dog.stdin.write(text[2:])
        dog.stdin.close()
        dog.wait(10)
        assert sleeper.wait(10) == -signal.SIGTERM
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait(10)
        if dog.poll() is None:
            dog.kill()
            dog.wait(10)


def _poll_until(runner: ProcessRunner, job_ids: set[int]) -> list[ProcessResult]:
    results: list[ProcessResult] = []
    deadline = time.monotonic() + 20
    while {r.job_id for r in results} != job_ids:
        assert time.monotonic() < deadline, f"ended: {results}"
        results += runner.poll()
        time.sleep(0.01)
    return results


def test_a_job_that_ends_is_reaped_without_asking_after_every_running_one(tmp_path):
    (tmp_path / "data").mkdir()
    runner = ProcessRunner()
    asked: list[int] = []
    try:
        def spec(job_id: int, argv: list[str]) -> ProcessSpec:
            return ProcessSpec(job_id=job_id, argv=argv, cwd=str(tmp_path / "data" / f"w{job_id}"),
                               root=str(tmp_path / "data"))

        for job_id in range(1, 11):
            assert runner.start(spec(job_id, ["sleep", "60"])) is None
            proc = runner.running[job_id].proc
            proc.poll = (lambda p=proc, j=job_id: asked.append(j) or type(p).poll(p))  # type: ignore[method-assign]
        assert runner.start(spec(11, ["true"])) is None
        results = _poll_until(runner, {11})
        assert results[0].return_code == 0 and results[0].outcome == "exit"
        assert asked == []
        assert sorted(runner.running) == list(range(1, 11))
        # A child that is no job's ends unreaped: every job is asked after, and none is lost.
        stranger = subprocess.Popen(["true"])
        time.sleep(0.2)
        assert runner.start(spec(12, ["true"])) is None
        results = _poll_until(runner, {12})
        assert results[0].return_code == 0 and set(asked) == set(range(1, 11))
        stranger.wait(10)
        runner.kill(3, "timeout", "test")
        results = _poll_until(runner, {3})
        assert results[0].outcome == "timeout"
    finally:
        runner.shutdown()


def test_a_job_whose_environment_or_arguments_exec_cannot_take_fails_alone(tmp_path):
    """A variable name with `=` (an app's environment is not checked elsewhere) or a NUL byte
    in an argument: that job's start fails (RUN_ERROR follows), the launcher goes on. Popen's
    ValueError used to escape the runner and end the launcher with every job it ran."""
    (tmp_path / "data").mkdir()
    runner = ProcessRunner()
    try:
        def spec(job_id: int, argv: list[str], env: dict[str, str]) -> ProcessSpec:
            return ProcessSpec(job_id=job_id, argv=argv, env=env, cwd=str(tmp_path / "data" / f"w{job_id}"),
                               root=str(tmp_path / "data"))

        bad_env = runner.start(spec(1, ["/bin/true"], {"A=B": "c"}))
        bad_arg = runner.start(spec(2, ["/bin/echo", "a\0b"], {}))
        for result in (bad_env, bad_arg):
            assert result is not None and result.outcome == "spawn_error" and "could not start" in result.message
        bad_dir = runner.start(ProcessSpec(job_id=4, argv=["/bin/true"], cwd=str(tmp_path / "data" / "a\0b"),
                                           root=str(tmp_path / "data")))
        assert bad_dir is not None and bad_dir.outcome == "spawn_error" and "refused to run" in bad_dir.message
        assert "environment variable" in bad_env.message
        assert not runner.running
        assert runner.start(spec(3, ["/bin/true"], {"FINE": "yes"})) is None
        assert _poll_until(runner, {3})[0].return_code == 0
    finally:
        runner.shutdown()


# -- background starts (the master's runner) --------------------------------------------------


class _Gate:
    """Holds the hand-over of background starts (the watchdog's registration is its first
    step) until opened; counts the owner's wake-ups."""

    def __init__(self, runner: ProcessRunner) -> None:
        import threading

        self.open = threading.Event()
        self.woken = threading.Event()
        self.wakes = 0
        watch = runner.reaper.watch

        def held_watch(pgid: int) -> None:
            assert self.open.wait(20)
            watch(pgid)

        runner.reaper.watch = held_watch  # type: ignore[method-assign]
        runner.start_in_background(self.wake)

    def wake(self) -> None:
        self.wakes += 1
        self.woken.set()


def _bg_spec(tmp_path: Path, job_id: int, argv: list[str], **kw) -> ProcessSpec:
    return ProcessSpec(job_id=job_id, argv=argv, cwd=str(tmp_path / "data" / f"w{job_id}"),
                       root=str(tmp_path / "data"), **kw)


def test_a_background_start_that_ends_before_its_hand_over_wakes_the_loop_and_is_reaped(tmp_path):
    """start() returns before the process exists; a job that ends before the spawner thread
    hands it over raises its SIGCHLD too early for poll() to know it: the hand-over must
    wake the loop, or the slot stays idle until some other event."""
    (tmp_path / "data").mkdir()
    runner = ProcessRunner()
    gate = _Gate(runner)
    try:
        assert runner.start(_bg_spec(tmp_path, 1, ["/bin/true"])) is None
        assert 1 in runner.starting and len(runner) == 1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the child ends while its hand-over is held
            try:
                if os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    break
            except ChildProcessError:  # not forked yet
                pass
            time.sleep(0.01)
        assert runner.poll() == [] and not gate.woken.is_set()  # SIGCHLD's poll: nothing known yet
        gate.open.set()
        assert gate.woken.wait(10), "the hand-over did not wake the loop"
        (result,) = _poll_until(runner, {1})
        assert result.outcome == "exit" and result.return_code == 0 and not runner.starting
    finally:
        gate.open.set()
        runner.shutdown()


def test_a_background_start_that_fails_or_is_killed_meanwhile_is_reported_by_poll(tmp_path):
    (tmp_path / "data").mkdir()
    runner = ProcessRunner()
    gate = _Gate(runner)
    try:
        assert runner.start(_bg_spec(tmp_path, 1, [str(tmp_path / "no-such-program")])) is None
        assert gate.woken.wait(10), "a failed start must wake the loop"
        (failed,) = _poll_until(runner, {1})
        assert failed.outcome == "spawn_error" and "could not start" in failed.message
        assert "could not start" in (tmp_path / "data" / "w1" / "job.out").read_text()
        gate.woken.clear()
        assert runner.start(_bg_spec(tmp_path, 2, ["sleep", "60"], timeout_s=30)) is None
        assert runner.next_deadline() is not None  # its time limit counts from start()
        assert runner.kill(2, "killed", "the server asked")
        assert gate.woken.wait(10)
        gate.open.set()  # handed over: poll() signals it
        (killed,) = _poll_until(runner, {2})
        assert killed.outcome == "killed" and killed.return_code == -signal.SIGTERM
        # Killed while a start that fails is handed over: killed, not a spawn_error (which
        # the master would report as RUN_ERROR for a job it no longer holds).
        gate.open.clear()
        could_not_start = runner._could_not_start

        def held(*args):
            assert gate.open.wait(20)
            return could_not_start(*args)

        runner._could_not_start = held  # type: ignore[method-assign]
        assert runner.start(_bg_spec(tmp_path, 3, [str(tmp_path / "no-such-program")])) is None
        assert runner.kill(3, "killed", "the lease is gone")
        gate.open.set()
        (dropped,) = _poll_until(runner, {3})
        assert dropped.outcome == "killed" and dropped.message == "the lease is gone"
    finally:
        gate.open.set()
        runner.shutdown()


def test_shutdown_kills_a_job_still_being_started_and_tells_the_watchdog_nothing_after(tmp_path):
    (tmp_path / "data").mkdir()
    runner = ProcessRunner()
    gate = _Gate(runner)
    pid_file = tmp_path / "data" / "w1" / "pid"
    assert runner.start(_bg_spec(tmp_path, 1, ["/bin/sh", "-c", f"echo $$ > {pid_file}; exec sleep 60"])) is None
    deadline = time.monotonic() + 10
    while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.01)
    pid = int(pid_file.read_text())
    gate.open.set()
    runner.shutdown()
    assert not _alive(pid) and not runner.starting and runner.reaper.proc is None


# -- followers: a job started the moment the one whose CPUs it takes over ends ---------------

_TWO_CPUS = pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                               reason="needs two CPUs to bind a job to one")


def _wait_for(flag: Path) -> str:
    return f"while [ ! -e {flag} ]; do sleep 0.01; done"


def _running(runner: ProcessRunner, job_id: int) -> None:
    """Until poll() has taken the job's start in."""
    deadline = time.monotonic() + 20
    while job_id not in runner.running:
        assert not runner.poll() and time.monotonic() < deadline, "the job did not start"
        time.sleep(0.01)


@_TWO_CPUS
def test_a_follower_starts_when_the_job_it_follows_ends_and_its_time_counts_from_then(tmp_path):
    (tmp_path / "data").mkdir()
    runner = ProcessRunner()
    runner.start_in_background(lambda: None)
    log, go, done = tmp_path / "order", tmp_path / "go", tmp_path / "done"
    try:
        assert runner.start(_bg_spec(tmp_path, 1, ["/bin/sh", "-c", f"{_wait_for(go)}; echo a >> {log}"],
                                     cpu_ids=[0])) is None
        _running(runner, 1)
        assert runner.can_follow(1)
        with pytest.raises(ValueError):  # not on the CPUs of the job it would follow
            runner.start(_bg_spec(tmp_path, 9, ["/bin/true"], cpu_ids=[1]), after=1)
        assert runner.start(_bg_spec(tmp_path, 2, ["/bin/sh", "-c", f"echo b >> {log}; {_wait_for(done)}"],
                                     cpu_ids=[0], timeout_s=30), after=1) is None
        assert 2 in runner.starting and runner.next_deadline() is None  # its wall time has not begun
        go.touch()
        (first,) = _poll_until(runner, {1})
        assert first.outcome == "exit" and first.return_code == 0
        _running(runner, 2)
        assert runner.running[2].proc.pid in runner.reaper.groups  # the watchdog knows it
        assert runner.next_deadline() is not None
        done.touch()
        (second,) = _poll_until(runner, {2})
        assert second.outcome == "exit" and second.return_code == 0
        assert log.read_text() == "a\nb\n"
    finally:
        go.touch()
        done.touch()
        runner.shutdown()


@_TWO_CPUS
@pytest.mark.parametrize("how", ["killed", WITHDRAWN])
def test_a_follower_stopped_before_the_job_it_follows_ends_never_starts(tmp_path, how):
    """Killed (the server asked), or taken back (withdraw: the job it follows runs long, and
    the master starts it elsewhere), a waiting follower never starts: nothing ran, nothing
    written; the job it followed runs on. Only a follower still waiting can be taken back."""
    (tmp_path / "data").mkdir()
    runner = ProcessRunner()
    runner.start_in_background(lambda: None)
    log, go = tmp_path / "order", tmp_path / "go"
    try:
        assert runner.start(_bg_spec(tmp_path, 1, ["/bin/sh", "-c", f"{_wait_for(go)}; echo a >> {log}"],
                                     cpu_ids=[0])) is None
        _running(runner, 1)
        assert not runner.withdraw(1)  # it runs: not a follower
        assert runner.start(_bg_spec(tmp_path, 2, ["/bin/sh", "-c", f"echo b >> {log}"], cpu_ids=[0]),
                            after=1) is None
        if how == "killed":
            assert runner.kill(2, "killed", "the server asked")
        else:
            assert runner.withdraw(2) and not runner.withdraw(2)
        (stopped,) = _poll_until(runner, {2})
        assert stopped.outcome == how and stopped.return_code is None
        assert how != "killed" or stopped.message == "the server asked"
        assert 1 in runner.running and not runner.starting
        assert (tmp_path / "data" / "w2" / "job.out").read_text() == ""  # nothing ran, nothing written
        go.touch()
        (first,) = _poll_until(runner, {1})
        assert first.outcome == "exit" and log.read_text() == "a\n"
    finally:
        go.touch()
        runner.shutdown()


@_TWO_CPUS
def test_shutdown_with_a_follower_waiting_behind_a_job_that_ignores_sigterm(tmp_path):
    """The pilot's clean shutdown: the follower never starts, its spawner thread does not
    wait out the job it follows, and that job is killed."""
    (tmp_path / "data").mkdir()
    runner = ProcessRunner()
    runner.start_in_background(lambda: None)
    log, pid_file = tmp_path / "order", tmp_path / "pid"
    ignores_term = (f"import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                    f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    assert runner.start(_bg_spec(tmp_path, 1, [sys.executable, "-c", ignores_term], cpu_ids=[0])) is None
    _running(runner, 1)
    assert runner.start(_bg_spec(tmp_path, 2, ["/bin/sh", "-c", f"echo b >> {log}"], cpu_ids=[0]), after=1) is None
    deadline = time.monotonic() + 10
    while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.01)
    pid = int(pid_file.read_text())
    runner.shutdown()
    assert not _alive(pid) and not log.exists() and runner.reaper.proc is None


class _FollowingDispatcher(_Dispatcher):
    """As _Dispatcher; jobs in `running` can be followed; remembers whom each start follows."""

    def __init__(self) -> None:
        super().__init__()
        self.running: set[int] = set()
        self.follows: dict[int, int] = {}
        self.killed: list[int] = []
        self.withdrawn: list[int] = []

    def can_follow(self, job_id: int) -> bool:
        return job_id in self.running

    def start(self, node_index: int | None, spec: ProcessSpec, after: int | None = None) -> ProcessResult | None:
        if after is not None:
            self.follows[spec.job_id] = after
        return super().start(node_index, spec)

    def kill(self, job_id: int, reason: str, message: str = "") -> None:
        self.killed.append(job_id)

    def withdraw(self, job_id: int) -> bool:
        self.withdrawn.append(job_id)
        return True


def test_short_jobs_are_placed_to_follow_running_ones_with_the_same_needs(tmp_path):
    m = master(tmp_path, cpus=2, prefetch=8)
    m.dispatcher = d = _FollowingDispatcher()
    m.mean_run_s = 0.002
    lease(m, *(local_job(i, held=True, packing=2) for i in range(1, 6)), local_job(6, held=True, packing=1))
    m._schedule()
    assert d.started == [1, 2] and d.follows == {}  # not running yet: nothing to follow
    d.running |= {1, 2}
    m._schedule()
    assert d.started == [1, 2, 3, 4] and d.follows == {3: 1, 4: 2}
    assert m.manager.assignments[1].cpu_ids != m.manager.assignments[2].cpu_ids
    assert [tr.job_id for tr in m.client.reports if tr.state == S.JOB_STATE_RUNNING] == [1, 2, 3, 4]
    assert list(m.queue) == [5, 6]
    cpus_of_1 = m.manager.assignments[1].cpu_ids
    m._finished(ProcessResult(1, 0, "exit", 0.001))
    assert m.manager.assignments[3].cpu_ids == cpus_of_1 and m.jobs[3].started  # handed over
    d.running |= {3}
    m._schedule()
    assert d.follows[5] == 3 and list(m.queue) == [6]
    d.running |= {4, 5}
    m._schedule()  # 6 needs a whole node: it follows nobody, and waits
    assert 6 not in d.follows and list(m.queue) == [6]
    m._on_kill(session_service_pb2.KillJobs(job_ids=[5]))  # killed while it waits for 3
    assert d.killed == [5]
    m._finished(ProcessResult(5, None, "killed", 0.0))
    m._finished(ProcessResult(3, 0, "exit", 0.001))
    assert 5 not in m.manager.assignments and 3 not in m.manager.assignments
    m.mean_run_s = 1.0  # longer jobs: no follower is placed
    m._finished(ProcessResult(2, 0, "exit", 0.001))
    m._finished(ProcessResult(4, 0, "exit", 0.001))
    m._schedule()
    assert d.started[-1] == 6 and 6 not in d.follows


def test_a_long_jobs_launcher_places_no_follower(tmp_path):
    m = master(tmp_path, cpus=2, prefetch=8)
    m.dispatcher = d = _FollowingDispatcher()
    m.mean_run_s = 5.0
    lease(m, *(local_job(i, held=True, packing=2) for i in range(1, 4)))
    m._schedule()
    d.running |= {1, 2}
    m._schedule()
    assert d.started == [1, 2] and d.follows == {} and list(m.queue) == [3]


@_TWO_CPUS
def test_a_job_can_follow_one_whose_start_is_not_handed_over_yet(tmp_path):
    """The follower's start is queued behind that start on the same spawner thread."""
    (tmp_path / "data").mkdir()
    runner = ProcessRunner()
    gate = _Gate(runner)  # holds the hand-over of every start
    log, go = tmp_path / "order", tmp_path / "go"
    try:
        assert runner.start(_bg_spec(tmp_path, 1, ["/bin/sh", "-c", f"{_wait_for(go)}; echo a >> {log}"],
                                     cpu_ids=[1])) is None
        assert 1 in runner.starting and runner.can_follow(1)
        assert runner.start(_bg_spec(tmp_path, 2, ["/bin/sh", "-c", f"echo b >> {log}"], cpu_ids=[1]),
                            after=1) is None
        go.touch()
        gate.open.set()
        assert {r.job_id: r.outcome for r in _poll_until(runner, {1, 2})} == {1: "exit", 2: "exit"}
        assert log.read_text() == "a\nb\n"
    finally:
        go.touch()
        gate.open.set()
        runner.shutdown()


@_TWO_CPUS
def test_no_job_follows_one_whose_spawner_thread_was_let_go(tmp_path, monkeypatch):
    """Only the thread that started a job holds what a follower waits on: a new thread for
    the same CPUs would start the follower beside it."""
    from balsam_grpc.launcher import runner as runner_module

    monkeypatch.setattr(runner_module, "MAX_SPAWNERS", 1)
    (tmp_path / "data").mkdir()
    runner = ProcessRunner()
    runner.start_in_background(lambda: None)
    go = tmp_path / "go"
    try:
        assert runner.start(_bg_spec(tmp_path, 1, ["/bin/sh", "-c", _wait_for(go)], cpu_ids=[0])) is None
        assert runner.can_follow(1)
        assert runner.start(_bg_spec(tmp_path, 2, ["/bin/sh", "-c", _wait_for(go)], cpu_ids=[1])) is None
        assert not runner.can_follow(1) and runner.can_follow(2)
        with pytest.raises(ValueError):
            runner.start(_bg_spec(tmp_path, 3, ["/bin/true"], cpu_ids=[0]), after=1)
        go.touch()
        assert {r.job_id for r in _poll_until(runner, {1, 2})} == {1, 2}
    finally:
        go.touch()
        runner.shutdown()


def test_no_short_job_waits_for_a_long_one(tmp_path):
    """Short jobs follow running ones; when one of those runs long (hung, or long in a mix
    of short ones), its follower is taken back and started on the other slot instead, the
    long job is followed no more, and a follower that has not started is followed by none."""
    m = master(tmp_path, cpus=2, prefetch=8)
    m.dispatcher = d = _FollowingDispatcher()
    clock = [100.0]
    m.clock = lambda: clock[0]
    m.mean_run_s = 0.002
    lease(m, *(local_job(i, held=True, packing=2) for i in range(1, 7)))
    m._schedule()
    d.running |= {1, 2}
    m._schedule()
    assert d.follows == {3: 1, 4: 2} and list(m.queue) == [5, 6]  # no follower of 3 or 4: not started
    clock[0] += 0.01
    m._finished(ProcessResult(2, 0, "exit", 0.01))  # 4 starts on 2's CPU
    d.running |= {4}
    m._schedule()
    assert d.follows[5] == 4 and d.withdrawn == []
    # Job 1 runs on: its follower 3 is due to be taken back when 1 has run FOLLOW_WAIT_MAX_S.
    assert m._follow_due() == 100.0 + FOLLOW_WAIT_MAX_S
    clock[0] = 100.0 + FOLLOW_WAIT_MAX_S
    m._finished(ProcessResult(4, 0, "exit", 0.01))  # 5 starts on that CPU
    d.running |= {5}
    m._schedule()
    assert d.withdrawn == [3]
    m._finished(ProcessResult(3, None, WITHDRAWN, 0.0))
    assert list(m.queue)[0] == 3 and 3 not in m.manager.assignments
    assert [tr.job_id for tr in m.client.reports if tr.state == S.JOB_STATE_RUNNING].count(3) == 1
    clock[0] += 0.001
    m._finished(ProcessResult(5, 0, "exit", 0.001))  # 6, which followed 5, starts on its CPU
    d.running |= {6}
    m._schedule()
    assert d.follows[3] == 6  # 3 waits for a short job now, first in line, not for job 1
    assert 1 not in m._followable and all(after != 1 for after in m._follower_of)
    assert [tr.job_id for tr in m.client.reports if tr.state == S.JOB_STATE_RUNNING].count(3) == 1
    # Job 1 ends at last: what it held is freed (nobody follows it).
    held_by_1 = m.manager.assignments[1].cpu_ids
    m._finished(ProcessResult(1, 0, "exit", 1.0))
    assert 1 not in m.manager.assignments and 1 not in m.jobs
    assert all(a.cpu_ids != held_by_1 for a in m.manager.assignments.values())


# -- the loop's wake-ups ------------------------------------------------------------------------


def test_the_loops_signals_run_their_handler_in_the_loop_and_are_given_back_on_close():
    """SignalReader: a signal's handler runs in the loop (once for signals that came together);
    close() puts back the handlers and wake-up descriptor that were there."""
    import asyncio

    from balsam_grpc.launcher.master import SignalReader

    seen: list[str] = []
    before = signal.getsignal(signal.SIGUSR1)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        got = asyncio.Event()
        reader = SignalReader(loop, {signal.SIGUSR1: lambda: (seen.append("usr1"), got.set()),
                                     signal.SIGUSR2: lambda: seen.append("usr2")})
        try:
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGUSR1)
            await asyncio.wait_for(got.wait(), 10)
            await asyncio.sleep(0.05)  # a second byte still in the socket is read, not lost
        finally:
            reader.close()
        assert signal.set_wakeup_fd(-1) == -1  # nothing of the reader's left behind

    asyncio.run(main())
    assert seen and set(seen) == {"usr1"}
    assert signal.getsignal(signal.SIGUSR1) == before


def test_a_wait_ends_by_its_own_timeout_whatever_the_timer_of_an_earlier_one():
    """Wakeup reuses the timer of a wait for later ones only while it is due no later than they
    must end: a short wait after a long one is not held to the long one's timer."""
    import asyncio

    from balsam_grpc.launcher.master import Wakeup

    async def main() -> None:
        loop = asyncio.get_running_loop()
        wake = Wakeup()
        loop.call_soon(wake.set)
        await wake.wait(loop, 3600)  # set meanwhile: its hour-long timer stays pending
        wake.clear()
        t0 = loop.time()
        await asyncio.wait_for(wake.wait(loop, 0.01), 10)  # not the hour: a timer of its own
        assert loop.time() - t0 < 5
        await asyncio.wait_for(wake.wait(loop, 0.01), 10)  # its timer came due: a new one
        wake.set()
        await wake.wait(loop, 3600)  # set: at once
        wake.cancel()

    asyncio.run(main())
