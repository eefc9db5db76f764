"""The slurm adapter against the real Slurm started by scripts/slurm.sh (4 fake nodes on
loopback). scripts/run_tests.sh starts it and exports BALSAM_TEST_SLURM=1; without that the
tests skip with the reason, except in CI (CI set): there a missing Slurm fails them.

Also: exactly-once pilot submission across a crash between sbatch and the site journal,
with the real sbatch/squeue (the "crash" is an exception raised the moment the adapter
returns the id, so nothing after it runs, as with kill -9)."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from balsam_grpc.site.batch import BatchJobs
from balsam_grpc.site.journal import Journal
from balsam_grpc.site.schedulers import SubmitError, get_scheduler, read_template
from balsam_grpc.site.settings import QueueLimits, SiteSettings
from balsam_grpc.v1 import batch_job_pb2

IN_CI = bool(os.environ.get("CI"))
# One Slurm for the whole run: this file and test_daemon_slurm.py run on one pytest-xdist
# worker, one test at a time (tests/conftest.py, SHARED_WORKER).
pytestmark = [
    pytest.mark.skipif(os.environ.get("BALSAM_TEST_SLURM") != "1" and not IN_CI,
                       reason="no real Slurm: run scripts/run_tests.sh (it runs scripts/slurm.sh start) "
                              "or set BALSAM_TEST_SLURM=1 with Slurm up"),
    pytest.mark.skipif(shutil.which("sbatch") is None and not IN_CI, reason="sbatch not installed"),
]

BOUND_S = 25.0


def run(coro):
    return asyncio.run(coro)


async def wait_for_state(sched, sid: str, wanted: set[str], seen: list[str]) -> str:
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline:
        got = await sched.statuses([sid])
        if got is not None:
            state = got[sid].state
            if not seen or seen[-1] != state:
                seen.append(state)
            if state in wanted:
                return state
        await asyncio.sleep(0.2)
    raise AssertionError(f"job {sid} never reached {wanted}; states seen: {seen}")


def write_script(sched, tmp_path: Path, name: str, command: str, num_nodes: int, minutes: int = 2) -> Path:
    text = sched.render_script(read_template("slurm.sh"), {
        "launcher_command": command, "num_nodes": num_nodes, "wall_time_min": minutes, "queue": "debug",
        "project": "", "job_name": name, "workdir": str(tmp_path), "env": {"BALSAM_TEST": "slurm real"},
    })
    path = tmp_path / f"{name}.sh"
    path.write_text(text)
    return path


def test_two_node_pilot_queued_running_finished(tmp_path):
    sched = get_scheduler("slurm")
    # Both nodes run a step; the marker shows the allocation really had 2 nodes.
    script = write_script(sched, tmp_path, "pilot2", "srun --nodes=2 --ntasks=2 hostname > nodes.txt\n"
                          "echo \"$BALSAM_TEST\" > env.txt\nsleep 1", num_nodes=2)

    async def scenario():
        sid = await sched.submit(script, project="", queue="debug", num_nodes=2, wall_time_min=2,
                                 job_name="pilot2", cwd=tmp_path)
        seen: list[str] = []
        end = await wait_for_state(sched, sid, {"finished", "failed"}, seen)
        final = (await sched.statuses([sid]))[sid]
        listed = await sched.statuses()
        return sid, end, seen, final, listed

    sid, end, seen, final, listed = run(scenario())
    assert sid.isdigit()
    assert end == "finished", seen
    assert "running" in seen or "queued" in seen  # observed before the end
    assert final.exit_code == 0 and final.num_nodes == 2 and final.queue == "debug"
    assert final.start_time is not None and final.end_time is not None and final.end_time >= final.start_time
    assert listed is not None and sid in listed
    assert len((tmp_path / "nodes.txt").read_text().split()) == 2
    assert (tmp_path / "env.txt").read_text().strip() == "slurm real"


def test_cancel_removes_job_from_squeue(tmp_path):
    sched = get_scheduler("slurm")
    script = write_script(sched, tmp_path, "tocancel", "sleep 300", num_nodes=1, minutes=5)

    async def scenario():
        sid = await sched.submit(script, project="", queue="debug", num_nodes=1, wall_time_min=5,
                                 job_name="tocancel", cwd=tmp_path)
        await wait_for_state(sched, sid, {"running"}, [])
        await sched.cancel(sid)
        await sched.cancel(sid)  # idempotent
        seen: list[str] = []
        end = await wait_for_state(sched, sid, {"finished", "failed"}, seen)
        final = (await sched.statuses([sid]))[sid]
        # Gone from the live queue: a plain squeue (pending/running only) no longer lists it.
        proc = await asyncio.create_subprocess_exec("squeue", "--noheader", "--jobs", sid, "--format=%i",
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        return end, final, out.decode()

    end, final, live = run(scenario())
    assert end == "finished"
    assert "CANCELLED" in final.message
    assert live.strip() == ""


def test_bad_partition_raises_submit_error_with_slurm_message(tmp_path):
    sched = get_scheduler("slurm")
    script = write_script(sched, tmp_path, "bad", "true", num_nodes=1)
    with pytest.raises(SubmitError) as err:
        run(sched.submit(script, project="", queue="nosuchpartition", num_nodes=1, wall_time_min=2,
                         job_name="bad", cwd=tmp_path))
    assert "Invalid partition name specified" in err.value.message


def test_too_many_nodes_is_refused_at_submission(tmp_path):
    sched = get_scheduler("slurm")
    script = write_script(sched, tmp_path, "big", "true", num_nodes=99)
    with pytest.raises(SubmitError, match="Batch job submission failed"):
        run(sched.submit(script, project="", queue="debug", num_nodes=99, wall_time_min=2,
                         job_name="big", cwd=tmp_path))


def test_unknown_ids_and_backfill(tmp_path):
    sched = get_scheduler("slurm")
    got = run(sched.statuses(["987654321"]))
    assert got is not None and got["987654321"].state == "finished" and got["987654321"].exit_code is None
    windows = run(sched.backfill_windows())
    assert windows is not None
    assert all(w.queue == "debug" and 0 < w.num_nodes <= 4 for w in windows)


# --- exactly once across a crash between sbatch and the journal ---------------------------------
class Crash(BaseException):
    """The daemon's kill -9: raised where it dies, never caught by the code under test."""


class DiesAfterSbatch:
    """The real slurm adapter; the "daemon" dies the moment sbatch has returned the id."""

    def __init__(self, inner):
        self.inner = inner
        self.crash = True
        self.sbatch_calls = 0

    async def submit(self, *args, **kwargs):
        self.sbatch_calls += 1
        sid = await self.inner.submit(*args, **kwargs)
        if self.crash:
            raise Crash(sid)
        return sid

    def __getattr__(self, name):
        return getattr(self.inner, name)


def squeue_ids(name: str) -> list[str]:
    out = subprocess.run(["squeue", "--noheader", "--states=all", f"--name={name}", "--format=%i"],
                         capture_output=True, text=True, timeout=20, check=True).stdout
    return out.split()


def batch_jobs(tmp_path: Path, site: str, sched) -> BatchJobs:
    settings = SiteSettings(site_id=1, name=site, allowed_queues={"debug": QueueLimits(max_nodes=4)})
    return BatchJobs(settings=settings, scheduler=sched, journal=Journal(tmp_path / "journal.json"),
                     qsubmit_dir=tmp_path, render=lambda bj: "#!/bin/bash\nsleep 120\n",
                     send_update=lambda r: True, send_snapshot=lambda s: True)


def test_crash_between_sbatch_and_journal_adopts_the_job(tmp_path):
    site = f"slurmreal-{secrets.token_hex(3)}"  # a name no earlier run used
    bj = batch_job_pb2.BatchJob(id=7, site_id=1, num_nodes=1, wall_time_min=5, queue="debug")
    sched = DiesAfterSbatch(get_scheduler("slurm"))
    with pytest.raises(Crash) as crashed:
        run(batch_jobs(tmp_path, site, sched).submit(bj))
    accepted = str(crashed.value.args[0])
    name = f"balsam-{site}-7"
    try:
        assert squeue_ids(name) == [accepted]
        assert Journal(tmp_path / "journal.json").intent(7).job_name == name
        # The restarted daemon is offered "submit:7" again.
        sched.crash = False
        restarted = batch_jobs(tmp_path, site, sched)
        result = run(restarted.submit(bj)).batch_job
        assert result.state == batch_job_pb2.BATCH_JOB_STATE_QUEUED and result.scheduler_id == accepted
        assert "found in the scheduler" in result.status_info
        assert sched.sbatch_calls == 1 and squeue_ids(name) == [accepted]  # exactly one pilot in Slurm
        assert Journal(tmp_path / "journal.json").submitted(7).scheduler_id == accepted
    finally:
        subprocess.run(["scancel", f"--name={name}"], timeout=20, check=False)


def test_crash_before_sbatch_submits_once(tmp_path):
    site = f"slurmreal-{secrets.token_hex(3)}"
    bj = batch_job_pb2.BatchJob(id=8, site_id=1, num_nodes=1, wall_time_min=5, queue="debug")
    real = get_scheduler("slurm")

    class DiesBeforeSbatch(DiesAfterSbatch):
        async def submit(self, *args, **kwargs):
            if self.crash:
                raise Crash()
            return await super().submit(*args, **kwargs)

    sched = DiesBeforeSbatch(real)
    sched.crash = True
    with pytest.raises(Crash):
        run(batch_jobs(tmp_path, site, sched).submit(bj))
    name = f"balsam-{site}-8"
    try:
        assert squeue_ids(name) == []
        sched.crash = False
        result = run(batch_jobs(tmp_path, site, sched).submit(bj)).batch_job
        assert result.state == batch_job_pb2.BATCH_JOB_STATE_QUEUED and result.status_info == "submitted"
        assert squeue_ids(name) == [result.scheduler_id]
        found = run(real.find_by_name(name))
        assert [j.scheduler_id for j in found] == [result.scheduler_id] and found[0].name == name
    finally:
        subprocess.run(["scancel", f"--name={name}"], timeout=20, check=False)
