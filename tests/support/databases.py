"""PostgreSQL databases of a test's own, next to the shared test database
(BALSAM_TEST_DATABASE_URL), so a test that needs an empty schema or kills connections
does not disturb the others.

Every database made here is named `<shared name>_<suffix>` and remembered: the test
session drops whatever is left at its end (tests/conftest.py), and scripts/run_tests.sh
drops `<shared name>_*` on exit, so a run that was killed leaves nothing behind either."""

from __future__ import annotations

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url


# Databases to drop when the test session ends (tests/faults/conftest.py drops them).
SESSION_DATABASES: list[str] = []
CREATED: set[str] = set()


def drop_created() -> None:
    """Drop every database fresh_postgres made that is still there."""
    for url in sorted(CREATED):
        drop_postgres(url)


def _admin(url: str | URL):  # type: ignore[no-untyped-def]
    return create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")


def fresh_postgres(url: str, suffix: str) -> str:
    """An empty database named `<shared name>_<suffix>` (dropped first if it exists);
    its URL, with the password kept."""
    base = make_url(url)
    name = f"{base.database}_{suffix}"
    admin = _admin(base)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    made = base.set(database=name).render_as_string(hide_password=False)
    CREATED.add(made)
    return made


def drop_postgres(url: str) -> None:
    """Drop the database `url` names, closing its connections."""
    CREATED.discard(url)
    name = make_url(url).database
    admin = _admin(url)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
