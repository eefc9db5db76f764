"""A real server process and a way to run `balsamctl` against it as a subprocess.

One server per test module (fixture scope "module"), on SQLite and, when
BALSAM_TEST_DATABASE_URL is set, on PostgreSQL. The PostgreSQL run uses its own database
(<name>_cli): the session-wide in-process harness of tests/server may be using the
configured one at the same time.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import POSTGRES_URL, database_params
from tests.support.databases import fresh_postgres

REPO = Path(__file__).resolve().parents[2]
BALSAMCTL = str(Path(sys.executable).with_name("balsamctl"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class CliServer:
    home: Path
    address: str
    process: subprocess.Popen[bytes]
    env: dict[str, str] = field(default_factory=dict)
    _client: Any = None

    def run(self, *args: str, input: str | None = None, timeout: float = 120,  # noqa: A002
            env: dict[str, str] | None = None, stdin: Any = None) -> subprocess.CompletedProcess[str]:
        """`balsamctl ARGS` as a subprocess; stdin is not a terminal unless given."""
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

            self._client = Client(profile=Profile.load(self.home / "profile.json", apply_env=False))
        return self._client

    def call(self, service: str, method: str, request: Any) -> Any:
        return self.client.call(service, method, request)


def _start(home: Path, database: str) -> CliServer:
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALSAM_")}
    env.update(BALSAM_HOME=str(home), NO_COLOR="1", COLUMNS="200", PYTHONUNBUFFERED="1")
    log = open(home / "server.log", "wb")  # noqa: SIM115 (kept open for the process's life)
    process = subprocess.Popen([sys.executable, "-m", "balsam_grpc.server", "--address", address,
                                "--database", database], env=env, stdout=log, stderr=subprocess.STDOUT,
                               cwd=REPO)
    server = CliServer(home=home, address=address, process=process, env=env)
    profile = home / "profile.json"
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {(home / 'server.log').read_text()}")
        if profile.exists() and json.loads(profile.read_text() or "{}").get("server") == address:
            break
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"server did not start: {(home / 'server.log').read_text()}")
        time.sleep(0.1)
    server.client.wait_ready(30)
    return server


@pytest.fixture(scope="module", params=database_params())
def cli_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliServer]:
    home = tmp_path_factory.mktemp("cli-home")
    if request.param == "postgres":
        database = fresh_postgres(POSTGRES_URL, "cli")
    else:
        database = f"sqlite:///{home / 'balsam.db'}"
    server = _start(home, database)
    yield server
    if server._client is not None:
        server._client.close()
    server.process.terminate()
    try:
        server.process.wait(15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(5)
