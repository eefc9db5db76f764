"""`balsamctl launcher ...`: start the launcher as its own process.

Layering: the CLI never imports the launcher package; it execs `python -m
balsam_grpc.launcher` with the same flags, so signals and the exit code are the launcher's.
Inside a batch script, prefer `mpiexec -n <nodes> python -m balsam_grpc.launcher ...`.
"""

from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path

import typer


class Mode(str, Enum):
    serial = "serial"
    mpi = "mpi"


def launcher_argv(mode: str = "mpi", site_dir: Path | None = None, site_id: int = 0, batch_job_id: int = 0,
                  wall_time: float = 0.0, idle_timeout: float = 0.0, tag: list[str] | None = None,
                  app_id: list[int] | None = None, partition: str = "", max_jobs: int = 0,
                  platform: str = "") -> list[str]:
    """The argv of `python -m balsam_grpc.launcher` for these options (pure)."""
    argv = [sys.executable, "-m", "balsam_grpc.launcher", "--mode", mode]
    for flag, value in (("--site-dir", site_dir), ("--site-id", site_id), ("--batch-job-id", batch_job_id),
                        ("--wall-time", wall_time), ("--idle-timeout", idle_timeout), ("--partition", partition),
                        ("--max-jobs", max_jobs), ("--platform", platform)):
        if value:
            argv += [flag, str(value)]
    for t in tag or []:
        argv += ["--tag", t]
    for a in app_id or []:
        argv += ["--app-id", str(a)]
    return argv


def launcher(
    mode: Mode = typer.Option(Mode.mpi, help="serial: single-process jobs only; mpi: also multi-node/multi-rank"),
    site_dir: Path = typer.Option(None, help="site folder (default $BALSAM_SITE_DIR or cwd)"),
    site_id: int = typer.Option(0, help="site id (default: site_id in <site dir>/settings.yml)"),
    batch_job_id: int = typer.Option(0, help="batch job this launcher runs in"),
    wall_time: float = typer.Option(0.0, help="minutes the allocation lasts (0 = no limit)"),
    idle_timeout: float = typer.Option(0.0, help="exit after this many seconds without work (0 = never)"),
    tag: list[str] = typer.Option(None, help="only jobs with this tag, key=value (repeatable)"),
    app_id: list[int] = typer.Option(None, help="only jobs of this app (repeatable)"),
    partition: str = typer.Option("", help="only jobs tagged partition=NAME"),
    max_jobs: int = typer.Option(0, help="most jobs held at once (0 = as many as fit)"),
    platform: str = typer.Option("", help="node preset: local, polaris, aurora, summit, perlmutter-gpu, ..."),
) -> None:
    """Run the launcher (pilot job) in the foreground: lease jobs and run them on this
    allocation's nodes.

    Example: balsamctl launcher --mode serial --wall-time 60 --idle-timeout 300 --tag experiment=xpcs
    """
    argv = launcher_argv(mode.value, site_dir, site_id, batch_job_id, wall_time, idle_timeout, tag, app_id,
                         partition, max_jobs, platform)
    os.execv(argv[0], argv)
