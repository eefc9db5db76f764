"""End to end on the `local` scheduler, all real processes: server, `balsamctl site
init/start`, the daemon, pilots started by the local scheduler running the launcher.

- jobs created with an empty queue -> the elastic queue requests a pilot -> the daemon
  submits it -> the launcher runs the jobs -> postprocess hooks change data -> cleanup
  removes the cleanup globs -> the idle pilot ends -> no new pilots (scale to zero);
- with a pilot running, a new job's creation-to-RUNNING latency (printed);
- kill -9 of the daemon in the middle of a hook: a restarted daemon loses nothing.
"""

from __future__ import annotations

import json
import time

import pytest
from google.protobuf import json_format

from sitekit import BJ, J, SiteKit
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(180)

FAST = dict(scheduler__poll_seconds=1, launcher__idle_timeout_s=6, elastic_queue__enabled=True,
            elastic_queue__min_wall_time_min=5, elastic_queue__check_seconds=1, elastic_queue__max_nodes=1)


@pytest.fixture
def kit(tmp_path, site_database_url):
    k = SiteKit(tmp_path, site_database_url)
    k.start_server()
    yield k
    k.stop()


def test_elastic_pilot_runs_jobs_with_hooks_and_scales_to_zero(kit):
    kit.init_site(**FAST)
    kit.start_daemon()
    site = kit.site()
    assert site.liveness.connected
    # The daemon published its elastic queue, which routers read as the site's capacity.
    assert site.elastic_queue.enabled and site.elastic_queue.max_nodes == 1
    assert site.elastic_queue.min_wall_time_min == 5
    assert kit.batch_jobs() == []  # an idle site requests nothing

    # node_packing_count 8: the five single-node jobs fit one 1-node pilot.
    echo = kit.create_jobs("Echo", 3, prefix="echo", node_packing_count=8)
    post = kit.create_jobs("Post", 2, prefix="post", node_packing_count=8)
    jobs = kit.wait_jobs(echo + post, J.JOB_STATE_JOB_FINISHED, 90)

    pilots = kit.batch_jobs()
    assert len(pilots) == 1, kit.debug()
    assert pilots[0].scheduler_id and pilots[0].num_nodes == 1 and pilots[0].wall_time_min == 5
    by_id = {j.id: j for j in jobs}
    for jid in post:
        assert json_format.MessageToDict(by_id[jid].data)["answer"] == 42
        wd = kit.site_dir / "data" / by_id[jid].workdir
        assert "postprocess read 42" in (wd / "balsam-hooks.log").read_text()
        # The cleaner removes the app's cleanup globs after JOB_FINISHED, nothing else.
        wait_until(lambda wd=wd: not (wd / "scratch.tmp").exists(), "cleanup of scratch.tmp", 20)
        assert (wd / "answer.txt").exists()
    for jid in echo:
        assert (kit.site_dir / "data" / by_id[jid].workdir / "out.txt").read_text() == "hello world\n"

    # A pilot is still running (idle timeout 6 s): a new job starts without any loop period.
    wait_until(lambda: kit.batch_jobs()[0].state == BJ.BATCH_JOB_STATE_RUNNING, "the pilot to show running", 10)
    (late,) = kit.create_jobs("Echo", 1, prefix="late", node_packing_count=8)
    kit.wait_jobs([late], J.JOB_STATE_JOB_FINISHED, 30)
    latency = kit.latency_to_running(late)
    print(f"\nLATENCY local: creation -> RUNNING with a pilot running: {latency * 1000:.0f} ms")
    assert len(kit.batch_jobs()) == 1

    # The idle pilot exits; the site requests nothing more (scale to zero).
    wait_until(lambda: all(b.state == BJ.BATCH_JOB_STATE_FINISHED for b in kit.batch_jobs()), "the idle pilot to end",
               60)
    finished = kit.batch_jobs()[0]
    assert finished.HasField("start_time") and finished.HasField("end_time")
    time.sleep(4)  # several elastic-queue checks and scheduler polls
    assert len(kit.batch_jobs()) == 1
    snapshot = kit.site().scheduler_snapshot
    assert snapshot.HasField("time")


def test_kill_9_mid_hook_loses_nothing(kit):
    kit.init_site(**FAST)
    kit.start_daemon()
    slow = kit.create_jobs("Post", 2, prefix="slow", params={"delay": "4"}, node_packing_count=8)
    wds = [kit.site_dir / "data" / j.workdir for j in kit.jobs(slow)]
    wait_until(lambda: any((wd / "hook-started").exists() for wd in wds), "a postprocess hook to start", 60)
    kit.kill_daemon()
    kit.start_daemon()
    jobs = kit.wait_jobs(slow, J.JOB_STATE_JOB_FINISHED, 90)
    # The killed daemon's hook folders were removed by the restarted one (none left in /tmp).
    assert not list((kit.site_dir / "state" / "hooks").glob("balsam-hook-*"))
    for j in jobs:
        assert json_format.MessageToDict(j.data)["answer"] == 42
    pilots = kit.batch_jobs()
    assert pilots and all(b.state not in (BJ.BATCH_JOB_STATE_PENDING_SUBMISSION, BJ.BATCH_JOB_STATE_SUBMIT_FAILED)
                          for b in pilots), kit.debug()
    # Every pilot went to the scheduler exactly once.
    records = list((kit.site_dir / "state" / "local-scheduler").glob("*.json"))
    assert len(records) == len(pilots)
    assert sorted(json.loads(r.read_text())["job_name"] for r in records) == sorted(
        f"balsam-{kit.site().name}-{b.id}" for b in pilots)


def test_kill_9_between_pilot_request_and_submission(kit):
    """The daemon dies right after the elastic queue recorded a pilot: the restarted daemon
    submits it (the server offers "submit:<id>" again) and the jobs run."""
    kit.init_site(**FAST)
    kit.start_daemon()
    kit.kill_daemon()
    ids = kit.create_jobs("Echo", 2, prefix="k", node_packing_count=8)
    # Nobody serves the site: a pilot recorded by hand stays pending.
    from balsam_grpc.v1 import batch_job_service_pb2, batch_job_service_pb2_grpc

    bj = kit.stub(batch_job_service_pb2_grpc.BatchJobServiceStub).CreateBatchJob(
        batch_job_service_pb2.CreateBatchJobRequest(batch_job=BJ.BatchJob(
            site_id=kit.site_id, num_nodes=1, wall_time_min=5, queue="local", project="local")),
        metadata=kit.metadata, timeout=30).batch_job
    assert bj.state == BJ.BATCH_JOB_STATE_PENDING_SUBMISSION
    kit.start_daemon()
    kit.wait_jobs(ids, J.JOB_STATE_JOB_FINISHED, 90)
    mine = {b.id: b for b in kit.batch_jobs()}[bj.id]
    assert mine.state != BJ.BATCH_JOB_STATE_PENDING_SUBMISSION and mine.scheduler_id


def test_cli_liveness_lock_and_reconnect_after_server_restart(kit):
    kit.init_site(**FAST)
    pid = kit.start_daemon()
    name = kit.site().name
    ls = kit.balsamctl("site", "ls").stdout
    assert name in ls and "connected" in ls.split(name, 1)[1].splitlines()[0]
    status = kit.balsamctl("site", "status", str(kit.site_dir)).stdout
    assert f"running, pid {pid}" in status and "stream:     connected" in status

    # One daemon per site directory; the error names the pid holding the lock.
    import subprocess
    import sys

    second = subprocess.run([sys.executable, "-m", "balsam_grpc.site", "--site-dir", str(kit.site_dir)],
                            env=kit.env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 2 and f"pid {pid}" in second.stderr
    assert "already runs" in kit.balsamctl("site", "start", str(kit.site_dir), check=False).stderr

    # The server dies and comes back: the daemon reconnects by itself and serves new work.
    kit.kill_server()
    time.sleep(1.5)
    kit.start_server()
    wait_until(lambda: kit.site().liveness.connected, "the daemon to reconnect", 60)
    ids = kit.create_jobs("Echo", 2, prefix="after", node_packing_count=8)
    kit.wait_jobs(ids, J.JOB_STATE_JOB_FINISHED, 60)
    assert kit.daemon_pid() == pid

    assert "stopped" in kit.balsamctl("site", "stop", str(kit.site_dir)).stdout
    assert "not running" in kit.balsamctl("site", "status", str(kit.site_dir)).stdout
    wait_until(lambda: not kit.site().liveness.connected, "the site to show disconnected", 20)
