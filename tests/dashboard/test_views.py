"""The dashboard's pure parts: query strings, paging trails, chart sampling, batch compaction,
bind addresses. No server, no browser."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlparse

import pytest

from balsam_grpc.dashboard.live import compact, frame, valid_cursor
from balsam_grpc.dashboard.serve import DashboardSetupError, parse_address
from balsam_grpc.dashboard.views import BadQuery, parse_job_query, parse_time, sample_steps
from balsam_grpc.v1 import event_pb2, job_pb2

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def q(**params: str | list[str]):  # type: ignore[no-untyped-def]
    return parse_job_query({k: v if isinstance(v, list) else [v] for k, v in params.items()}, now=NOW)


def test_job_query_takes_the_clis_vocabulary() -> None:
    query = q(state="running, job_finished", tag="exp=a,run=7", site="alpha,3", app="Echo", since="2h",
              order="-state_time", page_size="500")
    assert query.states == ("RUNNING", "JOB_FINISHED")
    assert query.sdk_filter() == {"state": ["RUNNING", "JOB_FINISHED"], "tags": {"exp": "a", "run": "7"},
                                  "site": ["alpha", 3], "app": ["Echo"], "since": NOW - timedelta(hours=2)}
    assert query.order == "-state_time" and query.page_size == 500 and query.filtered


@pytest.mark.parametrize(("params", "names"), [
    ({"state": "BOGUS"}, "RUNNING"), ({"tag": "novalue"}, "key=value"), ({"order": "color"}, "workdir"),
    ({"page_size": "7"}, "50, 100, 500"), ({"since": "yesterday"}, "ISO time"), ({"site": "a b"}, "name or an id"),
])
def test_a_bad_query_says_what_it_accepts(params: dict[str, str], names: str) -> None:
    with pytest.raises(BadQuery, match=names):
        q(**params)


def test_paging_trail_goes_forward_and_back() -> None:
    first = q(state="RUNNING")
    assert first.first_page and first.previous_url() is None
    second = parse_qs(urlparse(first.next_url("T2")).query)
    page2 = q(**second)
    assert page2.page_token == "T2" and page2.trail == ("",) and page2.page_number == 2
    page3 = q(**parse_qs(urlparse(page2.next_url("T3")).query))
    assert page3.trail == ("", "T2") and page3.states == ("RUNNING",)
    back = q(**parse_qs(urlparse(page3.previous_url()).query))
    assert back.page_token == "T2" and back.trail == ("",)
    assert q(**parse_qs(urlparse(back.previous_url()).query)).first_page


def test_times_are_iso_or_ages() -> None:
    assert parse_time("30m", "since", NOW) == NOW - timedelta(minutes=30)
    assert parse_time("2026-04-30T10:00", "since") == datetime(2026, 4, 30, 10, tzinfo=UTC)


def test_step_series_sampled_at_chart_points() -> None:
    t0 = datetime(2026, 5, 1)
    series = [(t0, 2.0), (t0 + timedelta(seconds=10), 5.0)]
    at = [t0.replace(tzinfo=UTC).timestamp() + s for s in (-1, 0, 5, 10, 60)]
    assert sample_steps(series, at) == [0.0, 2.0, 2.0, 5.0, 5.0]


def _event(eid: int, job: int, frm: int, to: int) -> event_pb2.Event:
    e = event_pb2.Event(id=eid, job_id=job, site_id=1, job_state=event_pb2.JobStateChange(from_state=frm, to_state=to))
    e.time.FromSeconds(1_700_000_000 + eid)
    return e


def test_a_batch_keeps_each_jobs_newest_state_and_its_creation() -> None:
    J = job_pb2
    batch = compact([_event(1, 7, J.JOB_STATE_CREATED, J.JOB_STATE_PREPROCESSED),
                     _event(2, 7, J.JOB_STATE_PREPROCESSED, J.JOB_STATE_RUNNING),
                     _event(3, 8, J.JOB_STATE_RUNNING, J.JOB_STATE_RUN_ERROR),
                     _event(4, 7, J.JOB_STATE_RUNNING, J.JOB_STATE_JOB_FINISHED)])
    assert batch["cursor"] == "4" and batch["events"] == 4 and batch["created"] == [7]
    assert {k: v["state"] for k, v in batch["jobs"].items()} == {"7": "JOB_FINISHED", "8": "RUN_ERROR"}
    assert [f["job_id"] for f in batch["failures"]] == [8]
    assert frame({"a": 1}, id="4") == 'id: 4\ndata: {"a":1}\n\n'


def test_cursors_and_addresses_are_checked() -> None:
    assert valid_cursor("123") and not valid_cursor("12a") and not valid_cursor("") and not valid_cursor("1" * 20)
    assert parse_address("127.0.0.1:8080").loopback and parse_address("[::1]:80").loopback
    assert not parse_address("0.0.0.0:8080").loopback and not parse_address("example.org:443").loopback
    for bad in ("8080", "host:", "host:99999"):
        with pytest.raises(DashboardSetupError):
            parse_address(bad)


def test_a_remote_bind_without_tls_is_refused() -> None:
    from balsam_grpc.dashboard.serve import serve

    with pytest.raises(DashboardSetupError, match="needs --tls-cert and --tls-key"):
        serve("0.0.0.0:8080", announce=False)
    with pytest.raises(DashboardSetupError, match="both"):
        serve("127.0.0.1:8080", tls_cert="cert.pem", announce=False)
