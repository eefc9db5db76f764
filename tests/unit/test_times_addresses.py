"""core.times and core.addresses: the one copy the CLI, the dashboard and the server use."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from balsam_grpc.core.addresses import is_loopback_address, is_loopback_host
from balsam_grpc.core.times import TimeError, parse_time

NOW = datetime(2026, 5, 1, 12, tzinfo=UTC)


def test_ages_and_iso_times() -> None:
    assert parse_time("90s", now=NOW) == NOW - timedelta(seconds=90)
    assert parse_time(" 2 hrs ", now=NOW) == NOW - timedelta(hours=2)
    assert parse_time("1.5d", now=NOW) == NOW - timedelta(days=1.5)
    plus2 = timezone(timedelta(hours=2))
    assert parse_time("2026-05-01T10:00", naive=plus2) == datetime(2026, 5, 1, 10, tzinfo=plus2)
    assert parse_time("2026-05-01T10:00Z", naive=plus2) == datetime(2026, 5, 1, 10, tzinfo=UTC)
    assert parse_time("2026-05-01T10:00").tzinfo is not None  # naive: this machine's zone


@pytest.mark.parametrize("text", ["yesterday", "10 parsecs", "", "99999999999999w"])
def test_what_is_not_a_time_says_what_is(text: str) -> None:
    with pytest.raises(TimeError, match="ISO time|further back"):
        parse_time(text, now=NOW)


def test_the_cli_and_the_dashboard_use_the_core_parser() -> None:
    from balsam_grpc.cli import filters
    from balsam_grpc.dashboard import views

    assert filters.parse_since("10m", now=NOW) == views.parse_time("10m", "since", NOW) == NOW - timedelta(minutes=10)
    assert views.parse_time("2026-05-01T10:00", "since") == datetime(2026, 5, 1, 10, tzinfo=UTC)


@pytest.mark.parametrize(("address", "loopback"), [
    ("127.0.0.1:50051", True), ("127.3.4.5:1", True), ("localhost:0", True), ("[::1]:8080", True),
    ("0.0.0.0:50051", False), ("[::]:1", False), ("10.0.0.1:5", False), ("login1.example.org:5", False),
    ("127.example.org:5", False),
])
def test_loopback_addresses(address: str, loopback: bool) -> None:
    assert is_loopback_address(address) is loopback
    assert is_loopback_host(address.rsplit(":", 1)[0]) is loopback
