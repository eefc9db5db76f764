"""The mpi4py master/worker launcher (the only modules importing mpi4py are named mpi_*).

Rank 0 is the master (session, node manager, MPI launches, and the jobs of its own node);
every other rank is the worker of one node: it starts the single-node jobs the master
sends, watches them and sends their results back. Messages are small pickles: commands
("start", spec) / ("kill", job_id, reason, message) / ("exit",) to a worker, results and
a final "bye" back. Nobody spins: workers sleep with backoff between probes and the
master probes only while workers have jobs.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import structlog
from mpi4py import MPI

from balsam_grpc.launcher.bootstrap import platform_of, run_context, run_rank0
from balsam_grpc.launcher.config import LauncherConfig
from balsam_grpc.launcher.nodes import NodeSpec, node_specs
from balsam_grpc.launcher.process_spec import ProcessSpec
from balsam_grpc.launcher.runner import ProcessResult, ProcessRunner

log = structlog.get_logger("balsam.launcher")
TAG_CMD = 1
TAG_RESULT = 2
MASTER_PROBE_S = 0.002
WORKER_SLEEP_MIN_S = 0.001
WORKER_SLEEP_BUSY_S = 0.01
WORKER_SLEEP_IDLE_S = 0.05
EXIT_WAIT_S = 5.0


class MpiDispatcher:
    """Node i is served by rank i; rank 0 (this process) serves node 0 and MPI launches."""

    def __init__(self, comm: MPI.Comm) -> None:
        self.comm = comm
        self.size = comm.Get_size()
        self.local = ProcessRunner()
        self.remote: dict[int, int] = {}  # job id -> rank

    def has_runner(self, node_index: int) -> bool:
        return 0 <= node_index < self.size

    def can_follow(self, job_id: int) -> bool:
        return False  # a job follows another on one runner only; not across ranks (yet)

    def start(self, node_index: int | None, spec: ProcessSpec, after: int | None = None) -> ProcessResult | None:
        if after is not None:
            raise ValueError("the MPI launcher starts no job to follow another")
        if not node_index:
            return self.local.start(spec)
        self.remote[spec.job_id] = node_index
        self.comm.send(("start", spec), dest=node_index, tag=TAG_CMD)
        return None

    def start_in_background(self, notify: Callable[[], None]) -> None:
        self.local.start_in_background(notify)  # the worker ranks start theirs as before

    def withdraw(self, job_id: int) -> bool:
        return False  # no job follows another here (can_follow)

    def kill(self, job_id: int, reason: str, message: str = "") -> None:
        rank = self.remote.get(job_id)
        if rank is None:
            self.local.kill(job_id, reason, message)
        else:
            self.comm.send(("kill", job_id, reason, message), dest=rank, tag=TAG_CMD)

    def poll(self) -> list[ProcessResult]:
        results = self.local.poll()
        status = MPI.Status()
        while self.comm.iprobe(source=MPI.ANY_SOURCE, tag=TAG_RESULT, status=status):
            msg = self.comm.recv(source=status.Get_source(), tag=TAG_RESULT)
            if isinstance(msg, ProcessResult):
                self.remote.pop(msg.job_id, None)
                results.append(msg)
        return results

    def next_deadline(self) -> float | None:
        return self.local.next_deadline()

    def poll_interval(self) -> float | None:
        return MASTER_PROBE_S if self.remote else None

    def shutdown(self) -> None:
        self.local.kill_all("killed", "launcher shut down")
        for rank in range(1, self.size):
            self.comm.send(("exit",), dest=rank, tag=TAG_CMD)
        waiting = set(range(1, self.size))
        deadline = time.monotonic() + EXIT_WAIT_S
        status = MPI.Status()
        while waiting and time.monotonic() < deadline:
            if self.comm.iprobe(source=MPI.ANY_SOURCE, tag=TAG_RESULT, status=status):
                msg = self.comm.recv(source=status.Get_source(), tag=TAG_RESULT)
                if msg == "bye":
                    waiting.discard(status.Get_source())
            else:
                time.sleep(0.01)
        self.local.shutdown(grace_s=1.0)


def worker_loop(comm: MPI.Comm) -> int:
    runner = ProcessRunner()
    sleep = WORKER_SLEEP_MIN_S
    status = MPI.Status()
    while True:
        active = False
        while comm.iprobe(source=0, tag=TAG_CMD, status=status):
            msg = comm.recv(source=0, tag=TAG_CMD)
            active = True
            if msg[0] == "start":
                failed = runner.start(msg[1])
                if failed is not None:
                    comm.send(failed, dest=0, tag=TAG_RESULT)
            elif msg[0] == "kill":
                runner.kill(msg[1], msg[2], msg[3])
            elif msg[0] == "exit":
                runner.shutdown()
                comm.send("bye", dest=0, tag=TAG_RESULT)
                return 0
        for result in runner.poll():
            comm.send(result, dest=0, tag=TAG_RESULT)
            active = True
        if active:
            sleep = WORKER_SLEEP_MIN_S
        else:
            sleep = min(sleep * 2, WORKER_SLEEP_BUSY_S if runner.running else WORKER_SLEEP_IDLE_S)
        time.sleep(sleep)


def run_mpi(cfg: LauncherConfig) -> int:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    platform = platform_of(cfg)
    mine = node_specs([socket.gethostname()], platform, cpus=cfg.cpus_per_node, gpus=cfg.gpus_per_node)[0]
    nodes: list[NodeSpec] = comm.allgather(mine)
    if rank != 0:
        return worker_loop(comm)
    log.info("mpi launcher", ranks=comm.Get_size(), nodes=[n.hostname for n in nodes], cpus=nodes[0].cpus)
    return run_rank0(cfg, nodes, MpiDispatcher(comm), run_context(cfg, platform))
