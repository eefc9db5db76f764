"""One launcher process (no MPI) against an embedded server: outcomes, kills, timeouts,
dynamic jobs, Python-function apps, unrunnable jobs."""

from __future__ import annotations

import os
import signal
import textwrap
import time

from balsam_grpc.core.appdef import load_app_classes
from balsam_grpc.v1 import app_pb2, app_service_pb2, job_pb2, job_service_pb2, session_pb2, session_service_pb2
from tests.launcher.conftest import WAIT, Launcher, S


def kill_job(site, job_id):
    site.server.call(site.server.jobs.UpdateJob, job_service_pb2.UpdateJobRequest(
        job=job_pb2.Job(id=job_id, state=S.JOB_STATE_KILLED), update_mask={"paths": ["state"]}))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose; the launcher reaps its own children.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


def wait_file(path, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear")


def active_session(site, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = site.server.call(site.server.sessions.ListSessions, session_service_pb2.ListSessionsRequest(
            filter=session_service_pb2.SessionFilter(site_ids=[site.id],
                                                     states=[session_pb2.SESSION_STATE_ACTIVE]))).sessions
        if got:
            return got[0]
        time.sleep(0.05)
    raise AssertionError("no active session")


def test_outcomes_failure_tail_timeout_and_dynamic_job(site, launchers):
    ok_app = site.app("echo", "echo hello {{ who }}", params=("who",))
    bad_app = site.app("fail", "/bin/sh -c 'echo line1; echo line2 >&2; exit 3'")
    slow_app = site.app("slow", "sleep 30")
    launchers.append(launcher := Launcher(site, "--mode", "serial", "--job-time-scale", "1", "--cpus-per-node",
                                          "8"))
    active_session(site)  # idle launcher waiting for work
    ok = site.jobs(ok_app, 2, parameters={"who": "world"}, resources={"node_packing_count": 4})
    bad = site.jobs(bad_app, resources={"node_packing_count": 4})[0]
    slow = site.jobs(slow_app, resources={"wall_time_min": 2, "node_packing_count": 4})[0]  # 2 s with scale 1
    site.wait_states([j.id for j in ok], S.JOB_STATE_JOB_FINISHED, proc=launcher.proc)
    assert (site.path / "data" / ok[0].workdir / "job.out").read_text() == "hello world\n"

    site.wait_states([bad.id], S.JOB_STATE_FAILED, proc=launcher.proc)  # default on_error: fail
    failed = site.get(bad.id)
    assert failed.return_code == 3 and "line1" in failed.error_tail and "line2" in failed.error_tail
    assert ("RUNNING", "RUN_ERROR") in site.events_of(bad.id)

    deadline = time.monotonic() + WAIT
    while ("RUNNING", "RUN_TIMEOUT") not in site.events_of(slow.id):
        assert time.monotonic() < deadline, site.events_of(slow.id)
        time.sleep(0.1)
    # Default timeout policy: restart; the launcher takes it again.
    assert ("RUN_TIMEOUT", "RESTART_READY") in site.events_of(slow.id)


def test_kill_running_job_stops_its_process_group(site, launchers):
    app = site.app("sleeper", "/bin/sh -c 'sleep 60 & echo $! > child.pid; echo $$ > pid; wait'")
    launchers.append(Launcher(site, "--mode", "serial"))
    job = site.jobs(app)[0]
    workdir = site.path / "data" / job.workdir
    pid = int(wait_file(workdir / "pid"))
    child = int(wait_file(workdir / "child.pid"))
    site.wait_states([job.id], S.JOB_STATE_RUNNING)
    kill_job(site, job.id)
    deadline = time.monotonic() + 10
    while pid_alive(pid) or pid_alive(child):
        assert time.monotonic() < deadline, "the killed job's processes are still alive"
        time.sleep(0.05)
    assert site.get(job.id).state == S.JOB_STATE_KILLED


def test_python_function_apps_return_and_raise(site, launchers):
    (site.path / "apps" / "pyapps.py").write_text(textwrap.dedent("""
        from balsam_grpc.core.appdef import ApplicationDefinition

        class Adder(ApplicationDefinition):
            parameters = {"x": {"type": "int", "required": True}, "y": {"type": "int", "default": 2}}
            def run(self, x, y):
                print("adding", x, y, "in", self.job.workdir)
                return {"sum": x + y, "job": self.job.id}

        class Boom(ApplicationDefinition):
            def run(self):
                raise RuntimeError("kaboom from a python app")
    """))
    classes = load_app_classes(site.path / "apps")
    apps = {cp: site.server.call(site.server.apps.CreateApp, app_service_pb2.CreateAppRequest(
        app=cls.app_message(site.id))).app for cp, cls in classes.items()}
    adder, boom = apps["pyapps.Adder"], apps["pyapps.Boom"]
    assert adder.kind == app_pb2.APP_KIND_PYTHON
    launchers.append(launcher := Launcher(site, "--mode", "serial", "--cpus-per-node", "4"))
    good = site.jobs(adder, parameters={"x": "40"}, resources={"node_packing_count": 2})[0]
    bad = site.jobs(boom, resources={"node_packing_count": 2})[0]
    site.wait_states([good.id], S.JOB_STATE_JOB_FINISHED, proc=launcher.proc)
    site.wait_states([bad.id], S.JOB_STATE_FAILED, proc=launcher.proc)
    result = site.get(good.id).data["result"]
    assert result["sum"] == 42 and result["job"] == good.id
    assert "adding 40 2" in (site.path / "data" / good.workdir / "job.out").read_text()
    failed = site.get(bad.id)
    assert "RuntimeError: kaboom from a python app" in failed.error_tail and "Traceback" in failed.error_tail


def test_unrunnable_job_is_reported_not_left_waiting(site, launchers):
    app = site.app("huge", "true")
    launchers.append(launcher := Launcher(site, "--mode", "mpi", "--cpus-per-node", "2"))
    job = site.jobs(app, resources={"threads_per_rank": 64})[0]
    site.wait_states([job.id], S.JOB_STATE_FAILED, proc=launcher.proc)
    assert "needs 64 CPUs per node" in site.get(job.id).state_message or any(
        "64 CPUs" in e for e in map(str, site.events_of(job.id)))


def test_quick_failure_is_retried_and_idle_exit_closes_session(site, launchers):
    app = site.app("flaky", "/bin/sh -c 'test -e marker || { touch marker; exit 7; }'",
                   retry_policy=app_pb2.RetryPolicy(quick_failure_seconds=30))
    job = site.jobs(app)[0]
    launchers.append(launcher := Launcher(site, "--mode", "serial", "--idle-timeout", "1.5"))
    site.wait_states([job.id], S.JOB_STATE_JOB_FINISHED, proc=launcher.proc)
    assert ("RUNNING", "RESTART_READY") in site.events_of(job.id)
    assert launcher.wait() == 0
    sessions = site.server.call(site.server.sessions.ListSessions, session_service_pb2.ListSessionsRequest(
        filter=session_service_pb2.SessionFilter(site_ids=[site.id]))).sessions
    assert [s.state for s in sessions] == [session_pb2.SESSION_STATE_CLOSED]


def test_allocation_end_times_out_running_jobs_and_closes(site, launchers):
    app = site.app("long", "sleep 60")
    job = site.jobs(app)[0]
    # 0.1 min allocation: new work stops 0.6 s before the end, running jobs time out 0.3 s before.
    launchers.append(launcher := Launcher(site, "--mode", "serial", "--wall-time", "0.1"))
    site.wait_states([job.id], S.JOB_STATE_RUNNING, proc=launcher.proc)
    assert launcher.wait(30) == 0
    assert ("RUNNING", "RUN_TIMEOUT") in site.events_of(job.id)
    assert "allocation ends" in launcher.text()
    sessions = site.server.call(site.server.sessions.ListSessions, session_service_pb2.ListSessionsRequest(
        filter=session_service_pb2.SessionFilter(site_ids=[site.id]))).sessions
    assert [s.state for s in sessions] == [session_pb2.SESSION_STATE_CLOSED]


def test_pilot_of_a_deleted_batch_job_exits_instead_of_retrying(site, launchers):
    """NOT_FOUND at open (its batch job is gone) cannot change by retrying: the launcher
    exits with the server's reason, so the allocation is given back."""
    launchers.append(launcher := Launcher(site, "--mode", "serial", "--batch-job-id", "987654321"))
    assert launcher.wait() != 0
    assert "987654321" in launcher.text()


def test_lease_prefetch_starts_each_job_once_and_hands_back_unstarted_ones(site, launchers):
    """--lease-prefetch holds jobs leased ahead of the free slots: each starts exactly once
    as slots free; one held ahead is not RUNNING (its runnable state, leased to the
    session) until started; on exit the ones never started are released at once (not
    after a lease timeout), never having been RUNNING."""
    short = site.app("short", "/bin/sh -c 'echo start >> starts; sleep 0.2'")
    launchers.append(launcher := Launcher(site, "--mode", "serial", "--cpus-per-node", "2",
                                          "--lease-prefetch", "3"))
    ids = [j.id for j in site.jobs(short, 10, resources={"node_packing_count": 2})]
    site.wait_states(ids, S.JOB_STATE_JOB_FINISHED, timeout=60, proc=launcher.proc)
    for job_id in ids:
        job = site.get(job_id)
        assert (site.path / "data" / job.workdir / "starts").read_text() == "start\n"
        assert sum(1 for p in site.events_of(job_id) if p[1] == "RUNNING") == 1, site.events_of(job_id)

    long_app = site.app("long", "/bin/sh -c 'echo $$ > pid; exec sleep 60'")
    held = [j.id for j in site.jobs(long_app, 5, resources={"node_packing_count": 2})]
    # Two run (the slots), three are held ahead of them: the server leased all five.
    deadline = time.monotonic() + WAIT
    while sum((site.path / "data" / site.get(i).workdir / "pid").exists() for i in held) < 2 or \
            sum(bool(site.get(i).lease.session_id) for i in held) < 5:
        assert time.monotonic() < deadline, launcher.text()[-3000:]
        time.sleep(0.05)
    site.wait_states([i for i in held if (site.path / "data" / site.get(i).workdir / "pid").exists()],
                     S.JOB_STATE_RUNNING, timeout=WAIT, proc=launcher.proc)
    time.sleep(0.5)  # a third start (a bug) would show its pid file by now
    started = [i for i in held if (site.path / "data" / site.get(i).workdir / "pid").exists()]
    assert len(started) == 2
    unstarted = [i for i in held if i not in started]
    for job_id in unstarted:  # held ahead: leased to the session, not RUNNING
        job = site.get(job_id)
        assert job.state == S.JOB_STATE_PREPROCESSED and job.lease.session_id, job
    os.kill(launcher.proc.pid, signal.SIGTERM)
    assert launcher.wait(30) == 0
    states = site.states(held)
    assert all(states[i] != S.JOB_STATE_RUNNING for i in held), states
    for job_id in unstarted:
        job = site.get(job_id)
        assert job.state == S.JOB_STATE_PREPROCESSED and not job.lease.session_id, job
        assert ("PREPROCESSED", "PREPROCESSED") in site.events_of(job_id)  # the release, for other sessions
        assert all(p[1] != "RUNNING" for p in site.events_of(job_id)), site.events_of(job_id)
        assert not (site.path / "data" / site.get(job_id).workdir / "pid").exists()
    sessions = site.server.call(site.server.sessions.ListSessions, session_service_pb2.ListSessionsRequest(
        filter=session_service_pb2.SessionFilter(site_ids=[site.id]))).sessions
    assert [s.state for s in sessions] == [session_pb2.SESSION_STATE_CLOSED]
