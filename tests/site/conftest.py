"""Site tests: the end-to-end ones run a server process on SQLite and, when
BALSAM_TEST_DATABASE_URL is set, on a PostgreSQL database of their own (created and
dropped here, so they never clobber the session harness's database)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

POSTGRES_URL = os.environ.get("BALSAM_TEST_DATABASE_URL", "")


def _params() -> list[object]:
    skip = pytest.mark.skipif(not POSTGRES_URL, reason="BALSAM_TEST_DATABASE_URL not set (CI sets it)")
    return [pytest.param("sqlite", id="sqlite"), pytest.param("postgres", id="postgres", marks=skip)]


@pytest.fixture(params=_params())
def site_database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "sqlite":
        yield ""  # the kit puts a SQLite file in its temp dir
        return
    import psycopg
    from sqlalchemy.engine import make_url

    base = make_url(POSTGRES_URL)
    name = f"balsam_site_e2e_{uuid.uuid4().hex[:8]}"
    admin = base.set(drivername="postgresql", database="postgres")
    dsn = admin.render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
