"""The `local` scheduler end to end: real detached processes, records that a new adapter
instance (a restarted site daemon) reads, cancellation that kills the whole process group,
and the wall time enforced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import psutil
import pytest

from balsam_grpc.site.schedulers import SubmitError, get_scheduler
from balsam_grpc.site.schedulers.local import RUNNER_MODULE, SUBMIT_STEP_S, job_from_record
from balsam_grpc.site.schedulers.local_state import write_record
from tests.support.local_scheduler import make_script, run, submit
from tests.support.waiting import wait_until


def test_submit_run_finish_seen_by_a_new_adapter(tmp_path):
    script = make_script(tmp_path, "ok", 'echo "$GREETING from $BALSAM_LOCAL_JOB_ID on $BALSAM_LOCAL_NUM_NODES nodes"\n'
                                           "touch started; while [ ! -e go ]; do sleep 0.05; done; exit 0")
    sched = get_scheduler("local", state_dir=tmp_path / "state")
    sid = run(submit(sched, script, tmp_path))
    wait_until(lambda: (tmp_path / "started").exists(), "script start")
    first = run(sched.statuses([sid]))[sid]
    assert first.state == "running" and first.num_nodes == 2 and first.start_time is not None
    # A restarted daemon: a new adapter on the same state dir knows the job.
    restarted = get_scheduler("local", state_dir=tmp_path / "state")
    assert run(restarted.statuses())[sid].state == "running"
    (tmp_path / "go").touch()
    final = wait_until(lambda: (j := run(restarted.statuses([sid]))[sid]).state != "running" and j, "job end")
    assert final.state == "finished" and final.exit_code == 0
    assert final.end_time >= final.start_time
    out = (tmp_path / f"local-{sid}.out").read_text()
    assert f"hello there from {sid} on 2 nodes" in out


def test_nonzero_exit_is_failed_with_code(tmp_path):
    script = make_script(tmp_path, "bad", "exit 7")
    sched = get_scheduler("local", state_dir=tmp_path / "state")
    sid = run(submit(sched, script, tmp_path))
    final = wait_until(lambda: (j := run(sched.statuses([sid]))[sid]).state not in ("running",) and j, "job end")
    assert final.state == "failed" and final.exit_code == 7


def test_cancel_kills_the_process_group(tmp_path):
    # The script leaves a background child: cancel must take it down too.
    script = make_script(tmp_path, "long", "sleep 300 & echo $! > child.pid; touch started; wait")
    sched = get_scheduler("local", state_dir=tmp_path / "state", kill_grace_s=2.0)
    sid = run(submit(sched, script, tmp_path))
    wait_until(lambda: (tmp_path / "child.pid").exists() and (tmp_path / "child.pid").read_text().strip(), "child pid")
    child = int((tmp_path / "child.pid").read_text())
    assert psutil.pid_exists(child)
    other = get_scheduler("local", state_dir=tmp_path / "state", kill_grace_s=2.0)  # cancel from a new instance
    run(other.cancel(sid))
    run(other.cancel(sid))  # idempotent
    wait_until(lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE,
               "background child killed")
    final = run(sched.statuses([sid]))[sid]
    assert final.state == "finished" and final.message == "cancelled"
    assert final.end_time is not None


def test_monitor_killed_hard_is_reported_ended_not_running(tmp_path):
    script = make_script(tmp_path, "orphan", "touch started; sleep 300")
    sched = get_scheduler("local", state_dir=tmp_path / "state", kill_grace_s=1.0)
    sid = run(submit(sched, script, tmp_path))
    rec_pid = wait_until(lambda: __import__("json").loads((tmp_path / "state" / f"{sid}.json").read_text()).get("pid"),
                         "monitor pid")
    os.kill(rec_pid, 9)
    final = wait_until(lambda: (j := run(sched.statuses([sid]))[sid]).state != "running" and j, "vanished monitor")
    assert final.state == "finished" and final.exit_code is None and "vanished" in final.message
    run(sched.cancel(sid))  # kills the orphaned script's group and records the end
    assert run(sched.statuses([sid]))[sid].message == "cancelled"


def test_wall_time_is_enforced(tmp_path):
    # seconds_per_minute compresses the wall time: 1 "minute" lasts 0.5 s here.
    script = make_script(tmp_path, "slow", "touch started; sleep 300")
    sched = get_scheduler("local", state_dir=tmp_path / "state", kill_grace_s=1.0, seconds_per_minute=0.5)
    sid = run(submit(sched, script, tmp_path, wall_time_min=1))
    final = wait_until(lambda: (j := run(sched.statuses([sid]))[sid]).state != "running" and j, "wall-time kill")
    assert final.state == "finished" and final.message == "wall time reached"
    assert final.exit_code == 128 + 15  # SIGTERM
    assert final.wall_time_min == 1


def test_unknown_ids_and_bad_submissions(tmp_path):
    sched = get_scheduler("local", state_dir=tmp_path / "state")
    got = run(sched.statuses(["42", "not-a-number"]))
    assert got["42"].state == "finished" and got["42"].exit_code is None
    assert got["not-a-number"].state == "unknown"
    assert run(sched.statuses()) == {}
    run(sched.cancel("42"))  # nothing to cancel: fine
    with pytest.raises(SubmitError, match="does not exist"):
        run(sched.submit(tmp_path / "missing.sh", project="", queue="", num_nodes=1, wall_time_min=1,
                         job_name="x", cwd=tmp_path))


def test_job_from_record_is_pure():
    base = {"scheduler_id": "3", "num_nodes": 1, "wall_time_min": 5, "submit_time": "2024-01-01T00:00:00+00:00",
            "start_time": "2024-01-01T00:00:01+00:00", "pid": 123}
    assert job_from_record(base, monitor_alive=True).state == "running"
    assert job_from_record(base, monitor_alive=False).state == "finished"
    ended = {**base, "end_time": "2024-01-01T00:01:00+00:00"}
    assert job_from_record({**ended, "exit_code": 0, "end_reason": "exited"}, monitor_alive=False).state == "finished"
    assert job_from_record({**ended, "exit_code": 143, "end_reason": "wall time reached"},
                           monitor_alive=False).state == "finished"
    failed = job_from_record({**ended, "exit_code": 2, "end_reason": "exited"}, monitor_alive=False)
    assert failed.state == "failed" and failed.exit_code == 2 and failed.message == "exit code 2"
    assert job_from_record({"scheduler_id": "4"}, monitor_alive=False).state == "unknown"


def _gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _record(tmp_path, sid):
    return json.loads((tmp_path / "state" / f"{sid}.json").read_text())


def test_a_wall_clock_step_does_not_make_a_running_monitor_vanish(tmp_path):
    # Seen once under load: a running pilot's job read "local monitor vanished" because its
    # start time (wall clock, at the record) and the process's creation time (boot time +
    # ticks, by the wall clock at the check) drifted apart by more than the tolerance.
    script = make_script(tmp_path, "steady", "touch started; while [ ! -e go ]; do sleep 0.05; done")
    sched = get_scheduler("local", state_dir=tmp_path / "state")
    sid = run(submit(sched, script, tmp_path))
    wait_until(lambda: (tmp_path / "started").exists(), "script start")
    path = tmp_path / "state" / f"{sid}.json"
    rec = _record(tmp_path, sid)
    assert rec["identity"].startswith("boot-ticks:")
    # The clock stepped an hour forward after the record was written.
    rec["start_time"] = (datetime.fromisoformat(rec["start_time"]) - timedelta(hours=1)).isoformat()
    write_record(path, rec)
    assert run(sched.statuses([sid]))[sid].state == "running"
    # A later process given the same pid is not the monitor.
    write_record(path, {**rec, "identity": "boot-ticks:1"})
    reused = run(sched.statuses([sid]))[sid]
    assert reused.state == "finished" and "vanished" in reused.message
    write_record(path, rec)
    (tmp_path / "go").touch()
    final = wait_until(lambda: (j := run(sched.statuses([sid]))[sid]).state != "running" and j, "job end")
    assert final.exit_code == 0


def test_a_monitor_that_ends_between_the_read_and_the_check_reports_its_exit(tmp_path):
    script = make_script(tmp_path, "quick", "exit 0")
    sched = get_scheduler("local", state_dir=tmp_path / "state")
    sid = run(submit(sched, script, tmp_path))
    wait_until(lambda: _record(tmp_path, sid).get("end_time") and _gone(_record(tmp_path, sid)["pid"]), "monitor end")
    # The record as read just before the monitor wrote its end and exited.
    stale = {k: v for k, v in _record(tmp_path, sid).items() if k not in ("end_time", "exit_code", "end_reason")}
    job = sched._job(stale)
    assert job.state == "finished" and job.exit_code == 0 and "vanished" not in job.message


def test_a_submission_cut_off_before_its_runner_is_decided_at_once(tmp_path):
    # A daemon killed between the job's record and its runner left a record no monitor
    # will ever claim; its restart waited out the whole submit timeout (40 s) before
    # resubmitting the pilot, and a fault test timed out at 30 s in CI.
    sched = get_scheduler("local", state_dir=tmp_path / "state")
    state = tmp_path / "state"
    state.mkdir()
    old = (datetime.now(UTC) - timedelta(seconds=SUBMIT_STEP_S + 1)).isoformat()
    cut = state / "1.json"
    write_record(cut, {"scheduler_id": "1", "job_name": "balsam-x-1", "submit_time": old})
    placeholder = state / "2.json"
    placeholder.touch()
    os.utime(placeholder, (time.time() - SUBMIT_STEP_S - 1,) * 2)
    assert run(sched.find_by_name("balsam-x-1")) == []
    assert "never started" in json.loads(cut.read_text())["end_reason"]

    # A runner for the record still runs: it is about to record its monitor, so wait.
    write_record(state / "3.json", {"scheduler_id": "3", "job_name": "balsam-x-3", "submit_time": old})
    runner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", RUNNER_MODULE,
                               str(state / "3.json")])
    try:
        wait_until(lambda: str(state / "3.json") in psutil.Process(runner.pid).cmdline(), "runner started")
        assert run(sched.find_by_name("balsam-x-3")) is None
    finally:
        runner.kill()
        runner.wait()
    assert run(sched.find_by_name("balsam-x-3")) == []
    # A placeholder just made may still become any job's record.
    (state / "4.json").touch()
    assert run(sched.find_by_name("balsam-x-4")) is None
