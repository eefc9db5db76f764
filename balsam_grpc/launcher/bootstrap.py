"""Starting the launcher: which nodes it manages, the channel to the server, rank 0's loop.

Shared by the single-process entry (`__main__`) and the MPI entry (`mpi_main`).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping

import grpc
import structlog

from balsam_grpc.core.channel import auth_metadata, channel_credentials, channel_options, channel_target, keepalive_ms
from balsam_grpc.core.settings import Profile
from balsam_grpc.launcher.config import LauncherConfig
from balsam_grpc.launcher.dispatch import Dispatcher
from balsam_grpc.launcher.master import Master
from balsam_grpc.launcher.nodes import NodeSpec, Platform, load_platform, node_specs, scheduler_hosts
from balsam_grpc.launcher.process_spec import RunContext

log = structlog.get_logger("balsam.launcher")
WORLD_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_STEP_NUM_TASKS", "ALPS_APP_PE_COUNT")


def mpi_world_size(env: Mapping[str, str]) -> int:
    """Ranks of the MPI job this process belongs to, from the launcher's environment (1 if none):
    the launcher imports mpi4py only when there is more than one rank."""
    for var in WORLD_SIZE_VARS:
        value = env.get(var, "")
        if value.isdigit():
            return int(value)
    return 1


def short(host: str) -> str:
    return host.split(".", 1)[0]


def plan_single_process_nodes(cfg: LauncherConfig, env: Mapping[str, str], hostname: str,
                              platform: Platform) -> tuple[list[NodeSpec], int | None]:
    """Nodes of a one-process launcher and the index of the one it runs on (None: it runs on
    none of them, e.g. a MOM node; every job is then an MPI launch).

    Serial mode uses only the local host (no worker ranks elsewhere); MPI mode uses every
    host the scheduler gave the allocation."""
    source, hosts = scheduler_hosts(env)
    if cfg.mode == "serial" or not hosts:
        hosts = [hostname]
    specs = node_specs(hosts, platform, cpus=cfg.cpus_per_node, gpus=cfg.gpus_per_node)
    local = next((i for i, h in enumerate(hosts) if short(h) == short(hostname)), None)
    log.info("nodes", source=source if hosts != [hostname] else "local", count=len(specs),
             cpus=specs[0].cpus, gpus=specs[0].gpus, local_index=local)
    return specs, local


def platform_of(cfg: LauncherConfig) -> Platform:
    return load_platform(cfg.platform, cfg.site_dir)


def run_context(cfg: LauncherConfig, platform: Platform) -> RunContext:
    return RunContext(data_dir=cfg.data_dir, apps_dir=cfg.apps_dir, mpi_flavor=cfg.mpi_flavor or platform.mpi_flavor,
                      mpiexec=cfg.mpiexec or platform.mpiexec, job_time_scale=cfg.job_time_scale,
                      server=Profile.load().server)


# The session stream is the heartbeat: a silently dead connection must be noticed well
# inside the server's lease timeout (default 20 s), so ping every 5 s (the most the server
# allows) and give up on a ping after 5 s.
# Reconnecting must also fit inside the lease timeout: cap gRPC's own reconnect backoff.
SESSION_KEEPALIVE = (("grpc.keepalive_time_ms", 5000), ("grpc.keepalive_timeout_ms", 5000),
                     ("grpc.http2.ping_timeout_ms", 5000), ("grpc.initial_reconnect_backoff_ms", 200),
                     ("grpc.min_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2000))


def session_keepalive() -> list[tuple[str, int]]:
    """SESSION_KEEPALIVE, tightened further by BALSAM_KEEPALIVE_TIME_MS/_TIMEOUT_MS (never loosened)."""
    interval, timeout = keepalive_ms()
    limits = {"grpc.keepalive_time_ms": interval, "grpc.keepalive_timeout_ms": timeout,
              "grpc.http2.ping_timeout_ms": timeout}
    return [(k, min(v, limits.get(k, v))) for k, v in SESSION_KEEPALIVE]


def aio_channel(profile: Profile) -> grpc.aio.Channel:
    """An asyncio channel with the limits/TLS of core.channel.make_channel and a tighter keepalive."""
    opts = channel_options(session_keepalive())
    if profile.tls_ca or profile.tls_cert or profile.tls_key:
        creds = channel_credentials(profile.tls_ca, profile.tls_cert, profile.tls_key)
        return grpc.aio.secure_channel(channel_target(profile.server), creds, options=opts)
    return grpc.aio.insecure_channel(channel_target(profile.server), options=opts)


async def run_master(cfg: LauncherConfig, nodes: list[NodeSpec], dispatcher: Dispatcher, ctx: RunContext) -> int:
    profile = Profile.load()
    channel = aio_channel(profile)
    try:
        master = Master(cfg, nodes, dispatcher, channel, auth_metadata(profile.token), ctx)
        return await master.run()
    finally:
        await channel.close()


# How long a thread may wait for the GIL before the one holding it must give it up. The
# spawner threads (runner.py) need it for a few moments per job while the loop runs; at
# CPython's 5 ms they forced the loop to hand it over mid-turn and wait to get it back, where
# at 50 ms they take it when the loop waits for its next event, as it does many times per
# job. Real path, SQLite, 2,000 /bin/true x 3 rounds, 4 alternated pairs: 1,040 -> 1,194
# jobs/s, launcher CPU 0.433 -> 0.418 ms per job (with its watchdog 0.470 -> 0.440).
GIL_SWITCH_INTERVAL_S = 0.05


def run_rank0(cfg: LauncherConfig, nodes: list[NodeSpec], dispatcher: Dispatcher, ctx: RunContext) -> int:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    return asyncio.run(run_master(cfg, nodes, dispatcher, ctx))
