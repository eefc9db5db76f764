"""Pure checks of the keyword -> Filter message mapping (no server)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from balsam_grpc.sdk import parse_tags
from balsam_grpc.sdk.filters import EVENT_FILTER, JOB_FILTER, SITE_FILTER, MatchesNothing
from balsam_grpc.v1 import event_service_pb2, job_pb2


def build(*criteria: tuple[bool, dict]) -> job_pb2.JobFilter:
    return JOB_FILTER.build([(exclude, JOB_FILTER.normalize(kw, exclude=exclude)) for exclude, kw in criteria],
                            resolve=lambda resource, names: {"theta": [7]}.get(names[0], []))


def test_keywords_map_to_one_filter_message() -> None:
    since = datetime(2026, 1, 1, tzinfo=UTC)
    msg = build((False, {"state": ["running", "JOB_STATE_FAILED"], "tags": {"a": 1}, "app": "eigen", "id": 5,
                         "site": "theta", "parent_id": [1, 2], "workdir__contains": "run", "since": since}),
                (True, {"state": "KILLED", "tags": {"skip": "yes"}}))
    assert list(msg.states) == [job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_FAILED]
    assert dict(msg.tags) == {"a": "1"} and list(msg.app_names) == ["eigen"] and list(msg.ids) == [5]
    assert list(msg.site_ids) == [7] and list(msg.parent_ids) == [1, 2] and msg.workdir_contains == "run"
    assert msg.create_time.start.ToDatetime(tzinfo=UTC) == since
    assert list(msg.exclude_states) == [job_pb2.JOB_STATE_KILLED] and dict(msg.exclude_tags) == {"skip": "yes"}


def test_chained_filters_are_anded() -> None:
    msg = build((False, {"id": [1, 2, 3]}), (False, {"id": [2, 3, 4]}), (False, {"tags": {"x": "1"}}),
                (False, {"tags": {"y": "2"}}), (False, {"since": timedelta(days=2)}),
                (False, {"since": timedelta(days=1)}))
    assert list(msg.ids) == [2, 3] and dict(msg.tags) == {"x": "1", "y": "2"}
    assert msg.create_time.start.ToDatetime(tzinfo=UTC) > datetime.now(UTC) - timedelta(days=1, minutes=1)
    with pytest.raises(MatchesNothing):
        build((False, {"state": "RUNNING"}), (False, {"state": "FAILED"}))
    with pytest.raises(MatchesNothing):
        build((False, {"site": "nowhere"}))
    assert list(build((True, {"state": "KILLED"}), (True, {"state": "FAILED"})).exclude_states) == [
        job_pb2.JOB_STATE_KILLED, job_pb2.JOB_STATE_FAILED]


def test_refusals_name_the_valid_choices() -> None:
    with pytest.raises(TypeError, match="valid keywords: .*workdir__contains"):
        JOB_FILTER.normalize({"workdir": "x"})
    with pytest.raises(ValueError, match="unknown job state 'DONE'; valid: CREATED, AWAITING_PARENTS"):
        JOB_FILTER.normalize({"state": ["RUNNING", "DONE"]})
    with pytest.raises(TypeError, match="expected ids"):
        JOB_FILTER.normalize({"id": "12"})
    with pytest.raises(TypeError, match="dict"):
        JOB_FILTER.normalize({"tags": "a=b"})
    with pytest.raises(ValueError, match="listed by ascending id only"):
        SITE_FILTER.check_order(("-id",))
    assert EVENT_FILTER.check_order(("-id",)) == ("-id",)
    kinds = EVENT_FILTER.build([(False, EVENT_FILTER.normalize({"kind": "job_state", "to_state": "KILLED"}))])
    assert list(kinds.kinds) == [event_service_pb2.EVENT_KIND_JOB_STATE]


def test_parse_tags() -> None:
    assert parse_tags(["a=1", "b=x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    with pytest.raises(ValueError, match="malformed tag 'oops'"):
        parse_tags(["oops"])
    with pytest.raises(ValueError, match="malformed tag '=v'"):
        parse_tags(["=v"])
