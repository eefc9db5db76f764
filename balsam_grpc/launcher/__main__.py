"""`python -m balsam_grpc.launcher [--mode serial|mpi] ...` (see config.py for the flags).

Under an MPI launcher with more than one rank it becomes the mpi4py master/worker program
(mpi_main); otherwise one process runs everything, importing no MPI at all.
"""

from __future__ import annotations

import os
import socket
import sys

from balsam_grpc.core.logging import configure_logging
from balsam_grpc.launcher.bootstrap import (
    mpi_world_size,
    plan_single_process_nodes,
    platform_of,
    run_context,
    run_rank0,
)
from balsam_grpc.launcher.config import parse_args
from balsam_grpc.launcher.dispatch import LocalDispatcher


def main(argv: list[str] | None = None) -> int:
    configure_logging()
    cfg = parse_args(argv)
    if mpi_world_size(os.environ) > 1:
        from balsam_grpc.launcher.mpi_main import run_mpi

        return run_mpi(cfg)
    platform = platform_of(cfg)
    nodes, local = plan_single_process_nodes(cfg, os.environ, socket.gethostname(), platform)
    return run_rank0(cfg, nodes, LocalDispatcher(local_node=local), run_context(cfg, platform))


if __name__ == "__main__":
    sys.exit(main())
