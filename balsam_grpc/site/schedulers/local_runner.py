"""The monitor of one `local` batch job: `python -m balsam_grpc.site.schedulers.local_runner STATE_FILE`.

It detaches (fork, setsid; the first process exits once the monitor has recorded itself), runs
the batch script in its own process group, enforces the wall time, and records start, end
and exit code in the job's JSON state file. Only this process writes the file after
submission (the adapter writes only when the monitor is already gone), so a restarted site
daemon reads an accurate record. Cancellation is SIGTERM to this monitor: it kills the
script's process group (SIGTERM, then SIGKILL after a grace period) and records the end.
Stdlib only, so it starts fast and survives the daemon.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .local_state import now_iso, process_identity, read_record, write_record

KILL_GRACE_S = 5.0


class _Stop(Exception):
    pass


def _kill_group(pgid: int, grace_s: float, child: subprocess.Popen) -> None:
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    # Background processes of the script may outlive it: the whole group goes.
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def monitor(state_file: Path, on_started=lambda: None) -> int:
    rec = read_record(state_file)
    if rec is None:
        return 2
    stop_reason: list[str] = []

    def on_term(signum, frame):  # noqa: ARG001 - signal handler signature
        if not stop_reason:
            stop_reason.append("cancelled")
        raise _Stop

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    env = {**os.environ, **{k: str(v) for k, v in (rec.get("env") or {}).items()},
           "BALSAM_LOCAL_JOB_ID": rec["scheduler_id"], "BALSAM_LOCAL_NUM_NODES": str(rec.get("num_nodes", 1)),
           "BALSAM_LOCAL_WALL_TIME_MIN": str(rec.get("wall_time_min", 0))}
    delay_s = float(rec.get("start_delay_s") or 0)
    if delay_s > 0:
        # Queued: the monitor is recorded (so status and cancel find it) but no start time yet.
        rec.update(pid=os.getpid(), identity=process_identity(os.getpid()))
        write_record(state_file, rec)
        on_started()
        try:
            time.sleep(delay_s)
        except _Stop:
            rec.update(end_time=now_iso(), exit_code=None, end_reason=stop_reason[0])
            write_record(state_file, rec)
            return 0
    out = open(rec["output"], "ab", buffering=0)  # noqa: SIM115 - held for the child's life
    child = subprocess.Popen([rec["script"]], cwd=rec["cwd"], env=env, stdin=subprocess.DEVNULL,
                             stdout=out, stderr=subprocess.STDOUT, process_group=0)
    rec.update(pid=os.getpid(), identity=process_identity(os.getpid()), pgid=child.pid, start_time=now_iso())
    write_record(state_file, rec)
    if delay_s <= 0:
        on_started()
    wall_s = float(rec.get("wall_time_s") or max(1, int(rec.get("wall_time_min") or 0)) * 60)
    deadline = time.monotonic() + wall_s
    try:
        while child.poll() is None:
            if time.monotonic() >= deadline:
                stop_reason.append("wall time reached")
                raise _Stop
            try:
                child.wait(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
    except _Stop:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _kill_group(child.pid, float(rec.get("kill_grace_s", KILL_GRACE_S)), child)
        child.wait()
    code = child.returncode
    rec.update(end_time=now_iso(), exit_code=128 - code if code < 0 else code,
               end_reason=stop_reason[0] if stop_reason else "exited")
    write_record(state_file, rec)
    out.close()
    return 0


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m balsam_grpc.site.schedulers.local_runner STATE_FILE", file=sys.stderr)
        return 2
    state_file = Path(argv[1])
    read_fd, write_fd = os.pipe()
    if os.fork():
        # The submitter waits for this first process: it exits once the monitor has started
        # the script and recorded its pid, so submit() returns a job that is really running.
        os.close(write_fd)
        ok = os.read(read_fd, 1)
        return 0 if ok == b"1" else 1
    os.close(read_fd)
    os.setsid()
    # A second fork: the monitor is not a session leader, so it can never get a controlling tty.
    if os.fork():
        os._exit(0)
    # Let go of the submitter's pipes: it waits for their EOF, not for the job.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    try:
        if read_record(state_file) is None:
            raise RuntimeError(f"unreadable state file {state_file}")
        code = monitor(state_file, on_started=lambda: os.write(write_fd, b"1"))
    except Exception as exc:  # the monitor must record why it could not run the script
        rec = read_record(state_file) or {}
        rec.update(end_time=now_iso(), exit_code=None, end_reason=f"local runner error: {exc}")
        try:
            write_record(state_file, rec)
        finally:
            os._exit(1)
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
