"""Launcher commands and batch scripts rendered from the templates (pure)."""

from __future__ import annotations

import shlex
from pathlib import Path

from balsam_grpc.site.batch import check_batch_job
from balsam_grpc.site.schedulers import read_template, render_script
from balsam_grpc.site.script import launcher_block, node_args, script_context
from balsam_grpc.site.settings import QueueLimits, SiteSettings
from balsam_grpc.v1 import batch_job_pb2, common_pb2

SITE = Path("/sites/theta")
KW = dict(site_dir=SITE, site_id=3, python="/venv/bin/python", serial_prefix="srun -N {num_nodes} -n {num_ranks}",
          mpiexec="/venv/bin/mpiexec", idle_timeout_s=60, extra_args=[])


def bj(**kw):
    return batch_job_pb2.BatchJob(id=42, site_id=3, num_nodes=4, wall_time_min=30, queue="debug", project="proj", **kw)


def test_single_mpi_launcher_runs_plain():
    line = launcher_block(bj(job_mode=common_pb2.JOB_MODE_MPI), default_mode="serial", **KW)
    argv = shlex.split(line)
    assert argv[:3] == ["/venv/bin/python", "-m", "balsam_grpc.launcher"]
    assert argv[argv.index("--mode") + 1] == "mpi"
    assert argv[argv.index("--batch-job-id") + 1] == "42"
    assert argv[argv.index("--wall-time") + 1] == "30"
    assert argv[argv.index("--site-dir") + 1] == str(SITE)
    assert argv[argv.index("--idle-timeout") + 1] == "60"


def test_serial_launcher_gets_the_mpi_prefix_and_tags():
    line = launcher_block(bj(job_mode=common_pb2.JOB_MODE_SERIAL, filter_tags={"exp": "a b"}), default_mode="mpi", **KW)
    assert line.startswith("srun -N 4 -n 4 /venv/bin/python -m balsam_grpc.launcher")
    argv = shlex.split(line)
    assert argv[argv.index("--tag") + 1] == "exp=a b"


def test_partitions_start_several_launchers_and_wait():
    job = bj(partitions=[batch_job_pb2.Partition(job_mode=common_pb2.JOB_MODE_MPI, num_nodes=3, filter_tags={"k": "big"}),
                         batch_job_pb2.Partition(job_mode=common_pb2.JOB_MODE_SERIAL, num_nodes=1,
                                                 filter_tags={"k": "small"})],
             filter_tags={"exp": "x"})
    lines = launcher_block(job, default_mode="serial", **KW).splitlines()
    assert len(lines) == 3 and lines[-1] == "wait"
    first, second = (shlex.split(line.rstrip(" &")) for line in lines[:2])
    assert lines[0].endswith(" &") and lines[1].endswith(" &")
    assert first[first.index("--mode") + 1] == "mpi" and "k=big" in first and "exp=x" in first
    assert second[:4] == ["srun", "-N", "1", "-n"] and second[second.index("--mode") + 1] == "serial"
    assert "k=small" in second


def test_slurm_and_local_templates_render_with_the_context():
    job = bj(job_mode=common_pb2.JOB_MODE_MPI)
    launcher = launcher_block(job, default_mode="serial", **KW)
    ctx = script_context(job, site_name="theta", site_dir=SITE, launcher=launcher,
                         env={"BALSAM_SERVER": "h:1", "BALSAM_TOKEN": "secret"}, preamble="module load x")
    for name in ("slurm.sh", "local.sh"):
        text = render_script(read_template(name), ctx)
        assert launcher in text
        assert "export BALSAM_SERVER=h:1" in text and "module load x" in text
    slurm = render_script(read_template("slurm.sh"), ctx)
    assert "#SBATCH --nodes=4" in slurm and "#SBATCH --partition=debug" in slurm and "#SBATCH --account=proj" in slurm


def test_batch_job_checked_against_site_limits():
    s = SiteSettings(site_id=3, name="theta", allowed_projects=["proj"],
                     allowed_queues={"debug": QueueLimits(max_nodes=2, max_wall_time_min=60)})
    assert "exceed the limit of queue 'debug' (2)" in check_batch_job(bj(), s)
    assert check_batch_job(batch_job_pb2.BatchJob(id=1, num_nodes=2, wall_time_min=60, queue="debug", project="proj"),
                           s) is None
    assert "queue 'prod' is not allowed" in check_batch_job(
        batch_job_pb2.BatchJob(num_nodes=1, wall_time_min=5, queue="prod", project="proj"), s)
    assert "project 'other' is not allowed" in check_batch_job(
        batch_job_pb2.BatchJob(num_nodes=1, wall_time_min=5, queue="debug", project="other"), s)
    assert "wall time 90 min exceeds" in check_batch_job(
        batch_job_pb2.BatchJob(num_nodes=1, wall_time_min=90, queue="debug", project="proj"), s)


def test_node_inventory_comes_from_the_site_preset():
    polaris = {"mpi_launch": "pals", "cpus_per_node": 32, "gpus_per_node": 4}
    assert node_args(polaris) == ["--mpi-flavor", "pals", "--cpus-per-node", "32", "--gpus-per-node", "4"]
    assert node_args({"mpi_launch": "srun", "cpus_per_node": 0, "gpus_per_node": 0}) == ["--mpi-flavor", "slurm"]
    assert node_args(polaris, "perlmutter-gpu") == ["--platform", "perlmutter-gpu"]
    argv = shlex.split(launcher_block(bj(job_mode=common_pb2.JOB_MODE_MPI), default_mode="serial",
                                      **{**KW, "node_args": node_args(polaris)}))
    assert argv[argv.index("--mpi-flavor") + 1] == "pals" and argv[argv.index("--cpus-per-node") + 1] == "32"
