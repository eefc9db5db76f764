"""What to execute for a leased job on its assigned nodes (pure).

Turns a LeasedJob (job + app + lease) and the node manager's Assignment into a
ProcessSpec: argv, workdir, environment, CPU ids, time limit and any files to write
first. A ProcessSpec is plain data, so the master can hand it to a worker rank over MPI.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import json_format

from balsam_grpc.core.appdef import command_argv
from balsam_grpc.core.jobenv import JOB_TOKEN_ENV
from balsam_grpc.launcher.launch_commands import LaunchSpec, build_argv
from balsam_grpc.launcher.node_manager import Assignment, Resources
from balsam_grpc.v1 import app_pb2, session_service_pb2

RESULT_FILE = ".balsam-result.json"
JOB_FILE = ".balsam-job.json"


@dataclass
class ProcessSpec:
    """One process to start (a program, a shell script, or an MPI launcher)."""

    job_id: int
    argv: list[str]
    cwd: str
    env: dict[str, str] = field(default_factory=dict)
    cpu_ids: list[int] = field(default_factory=list)  # bind a directly started process to these
    timeout_s: float | None = None
    files: dict[str, str] = field(default_factory=dict)  # name in cwd -> text, written before start
    result_path: str = ""  # Python-function apps write their outcome here
    out_name: str = "job.out"
    root: str = ""  # the site's data folder: cwd must resolve inside it, symlinks included


@dataclass(frozen=True)
class RunContext:
    """Launcher-wide settings that shape every job's process."""

    data_dir: Path
    apps_dir: Path
    mpi_flavor: str = "mpich"
    mpiexec: str = ""
    python: str = sys.executable
    # Seconds per minute of job.wall_time_min (60; tests shrink it to exercise timeouts).
    job_time_scale: float = 60.0
    # The server's address, for jobs that call it with their BALSAM_JOB_TOKEN.
    server: str = ""


def workdir_path(data_dir: str, workdir: str) -> str:
    """str(Path(data_dir) / workdir), without building Paths for the usual plain relative
    workdir (the launcher makes one per job)."""
    if workdir and workdir[0] != "/" and all(part and part != "." for part in workdir.split("/")):
        return f"{data_dir}/{workdir}" if data_dir != "/" else f"/{workdir}"
    return str(Path(data_dir) / workdir)


def job_environment(leased: session_service_pb2.LeasedJob, res: Resources,
                    gpu_ids: list[int], server: str = "") -> dict[str, str]:
    """OMP_NUM_THREADS and CUDA_VISIBLE_DEVICES from the assignment, then the app's environment
    (which wins: an app that sets OMP_NUM_THREADS means it), then the run's credential
    and where to use it (core/jobenv.py)."""
    env = {"OMP_NUM_THREADS": str(res.threads_per_rank), "BALSAM_JOB_ID": str(leased.job.id)}
    if res.gpus_per_node:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpu_ids))
    app_env = leased.app.environment
    if app_env:
        env.update(app_env)
    if server:
        env["BALSAM_SERVER"] = server
    if leased.job_token:
        env[JOB_TOKEN_ENV] = leased.job_token
    return env


def build_process_spec(leased: session_service_pb2.LeasedJob, placed: Assignment, hosts: list[str],
                       ctx: RunContext, *, force_mpi_launch: bool = False,
                       res: Resources | None = None) -> ProcessSpec:
    """The process for a placed job. Raises InvalidArgument when the command cannot be
    rendered from the job's parameters (the caller reports RUN_ERROR).

    Multi-node and multi-rank jobs get an MPI launch; so does a single-rank job placed on a
    node where no launcher rank runs (`force_mpi_launch`)."""
    job, app = leased.job, leased.app
    res = Resources.from_pb(job.resources) if res is None else res  # the caller's, made when leased
    workdir = workdir_path(str(ctx.data_dir), job.workdir)
    env = job_environment(leased, res, placed.gpu_ids[0] if placed.gpu_ids else [], ctx.server)
    files: dict[str, str] = {}
    result_path = ""
    if app.kind == app_pb2.APP_KIND_PYTHON:
        files[JOB_FILE] = json_format.MessageToJson(session_service_pb2.LeasedJob(job=job, app=app))
        result_path = os.path.join(workdir, RESULT_FILE)
        command = [ctx.python, "-m", "balsam_grpc.launcher.pyfunc", "--apps", str(ctx.apps_dir),
                   "--job", JOB_FILE, "--result", RESULT_FILE]
    else:
        command = command_argv(app, dict(job.parameters))
    argv = command
    mpi_launch = res.needs_mpi_launch or force_mpi_launch
    if mpi_launch:
        spec = LaunchSpec(hosts=hosts, ranks_per_node=res.ranks_per_node, threads_per_rank=res.threads_per_rank,
                          threads_per_core=res.threads_per_core, gpus_per_rank=res.gpus_per_rank,
                          cpu_ids=placed.cpu_ids, env={k: v for k, v in env.items() if k != JOB_TOKEN_ENV},
                          forward=[JOB_TOKEN_ENV] if JOB_TOKEN_ENV in env else [],
                          launch_params=dict(job.resources.launch_params), executable=ctx.mpiexec,
                          shares_nodes=placed.occupancy < 1)
        argv = build_argv(ctx.mpi_flavor, spec, command)
    preamble = app.preamble.strip()
    if preamble:
        # The preamble (module loads, conda activate) is the app's own text; the command
        # follows it as arguments, so nothing of the job is pasted into the script.
        argv = ["/bin/bash", "-c", preamble + '\nexec "$@"', "balsam-preamble", *argv]
    timeout = job.resources.wall_time_min * ctx.job_time_scale if job.resources.wall_time_min > 0 else None
    return ProcessSpec(job_id=job.id, argv=argv, cwd=workdir, env=env,
                       cpu_ids=[] if mpi_launch else list(placed.cpu_ids[0]), timeout_s=timeout, files=files,
                       result_path=result_path, root=str(ctx.data_dir))
