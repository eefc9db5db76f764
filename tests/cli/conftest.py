"""A real server process and a way to run `balsamctl` against it as a subprocess.

One server per test module (fixture scope "module"), on SQLite and, when
BALSAM_TEST_DATABASE_URL is set, on PostgreSQL. The PostgreSQL run uses its own database
(<name>_cli): the session-wide in-process harness of tests/server may be using the
configured one at the same time.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import POSTGRES_URL, database_params
from tests.support.cli_fork import BALSAMCTL, CliForker
from tests.support.databases import fresh_postgres
from tests.support.server_fork import shared_forker
from tests.support.server_proc import ServerProcess


class CliServer:
    """The server process, and `balsamctl` run against it with the server's environment
    (no BALSAM_* of the test's own, no colour, wide columns)."""

    def __init__(self, home: Path, database: str, forker: CliForker | None = None) -> None:
        self.forker = forker
        self.server = ServerProcess(home, database, extra_env={"NO_COLOR": "1", "COLUMNS": "200",
                                                               "PYTHONUNBUFFERED": "1"}, forker=shared_forker())
        self._client: Any = None

    @property
    def home(self) -> Path:
        return self.server.home

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def env(self) -> dict[str, str]:
        return self.server.env

    def start(self) -> None:
        self.server.start()
        try:
            self.client.wait_ready(30)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self.server.stop(timeout=15)

    def run(self, *args: str, input: str | None = None, timeout: float = 120,  # noqa: A002
            env: dict[str, str] | None = None, stdin: Any = None) -> subprocess.CompletedProcess[str]:
        """`balsamctl ARGS` as a process of its own (forked from one that has imported the
        CLI, when the server has a forker); stdin is not a terminal unless given."""
        if self.forker is not None:
            return self.forker.run(BALSAMCTL, args, env={**self.env, **(env or {})}, input=input, stdin=stdin,
                                   timeout=timeout)
        return subprocess.run([BALSAMCTL, *args], input=input, capture_output=True, text=True, timeout=timeout,
                              env={**self.env, **(env or {})}, stdin=stdin if input is None else None)

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([BALSAMCTL, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env, stdin=subprocess.DEVNULL)

    def json(self, *args: str) -> Any:
        result = self.run(*args, "-o", "json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    @property
    def client(self) -> Any:
        """An SDK client of the same user, to set up and check state around the CLI."""
        if self._client is None:
            from balsam_grpc.core.settings import Profile
            from balsam_grpc.sdk.client import Client

            self._client = Client(profile=Profile.load(self.server.profile_path, apply_env=False))
        return self._client

    def call(self, service: str, method: str, request: Any) -> Any:
        return self.client.call(service, method, request)

    def run_job(self, job_id: int, *reports: int) -> None:
        """Lease the job to a scripted launcher session and report `reports` (the run's
        end: RUN_DONE, RUN_ERROR, ...), as a launcher would; then close the session."""
        from tests.support.launcher import client_run_job

        client_run_job(self.client, job_id, *reports)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one "error: ..." line a failed command prints (no traceback)."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture(scope="module", params=database_params())
def cli_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
               cli_forker: CliForker) -> Iterator[CliServer]:
    home = tmp_path_factory.mktemp("cli-home")
    if request.param == "postgres":
        database = fresh_postgres(POSTGRES_URL, "cli")
    else:
        database = f"sqlite:///{home / 'balsam.db'}"
    server = CliServer(home, database, cli_forker)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sqlite_cli_server(tmp_path_factory: pytest.TempPathFactory, cli_forker: CliForker) -> Iterator[CliServer]:
    """A server process on SQLite only, for tests of the CLI's own behaviour whose server
    side runs on both databases elsewhere."""
    home = tmp_path_factory.mktemp("cli-sqlite")
    server = CliServer(home, f"sqlite:///{home / 'balsam.db'}", cli_forker)
    server.start()
    yield server
    server.stop()
