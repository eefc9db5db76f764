"""End to end on the REAL Slurm of scripts/slurm.sh (loopback, fake nodes node1..node4).

Skipped, with the reason printed, only when neither BALSAM_TEST_SLURM nor CI is set; in
CI a Slurm that does not answer is a failure, not a skip.

- jobs created with an empty queue: the elastic queue requests a 2-node pilot, the daemon
  submits it with sbatch, the launcher (mpi mode) inside the allocation runs serial jobs
  and a 2-rank MPI job across 2 fake nodes, jobs reach JOB_FINISHED, the idle pilot ends,
  no new pilot is requested (scale to zero); with the pilot running, a new job's
  creation-to-RUNNING latency is printed;
- a pilot cancelled by the user (PENDING_DELETION) disappears from squeue.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
from sitekit import BJ, J, SiteKit
from tests.support.waiting import wait_until

WANTED = bool(os.environ.get("BALSAM_TEST_SLURM") or os.environ.get("CI"))
pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(not WANTED, reason="real Slurm tests: set BALSAM_TEST_SLURM=1 after `scripts/slurm.sh start` "
                                          "(CI sets CI and runs them)"),
]

SQUEUE = shutil.which("squeue") or "/usr/bin/squeue"

APPS = textwrap.dedent(f'''
    from balsam_grpc.core.appdef import ApplicationDefinition

    class Echo(ApplicationDefinition):
        """Serial job: records the Slurm node it ran on."""
        command_template = "echo serial on $SLURMD_NODENAME > out.txt"
        shell = True

    class Ranks(ApplicationDefinition):
        """MPI job: every rank prints rank/size@node (workdirs are data/<prefix>/<name>)."""
        command_template = "{sys.executable} ../../../apps/_ranks.py"
''')
# Files starting with "_" are not imported as apps (the daemon must never import mpi4py).
RANKS = textwrap.dedent('''
    import os
    from mpi4py import MPI
    c = MPI.COMM_WORLD
    print(f"{c.Get_rank()}/{c.Get_size()}@{os.environ.get('SLURMD_NODENAME', '?')}", flush=True)
''')


@pytest.fixture(scope="module", autouse=True)
def slurm_up():
    try:
        res = subprocess.run(["sinfo", "-h", "-o", "%D %T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"Slurm is not usable ({exc}); start it with scripts/slurm.sh start")
    if res.returncode != 0:
        pytest.fail(f"sinfo failed: {res.stderr.strip()}; start Slurm with scripts/slurm.sh start")


@pytest.fixture
def kit(tmp_path, site_database_url):
    k = SiteKit(tmp_path, site_database_url)
    k.start_server()
    yield k
    for b in (k.batch_jobs() if k.channel else []):
        if b.scheduler_id:
            subprocess.run(["scancel", b.scheduler_id], capture_output=True, timeout=20)
    k.stop()


def squeue_lists(scheduler_id: str) -> bool:
    res = subprocess.run([SQUEUE, "-h", "-j", scheduler_id, "-o", "%T"], capture_output=True, text=True, timeout=20)
    states = res.stdout.split()
    return any(s in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED") for s in states)


def test_elastic_pilot_on_slurm_runs_serial_and_mpi_jobs_across_two_nodes(kit):
    kit.init_site(platform="slurm", apps=APPS, scheduler__poll_seconds=1, launcher__idle_timeout_s=10,
                  elastic_queue__enabled=True, elastic_queue__queue="debug", elastic_queue__job_mode="mpi",
                  elastic_queue__min_nodes=2, elastic_queue__max_nodes=2, elastic_queue__min_wall_time_min=5,
                  elastic_queue__max_wall_time_min=10, elastic_queue__check_seconds=1)
    (kit.site_dir / "apps" / "_ranks.py").write_text(RANKS)
    kit.start_daemon()
    assert kit.batch_jobs() == []

    serial = kit.create_jobs("Echo", 3, prefix="serial", node_packing_count=4)
    kit.wait_jobs(serial, J.JOB_STATE_JOB_FINISHED, 180)
    # The MPI job comes while the 2-node pilot runs (its footprint fits: no second pilot).
    # No launch_params: scripts/slurm.sh sets MpiDefault=pmi2, which the mpich wheel needs.
    (mpi,) = kit.create_jobs("Ranks", 1, prefix="mpi", num_nodes=2, ranks_per_node=1)
    jobs = {j.id: j for j in kit.wait_jobs([*serial, mpi], J.JOB_STATE_JOB_FINISHED, 60)}

    pilots = kit.batch_jobs()
    assert len(pilots) == 1, kit.debug()
    pilot = pilots[0]
    assert pilot.scheduler_id.isdigit() and pilot.num_nodes == 2 and pilot.queue == "debug"
    script = (kit.site_dir / "qsubmit" / f"batch-{pilot.id}.sh").read_text()
    assert "#SBATCH --nodes=2" in script and "balsam_grpc.launcher" in script

    out = (kit.site_dir / "data" / jobs[mpi].workdir / "job.out").read_text()
    ranks = sorted(line.strip() for line in out.splitlines() if "@" in line)
    assert [r.split("@")[0] for r in ranks] == ["0/2", "1/2"], out
    assert len({r.split("@")[1] for r in ranks}) == 2, f"both ranks on one node: {ranks}"
    for jid in serial:
        assert "serial on node" in (kit.site_dir / "data" / jobs[jid].workdir / "out.txt").read_text()

    # With the pilot running, a new job goes to RUNNING without any loop period.
    wait_until(lambda: kit.batch_jobs()[0].state == BJ.BATCH_JOB_STATE_RUNNING, "the pilot to show running", 20)
    (late,) = kit.create_jobs("Echo", 1, prefix="late", node_packing_count=4)
    kit.wait_jobs([late], J.JOB_STATE_JOB_FINISHED, 60)
    print(f"\nLATENCY slurm: creation -> RUNNING with a pilot running: {kit.latency_to_running(late) * 1000:.0f} ms")

    # The idle pilot ends (its launcher exits after the idle timeout); nothing new is requested.
    wait_until(lambda: kit.batch_jobs()[0].state == BJ.BATCH_JOB_STATE_FINISHED, "the pilot to end", 120)
    assert not squeue_lists(pilot.scheduler_id)
    time.sleep(4)
    assert len(kit.batch_jobs()) == 1, kit.debug()


def test_user_cancelled_pilot_disappears_from_squeue(kit):
    kit.init_site(platform="slurm", apps=APPS, scheduler__poll_seconds=1, elastic_queue__enabled=False)
    kit.start_daemon()
    from balsam_grpc.v1 import batch_job_service_pb2, batch_job_service_pb2_grpc

    bj = kit.stub(batch_job_service_pb2_grpc.BatchJobServiceStub).CreateBatchJob(
        batch_job_service_pb2.CreateBatchJobRequest(batch_job=BJ.BatchJob(
            site_id=kit.site_id, num_nodes=1, wall_time_min=5, queue="debug")), metadata=kit.metadata,
        timeout=30).batch_job

    def submitted():
        b = {x.id: x for x in kit.batch_jobs()}[bj.id]
        return b if b.scheduler_id and b.state in (BJ.BATCH_JOB_STATE_QUEUED, BJ.BATCH_JOB_STATE_RUNNING) else None
    sid = wait_until(submitted, "sbatch of the pilot", 60).scheduler_id
    assert squeue_lists(sid)
    kit.update_batch_job_state(bj.id, BJ.BATCH_JOB_STATE_PENDING_DELETION)
    wait_until(lambda: not squeue_lists(sid), f"job {sid} to leave squeue", 60)
    wait_until(lambda: {x.id: x for x in kit.batch_jobs()}[bj.id].state == BJ.BATCH_JOB_STATE_FINISHED,
               "the batch job to be FINISHED on the server", 30)


def test_refused_batch_jobs_are_submit_failed_with_the_reason(kit):
    kit.init_site(platform="slurm", apps=APPS, elastic_queue__enabled=False,
                  allowed_queues={"debug": {"max_nodes": 2, "max_wall_time_min": 30}, "nosuch": {}})
    kit.start_daemon()
    from balsam_grpc.v1 import batch_job_service_pb2, batch_job_service_pb2_grpc

    stub = kit.stub(batch_job_service_pb2_grpc.BatchJobServiceStub)

    def create(**kw):
        return stub.CreateBatchJob(batch_job_service_pb2.CreateBatchJobRequest(batch_job=BJ.BatchJob(
            site_id=kit.site_id, wall_time_min=5, **kw)), metadata=kit.metadata, timeout=30).batch_job
    too_big = create(num_nodes=3, queue="debug")      # refused by the site's limits
    no_partition = create(num_nodes=1, queue="nosuch")  # refused by sbatch itself

    def failed(bid):
        b = {x.id: x for x in kit.batch_jobs()}[bid]
        return b if b.state == BJ.BATCH_JOB_STATE_SUBMIT_FAILED else None
    assert "3 nodes exceed the limit of queue 'debug' (2)" in wait_until(lambda: failed(too_big.id), "SUBMIT_FAILED",
                                                                         30).status_info
    info = wait_until(lambda: failed(no_partition.id), "SUBMIT_FAILED from sbatch", 30).status_info
    assert "partition" in info.lower(), info
