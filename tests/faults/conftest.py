"""Fault suite fixtures: the results table printed at the end of the run, a fresh
database per scenario (SQLite file, or a PostgreSQL database of our own), and ordering
(scenarios marked `runs_last`, which restart the shared PostgreSQL, run after everything
else in the session)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import POSTGRES_URL, database_params
from tests.faults.harness import ServerProc
from tests.support.databases import SESSION_DATABASES, drop_postgres, fresh_postgres
from tests.faults.report import ROWS


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "runs_last: restarts shared services; runs after every other test")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    last = [i for i in items if i.get_closest_marker("runs_last")]
    if last:
        items[:] = [i for i in items if not i.get_closest_marker("runs_last")] + last


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not ROWS:
        return
    tr = terminalreporter
    tr.section("fault injection: recovery")
    head = f"{'fault':<58} {'recovery':>9}  {'jobs':>5} {'lost':>5} {'dup':>4}  recovered when"
    tr.write_line(head)
    tr.write_line("-" * len(head))
    for r in ROWS:
        rec = f"{r.recovery_s:.2f} s" if r.recovery_s is not None else "-"
        tr.write_line(f"{r.fault:<58} {rec:>9}  {r.jobs:>5} {r.lost:>5} {r.duplicates:>4}  {r.recovered_when}")
    tr.write_line(f"jobs lost in total: {sum(r.lost for r in ROWS)}; "
                  f"duplicate completions in total: {sum(r.duplicates for r in ROWS)}")


# Dropped at the end of the session. The list lives in tests/support/databases.py: test
# modules import this conftest under another module name than pytest does, and a list
# defined here would be two lists, the tests' never dropped.
CREATED_DATABASES = SESSION_DATABASES


def database_url(backend: str, tmp: Path) -> str:
    if backend == "postgres":
        CREATED_DATABASES.append(fresh_postgres(POSTGRES_URL, f"faults_{secrets.token_hex(3)}"))
        return CREATED_DATABASES[-1]
    return f"sqlite:///{tmp / 'balsam.db'}"


@pytest.fixture(scope="session", autouse=True)
def _drop_fault_databases() -> Iterator[None]:
    yield
    while CREATED_DATABASES:
        drop_postgres(CREATED_DATABASES.pop())


@pytest.fixture(params=database_params())
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProc]:
    """A server process on SQLite (the scenarios run on both databases take `backend`)."""
    srv = ServerProc(tmp_path / "home", database_url("sqlite", tmp_path))
    srv.start()
    yield srv
    srv.stop()
