"""A balsam-grpc server as a real process (python -m balsam_grpc.server) on a fixed
port with its own BALSAM_HOME and database, which can be stopped and started again."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    def __init__(self, home: Path, database_url: str | None = None, port: int | None = None) -> None:
        self.home = home
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.database_url = database_url or f"sqlite:///{home / 'balsam.db'}"
        self.log_path = home / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def profile_path(self) -> Path:
        return self.home / "profile.json"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BALSAM_")}
        env["BALSAM_HOME"] = str(self.home)
        return env

    def start(self, timeout: float = 60) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "balsam_grpc.server", "--address", self.address, "--database", self.database_url],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self._wait_listening(timeout)

    def _wait_listening(self, timeout: float) -> None:
        """Until the profile names this address and the port accepts connections (the
        server writes the profile at start, before it serves)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            if self.profile_path.exists() and json.loads(self.profile_path.read_text()).get("server") == self.address:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        return
                except OSError:
                    pass
            time.sleep(0.05)  # process start-up, not a result: there is no event to wait on
        raise TimeoutError(f"server did not listen on {self.address} within {timeout} s")

    def token(self) -> str:
        return str(json.loads(self.profile_path.read_text())["token"])

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
