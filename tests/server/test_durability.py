"""PostgreSQL settings that put acknowledged work at risk are named at server start."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from balsam_grpc.server.store import durability
from balsam_grpc.server.store.db import make_engine
from tests.conftest import POSTGRES_URL

SAFE = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on", "autovacuum": "on"}


def test_safe_settings_warn_of_nothing() -> None:
    assert durability.warnings(SAFE) == []
    for level in ("local", "remote_write", "remote_apply"):  # each flushes this host's WAL first
        assert durability.warnings({**SAFE, "synchronous_commit": level}) == []


@pytest.mark.parametrize("name", ["fsync", "synchronous_commit", "full_page_writes", "autovacuum"])
def test_each_risky_setting_is_named_with_its_fix(name: str) -> None:
    (warning,) = durability.warnings({**SAFE, name: "off"})
    assert f"{name}=off" in warning and f"{name}=on" in warning


@pytest.mark.skipif(not POSTGRES_URL, reason="BALSAM_TEST_DATABASE_URL not set (CI sets it; scripts/run_tests.sh "
                                             "does too)")
def test_the_settings_are_read_from_the_database() -> None:
    engine = make_engine(POSTGRES_URL)
    try:
        with engine.connect() as conn:
            read = durability.read_settings(conn)
            shown = {name: conn.execute(text(f"SHOW {name}")).scalar() for name in durability.SETTINGS}
    finally:
        engine.dispose()
    assert read == shown
