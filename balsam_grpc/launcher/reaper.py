"""Job processes die with their launcher, even a launcher killed with SIGKILL.

A launcher that dies without stopping its jobs leaves them running; the server re-leases
those jobs after the lease timeout and a second run starts beside the orphaned first.
Each job runs in its own process group (runner.py), so what is to be killed is a list
of groups, and whoever kills them must outlive the launcher: a small watchdog process,
`python -m balsam_grpc.launcher.reaper`, in its own session (a signal to the launcher's
group does not reach it). The launcher writes `+<pgid>` when a job starts and `-<pgid>`
when it has ended on a pipe to the watchdog's stdin. The pipe's write end lives only in
the launcher (job processes are started with close_fds), so the kernel closes it when
the launcher exits however it exits; the watchdog then reads end-of-file, sends SIGTERM
to every group still registered, SIGKILL to what is left after a short grace, and exits.
The SIGTERM lets a job clean up: an mpiexec killed outright leaves its topology file in
/tmp and its ranks' shared memory in /dev/shm, on a node that runs many jobs.

Why not PR_SET_PDEATHSIG alone: it reaches only the direct child (a shell's children, or
everything under `mpiexec` that stays in its group, would survive) and fires when the
forking *thread* exits, not the process. An MPI launch dies with its mpiexec: Hydra's
proxies kill their ranks when mpiexec's control connection drops.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import structlog

log = structlog.get_logger("balsam.launcher")
READ_PAUSE_S = 0.05  # the most a dead launcher's groups wait for their SIGTERM beyond it
TERM_GRACE_S = 0.5  # then SIGKILL: as the launcher's own kills (runner.KILL_GRACE_S)


class Reaper:
    """The launcher's side: started on first use, restarted if it died. Thread-safe: the
    runner's spawner threads tell it of the jobs they start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.groups: set[int] = set()
        # Groups that ended, told to the watchdog with the next group that starts (or by
        # flush()): one write per job instead of two. Until then a dying launcher's watchdog
        # signals an empty group, or one whose id was reused within that moment.
        self._ended: list[str] = []

    def _send(self, line: str) -> None:
        if self.proc is None:
            self._start()  # tells the new watchdog every current group, this change included
            return
        if self._ended:
            line = "".join(self._ended) + line
            self._ended.clear()
        try:
            self._write(line.encode())
        except (BrokenPipeError, ValueError):  # it died: its end of the pipe closed with it
            log.warning("job watchdog died; starting another", pid=self.proc.pid)
            self.proc.poll()
            self._start()

    def _write(self, data: bytes) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        fd = self.proc.stdin.fileno()
        while data:
            data = data[os.write(fd, data):]

    def _start(self) -> None:
        self._ended.clear()
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "balsam_grpc.launcher.reaper"],
                                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         start_new_session=True, close_fds=True)
            self._write("".join(f"+{g}\n" for g in self.groups).encode())
        except OSError as exc:
            log.error("could not start the job watchdog: jobs would outlive a killed launcher", error=str(exc))
            self.proc = None

    def watch(self, pgid: int) -> None:
        with self._lock:
            self.groups.add(pgid)
            self._send(f"+{pgid}\n")

    def forget(self, pgid: int) -> None:
        with self._lock:
            if pgid in self.groups:
                self.groups.discard(pgid)
                if self.proc is not None:
                    self._ended.append(f"-{pgid}\n")

    def flush(self) -> None:
        """Tell the watchdog now about the groups that ended."""
        if self._ended and self.proc is not None:
            with self._lock:
                self._send("")

    def close(self) -> None:
        """The launcher is done: the watchdog kills what is still registered and exits."""
        with self._lock:
            self._close()

    def _close(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            try:
                self._write("".join(self._ended).encode())  # so a reused group id is spared
                self._ended.clear()
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                log.warning("job watchdog did not exit", pid=self.proc.pid)
        self.proc = None


def _signal_groups(groups: set[int], sig: int) -> set[int]:
    """The groups that were there to signal."""
    reached = set()
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
            reached.add(pgid)
        except (ProcessLookupError, PermissionError):
            pass
    return reached


def kill_groups(groups: set[int], grace: float = TERM_GRACE_S, rounds: int = 3) -> None:
    """SIGTERM each group; SIGKILL what is left after `grace`, again a few times for
    processes forked meanwhile."""
    alive = _signal_groups(groups, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = _signal_groups(alive, 0)
    for _ in range(rounds):
        alive = _signal_groups(alive, signal.SIGKILL)
        if not alive:
            return
        time.sleep(0.05)


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only the end of the pipe ends it
    groups: set[int] = set()
    fd = sys.stdin.fileno()
    rest = b""
    while chunk := os.read(fd, 65536):
        *lines, rest = (rest + chunk).split(b"\n")
        for line in lines:
            line = line.strip()
            if line[:1] == b"+" and line[1:].isdigit():
                groups.add(int(line[1:]))
            elif line[:1] == b"-" and line[1:].isdigit():
                groups.discard(int(line[1:]))
        # Lines gather in the pipe meanwhile: a read() waiting when the launcher writes would
        # wake this process for every job start, and on a busy node take the launcher's CPU.
        time.sleep(READ_PAUSE_S)
    kill_groups(groups)
    return 0


if __name__ == "__main__":
    sys.exit(main())
