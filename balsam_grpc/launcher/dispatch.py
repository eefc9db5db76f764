"""Where a placed job's process runs: this process, or the worker rank of its node.

The master only talks to a Dispatcher; `LocalDispatcher` runs everything here (one
process, or `mpiexec -n 1`), `mpi_dispatch.MpiDispatcher` adds worker ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from balsam_grpc.launcher.process_spec import ProcessSpec
from balsam_grpc.launcher.runner import ProcessResult, ProcessRunner


class Dispatcher(Protocol):
    def has_runner(self, node_index: int) -> bool: ...

    def can_follow(self, job_id: int) -> bool: ...

    def start(self, node_index: int | None, spec: ProcessSpec, after: int | None = None) -> ProcessResult | None:
        """`after`: a running job (can_follow) whose CPUs this one takes over: started the
        moment that one ends."""

    def start_in_background(self, notify: Callable[[], None]) -> None: ...

    def withdraw(self, job_id: int) -> bool:
        """Take back a follower not started yet (ProcessRunner.withdraw)."""

    def kill(self, job_id: int, reason: str, message: str = "") -> None: ...

    def poll(self) -> list[ProcessResult]: ...

    def next_deadline(self) -> float | None: ...

    def poll_interval(self) -> float | None: ...

    def shutdown(self) -> None: ...


class LocalDispatcher:
    """Every process runs here; `local_node` is the node index this process sits on
    (None: on none of the allocation's nodes, so every job needs an MPI launch)."""

    def __init__(self, runner: ProcessRunner | None = None, local_node: int | None = 0) -> None:
        self.runner = runner or ProcessRunner()
        self.local_node = local_node

    def has_runner(self, node_index: int) -> bool:
        return node_index == self.local_node

    def can_follow(self, job_id: int) -> bool:
        return self.runner.can_follow(job_id)

    def start(self, node_index: int | None, spec: ProcessSpec, after: int | None = None) -> ProcessResult | None:
        return self.runner.start(spec, after=after)

    def start_in_background(self, notify: Callable[[], None]) -> None:
        self.runner.start_in_background(notify)

    def withdraw(self, job_id: int) -> bool:
        return self.runner.withdraw(job_id)

    def kill(self, job_id: int, reason: str, message: str = "") -> None:
        self.runner.kill(job_id, reason, message)

    def poll(self) -> list[ProcessResult]:
        return self.runner.poll()

    def next_deadline(self) -> float | None:
        return self.runner.next_deadline()

    def poll_interval(self) -> float | None:
        # SIGCHLD wakes the master when a local process ends; no polling needed.
        return None

    def shutdown(self) -> None:
        self.runner.shutdown()
