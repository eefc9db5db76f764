"""The job transition table (core/states RULES): its documentation, and that the server's
own steps stay inside it."""

from __future__ import annotations

from pathlib import Path

from balsam_grpc.core.states import (
    RULES,
    JobState,
    Role,
    StepContext,
    automatic_step,
    restart_point,
    role_refusal,
    states_document,
)

S = JobState
ROOT = Path(__file__).resolve().parents[2]


def test_committed_states_doc_matches_the_table():
    assert (ROOT / "docs" / "states.md").read_text() == states_document(), "run scripts/gen_states_doc.py"


def test_every_automatic_step_is_a_server_move():
    contexts = [StepContext(has_stage_in=a, has_stage_out=b, has_preprocess=c, has_postprocess=d, has_error_hook=e,
                            has_timeout_hook=f, run_count=n, restart_on_error=g)
                for a in (False, True) for b in (False, True) for c in (False, True) for d in (False, True)
                for e in (False, True) for f in (False, True) for n in (0, 9) for g in (False, True)]
    for state in S:
        for ctx in contexts:
            nxt = automatic_step(state, ctx)
            if nxt is not None:
                assert role_refusal(Role.SERVER, state, nxt) is None, (state, nxt)


def test_running_is_entered_only_by_a_session_and_left_by_the_owner_only_as_killed():
    for (src, dst), whys in RULES.items():
        if dst is S.RUNNING:
            assert set(whys) == {Role.SESSION}
        if src is S.RUNNING and Role.USER in whys:
            assert dst is S.KILLED
    assert role_refusal(Role.USER, S.PREPROCESSED, S.RUNNING)[0] == "ROLE_NOT_ALLOWED"
    assert role_refusal(Role.USER, S.STAGED_OUT, S.RUNNING)[0] == "ILLEGAL_TRANSITION"


def test_restart_points():
    assert restart_point(S.AWAITING_PARENTS, inputs_gone=False, pending_parents=1) is S.AWAITING_PARENTS
    assert restart_point(S.CREATED, inputs_gone=False, pending_parents=0) is S.READY
    assert restart_point(S.READY, inputs_gone=False, pending_parents=0) is S.READY
    assert restart_point(S.STAGED_IN, inputs_gone=False, pending_parents=0) is S.STAGED_IN
    assert restart_point(S.RUNNING, inputs_gone=False, pending_parents=0) is S.RESTART_READY
    assert restart_point(S.RUN_ERROR, inputs_gone=True, pending_parents=0) is S.READY
    assert restart_point(S.POSTPROCESSED, inputs_gone=False, pending_parents=0) is S.POSTPROCESSED
