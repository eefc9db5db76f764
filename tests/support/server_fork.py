"""Server processes forked from one that has already imported the server.

Starting `python -m balsam_grpc.server` spends about a second of CPU importing grpc,
SQLAlchemy, psycopg and Alembic, several seconds when the machine is busy. A test that
kills and restarts the server dozens of times starts it with `ServerForker` instead:
`python -m tests.support.server_fork` imports the server once, then forks a child per
request that runs the server's own `main()` in a process of its own (its pid, its
session when asked, its output in its log file), so `kill -9` ends exactly that server
as it would a separately started one. The forking process has no threads and has never
created a gRPC object, so each child starts gRPC fresh.

Protocol on the fork server's stdin/stdout: one JSON request per line
({"argv", "env", "cwd", "log", "new_session"}), answered by the child's pid.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[2]


class ForkedServer:
    """The subset of subprocess.Popen that ServerProcess uses, for a forked server (a
    child of the fork server, which reaps it: its exit code is not known here)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                if psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE:
                    return None
            except psutil.NoSuchProcess:
                pass
            self.returncode = -1  # ended; the fork server reaped it
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"server pid {self.pid}", timeout or 0)
            time.sleep(0.01)  # not our child: nothing to block on
        return self.returncode or 0


class ServerForker:
    """A fork server for balsam-grpc servers; `close()` ends it (not its children)."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.server_fork"], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._lock = threading.Lock()

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], log: Path, *, cwd: Path = REPO,
              new_session: bool = False) -> ForkedServer:
        request = {"argv": list(argv), "env": dict(env), "cwd": str(cwd), "log": str(log),
                   "new_session": new_session}
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self._lock:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline()
        if not answer.strip():
            raise RuntimeError(f"the fork server exited ({self.proc.poll()})")
        return ForkedServer(int(answer))

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


_SHARED: ServerForker | None = None


def shared_forker() -> ServerForker:
    """One fork server for the whole test run, started on first use and closed at exit
    (for servers started a few times per test: the CLI tests' and the fault suite's)."""
    global _SHARED
    if _SHARED is None or _SHARED.proc.poll() is not None:
        _SHARED = ServerForker()
        atexit.register(_SHARED.close)
    return _SHARED


def _child(request: dict[str, Any], main: Any) -> None:
    """In the forked child: become the requested server process and never return."""
    code = 1
    try:
        if request["new_session"]:
            os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(null)
        os.close(log)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["balsam_grpc.server", *request["argv"]]
        main(request["argv"])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported in the server's log
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve() -> None:
    from balsam_grpc.server.__main__ import main

    # What a server start imports on the way (the servicers, the bootstrap), once here
    # rather than in every forked server.
    for module in ("bootstrap", "services.apps", "services.auth", "services.batch_jobs", "services.events",
                   "services.jobs", "services.sessions", "services.sites", "services.site_stream",
                   "services.transfers", "services.registry"):
        importlib.import_module(f"balsam_grpc.server.{module}")

    if threading.active_count() != 1:
        raise SystemExit("the fork server must have no threads when it forks")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request, main)
        print(pid, flush=True)


if __name__ == "__main__":
    _serve()
