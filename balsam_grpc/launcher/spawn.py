"""Start a job's process for a fraction of subprocess.Popen's CPU.

Popen spends ~100 us of Python per start in this launcher (its checks, its handles, the
environment re-encoded variable by variable, its locks), more than the start itself: a
real `/bin/true` job costs the launcher well under a millisecond in all. `spawn` makes
the same call to `_posixsubprocess.fork_exec` that Popen makes (vfork and exec, the child
closing every other descriptor, its own session, signals restored) with arguments built
once by the caller, and reports a failed exec or chdir as the same OSError. The call is
CPython's private API, stable from 3.11 to 3.13; on any other version it is Popen.
"""

from __future__ import annotations

import builtins
import os
import subprocess
import sys

try:
    from _posixsubprocess import fork_exec as _fork_exec
except ImportError:  # not CPython on a POSIX system
    _fork_exec = None

FORK_EXEC = _fork_exec is not None and (3, 11) <= sys.version_info[:2] <= (3, 13)


class Child:
    """The started process: the part of Popen's interface the runner uses."""

    def __init__(self, args: list[str], pid: int) -> None:
        self.args = args
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """Its exit code (-N: killed by signal N) once it ended and is reaped; else None."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: its status is lost (as Popen has it)
                self.returncode = 0
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Signal it unless it was reaped (its pid may belong to another process by then)."""
        if self.poll() is None:
            os.kill(self.pid, sig)


def environment_entries(env: dict[str, str]) -> dict[bytes, bytes]:
    """`env` as execve takes it, by name: {b"NAME": b"NAME=value"}. A job's environment is
    the launcher's (made once) updated with the job's few variables, not ~85 variables
    encoded and joined for every job. ValueError for a name with `=` (as Popen)."""
    out = {}
    for key, value in env.items():
        name = os.fsencode(key)
        if b"=" in name:
            raise ValueError("illegal environment variable name")
        out[name] = name + b"=" + os.fsencode(value)
    return out


def spawn(argv: list[str], *, cwd: str, env: dict[bytes, bytes], stdin: int, stdout: int) -> Child | subprocess.Popen:
    """Start `argv` in `cwd` with exactly the environment `env` (environment_entries), reading `stdin`, its stdout and stderr to
    `stdout`, in a session of its own, every other descriptor closed, signals as on exec
    of a fresh process. OSError (errno, message, the program or `cwd`) when it could not
    start, as Popen would raise it."""
    if not FORK_EXEC:
        return subprocess.Popen(argv, cwd=cwd, env={name: entry[len(name) + 1:] for name, entry in env.items()},
                                stdin=stdin, stdout=stdout, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)
    program = os.fsencode(argv[0])
    if os.path.dirname(program):
        programs: tuple[bytes, ...] = (program,)
    else:  # searched on the job's own PATH, as Popen does
        path = env.get(b"PATH")
        programs = tuple(os.path.join(os.fsencode(d), program)
                         for d in os.get_exec_path({} if path is None else {b"PATH": path[5:]}))
    err_read, err_write = os.pipe()
    # The child reports a failed exec here: its end must not land on 0, 1 or 2.
    low: list[int] = []
    while err_write < 3:
        low.append(err_write)
        err_write = os.dup(err_write)
    for fd in low:
        os.close(fd)
    try:
        try:
            pid = _fork_exec(argv, programs, True, (err_write,), cwd, list(env.values()),
                             stdin, -1, -1, stdout, -1, stdout, err_read, err_write,
                             True, True, -1, None, None, None, -1, None, True)
        finally:
            os.close(err_write)
        report = b""
        while part := os.read(err_read, 50000):  # end of file: the exec succeeded
            report += part
            if len(report) > 50000:
                break
    finally:
        os.close(err_read)
    if report:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        raise _child_error(report, argv[0], cwd)
    return Child(argv, pid)


def _child_error(report: bytes, program: str, cwd: str) -> Exception:
    """The exception the child reported, as subprocess rebuilds it ("Name:hex errno:text")."""
    try:
        name, hex_errno, text = report.split(b":", 2)
        message = text.decode()
    except ValueError:
        return subprocess.SubprocessError(f"bad exception data from child: {report!r}")
    kind = getattr(builtins, name.decode("ascii", "replace"), subprocess.SubprocessError)
    if isinstance(kind, type) and issubclass(kind, OSError) and hex_errno:
        number = int(hex_errno, 16)
        filename = cwd if message == "noexec" else program  # noexec: chdir failed
        return kind(number, os.strerror(number) if number else "", filename)
    if isinstance(kind, type) and issubclass(kind, Exception):
        return kind(message)
    return subprocess.SubprocessError(message)
