"""The local scheduler's artificial queue delay (`start_delay_s`): a job is "queued" for
that long with its monitor recorded, then runs; cancelling it while queued ends it
without ever starting the script."""

from __future__ import annotations

import pytest

from balsam_grpc.core.errors import InvalidArgument
from balsam_grpc.site.schedulers import get_scheduler
from balsam_grpc.site.schedulers.local import job_from_record
from tests.support.local_scheduler import make_script, run, submit
from tests.support.waiting import wait_until


def test_delayed_job_is_queued_then_runs(tmp_path):
    sched = get_scheduler("local", state_dir=tmp_path / "state", start_delay_s=1.5)
    marker = tmp_path / "ran"
    sid = run(submit(sched, make_script(tmp_path, "late", f"touch {marker}"), tmp_path))
    first = run(sched.statuses([sid]))[sid]
    assert first.state == "queued" and first.start_time is None and not marker.exists()
    wait_until(lambda: run(sched.statuses([sid]))[sid].state == "finished", "the delayed job to finish")
    done = run(sched.statuses([sid]))[sid]
    assert marker.exists() and done.exit_code == 0 and done.start_time is not None


def test_cancel_while_queued_never_starts_the_script(tmp_path):
    sched = get_scheduler("local", state_dir=tmp_path / "state", start_delay_s=30)
    marker = tmp_path / "ran"
    sid = run(submit(sched, make_script(tmp_path, "never", f"touch {marker}"), tmp_path))
    assert run(sched.statuses([sid]))[sid].state == "queued"
    run(sched.cancel(sid))
    job = run(sched.statuses([sid]))[sid]
    assert job.state == "finished" and job.message == "cancelled" and not marker.exists()


def test_record_states_and_bad_option(tmp_path):
    assert job_from_record({"scheduler_id": "1", "pid": 5}, monitor_alive=True).state == "queued"
    assert job_from_record({"scheduler_id": "1", "pid": 5, "start_time": "2024-01-01T00:00:00+00:00"},
                           monitor_alive=True).state == "running"
    with pytest.raises(InvalidArgument):
        get_scheduler("local", state_dir=tmp_path, start_delay_s=-1)
