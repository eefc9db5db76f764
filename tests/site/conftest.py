"""Site tests: the end-to-end ones run a server process on SQLite and, when
BALSAM_TEST_DATABASE_URL is set, on a PostgreSQL database of their own (created and
dropped here, so they never clobber the session harness's database)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.conftest import POSTGRES_URL, database_params
from tests.support.databases import drop_postgres, fresh_postgres


@pytest.fixture(params=database_params())
def site_database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "sqlite":
        yield ""  # the kit puts a SQLite file in its temp dir
        return
    url = fresh_postgres(POSTGRES_URL, f"site_e2e_{uuid.uuid4().hex[:8]}")
    try:
        yield url
    finally:
        drop_postgres(url)
