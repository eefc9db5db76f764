"""Which nodes the allocation has and what each one holds (CPUs, GPUs).

Pure parsers of what batch schedulers hand a job (Slurm node lists with ranges, PBS node
files, Cobalt partition names, LSF host files), platform presets, and a thin detection of
the local host. The parsers never raise on odd input beyond ValueError with a clear
message, so they can be fuzzed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One compute node as the launcher sees it."""

    hostname: str
    cpus: int
    gpus: int = 0


@dataclass(frozen=True, slots=True)
class Platform:
    """What a machine's nodes look like and how MPI jobs start there.

    cpus_per_node / gpus_per_node of 0 mean "detect on the local host"."""

    name: str
    cpus_per_node: int = 0
    gpus_per_node: int = 0
    mpi_flavor: str = "mpich"
    mpiexec: str = ""  # executable of the MPI launcher; empty: the flavor's default name on PATH


# Small built-in table; a site can add `<site dir>/platforms/<name>.yml` with the same keys.
PLATFORMS: dict[str, Platform] = {
    "local": Platform("local"),
    "polaris": Platform("polaris", cpus_per_node=32, gpus_per_node=4, mpi_flavor="pals"),
    "aurora": Platform("aurora", cpus_per_node=104, gpus_per_node=6, mpi_flavor="pals"),
    "theta": Platform("theta", cpus_per_node=64, gpus_per_node=0, mpi_flavor="aprun"),
    "summit": Platform("summit", cpus_per_node=42, gpus_per_node=6, mpi_flavor="jsrun"),
    "perlmutter-gpu": Platform("perlmutter-gpu", cpus_per_node=64, gpus_per_node=4, mpi_flavor="slurm"),
    "perlmutter-cpu": Platform("perlmutter-cpu", cpus_per_node=128, gpus_per_node=0, mpi_flavor="slurm"),
    "slurm": Platform("slurm", mpi_flavor="slurm"),
    "openmpi": Platform("openmpi", mpi_flavor="openmpi"),
}


def load_platform(name: str, site_dir: Path | None = None) -> Platform:
    """The built-in preset, or `<site dir>/platforms/<name>.yml` (which wins)."""
    if site_dir is not None:
        path = site_dir / "platforms" / f"{name}.yml"
        if path.exists():
            data = yaml.safe_load(path.read_text()) or {}
            if not isinstance(data, dict):
                raise ValueError(f"{path}: expected a mapping of platform settings")
            known = {k: data[k] for k in ("cpus_per_node", "gpus_per_node", "mpi_flavor", "mpiexec") if k in data}
            return Platform(name, **known)
    try:
        return PLATFORMS[name]
    except KeyError:
        raise ValueError(f"unknown platform {name!r}; built-in: {', '.join(sorted(PLATFORMS))}") from None


# -- scheduler node lists (pure) --------------------------------------------------------



def expand_slurm_nodelist(text: str, limit: int = 100_000) -> list[str]:
    """`nid[0001-0003,0007],gpu1` -> nid0001 nid0002 nid0003 nid0007 gpu1 (zero padding kept;
    `r[1-2]n[3-4]` expands as a product). python-hostlist does the expansion; errors and
    lists longer than `limit` are ValueError."""
    import hostlist

    try:
        hosts = hostlist.expand_hostlist(text.strip(), allow_duplicates=True)
    except hostlist.BadHostlist as exc:
        raise ValueError(f"bad node list {text!r}: {exc}") from None
    hosts = [h.strip() for h in hosts if h.strip()]
    if any(c.isspace() for h in hosts for c in h):
        raise ValueError(f"bad node list {text!r}: a host name holds white space")
    if len(hosts) > limit:
        raise ValueError(f"node list expands to more than {limit} names")
    return hosts


def parse_host_file(text: str) -> list[str]:
    """A PBS node file: one host per line per slot, repeated; keep the first occurrence order."""
    seen: dict[str, None] = {}
    for line in text.splitlines():
        host = line.split("#", 1)[0].strip()
        if host:
            seen.setdefault(host.split()[0], None)
    return list(seen)


def parse_lsf_hostfile(text: str) -> list[str]:
    """LSB_DJOB_HOSTFILE: one line per slot; the first host is the launch (batch) node, which
    runs no job tasks when other hosts exist (Summit-style), so it is dropped then."""
    hosts = parse_host_file(text)
    return hosts[1:] if len(hosts) > 1 else hosts


def parse_cobalt_partname(text: str, limit: int = 100_000) -> list[str]:
    """COBALT_PARTNAME on Theta is a list of node ids like `3824-3827,3830`; nodes are named
    `nid` + the id zero-padded to five digits."""
    spec = text.strip()
    if not spec or not all(c.isdigit() or c in ",-" for c in spec):
        raise ValueError(f"COBALT_PARTNAME {text!r} is not a list of numeric node ids")
    ids = expand_slurm_nodelist(f"nid[{spec}]", limit)
    return [f"nid{int(i.removeprefix('nid')):05d}" for i in ids]


def scheduler_hosts(env: Mapping[str, str], read_file=lambda p: Path(p).read_text()) -> tuple[str, list[str]]:
    """(source, host names) of the allocation from the batch scheduler's environment;
    ("local", []) outside one."""
    if env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST"):
        return "slurm", expand_slurm_nodelist(env.get("SLURM_JOB_NODELIST") or env["SLURM_NODELIST"])
    if env.get("PBS_NODEFILE"):
        return "pbs", parse_host_file(read_file(env["PBS_NODEFILE"]))
    if env.get("COBALT_PARTNAME"):
        return "cobalt", parse_cobalt_partname(env["COBALT_PARTNAME"])
    if env.get("LSB_DJOB_HOSTFILE"):
        return "lsf", parse_lsf_hostfile(read_file(env["LSB_DJOB_HOSTFILE"]))
    return "local", []


# -- local inventory (thin I/O) ---------------------------------------------------------

def detect_cpus() -> int:
    try:
        import psutil

        return int(psutil.cpu_count(logical=True) or os.cpu_count() or 1)
    except ImportError:  # psutil is a dependency; this only guards odd installs
        return os.cpu_count() or 1


def count_gpus_from_nvidia_smi(output: str) -> int:
    """`nvidia-smi -L` output -> number of GPUs (lines starting with 'GPU ')."""
    return sum(1 for line in output.splitlines() if line.strip().startswith("GPU "))


def detect_gpus() -> int:
    """NVIDIA GPUs on this host; no nvidia-smi (or a failing one) means 0."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return 0
    return count_gpus_from_nvidia_smi(out.stdout) if out.returncode == 0 else 0


def local_hostname() -> str:
    return socket.gethostname()


def node_specs(hosts: list[str], platform: Platform, *, cpus: int = 0, gpus: int | None = None) -> list[NodeSpec]:
    """Inventory of each host: explicit overrides, else the preset, else local detection
    (a preset with cpus_per_node set is trusted for GPUs too)."""
    n_cpus = cpus or platform.cpus_per_node or detect_cpus()
    if gpus is None:
        gpus = platform.gpus_per_node if platform.cpus_per_node else detect_gpus()
    return [NodeSpec(h, n_cpus, gpus) for h in hosts]
