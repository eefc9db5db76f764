"""store.transitions.app_rules: the rules of an app's hooks and retry policy, shared by
every report that reads the same (flat) values; the same rules as AppRules builds."""

from __future__ import annotations

from balsam_grpc.server.store.transitions import AppRules, app_rules


def _fields(rules: AppRules) -> dict[str, object]:
    return dict(vars(rules))


def test_flat_values_share_one_rules_object_with_the_same_rules() -> None:
    hooks, policy = {"postprocess": True}, {"max_retries": 5, "on_error": "RETRY_POLICY_RESTART"}
    first = app_rules(hooks, policy)
    assert app_rules(dict(hooks), dict(policy)) is first
    assert _fields(first) == _fields(AppRules({"hooks": hooks, "retry_policy": policy}))
    other = app_rules({"postprocess": False}, policy)
    assert other is not first and not other.has_postprocess and first.has_postprocess


def test_nested_or_missing_values_are_built_each_time() -> None:
    nested = {"preprocess": {"module": "x"}}
    assert _fields(app_rules(nested, None)) == _fields(AppRules({"hooks": nested}))
    assert app_rules(None, None).max_retries == 3
