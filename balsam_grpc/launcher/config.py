"""Command line and settings of the launcher (pure parsing)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from balsam_grpc.launcher.launch_commands import FLAVORS


@dataclass
class LauncherConfig:
    mode: str = "mpi"  # "serial" or "mpi"
    site_dir: Path = field(default_factory=Path.cwd)
    site_id: int = 0
    batch_job_id: int = 0
    wall_time_min: float = 0.0  # the allocation's length; 0 = no limit
    idle_timeout_s: float = 0.0  # exit after this long without work; 0 = never
    filter_tags: dict[str, str] = field(default_factory=dict)
    app_ids: list[int] = field(default_factory=list)
    partition: str = ""
    max_jobs: int = 0  # most jobs held at once; 0 = as many as fit
    # Jobs held ahead of free slots, started as slots free (0 = lease only what fits now;
    # -1 = automatic, see master.auto_prefetch).
    lease_prefetch: int = -1
    platform: str = "local"
    cpus_per_node: int = 0
    gpus_per_node: int | None = None
    mpi_flavor: str = ""
    mpiexec: str = ""
    job_time_scale: float = 60.0
    progress_interval_s: float = 5.0

    @property
    def data_dir(self) -> Path:
        return self.site_dir / "data"

    @property
    def apps_dir(self) -> Path:
        return self.site_dir / "apps"

    @property
    def credit_tags(self) -> dict[str, str]:
        tags = dict(self.filter_tags)
        if self.partition:
            tags["partition"] = self.partition
        return tags


def parse_tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"tag {text!r} is not key=value")
    return key, value


def site_id_from_settings(site_dir: Path) -> int:
    """`site_id` from `<site dir>/settings.yml` (written by the site daemon), 0 if absent."""
    path = site_dir / "settings.yml"
    if not path.exists():
        return 0
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping")
    return int(data.get("site_id") or 0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m balsam_grpc.launcher",
                                description="Run leased jobs inside a batch allocation (usually started as "
                                            "`mpiexec -n <nodes> python -m balsam_grpc.launcher ...`).")
    p.add_argument("--mode", choices=("serial", "mpi"), default="mpi",
                   help="serial: single-process jobs only; mpi: also multi-node / multi-rank jobs")
    p.add_argument("--site-dir", type=Path, default=None, help="site folder (default $BALSAM_SITE_DIR or cwd)")
    p.add_argument("--site-id", type=int, default=0, help="site id (default: site_id in <site dir>/settings.yml)")
    p.add_argument("--batch-job-id", type=int, default=0, help="batch job this launcher runs in")
    p.add_argument("--wall-time", type=float, default=0.0, help="minutes the allocation lasts (0 = no limit)")
    p.add_argument("--idle-timeout", type=float, default=0.0, help="exit after this many seconds without work")
    p.add_argument("--tag", type=parse_tag, action="append", default=[], help="only jobs with this tag (k=v)")
    p.add_argument("--app-id", type=int, action="append", default=[], help="only jobs of this app")
    p.add_argument("--partition", default="", help="only jobs tagged partition=NAME")
    p.add_argument("--max-jobs", type=int, default=0, help="most jobs held at once (0 = as many as fit)")
    p.add_argument("--lease-prefetch", type=int, default=-1,
                   help="hold up to this many jobs ahead of free slots and start them as slots free: they stay "
                        "in their runnable state on the server (not RUNNING) until started, and unstarted ones "
                        "are released when the session closes (0 = off; default: none until jobs are seen to end, then "
                        "enough for 0.25 s of work, at most 256)")
    p.add_argument("--platform", default="local", help="node preset (cpus/gpus per node, MPI launcher)")
    p.add_argument("--cpus-per-node", type=int, default=0, help="override the preset's CPUs per node")
    p.add_argument("--gpus-per-node", type=int, default=None, help="override the preset's GPUs per node")
    p.add_argument("--mpi-flavor", choices=FLAVORS, default="", help="override the preset's MPI launcher")
    p.add_argument("--mpiexec", default="", help="path of the MPI launcher executable")
    p.add_argument("--job-time-scale", type=float, default=60.0,
                   help="seconds per minute of job wall_time_min (tests and demos shrink it)")
    p.add_argument("--progress-interval", type=float, default=5.0, help="seconds between progress log lines")
    return p


def parse_args(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> LauncherConfig:
    environ = dict(os.environ if environ is None else environ)
    a = build_parser().parse_args(argv)
    site_dir = (a.site_dir or Path(environ.get("BALSAM_SITE_DIR") or Path.cwd())).expanduser().resolve()
    site_id = a.site_id or site_id_from_settings(site_dir)
    if site_id <= 0:
        raise SystemExit(f"no site id: pass --site-id or write site_id in {site_dir / 'settings.yml'}")
    return LauncherConfig(mode=a.mode, site_dir=site_dir, site_id=site_id, batch_job_id=a.batch_job_id,
                          wall_time_min=a.wall_time, idle_timeout_s=a.idle_timeout, filter_tags=dict(a.tag),
                          app_ids=list(a.app_id), partition=a.partition, max_jobs=a.max_jobs,
                          lease_prefetch=max(-1, a.lease_prefetch),
                          platform=a.platform, cpus_per_node=a.cpus_per_node, gpus_per_node=a.gpus_per_node,
                          mpi_flavor=a.mpi_flavor, mpiexec=a.mpiexec, job_time_scale=a.job_time_scale,
                          progress_interval_s=a.progress_interval)
