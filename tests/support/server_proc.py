"""A balsam-grpc server as a separate process (`python -m balsam_grpc.server`) on a free
port with its own BALSAM_HOME and database; it can be stopped (or killed) and started
again on the same port and database. Used by tests/cli, tests/faults and tests/sdk."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from balsam_grpc.sdk import Client
from tests.support.server_fork import ForkedServer, ServerForker

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """The server on 127.0.0.1:<free port> with BALSAM_HOME=`home` (its profile and
    server.log go there). `env` is the environment of the server and of whatever the test
    runs against it: the test's own, less every BALSAM_* variable, plus BALSAM_HOME and
    `extra_env`. `args` are added to the server's command line; `new_session` starts it
    in a session of its own; with `forker` it is forked from a process that has already
    imported the server (tests/support/server_fork.py: for tests that restart it often)."""

    def __init__(self, home: Path, database_url: str, *, args: Sequence[str] = (),
                 extra_env: Mapping[str, str] | None = None, new_session: bool = False,
                 forker: ServerForker | None = None) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.database_url = database_url
        self.args = list(args)
        self.new_session = new_session
        self.log_path = home / "server.log"
        self.forker = forker
        self.proc: subprocess.Popen[bytes] | ForkedServer | None = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BALSAM_")}
        self.env.update(BALSAM_HOME=str(home), **(extra_env or {}))

    @property
    def profile_path(self) -> Path:
        return self.home / "profile.json"

    @property
    def token(self) -> str:
        return str(json.loads(self.profile_path.read_text())["token"])

    def start(self, timeout: float = 60) -> None:
        """Start the server (its output appended to server.log) and wait until the profile
        names this address and the port accepts connections (the server writes the profile
        at start, before it serves). A server that exits or is not up within `timeout`
        seconds is an error (and one still running is killed)."""
        argv = ["--address", self.address, "--database", self.database_url, *self.args]
        if self.forker is not None:
            self.proc = self.forker.spawn(argv, self.env, self.log_path, new_session=self.new_session)
        else:
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen([sys.executable, "-m", "balsam_grpc.server", *argv], cwd=REPO,
                                             env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=self.new_session)
        deadline = time.monotonic() + timeout
        while not self._listening():
            if time.monotonic() > deadline:
                self.stop(kill=True)
                raise RuntimeError(f"the server did not listen on {self.address} within {timeout:g} s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.05)  # process start-up: there is no event to wait on

    def _listening(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
        if not (self.profile_path.exists() and
                json.loads(self.profile_path.read_text() or "{}").get("server") == self.address):
            return False
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self, kill: bool = False, timeout: float = 30) -> None:
        """SIGTERM (or SIGKILL) the server and wait `timeout` seconds for it, then kill it."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def client(self, address: str = "", **kw: Any) -> Client:
        """A new SDK client with the profile's token, to this server or to `address` (a proxy)."""
        kw.setdefault("timeout", 20)
        return Client(address or self.address, token=self.token, **kw)
