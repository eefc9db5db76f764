"""The interface every transfer backend implements, and the two kinds of failure."""

from __future__ import annotations

from typing import Protocol

from balsam_grpc.site.transfers.model import Status, Task


class TransferFailed(Exception):
    """The task (or its submission) failed for a reason a retry will not fix: the items
    fail with this message, which says what fixes it."""


class TransferUnavailable(Exception):
    """The backend could not be reached (network, 5xx): the call is retried with backoff."""


class Backend(Protocol):
    # Whether a task id known only from the server (a lost journal) can be tracked again.
    can_adopt: bool

    async def prepare(self, task: Task) -> None:
        """Whatever must be known before submitting and journaled first (Globus: the
        submission id, set on task.submission_id)."""

    async def submit(self, task: Task) -> str:
        """Start the task; returns the backend's task id. Submitting a task again (after a
        crash) must not start a second one."""

    async def poll(self, task: Task) -> Status:
        """How the task is doing. A task this process does not know (after a restart) is
        picked up again."""

    async def cancel(self, task: Task) -> None:
        """Best effort: stop the task (deadline exceeded)."""
