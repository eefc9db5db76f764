"""store.codec.array_text: the array literals of a launcher report's event insert and job
update (cast by the statement) read back as the values they were made of, whatever the
text holds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from balsam_grpc.server.store.codec import array_text
from tests.conftest import POSTGRES_URL

TEXTS = ['say "hi"', "back\\slash", "", "NULL", "{a,b}", " padded ", "tab\tnew\nline", "€ ünïcode", None]
TIMES = [datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), None]


def test_every_element_but_a_number_is_quoted_and_none_is_null() -> None:
    assert array_text([1, None, -2]) == "{1,NULL,-2}"
    assert array_text(['a"b', "c\\d", "NULL", True]) == '{"a\\"b","c\\\\d","NULL",t}'
    assert array_text([]) == "{}"


def test_times_keep_their_offset_when_repeated() -> None:
    """Times are formatted once per value (a transaction's events share one): the same
    instant at another offset is still written with its own offset."""
    utc = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    east = utc.astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert array_text([utc, utc, east, None]) == (
        '{"2026-01-02T03:04:05.678901+00:00","2026-01-02T03:04:05.678901+00:00",'
        '"2026-01-02T08:34:05.678901+05:30",NULL}')


@pytest.mark.skipif(not POSTGRES_URL, reason="BALSAM_TEST_DATABASE_URL not set")
def test_postgresql_reads_back_the_values() -> None:
    from sqlalchemy import text

    from balsam_grpc.server.store.db import make_engine

    engine = make_engine(POSTGRES_URL)
    try:
        with engine.connect() as conn:
            row = conn.execute(text("SELECT CAST(:t AS TEXT[]), CAST(:i AS BIGINT[]), CAST(:w AS TIMESTAMPTZ[]), "
                                    "CAST(:b AS BOOLEAN[])"),
                               {"t": array_text(TEXTS), "i": array_text([7, None, 2**40]), "w": array_text(TIMES),
                                "b": array_text([True, False, None])}).one()
    finally:
        engine.dispose()
    assert list(row) == [TEXTS, [7, None, 2**40], TIMES, [True, False, None]]
