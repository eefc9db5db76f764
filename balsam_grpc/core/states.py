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

class Role(StrEnum):
    """Who causes a transition. Each path that changes a job's state acts as one role."""

    USER = "USER"        # the job's owner through JobService (user token), SDK, CLI
    SESSION = "SESSION"  # the launcher session holding the job's lease (session stream)
    SITE = "SITE"        # the site daemon: hook results, transfer reports, a site token
    SERVER = "SERVER"    # the server itself: automatic steps, parents, leases that end


R = Role
_RETRY_TARGETS = (S.AWAITING_PARENTS, S.READY, S.STAGED_IN, S.POSTPROCESSED, S.RESTART_READY)
# Non-final states from which a user may kill a job (every one of them).
_NON_FINAL = tuple(s for s in S if s not in (S.JOB_FINISHED, S.FAILED, S.KILLED))

# (from, to): the roles that may cause it, and why it happens. The one table: legality,
# permissions and the documentation's transition table (docs/states.md) all come from it.
RULES: dict[tuple[JobState, JobState], dict[Role, str]] = {}


def _rule(src: JobState, dst: JobState, roles: set[Role], why: str) -> None:
    for role in roles:
        RULES.setdefault((src, dst), {})[role] = why


_rule(S.CREATED, S.AWAITING_PARENTS, {R.SERVER}, "created with parents still to finish")
_rule(S.CREATED, S.READY, {R.SERVER}, "created with no parent to wait for")
_rule(S.CREATED, S.FAILED, {R.SERVER}, "created under a parent that already failed")
_rule(S.AWAITING_PARENTS, S.READY, {R.SERVER}, "every parent finished")
_rule(S.AWAITING_PARENTS, S.FAILED, {R.SERVER}, "a parent failed (child policy FAIL)")
_rule(S.READY, S.STAGED_IN, {R.SERVER}, "every stage-in item is done (or there is none)")
_rule(S.READY, S.FAILED, {R.SERVER}, "a stage-in item failed")
_rule(S.STAGED_IN, S.PREPROCESSED, {R.SITE}, "preprocess hook done")
_rule(S.STAGED_IN, S.PREPROCESSED, {R.SERVER}, "the app has no preprocess hook")
_rule(S.STAGED_IN, S.FAILED, {R.SITE}, "preprocess hook failed")
_rule(S.PREPROCESSED, S.RUNNING, {R.SESSION}, "leased to a launcher session, or started by the session holding it ahead")
_rule(S.RESTART_READY, S.RUNNING, {R.SESSION}, "leased to a launcher session, or started by the session holding it ahead")
_rule(S.RUNNING, S.RUN_DONE, {R.SESSION}, "the process exited 0")
_rule(S.RUNNING, S.RUN_ERROR, {R.SESSION}, "the process failed")
_rule(S.RUNNING, S.RUN_TIMEOUT, {R.SESSION}, "the launcher ran out of wall time")
_rule(S.RUNNING, S.RUN_TIMEOUT, {R.SERVER}, "its lease ended: session closed or expired, pilot ended")
_rule(S.RUNNING, S.RESTART_READY, {R.SESSION}, "the launcher's quick-failure retry")
_rule(S.RUN_DONE, S.POSTPROCESSED, {R.SITE}, "postprocess hook done")
_rule(S.RUN_DONE, S.POSTPROCESSED, {R.SERVER}, "the app has no postprocess hook")
_rule(S.RUN_DONE, S.RESTART_READY, {R.SITE}, "postprocess hook asks for a rerun")
_rule(S.RUN_DONE, S.FAILED, {R.SITE}, "postprocess hook failed the job")
for _state, _hook in ((S.RUN_ERROR, "handle_error"), (S.RUN_TIMEOUT, "handle_timeout")):
    _rule(_state, S.RESTART_READY, {R.SITE}, f"{_hook} hook asks for a rerun")
    _rule(_state, S.RESTART_READY, {R.SERVER}, "no hook: the app's retry policy reruns it")
    _rule(_state, S.FAILED, {R.SITE}, f"{_hook} hook failed the job")
    _rule(_state, S.FAILED, {R.SERVER}, "no hook: the app's retry policy gives up")
_rule(S.POSTPROCESSED, S.STAGED_OUT, {R.SERVER}, "every stage-out item is done (or there is none)")
_rule(S.POSTPROCESSED, S.FAILED, {R.SERVER}, "a stage-out item failed")
_rule(S.STAGED_OUT, S.JOB_FINISHED, {R.SERVER}, "staged out")
for _state in _NON_FINAL:
    _rule(_state, S.KILLED, {R.USER}, "killed by its owner")
# Retry (RetryJobs): back to where the job must restart (restart_point).
for _state in (S.FAILED, S.KILLED):
    for _target in _RETRY_TARGETS:
        _rule(_state, _target, {R.USER}, "retried by its owner")
_rule(S.FAILED, S.AWAITING_PARENTS, {R.SERVER}, "its failed parent was retried")
for _state in (S.RUN_ERROR, S.RUN_TIMEOUT):
    for _target in (S.READY, S.RESTART_READY):
        _rule(_state, _target, {R.USER}, "retried by its owner")

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    src: frozenset(dst for (a, dst) in RULES if a is src) for src in S}
# States a retry starts from.
RETRYABLE_STATES = frozenset({S.FAILED, S.KILLED, S.RUN_ERROR, S.RUN_TIMEOUT})


def is_legal(src: JobState, dst: JobState) -> bool:
    return (src, dst) in RULES


def roles_for(src: JobState, dst: JobState) -> frozenset[Role]:
    return frozenset(RULES.get((src, dst), ()))


def illegal_reason(src: JobState, dst: JobState) -> str:
    allowed = ", ".join(sorted(TRANSITIONS[src])) or "none: it is final"
    return f"cannot move a job from {src} to {dst}; allowed from {src}: {allowed}"


def role_refusal(role: Role, src: JobState, dst: JobState) -> tuple[str, str] | None:
    """Why `role` may not move a job from `src` to `dst`, as (kind, message) where kind is
    "ILLEGAL_TRANSITION" (no such move: FAILED_PRECONDITION) or "ROLE_NOT_ALLOWED" (the
    move exists but another party makes it: PERMISSION_DENIED); None when allowed."""
    if not is_legal(src, dst):
        return "ILLEGAL_TRANSITION", illegal_reason(src, dst)
    roles = roles_for(src, dst)
    if role in roles:
        return None
    who = " or ".join(_ROLE_NAMES[r] for r in sorted(roles))
    return "ROLE_NOT_ALLOWED", f"{src} -> {dst} is made by {who}, not by {_ROLE_NAMES[role]}"


_ROLE_NAMES = {R.USER: "the job's owner", R.SESSION: "the launcher session holding its lease",
               R.SITE: "the site daemon", R.SERVER: "the server itself"}


def restart_point(failed_from: JobState, *, inputs_gone: bool, pending_parents: int) -> JobState:
    """Where a retried job starts again, from the state it failed or was killed in:
    waiting on its parents again, staging in again (its stage-in failed, or its inputs
    were cleaned away), preprocessing again, staging out again, or RESTART_READY (run)."""
    if failed_from in (S.CREATED, S.AWAITING_PARENTS):
        return S.AWAITING_PARENTS if pending_parents else S.READY
    if failed_from is S.READY or inputs_gone:
        return S.READY
    if failed_from is S.STAGED_IN:
        return S.STAGED_IN
    if failed_from in (S.POSTPROCESSED, S.STAGED_OUT):
        return S.POSTPROCESSED
    return S.RESTART_READY


def states_document() -> str:
    """docs/states.md: who may cause which job transition, generated from RULES
    (scripts/gen_states_doc.py writes it; a test checks the committed file matches)."""
    order = {s: i for i, s in enumerate(S)}
    lines = [
        "# Job state transitions",
        "",
        "Generated from `balsam_grpc/core/states.py` (`RULES`) by `scripts/gen_states_doc.py`; do not edit.",
        "",
        "The server checks every state change against this table in one place",
        "(`store/transitions.py`, `Transitioner.move`). A move that is not in the table is",
        "refused with FAILED_PRECONDITION (`ILLEGAL_TRANSITION`); a move in the table made by",
        "a party not listed for it is refused with PERMISSION_DENIED (`ROLE_NOT_ALLOWED`).",
        "Further guards: a job enters RUNNING only by being leased (`LEASE_REQUIRED`);",
        "STAGED_IN and STAGED_OUT are reached only when every transfer item of that direction",
        "is done (`TRANSFERS_PENDING`); a retry goes only to the job's restart point",
        "(`RESTART_ELSEWHERE`).",
        "",
        "Who: " + "; ".join(f"`{r}` {_ROLE_NAMES[r]}" for r in R) + ".",
        "",
        "| from | to | who: when |",
        "| --- | --- | --- |",
    ]
    for (src, dst), whys in sorted(RULES.items(), key=lambda kv: (order[kv[0][0]], order[kv[0][1]])):
        who = "; ".join(f"{role}: {why}" for role, why in sorted(whys.items()))
        lines.append(f"| {src} | {dst} | {who} |")
    return "\n".join(lines) + "\n"


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
