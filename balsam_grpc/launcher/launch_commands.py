"""Argv of one MPI launch per job, for each MPI launcher family (pure functions).

`build_argv(flavor, spec, command)` returns the full argv: the launcher's own flags
(hosts, ranks, ranks per node, threads, GPUs, CPU binding, environment) followed by the
job's command argv. Extra options come from the job's `launch_params`: a key with a
leading dash is used verbatim, a one-letter key becomes `-k`, others `--key`; an empty
value makes a bare flag. A "cpu-bind" key replaces the launcher's default binding.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

FLAVORS = ("mpich", "pals", "openmpi", "slurm", "aprun", "jsrun")
DEFAULT_EXECUTABLE = {"mpich": "mpiexec", "pals": "mpiexec", "openmpi": "mpirun", "slurm": "srun",
                      "aprun": "aprun", "jsrun": "jsrun"}


@dataclass(frozen=True)
class LaunchSpec:
    """What one MPI launch needs to know."""

    hosts: Sequence[str]
    ranks_per_node: int = 1
    threads_per_rank: int = 1
    threads_per_core: int = 1
    gpus_per_rank: int = 0
    # CPU ids assigned on each node (same order as hosts); empty: no binding.
    cpu_ids: Sequence[Sequence[int]] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    launch_params: Mapping[str, str] = field(default_factory=dict)
    executable: str = ""
    # The job shares its nodes with other jobs (packing): Slurm needs --overlap then.
    shares_nodes: bool = False
    # Secrets (the job's token): in the launcher's environment, never in argv, which every
    # user of the node can read in /proc. Hydra, PALS, srun --export=ALL, aprun and jsrun
    # pass the whole environment on; Open MPI needs their names (-x NAME).
    forward: Sequence[str] = ()

    @property
    def num_nodes(self) -> int:
        return len(self.hosts)

    @property
    def num_ranks(self) -> int:
        return self.num_nodes * self.ranks_per_node

    @property
    def cpus_per_rank(self) -> int:
        return max(1, -(-self.threads_per_rank // self.threads_per_core))

    def rank_cpu_lists(self) -> list[list[int]]:
        """CPU ids of each rank on the first node (the same layout is used on every node)."""
        if not self.cpu_ids:
            return []
        ids = list(self.cpu_ids[0])
        k = self.cpus_per_rank
        return [ids[i * k:(i + 1) * k] for i in range(self.ranks_per_node) if ids[i * k:(i + 1) * k]]


def _params(spec: LaunchSpec, *, equals: bool = False, skip: Sequence[str] = ("cpu-bind",)) -> list[str]:
    out: list[str] = []
    for key, value in spec.launch_params.items():
        if key in skip:
            continue
        flag = key if key.startswith("-") else (f"-{key}" if len(key) == 1 else f"--{key}")
        if value == "":
            out.append(flag)
        elif equals and flag.startswith("--"):
            out.append(f"{flag}={value}")
        else:
            out += [flag, value]
    return out


def _env_pairs(spec: LaunchSpec, flag: str, *, joined: bool = True) -> list[str]:
    out: list[str] = []
    for key, value in sorted(spec.env.items()):
        out += [flag, f"{key}={value}"] if joined else [flag, key, value]
    return out


def _ranges(ids: Sequence[int]) -> str:
    """[0,1,2,5] -> '0-2,5'."""
    out, ids = [], sorted(ids)
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


def mpich_argv(spec: LaunchSpec) -> list[str]:
    """MPICH Hydra mpiexec."""
    argv = [spec.executable or "mpiexec", "-n", str(spec.num_ranks), "-ppn", str(spec.ranks_per_node),
            "-hosts", ",".join(spec.hosts)]
    bind = spec.launch_params.get("cpu-bind")
    ranks = spec.rank_cpu_lists()
    if bind:
        argv += ["-bind-to", bind]
    elif ranks:
        argv += ["-bind-to", "user:" + ",".join("+".join(map(str, r)) for r in ranks)]
    argv += _env_pairs(spec, "-genv", joined=False)
    return argv + _params(spec)


def pals_argv(spec: LaunchSpec) -> list[str]:
    """Cray PALS mpiexec (Polaris, Aurora)."""
    argv = [spec.executable or "mpiexec", "-n", str(spec.num_ranks), "--ppn", str(spec.ranks_per_node),
            "--hosts", ",".join(spec.hosts), "--depth", str(spec.cpus_per_rank)]
    bind = spec.launch_params.get("cpu-bind")
    ranks = spec.rank_cpu_lists()
    if bind:
        argv += ["--cpu-bind", bind]
    elif ranks:
        argv += ["--cpu-bind", "list:" + ":".join(_ranges(r) for r in ranks)]
    else:
        argv += ["--cpu-bind", "depth"]
    argv += _env_pairs(spec, "--env")
    return argv + _params(spec)


def openmpi_argv(spec: LaunchSpec) -> list[str]:
    """Open MPI mpirun (as root it also needs OMPI_ALLOW_RUN_AS_ROOT* in the environment)."""
    argv = [spec.executable or "mpirun", "-np", str(spec.num_ranks),
            "--host", ",".join(f"{h}:{spec.ranks_per_node}" for h in spec.hosts),
            "--map-by", f"ppr:{spec.ranks_per_node}:node:PE={spec.cpus_per_rank}"]
    bind = spec.launch_params.get("cpu-bind")
    if bind:
        argv += ["--bind-to", bind]
    elif spec.cpu_ids:
        argv += ["--bind-to", "core"]
    argv += _env_pairs(spec, "-x")
    for name in spec.forward:
        argv += ["-x", name]
    return argv + _params(spec)


def slurm_argv(spec: LaunchSpec) -> list[str]:
    """Slurm srun job step. `--exact` gives the step only the CPUs it asks for, so several
    steps pack onto one node; `--overlap` lets a step share CPUs already held by others."""
    argv = [spec.executable or "srun", f"--ntasks={spec.num_ranks}", f"--nodes={spec.num_nodes}",
            f"--ntasks-per-node={spec.ranks_per_node}", f"--cpus-per-task={spec.cpus_per_rank}",
            f"--nodelist={','.join(spec.hosts)}", "--exact"]
    if spec.shares_nodes:
        argv.append("--overlap")
    if spec.gpus_per_rank:
        argv.append(f"--gpus-per-task={spec.gpus_per_rank}")
    bind = spec.launch_params.get("cpu-bind")
    ranks = spec.rank_cpu_lists()
    if bind:
        argv.append(f"--cpu-bind={bind}")
    elif ranks and spec.cpus_per_rank == 1:
        argv.append("--cpu-bind=map_cpu:" + ",".join(str(r[0]) for r in ranks))
    elif ranks:
        argv.append("--cpu-bind=mask_cpu:" + ",".join(hex(sum(1 << c for c in r)) for r in ranks))
    exports = ",".join(f"{k}={v}" for k, v in sorted(spec.env.items()))
    argv.append("--export=ALL" + ("," + exports if exports else ""))
    return argv + _params(spec, equals=True)


_NID = re.compile(r"^nid0*(\d+)$")


def aprun_argv(spec: LaunchSpec) -> list[str]:
    """Cray ALPS aprun; `-L` takes numeric node ids (nid00012 -> 12)."""
    nids = [m.group(1) if (m := _NID.match(h)) else h for h in spec.hosts]
    argv = [spec.executable or "aprun", "-n", str(spec.num_ranks), "-N", str(spec.ranks_per_node),
            "-d", str(spec.cpus_per_rank), "-j", str(spec.threads_per_core),
            "-cc", spec.launch_params.get("cpu-bind", "depth"), "-L", ",".join(nids)]
    argv += _env_pairs(spec, "-e")
    return argv + _params(spec)


def jsrun_argv(spec: LaunchSpec) -> list[str]:
    """IBM jsrun: one resource set per rank. jsrun takes no host list (only an ERF file),
    so it places resource sets on the allocation's nodes itself."""
    argv = [spec.executable or "jsrun", "--nrs", str(spec.num_ranks), "--tasks_per_rs", "1",
            "--cpu_per_rs", str(spec.cpus_per_rank), "--gpu_per_rs", str(spec.gpus_per_rank),
            "--rs_per_host", str(spec.ranks_per_node),
            "--bind", spec.launch_params.get("cpu-bind", f"packed:{spec.cpus_per_rank}"),
            "--launch_distribution", "packed"]
    argv += _env_pairs(spec, "-E")
    return argv + _params(spec)


BUILDERS: dict[str, Callable[[LaunchSpec], list[str]]] = {
    "mpich": mpich_argv, "pals": pals_argv, "openmpi": openmpi_argv, "slurm": slurm_argv,
    "aprun": aprun_argv, "jsrun": jsrun_argv,
}


def build_argv(flavor: str, spec: LaunchSpec, command: Sequence[str]) -> list[str]:
    """The MPI launcher's argv followed by the job's command argv (never a command line:
    a string would be re-split, and its values with it)."""
    if isinstance(command, str):
        raise TypeError("build_argv takes the command as an argument vector (list of str), not a string")
    try:
        builder = BUILDERS[flavor]
    except KeyError:
        raise ValueError(f"unknown MPI launcher {flavor!r}; one of {', '.join(FLAVORS)}") from None
    if not spec.hosts:
        raise ValueError("an MPI launch needs at least one host")
    return builder(spec) + list(command)
