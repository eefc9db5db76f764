"""`balsamctl` runs forked from one process that has already imported the CLI.

A `balsamctl` process spends about half a second of CPU importing grpc, the SDK, typer
and rich before it parses its arguments (several seconds when the machine is busy), and
tests/cli runs it a few hundred times. `CliForker.run()` answers like `subprocess.run`
of the console script: `python -m tests.support.cli_fork` imports `balsam_grpc.cli.main`
once, then forks a child per command that becomes that command's process: the caller's
stdin, stdout and stderr (passed over a UNIX socket), its environment (the whole of it,
nothing of the fork server's), its working directory and argv, fresh std streams, then
the console script's `app()`, atexit handlers and exit code. The fork server imports
nothing that reads the environment at import time, and it has no threads and has never
created a gRPC object when it forks, so each child starts gRPC fresh.

Protocol: one connection per command; the request is one JSON line
({"argv", "env", "cwd"}) sent with three file descriptors (stdin, stdout, stderr); the
answers are the child's pid, then, when the fork server has reaped it, its exit code as
`subprocess` reports it (negative: the signal that ended it).
"""

from __future__ import annotations

import atexit
import io
import json
import locale
import os
import selectors
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BALSAMCTL = str(Path(sys.executable).with_name("balsamctl"))  # the console script


class CliForker:
    """The fork server; `close()` ends it (commands still running keep running)."""

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="balsamctl-fork-")
        self.path = os.path.join(self._dir, "sock")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.support.cli_fork", self.path], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the balsamctl fork server did not start ({self.proc.poll()})")

    def run(self, argv0: str, args: Sequence[str], *, env: Mapping[str, str], input: str | None = None,  # noqa: A002
            stdin: Any = None, timeout: float | None = None,
            cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
        """What `subprocess.run([argv0, *args], input=, stdin=, env=, cwd=, capture_output=True,
        text=True, timeout=)` answers, the command forked rather than started."""
        cmd = [argv0, *args]
        to_close: list[int] = []
        writer: int | None = None
        if input is not None:
            child_in, writer = os.pipe()
            to_close.append(child_in)
        elif stdin == subprocess.DEVNULL:
            child_in = os.open(os.devnull, os.O_RDONLY)
            to_close.append(child_in)
        elif stdin is None:
            child_in = 0  # inherited, as subprocess does
        else:
            child_in = stdin if isinstance(stdin, int) else stdin.fileno()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        to_close += [out_w, err_w]
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self.path)
            request = json.dumps({"argv": cmd, "env": dict(env), "cwd": str(cwd or os.getcwd())}).encode() + b"\n"
            socket.send_fds(conn, [request], [child_in, out_w, err_w])
        finally:
            for fd in to_close:
                os.close(fd)
        answers = conn.makefile("r")
        pid = int(answers.readline())
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            stdout, stderr = _communicate(writer, out_r, err_r, input, deadline)
            line = _readline_until(conn, answers, deadline)
        except subprocess.TimeoutExpired:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            raise subprocess.TimeoutExpired(cmd, timeout or 0) from None
        finally:
            answers.close()
            conn.close()
        return subprocess.CompletedProcess(cmd, int(line), _text(stdout), _text(stderr))

    def shim(self, bindir: Path, argv0: str) -> Path:
        """An executable `balsamctl` in `bindir` that runs each command through this fork
        server with its own stdin, stdout, stderr, environment and working directory, and
        exits as the command did: for commands a shell runs (the tutorial's blocks)."""
        bindir.mkdir(parents=True, exist_ok=True)
        shim = bindir / "balsamctl"
        command = " ".join(shlex.quote(str(a)) for a in (sys.executable, "-S", __file__, "--client", self.path, argv0))
        shim.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        shim.chmod(0o755)
        return shim

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # the fork server's signal to exit
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for name in os.listdir(self._dir):
            os.unlink(os.path.join(self._dir, name))
        os.rmdir(self._dir)


_SHARED: CliForker | None = None


def shared_cli_forker() -> CliForker:
    """One balsamctl fork server for the whole test run, started on first use and closed
    at exit."""
    global _SHARED
    if _SHARED is None or _SHARED.proc.poll() is not None:
        _SHARED = CliForker()
        atexit.register(_SHARED.close)
    return _SHARED


def _text(data: bytes) -> str:
    """Bytes decoded as subprocess's text mode does (locale encoding, universal newlines)."""
    return io.TextIOWrapper(io.BytesIO(data), encoding=locale.getpreferredencoding(False)).read()


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise subprocess.TimeoutExpired("balsamctl", 0)
    return left


def _communicate(writer: int | None, out_r: int, err_r: int, input: str | None,  # noqa: A002
                 deadline: float | None) -> tuple[bytes, bytes]:
    """Feed stdin, read stdout and stderr to their ends (the command and whatever it
    started closed them), as Popen.communicate does."""
    data = (input or "").encode(locale.getpreferredencoding(False)) if writer is not None else b""
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    sel = selectors.DefaultSelector()
    try:
        sel.register(out_r, selectors.EVENT_READ)
        sel.register(err_r, selectors.EVENT_READ)
        if writer is not None:
            if data:
                os.set_blocking(writer, False)
                sel.register(writer, selectors.EVENT_WRITE)
            else:
                os.close(writer)
                writer = None
        while sel.get_map():
            for key, _ in sel.select(_remaining(deadline)):
                fd = key.fd
                if fd == writer:
                    try:
                        data = data[os.write(fd, data[:65536]):]
                    except BrokenPipeError:
                        data = b""
                    if not data:
                        sel.unregister(fd)
                        os.close(fd)
                        writer = None
                    continue
                chunk = os.read(fd, 65536)
                if chunk:
                    chunks[fd].append(chunk)
                else:
                    sel.unregister(fd)
            if not sel.get_map():
                break
            _remaining(deadline)
    finally:
        sel.close()
        for fd in (out_r, err_r, *((writer,) if writer is not None else ())):
            os.close(fd)
    return b"".join(chunks[out_r]), b"".join(chunks[err_r])


def _readline_until(conn: socket.socket, answers: Any, deadline: float | None) -> str:
    conn.settimeout(_remaining(deadline))
    try:
        line = answers.readline()
    except TimeoutError:
        raise subprocess.TimeoutExpired("balsamctl", 0) from None
    if not line.strip():
        raise RuntimeError("the balsamctl fork server ended before the command's exit code")
    return line


# ------------------------------------------------------------------ the fork server

def _child(request: dict[str, Any], fds: list[int], app: Any, base_path: list[str]) -> None:
    """In the forked child: become the requested `balsamctl` process and never return."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
        encoding = sys.stdout.encoding
        sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)),
                                                      encoding=encoding, line_buffering=os.isatty(0))
        sys.stdout = sys.__stdout__ = _writer(1, encoding, "strict", unbuffered)
        sys.stderr = sys.__stderr__ = _writer(2, encoding, "backslashreplace", True)
        sys.argv = list(request["argv"])
        # The console script's import path: its own folder, the caller's PYTHONPATH, then
        # the interpreter's (not the repository the fork server was started from).
        pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [os.path.dirname(sys.argv[0]), *pythonpath, *base_path]
        # The console script's __main__ (click names the program after it: `balsamctl`).
        script = types.ModuleType("__main__")
        script.__file__ = sys.argv[0]
        sys.modules["__main__"] = script
        try:
            raise SystemExit(app())  # the console script: sys.exit(app())
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code is not None and not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - printed as the interpreter would
            import traceback

            traceback.print_exc()
        threading._shutdown()  # type: ignore[attr-defined]  # what interpreter exit waits for
        import atexit

        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001, S110 - a closed pipe: nothing to flush to
                pass
        os._exit(code)


def _writer(fd: int, encoding: str, errors: str, unbuffered: bool) -> io.TextIOWrapper:
    raw = io.FileIO(fd, "w", closefd=False)
    binary: Any = raw if unbuffered else io.BufferedWriter(raw)
    return io.TextIOWrapper(binary, encoding=encoding, errors=errors, line_buffering=os.isatty(fd),
                            write_through=unbuffered)


def _serve(path: str) -> None:
    server_pythonpath = set(filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    base_path = [p for p in sys.path[1:] if p not in server_pythonpath]
    from balsam_grpc.cli.main import app

    if threading.active_count() != 1:
        raise SystemExit("the balsamctl fork server must have no threads when it forks")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes the selector through wake_w
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(wake_r, selectors.EVENT_READ, "child")
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    waiting: dict[int, socket.socket] = {}
    print("ready", flush=True)
    running = True
    while running or waiting:
        for key, _ in sel.select(1.0):
            if key.data == "stdin":
                sys.stdin.read()  # EOF: the tests are done; finish the commands still running
                sel.unregister(sys.stdin)
                running = False
            elif key.data == "accept":
                conn, _ = listener.accept()
                msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
                while not msg.endswith(b"\n"):
                    msg += conn.recv(1 << 20)
                pid = os.fork()
                if pid == 0:
                    sel.close()
                    listener.close()
                    for other in waiting.values():
                        other.close()
                    conn.close()
                    _child(json.loads(msg), fds, app, base_path)
                for fd in fds:
                    os.close(fd)
                conn.sendall(f"{pid}\n".encode())
                waiting[pid] = conn
            else:
                os.read(wake_r, 4096)
        while waiting:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn = waiting.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:
                    pass
                conn.close()
    listener.close()


def _client(path: str, argv: list[str]) -> None:
    """The shim's side: this process's stdin, stdout and stderr, environment and working
    directory to a forked command; signals it gets are passed on; its exit code is ours."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    request = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode() + b"\n"
    socket.send_fds(conn, [request], [0, 1, 2])
    answers = conn.makefile("r")
    pid = int(answers.readline())

    def forward(sig: int, _: Any) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    line = answers.readline()
    if not line.strip():
        raise SystemExit("the balsamctl fork server ended before the command's exit code")
    code = int(line)
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    raise SystemExit(code)


if __name__ == "__main__":
    if sys.argv[1] == "--client":
        _client(sys.argv[2], sys.argv[3:])
    else:
        _serve(sys.argv[1])
