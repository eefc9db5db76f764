"""One clock for every replica (server/clock.py): times are stamped and compared on the
database's clock, whatever the host's says.

Before, each replica used its host's clock: one running 15 s ahead of the others reaped
their live launcher sessions (expire_time, kept 20 s ahead by the holder's heartbeat,
had "passed" on its clock) and released their jobs to run again; token expiry and the
creation times of small creates (large ones take the database's transaction time) went
by the host too. The process-wide offset is never moved here: the in-process test server
of other tests reads the same clock.
"""

from __future__ import annotations

import ast
import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from balsam_grpc.server import clock, convert
from balsam_grpc.server.store.db import Database
from tests.conftest import POSTGRES_URL

SERVER = Path(__file__).resolve().parents[2] / "balsam_grpc" / "server"
T0 = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
MS = timedelta(milliseconds=1)


def test_the_offset_is_taken_from_the_shortest_round_trip() -> None:
    readings = [
        (T0, T0 + 3600 * 1000 * MS + 9 * MS, T0 + 20 * MS),  # slow: its middle is uncertain
        (T0 + 30 * MS, T0 + 3600 * 1000 * MS + 31 * MS, T0 + 32 * MS),
    ]
    offset, round_trip = clock.offset_of(readings)
    assert round_trip == 2 * MS
    assert offset == timedelta(hours=1)


class _FakeDatabase:
    """A database whose clock runs an hour ahead of this host's."""

    is_postgres = True

    async def read_now(self, fn: Any, count: int) -> list[clock.Reading]:
        now = convert._local_now()
        return [(now, now + timedelta(hours=1), now + MS)] * count


def test_a_sync_sets_the_offset_to_the_databases_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    set_to: list[timedelta] = []
    monkeypatch.setattr(convert, "set_clock_offset", set_to.append)
    offset = asyncio.run(clock.DatabaseClock(_FakeDatabase()).sync())  # type: ignore[arg-type]
    assert set_to == [offset]
    assert abs(offset - timedelta(hours=1)) < MS


def test_no_server_module_reads_the_hosts_clock_but_convert() -> None:
    """Every time the server stamps or compares goes through convert.utcnow()."""
    readers = []
    for path in sorted(SERVER.rglob("*.py")):
        if path.name == "convert.py" and path.parent == SERVER:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and isinstance(node.func.value, ast.Name) \
                    and (node.func.value.id, node.func.attr) in {("datetime", "now"), ("datetime", "utcnow"),
                                                                 ("time", "time")}:
                readers.append(f"{path.relative_to(SERVER)}:{node.lineno}")
    assert readers == []


@pytest.mark.skipif(not POSTGRES_URL, reason="BALSAM_TEST_DATABASE_URL not set (CI sets it; scripts/run_tests.sh "
                    "does too); SQLite is served by one process, whose clock is the only one")
def test_the_clock_is_read_from_postgresql(monkeypatch: pytest.MonkeyPatch) -> None:
    set_to: list[timedelta] = []
    monkeypatch.setattr(convert, "set_clock_offset", set_to.append)
    db = Database(POSTGRES_URL, workers=1)
    try:
        readings = db.read_now_sync(clock.read_clocks, 3)
        offset = asyncio.run(clock.DatabaseClock(db).sync())
    finally:
        db.dispose()
    assert len(readings) == 3
    for before, database, after in readings:
        assert before <= after and database.tzinfo is not None
    # The same host: the offset is the round trip's uncertainty, not hours.
    assert set_to == [offset] and abs(offset) < timedelta(seconds=1)
