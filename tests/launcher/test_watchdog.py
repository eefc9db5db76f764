"""How the job watchdog ends a dead launcher's jobs: SIGTERM first, so a job (an mpiexec
above all) can clean up what it made, then SIGKILL for what is still there."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from balsam_grpc.launcher.reaper import TERM_GRACE_S


def _group_gone(pgid: int) -> bool:
    """Gone within 10 s: the killed `sleep` of a job is reaped by whoever adopted it, later."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _job(script: str) -> subprocess.Popen:
    return subprocess.Popen(["/bin/sh", "-c", script], start_new_session=True)


def _watchdog_of(*groups: int) -> subprocess.Popen:
    """A watchdog told these groups, whose launcher then died (its end of the pipe closed)."""
    dog = subprocess.Popen([sys.executable, "-m", "balsam_grpc.launcher.reaper"], stdin=subprocess.PIPE,
                           start_new_session=True)
    assert dog.stdin is not None
    dog.stdin.write("".join(f"+{g}\n" for g in groups).encode())
    dog.stdin.close()
    return dog


@pytest.fixture
def jobs():
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def _wait_started(path: Path) -> None:
    deadline = time.monotonic() + 10
    while not path.exists():
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.02)


def test_a_dead_launchers_job_is_terminated_so_it_can_clean_up(tmp_path, jobs):
    cleaned, started = tmp_path / "cleaned", tmp_path / "started"
    jobs.append(job := _job(f"trap 'echo cleaned > {cleaned}; exit 0' TERM; touch {started}; "
                            "while :; do sleep 0.05; done"))
    _wait_started(started)
    _watchdog_of(job.pid).wait(10)
    assert job.wait(10) == 0, "the job was killed before it could handle SIGTERM"
    assert cleaned.read_text() == "cleaned\n"
    assert _group_gone(job.pid)


def test_a_job_that_ignores_sigterm_is_killed_after_the_grace(tmp_path, jobs):
    started = tmp_path / "started"
    jobs.append(job := _job(f"trap '' TERM; touch {started}; while :; do sleep 0.05; done"))
    _wait_started(started)
    began = time.monotonic()
    _watchdog_of(job.pid).wait(10)
    assert job.wait(10) == -signal.SIGKILL
    assert _group_gone(job.pid)
    # The watchdog waited out the grace for it (and no longer than it needed to).
    assert time.monotonic() - began >= TERM_GRACE_S
