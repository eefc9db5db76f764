"""The CLI's pure input checks: filters, job lines, analytics (no server)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from balsam_grpc.cli.analytics import state_counts, summarize
from balsam_grpc.cli.errors import UsageError
from balsam_grpc.cli.filters import parse_key_values, parse_since, parse_states, parse_tags, selection_from_options
from balsam_grpc.cli.jobspec import JobSpecError, read_job_lines, spec_from_dict, validate_specs
from balsam_grpc.sdk.analytics import StateChange
from balsam_grpc.v1 import app_pb2

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def test_states_accept_comma_lists_any_case_and_full_names() -> None:
    assert parse_states(["running,RUN_ERROR", "JOB_STATE_FAILED", "running"]) == ["RUNNING", "RUN_ERROR", "FAILED"]
    with pytest.raises(UsageError, match=r"unknown job state 'RUNING'; valid states: CREATED, .*KILLED"):
        parse_states(["RUNING"])


def test_tags_need_key_value_and_agree() -> None:
    assert parse_tags(["a=1", "b=x=y", "c="]) == {"a": "1", "b": "x=y", "c": ""}
    with pytest.raises(UsageError, match="must look like key=value"):
        parse_tags(["foo"])
    with pytest.raises(UsageError, match="given twice with different values"):
        parse_tags(["a=1", "a=2"])


def test_key_values_given_twice_must_agree() -> None:
    """`job create -p n=1 ... -p n=2` (a script's two defaults, a typo) silently ran the
    job with n=2; tags given so were already refused."""
    assert parse_key_values(["n=1", "s=a=b", "n=1"], "--param") == {"n": "1", "s": "a=b"}
    with pytest.raises(UsageError, match=r"--param: 'n' given twice with different values \('1', '2'\)"):
        parse_key_values(["n=1", "n=2"], "--param")


@pytest.mark.parametrize(("text", "ago"), [("30s", 30), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1w", 604800),
                                           ("1.5h", 5400)])
def test_since_relative(text: str, ago: int) -> None:
    assert parse_since(text, now=NOW) == NOW - timedelta(seconds=ago)


def test_since_iso_and_garbage() -> None:
    assert parse_since("2024-05-01T10:00:00+00:00") == datetime(2024, 5, 1, 10, tzinfo=UTC)
    assert parse_since("2024-05-01T10:00").tzinfo is not None  # naive means local time
    with pytest.raises(UsageError, match="neither an ISO time"):
        parse_since("last tuesday")


def test_selection_maps_to_sdk_keywords() -> None:
    sel = selection_from_options(state=["RUNNING"], exclude_state=["KILLED"], tag=["k=v"], app=["hello", "7"],
                                 site=["laptop"], id=["1,2"], limit=5)
    assert sel.filter_kwargs() == {"id": [1, 2], "state": ["RUNNING"], "tags": {"k": "v"}, "app": ["hello", 7],
                                   "site": ["laptop"]}
    assert sel.exclude_kwargs() == {"state": ["KILLED"]}
    assert not sel.is_empty and selection_from_options().is_empty
    with pytest.raises(UsageError, match="--limit must be at least 1"):
        selection_from_options(limit=0)
    with pytest.raises(UsageError, match="'x' is not a job id"):
        selection_from_options(id=["x"])


APP = app_pb2.App(id=3, site_id=1, name="hello", parameters=[
    app_pb2.AppParameter(name="n", required=True, type=app_pb2.PARAMETER_TYPE_INT)])


def resolve(app: int | str, site: int | str | None) -> app_pb2.App:
    return APP


def test_job_lines_take_defaults_and_report_line_numbers() -> None:
    lines = ['{"workdir": "a", "parameters": {"n": 1}, "tags": {"x": true}}', "", "# comment",
             '{"app": "hello", "workdir": "b/../c", "parameters": {"n": "2"}}']
    specs = read_job_lines(lines, {"app": "hello", "site": "laptop", "tags": {"exp": "e"}}, source="f.jsonl")
    assert [s.where for s in specs] == ["f.jsonl:1", "f.jsonl:4"]
    assert dict(specs[0].job.tags) == {"exp": "e", "x": "true"}
    validate_specs(specs, resolve)
    assert specs[1].job.workdir == "c" and specs[1].job.app_id == 3 and specs[1].job.site_id == 1
    with pytest.raises(JobSpecError, match=r"^f.jsonl:2: not JSON"):
        read_job_lines(['{"workdir": "a"}', "{oops"], {"app": "hello"}, source="f.jsonl")
    with pytest.raises(JobSpecError, match="no app"):
        spec_from_dict({"workdir": "a"}, {}, line_no=1, source="f")


def test_job_specs_checked_against_the_app() -> None:
    bad = [spec_from_dict({"workdir": "w", "parameters": {"n": "x"}}, {"app": "hello"}, line_no=3, source="f")]
    with pytest.raises(JobSpecError, match=r"^f:3: parameters.n: 'x' is not a valid int \(INVALID_FIELD\)$"):
        validate_specs(bad, resolve)
    escape = [spec_from_dict({"workdir": "../up", "parameters": {"n": 1}}, {"app": "hello"}, line_no=0)]
    with pytest.raises(JobSpecError, match="escapes the site's data folder"):
        validate_specs(escape, resolve)
    dup = [spec_from_dict({"workdir": "same", "parameters": {"n": 1}}, {"app": "hello"}, line_no=i, source="f")
           for i in (1, 2)]
    with pytest.raises(JobSpecError, match="f:2: workdir 'same' is also used by f:1"):
        validate_specs(dup, resolve)


def test_analytics_summary_counts_entries_and_finishes() -> None:
    t = NOW.replace(tzinfo=None)
    changes = [
        StateChange(1, 1, t, "UNSPECIFIED", "PREPROCESSED", via=("READY", "STAGED_IN")),
        StateChange(1, 1, t + timedelta(seconds=10), "PREPROCESSED", "RUNNING"),
        StateChange(1, 1, t + timedelta(seconds=70), "RUNNING", "JOB_FINISHED",
                    via=("RUN_DONE", "POSTPROCESSED", "STAGED_OUT")),
        StateChange(2, 1, t, "UNSPECIFIED", "PREPROCESSED"),
        StateChange(2, 1, t + timedelta(seconds=5), "PREPROCESSED", "FAILED"),
    ]
    counts = state_counts(changes)
    assert counts["PREPROCESSED"] == 2 and counts["JOB_FINISHED"] == 1 and counts["READY"] == 1
    summary = summarize(changes, 60)
    assert summary["jobs"] == 2 and summary["events"] == 5
    assert [b["finished"] for b in summary["throughput"]] == [1]
    assert summary["latency_seconds"]["run"]["count"] == 1
    assert summary["latency_seconds"]["run"]["p50"] == 60.0
