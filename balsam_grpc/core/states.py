"""The job state machine: one transition table and the server's automatic steps.

Pure logic: the server's store asks these functions what is legal and where a job goes
next; nothing here touches a database or the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class JobState(StrEnum):
    CREATED = "CREATED"
    AWAITING_PARENTS = "AWAITING_PARENTS"
    READY = "READY"
    STAGED_IN = "STAGED_IN"
    PREPROCESSED = "PREPROCESSED"
    RUNNING = "RUNNING"
    RUN_DONE = "RUN_DONE"
    RUN_ERROR = "RUN_ERROR"
    RUN_TIMEOUT = "RUN_TIMEOUT"
    RESTART_READY = "RESTART_READY"
    POSTPROCESSED = "POSTPROCESSED"
    STAGED_OUT = "STAGED_OUT"
    JOB_FINISHED = "JOB_FINISHED"
    FAILED = "FAILED"
    KILLED = "KILLED"


S = JobState

FINAL_STATES = frozenset({S.JOB_FINISHED, S.FAILED, S.KILLED})
# States a launcher can lease from.
RUNNABLE_STATES = frozenset({S.PREPROCESSED, S.RESTART_READY})
# States in which a launcher holds the job; deleting it would orphan a process.
ACTIVE_STATES = frozenset({S.RUNNING})

_KILLABLE = {S.KILLED}
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.CREATED: frozenset({S.AWAITING_PARENTS, S.READY, S.FAILED, *_KILLABLE}),
    S.AWAITING_PARENTS: frozenset({S.READY, S.FAILED, *_KILLABLE}),
    S.READY: frozenset({S.STAGED_IN, S.FAILED, *_KILLABLE}),
    S.STAGED_IN: frozenset({S.PREPROCESSED, S.FAILED, *_KILLABLE}),
    S.PREPROCESSED: frozenset({S.RUNNING, S.FAILED, *_KILLABLE}),
    # RESTART_READY straight from RUNNING: the launcher's quick-failure retry.
    S.RUNNING: frozenset({S.RUN_DONE, S.RUN_ERROR, S.RUN_TIMEOUT, S.RESTART_READY, *_KILLABLE}),
    # A postprocess hook may ask for a rerun, or fail the job.
    S.RUN_DONE: frozenset({S.POSTPROCESSED, S.RESTART_READY, S.FAILED, *_KILLABLE}),
    S.RUN_ERROR: frozenset({S.RESTART_READY, S.FAILED, *_KILLABLE}),
    S.RUN_TIMEOUT: frozenset({S.RESTART_READY, S.FAILED, *_KILLABLE}),
    S.RESTART_READY: frozenset({S.RUNNING, S.FAILED, *_KILLABLE}),
    S.POSTPROCESSED: frozenset({S.STAGED_OUT, S.FAILED, *_KILLABLE}),
    S.STAGED_OUT: frozenset({S.JOB_FINISHED, S.FAILED, *_KILLABLE}),
    S.JOB_FINISHED: frozenset(),
    S.FAILED: frozenset(),
    S.KILLED: frozenset(),
}


def is_legal(src: JobState, dst: JobState) -> bool:
    return dst in TRANSITIONS[src]


def illegal_reason(src: JobState, dst: JobState) -> str:
    allowed = ", ".join(sorted(TRANSITIONS[src])) or "none: it is final"
    return f"cannot move a job from {src} to {dst}; allowed from {src}: {allowed}"


@dataclass(frozen=True, slots=True)
class StepContext:
    """What the server knows about a job that decides its no-work steps."""

    has_stage_in: bool = False
    has_stage_out: bool = False
    has_preprocess: bool = False
    has_postprocess: bool = False
    has_error_hook: bool = False
    has_timeout_hook: bool = False
    run_count: int = 0
    max_retries: int = 3
    restart_on_error: bool = False
    restart_on_timeout: bool = True


def automatic_step(state: JobState, ctx: StepContext) -> JobState | None:
    """The state the server moves a job to on its own, or None when it must wait.

    A step is automatic when no one has work to do between the two states: no transfer,
    no hook. Error and timeout policies apply only when the app has no hook for them.
    """
    if state is S.READY and not ctx.has_stage_in:
        return S.STAGED_IN
    if state is S.STAGED_IN and not ctx.has_preprocess:
        return S.PREPROCESSED
    if state is S.RUN_DONE and not ctx.has_postprocess:
        return S.POSTPROCESSED
    if state is S.POSTPROCESSED and not ctx.has_stage_out:
        return S.STAGED_OUT
    if state is S.STAGED_OUT:
        return S.JOB_FINISHED
    retries_left = ctx.run_count <= ctx.max_retries
    if state is S.RUN_ERROR and not ctx.has_error_hook:
        return S.RESTART_READY if ctx.restart_on_error and retries_left else S.FAILED
    if state is S.RUN_TIMEOUT and not ctx.has_timeout_hook:
        return S.RESTART_READY if ctx.restart_on_timeout and retries_left else S.FAILED
    return None


def settle(state: JobState, ctx: StepContext) -> list[JobState]:
    """Every state a job passes through on its own after arriving in `state`.

    Returns the path after `state` (empty when it waits where it is).
    """
    path: list[JobState] = []
    nxt = automatic_step(state, ctx)
    while nxt is not None:
        path.append(nxt)
        nxt = automatic_step(nxt, ctx)
    return path


def initial_state(pending_parents: int) -> JobState:
    return S.AWAITING_PARENTS if pending_parents else S.READY
