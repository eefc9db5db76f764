"""The runner's own process start (launcher/spawn.py) against what subprocess.Popen does:
the same child (session, descriptors, environment, folder) and the same errors."""

from __future__ import annotations

import errno
import json
import os
import signal
import sys

import pytest

from balsam_grpc.launcher import spawn as spawn_module
from balsam_grpc.launcher.spawn import environment_entries, spawn

PROBE = ("import json, os, sys; json.dump({'cwd': os.getcwd(), 'sid': os.getsid(0), 'pid': os.getpid(), "
         "'env': dict(os.environ), 'fds': sorted(int(f) for f in os.listdir('/proc/self/fd')), "
         "'stdin': sys.stdin.read()}, sys.stdout); print('to stderr', file=sys.stderr)")


@pytest.fixture(params=["fork_exec", "popen"])
def way(request, monkeypatch):
    """Both paths: the private call (CPython 3.11-3.13) and Popen (any other Python)."""
    if request.param == "fork_exec" and not spawn_module.FORK_EXEC:
        pytest.skip("this Python has no known fork_exec")
    monkeypatch.setattr(spawn_module, "FORK_EXEC", request.param == "fork_exec")
    return request.param


def wait(child) -> int:
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    rc = child.poll()
    assert rc is not None
    return rc


def test_the_child_runs_in_its_folder_and_session_with_only_its_environment_and_descriptors(tmp_path, way):
    out = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    stdin = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    leaked = os.open(os.devnull, os.O_RDONLY)  # inheritable: close_fds must close it all the same
    work = tmp_path / "work"
    work.mkdir()
    try:
        child = spawn([sys.executable, "-c", PROBE], cwd=str(work), env=environment_entries({"ONLY": "this", "PATH": "/usr/bin"}),
                      stdin=stdin, stdout=out)
        assert wait(child) == 0
    finally:
        for fd in (out, stdin, leaked):
            os.close(fd)
    text = (tmp_path / "out").read_text()
    assert "to stderr" in text  # stderr to the same file
    seen = json.loads(text.replace("to stderr", ""))
    assert seen["cwd"] == str(work)
    assert seen["sid"] == seen["pid"]  # a session (and process group) of its own
    assert {k: v for k, v in seen["env"].items() if k != "LC_CTYPE"} == {"ONLY": "this", "PATH": "/usr/bin"}
    assert seen["fds"] == [0, 1, 2, 3]  # 3: the listing's own
    assert seen["stdin"] == ""


def test_a_bare_program_name_is_searched_on_the_jobs_own_path(tmp_path, way):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "only-here"
    tool.write_text("#!/bin/sh\nexit 7\n")
    tool.chmod(0o700)
    out = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        child = spawn(["only-here"], cwd=str(tmp_path), env=environment_entries({"PATH": f"/nonexistent:{bin_dir}"}),
                      stdin=out, stdout=out)
    finally:
        os.close(out)
    assert wait(child) == 7


def test_a_missing_program_or_folder_raises_what_popen_raises(tmp_path, way):
    out = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        with pytest.raises(FileNotFoundError) as missing:
            spawn([str(tmp_path / "no-such-program")], cwd=str(tmp_path), env={}, stdin=out, stdout=out)
        assert missing.value.errno == errno.ENOENT and missing.value.filename == str(tmp_path / "no-such-program")
        with pytest.raises(FileNotFoundError) as no_dir:
            spawn(["/bin/true"], cwd=str(tmp_path / "gone"), env={}, stdin=out, stdout=out)
        assert no_dir.value.filename == str(tmp_path / "gone")
        (tmp_path / "plain").write_text("not a program")
        with pytest.raises(PermissionError):
            spawn([str(tmp_path / "plain")], cwd=str(tmp_path), env={}, stdin=out, stdout=out)
    finally:
        os.close(out)


def test_a_killed_child_reports_the_signal_and_is_not_signalled_after_it_was_reaped(tmp_path, way):
    out = os.open(tmp_path / "out", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        child = spawn(["/bin/sleep", "30"], cwd=str(tmp_path), env={}, stdin=out, stdout=out)
    finally:
        os.close(out)
    assert child.poll() is None
    os.killpg(child.pid, signal.SIGKILL)
    assert wait(child) == -signal.SIGKILL
    child.send_signal(signal.SIGTERM)  # reaped: its pid may be someone else's now; nothing is sent
    assert child.args == ["/bin/sleep", "30"]


def test_an_environment_name_with_an_equals_sign_is_refused():
    with pytest.raises(ValueError):
        environment_entries({"A=B": "c"})
