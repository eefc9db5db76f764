"""Pure rendering of what a pilot batch job runs: the launcher command line(s) and the
context the batch script template is filled with.

One launcher per allocation, or one per partition (each with its own mode, node count
and filter tags) started in the background and waited for. Serial-mode launchers run as
an MPI program across their nodes (rank 0 talks to the server, the other ranks run
tasks), so they get the platform's MPI prefix; mpi-mode launchers are a single process
that starts one mpiexec/srun per job, so they run plain on the allocation's head node.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from balsam_grpc.site.schedulers import pilot_job_name
from balsam_grpc.v1 import batch_job_pb2, common_pb2

MODE_NAMES = {common_pb2.JOB_MODE_UNSPECIFIED: "", common_pb2.JOB_MODE_SERIAL: "serial",
              common_pb2.JOB_MODE_MPI: "mpi"}

# How a serial launcher is spread over its nodes, per scheduler, when settings.yml has
# no launcher.mpi_prefix. {num_nodes}/{num_ranks}/{mpiexec} are filled in.
DEFAULT_SERIAL_PREFIX = {
    "local": "{mpiexec} -n {num_ranks}",
    "slurm": "srun --overlap -N {num_nodes} -n {num_ranks} --ntasks-per-node=1 --mpi=pmi2",
    "pbs": "mpiexec -n {num_ranks} --ppn 1",
    "cobalt": "aprun -n {num_ranks} -N 1",
    "lsf": "jsrun -n {num_ranks} -r 1",
}


# Site platform preset -> the launcher's node preset of the same machine (the launcher
# keeps its own table: cpus/gpus per node and MPI flavor).
# The launcher's MPI flavors by the platform presets' mpi_launch names.
_MPI_FLAVORS = {"mpich": "mpich", "pals": "pals", "srun": "slurm", "jsrun": "jsrun", "aprun": "aprun"}


def node_args(preset: dict[str, Any], launcher_platform: str = "") -> list[str]:
    """Launcher flags describing the allocation's nodes. The site's platform preset is the
    one source of node inventory and MPI flavor; an explicit launcher preset name (a site
    setting) overrides it."""
    if launcher_platform:
        return ["--platform", launcher_platform]
    args = ["--mpi-flavor", _MPI_FLAVORS[preset["mpi_launch"]]]
    if preset.get("cpus_per_node"):  # 0 = let the launcher detect the host's cpus and gpus
        args += ["--cpus-per-node", str(preset["cpus_per_node"]), "--gpus-per-node", str(preset.get("gpus_per_node", 0))]
    return args


@dataclass(frozen=True)
class LauncherPlan:
    mode: str
    num_nodes: int
    tags: dict[str, str]


def launcher_plans(bj: batch_job_pb2.BatchJob, default_mode: str) -> list[LauncherPlan]:
    """One launcher per partition, or one on the whole allocation."""
    base_tags = dict(bj.filter_tags)
    mode = MODE_NAMES.get(bj.job_mode) or default_mode
    if not bj.partitions:
        return [LauncherPlan(mode, bj.num_nodes, base_tags)]
    return [LauncherPlan(MODE_NAMES.get(p.job_mode) or mode, p.num_nodes, {**base_tags, **dict(p.filter_tags)})
            for p in bj.partitions]


def launcher_command(plan: LauncherPlan, *, site_dir: Path, site_id: int, batch_job_id: int, wall_time_min: int,
                     python: str, serial_prefix: str, mpiexec: str, idle_timeout_s: int,
                     extra_args: list[str], node_args: list[str] = ()) -> str:
    argv = [python, "-m", "balsam_grpc.launcher", "--site-dir", str(site_dir), "--site-id", str(site_id),
            "--mode", plan.mode, "--batch-job-id", str(batch_job_id), "--wall-time", str(wall_time_min)]
    if idle_timeout_s:
        argv += ["--idle-timeout", str(idle_timeout_s)]
    argv += list(node_args)
    for key, value in sorted(plan.tags.items()):
        argv += ["--tag", f"{key}={value}"]
    argv += list(extra_args)
    command = shlex.join(argv)
    if plan.mode == "serial" and serial_prefix:
        # One rank per node; rank 0 also owns the session stream.
        prefix = serial_prefix.format(num_nodes=plan.num_nodes, num_ranks=plan.num_nodes, mpiexec=mpiexec)
        command = f"{prefix} {command}"
    return command


def launcher_block(bj: batch_job_pb2.BatchJob, *, default_mode: str, **kw: object) -> str:
    """The shell lines that run the pilot's launcher(s) and wait for them."""
    plans = launcher_plans(bj, default_mode)
    if len(plans) == 1:
        return launcher_command(plans[0], batch_job_id=bj.id, wall_time_min=bj.wall_time_min, **kw)  # type: ignore[arg-type]
    lines = [launcher_command(p, batch_job_id=bj.id, wall_time_min=bj.wall_time_min, **kw) + " &"  # type: ignore[arg-type]
             for p in plans]
    return "\n".join([*lines, "wait"])


def script_context(bj: batch_job_pb2.BatchJob, *, site_name: str, site_dir: Path, launcher: str,
                   env: dict[str, str], preamble: str = "", sched_directives: str = "") -> dict[str, object]:
    """Values a batch script template may use."""
    return {
        "workdir": str(site_dir / "qsubmit"),
        "preamble": preamble,
        "sched_directives": sched_directives,
        "partitions": ", ".join(f"{p.num_nodes} node(s) {MODE_NAMES.get(p.job_mode) or 'default'}"
                                for p in bj.partitions),
        "job_name": pilot_job_name(site_name, bj.id),
        "batch_job_id": bj.id,
        "num_nodes": bj.num_nodes,
        "wall_time_min": bj.wall_time_min,
        "queue": bj.queue,
        "project": bj.project,
        "site_dir": str(site_dir),
        "site_name": site_name,
        "output": str(site_dir / "logs" / f"batch-{bj.id}.out"),
        "launcher_cmd": launcher,
        "launcher_command": launcher,
        "env": env,
        "optional_params": " ".join(f"{k}={v}" for k, v in sorted(bj.optional_params.items())),
        **{f"param_{k}": v for k, v in bj.optional_params.items()},
    }
