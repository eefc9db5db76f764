"""What the transfer service works on: items (one file or directory of one job), tasks
(a batch of items moved together by one backend call) and their outcomes. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

IN, OUT = "IN", "OUT"
# Task states in the journal.
NEW, SUBMITTED, DONE, ERROR = "new", "submitted", "done", "error"
OPEN_TASK_STATES = (NEW, SUBMITTED)


@dataclass
class Item:
    """One transfer item as the site sees it: `remote` is the path at the location,
    `local` the absolute path in the job's workdir."""

    id: int
    job_id: int
    direction: str  # IN | OUT
    location: str   # alias
    remote: str
    local: Path
    recursive: bool = False
    slot: str = ""

    @property
    def source(self) -> str:
        return self.remote if self.direction == IN else str(self.local)

    @property
    def destination(self) -> str:
        return str(self.local) if self.direction == IN else self.remote


@dataclass
class ItemOutcome:
    """How one item of a finished task ended."""

    ok: bool
    error: str = ""
    bytes: int = 0
    files: int = 0


@dataclass
class Task:
    """A batch of items of one (direction, location) moved as one backend task."""

    key: str
    location: str
    direction: str
    items: list[Item]
    state: str = NEW
    submission_id: str = ""
    task_id: str = ""
    error: str = ""
    created: float = 0.0      # wall clock (time.time) so it survives restarts
    submitted: float = 0.0
    finished: float = 0.0
    attempts: int = 0
    bytes: int = 0
    files: int = 0
    outcomes: dict[int, ItemOutcome] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        start = self.submitted or self.created
        return max(0.0, self.finished - start) if self.finished and start else 0.0


@dataclass
class Status:
    """A backend's answer to "how is this task doing"."""

    done: bool
    ok: bool = True
    error: str = ""           # the task-level reason when not ok
    bytes: int = 0
    files: int = 0
    detail: str = ""          # progress text for logs (Globus nice_status)
    outcomes: dict[int, ItemOutcome] = field(default_factory=dict)  # per item when the backend knows


def plan_batches(queued: list[Item], batch_size: int, room: int) -> list[list[Item]]:
    """Split the queued items of one (direction, location) into at most `room` batches of
    at most `batch_size` items, oldest first."""
    batches = []
    for start in range(0, len(queued), batch_size):
        if len(batches) >= room:
            break
        batches.append(queued[start:start + batch_size])
    return batches


def share(total: int, n: int) -> list[int]:
    """`total` split into `n` integer parts that add up to it (task figures spread over
    its items when the backend reports only totals)."""
    if n <= 0:
        return []
    base, extra = divmod(max(0, total), n)
    return [base + (1 if i < extra else 0) for i in range(n)]
