"""Transfer pieces without a server: location URLs and path rules, batching, the local
copy (atomic, resumable, clear errors), the rsync command line and its figures, and a
real rsync run through a stand-in for ssh."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import threading
from pathlib import Path

import pytest

from balsam_grpc.site.transfers.backends.base import TransferFailed
from balsam_grpc.site.transfers.backends.local import CopyStats, Sides, Stopped, copy_path
from balsam_grpc.site.transfers.backends.rsync import RsyncBackend, describe_failure, parse_stats, rsync_argv
from balsam_grpc.site.transfers.config import (
    LocationError,
    RsyncSettings,
    TransferSettings,
    check_transfer_settings,
    map_path,
    parse_location,
)
from balsam_grpc.site.transfers.journal import TransferJournal
from balsam_grpc.site.transfers.model import IN, OUT, Item, Task, plan_batches, share
from balsam_grpc.site.transfers.service import TransferService
from balsam_grpc.v1 import common_pb2, transfer_item_pb2

T = transfer_item_pb2


# ---------------------------------------------------------------------------- pure

def test_locations_parse_and_confine_paths():
    loc = parse_location("aps", "file:///data/aps")
    assert (loc.scheme, loc.root) == ("file", "/data/aps")
    assert loc.resolve("/run1/a.h5") == "/data/aps/run1/a.h5"
    with pytest.raises(LocationError, match="leaves the root"):
        loc.resolve("/../etc/passwd")
    g = parse_location("g", "globus://9A4D1E6C-1F2B-4C3D-8E5F-0A1B2C3D4E5F")
    assert (g.host, g.root) == ("9a4d1e6c-1f2b-4c3d-8e5f-0a1b2c3d4e5f", "/")
    r = parse_location("r", "rsync://alice@dtn.example.org:2222/srv/data")
    assert (r.user, r.host, r.port, r.root) == ("alice", "dtn.example.org", 2222, "/srv/data")
    for bad in ("ftp://x/y", "globus://not-a-uuid", "rsync://host-without-user/x", "file://otherhost/x"):
        with pytest.raises(LocationError):
            parse_location("bad", bad)


def test_path_map_longest_prefix():
    m = {"/lus/eagle/projects": "/projects", "/lus/eagle": "/eagle", "/": "/root"}
    assert map_path("/lus/eagle/projects/p1/w/a.h5", m) == "/projects/p1/w/a.h5"
    assert map_path("/lus/eagle/other", m) == "/eagle/other"
    assert map_path("/lus/eaglex/a", m) == "/root/lus/eaglex/a"  # whole components only
    assert map_path("/home/a", {}) == "/home/a"


def test_settings_rules():
    check_transfer_settings(TransferSettings())
    with pytest.raises(Exception, match="batch_size"):
        check_transfer_settings(TransferSettings(batch_size=0))


def test_batches_and_shares():
    items = [Item(id=i, job_id=i, direction=IN, location="a", remote=f"/{i}", local=Path(f"/w/{i}")) for i in range(7)]
    assert [len(b) for b in plan_batches(items, 3, 5)] == [3, 3, 1]
    assert [len(b) for b in plan_batches(items, 3, 1)] == [3]
    assert share(10, 3) == [4, 3, 3] and sum(share(7, 7)) == 7 and share(5, 0) == []


# ---------------------------------------------------------------------------- local copy

def _tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.txt").write_text("beta!")


def test_copy_file_and_tree(tmp_path):
    src = tmp_path / "src"
    _tree(src)
    stats = copy_path(src / "a.txt", tmp_path / "dst" / "deep" / "a.txt", False, Sides(tmp_path, tmp_path))
    assert (tmp_path / "dst" / "deep" / "a.txt").read_text() == "alpha"
    assert (stats.bytes, stats.files) == (5, 1)
    stats = copy_path(src, tmp_path / "tree", True, Sides(tmp_path, tmp_path))
    assert (tmp_path / "tree" / "sub" / "b.txt").read_text() == "beta!"
    assert (stats.bytes, stats.files, stats.copied_bytes) == (10, 2, 10)
    again = copy_path(src, tmp_path / "tree", True, Sides(tmp_path, tmp_path))  # already in place: nothing copied
    assert (again.copied_bytes, again.skipped_files) == (0, 2)
    assert not list(tmp_path.rglob("*.balsam-part"))


def test_copy_errors_are_clear(tmp_path):
    with pytest.raises(TransferFailed, match="source not found: .*nope"):
        copy_path(tmp_path / "nope", tmp_path / "x", False, Sides(tmp_path, tmp_path))
    _tree(tmp_path / "d")
    with pytest.raises(TransferFailed, match="is a directory, but the app's transfer slot is not recursive"):
        copy_path(tmp_path / "d", tmp_path / "x", False, Sides(tmp_path, tmp_path))


def test_interrupted_copy_resumes_without_copying_twice(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}.bin").write_bytes(os.urandom(300_000))
    stop = threading.Event()
    original = CopyStats.__init__
    done: list[str] = []

    # Stop after the first file is in place (the daemon killed mid-task).
    import balsam_grpc.site.transfers.backends.local as local

    real_replace = os.replace

    def replace_then_stop(a, b):  # noqa: ANN001
        real_replace(a, b)
        done.append(str(b))
        stop.set()

    local.os.replace = replace_then_stop  # type: ignore[attr-defined]
    try:
        with pytest.raises(Stopped):
            copy_path(src, tmp_path / "dst", True, Sides(tmp_path, tmp_path), stop=stop)
    finally:
        local.os.replace = real_replace  # type: ignore[attr-defined]
    assert CopyStats.__init__ is original and len(done) == 1
    first = Path(done[0])
    inode = first.stat().st_ino
    stats = copy_path(src, tmp_path / "dst", True, Sides(tmp_path, tmp_path))
    assert (stats.files, stats.skipped_files) == (3, 1)
    assert first.stat().st_ino == inode
    for i in range(3):
        assert (tmp_path / "dst" / f"f{i}.bin").read_bytes() == (src / f"f{i}.bin").read_bytes()


def _local_run(tmp_path: Path, direction: str, remote: str, local: Path, recursive: bool = False) -> tuple[bool, str]:
    from balsam_grpc.site.transfers.backends.local import LocalBackend

    backend = LocalBackend(parse_location("loc", f"file://{tmp_path / 'loc'}"), data_dir=tmp_path / "data",
                           wake=lambda: None)
    item = Item(id=1, job_id=1, direction=direction, location="loc", remote=remote, local=local, recursive=recursive)
    outcome = backend._run(Task(key="t", location="loc", direction=direction, items=[item]))[1]
    return outcome.ok, outcome.error


@pytest.mark.edge("file:// stage-in and stage-out through symlinks out of their roots",
                   "the item fails with the reason; nothing read or written outside")
def test_symlinks_cannot_lead_a_local_copy_out_of_its_roots(tmp_path):
    """A symlink inside the location's root (or in the job's workdir) that leads outside
    it fails the item with the reason; nothing outside is read or written."""
    loc, data, outside = tmp_path / "loc", tmp_path / "data", tmp_path / "outside"
    for d in (loc / "tree", data / "job", outside):
        d.mkdir(parents=True)
    (outside / "secret.txt").write_text("not for jobs")
    (loc / "leak.txt").symlink_to(outside / "secret.txt")
    (loc / "tree" / "leak.txt").symlink_to(outside / "secret.txt")
    (loc / "exit").symlink_to(outside, target_is_directory=True)
    (data / "job" / "result.txt").write_text("result")

    ok, error = _local_run(tmp_path, IN, "leak.txt", data / "job" / "in.txt")
    assert not ok and "refused" in error and "is not inside" in error, error
    ok, error = _local_run(tmp_path, IN, "tree", data / "job" / "tree", recursive=True)
    assert not ok and "refused" in error, error
    assert not (data / "job" / "in.txt").exists() and not (data / "job" / "tree" / "leak.txt").exists()

    ok, error = _local_run(tmp_path, OUT, "exit/result.txt", data / "job" / "result.txt")
    assert not ok and "refused" in error and "is not inside" in error, error
    ok, error = _local_run(tmp_path, OUT, "exit", data / "job", recursive=True)
    assert not ok and "refused" in error, error
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]

    # The workdir side: a symlink planted in the job's workdir after intake.
    (loc / "ok.txt").write_text("fine")
    (data / "job" / "planted").symlink_to(outside, target_is_directory=True)
    ok, error = _local_run(tmp_path, IN, "ok.txt", data / "job" / "planted" / "x")
    assert not ok and "refused" in error, error
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


def test_stage_in_writes_owner_only(tmp_path):
    loc = tmp_path / "loc"
    (loc / "in").mkdir(parents=True)
    (loc / "in" / "a.txt").write_text("a")
    os.chmod(loc / "in" / "a.txt", 0o644)
    (tmp_path / "data").mkdir()
    ok, error = _local_run(tmp_path, IN, "in", tmp_path / "data" / "app" / "job1" / "in", recursive=True)
    assert ok, error
    for folder in ("app", "app/job1", "app/job1/in"):
        assert stat.S_IMODE((tmp_path / "data" / folder).stat().st_mode) == 0o700, folder
    assert stat.S_IMODE((tmp_path / "data" / "app" / "job1" / "in" / "a.txt").stat().st_mode) == 0o600


def test_service_refuses_paths_outside_the_workdir(tmp_path):
    data = tmp_path / "site" / "data"
    data.mkdir(parents=True)
    reports: list = []
    service = TransferService(settings=TransferSettings(), locations={"aps": f"file://{tmp_path}"}, data_dir=data,
                              journal=TransferJournal(tmp_path / "j.sqlite"), report=reports.append)
    bad = [T.TransferItem(id=1, job_id=1, direction=common_pb2.TRANSFER_DIRECTION_IN, location_alias="aps",
                          remote_path="/a", local_path="../../escape", job_workdir="w1"),
           T.TransferItem(id=2, job_id=1, direction=common_pb2.TRANSFER_DIRECTION_IN, location_alias="aps",
                          remote_path="/a", local_path="ok", job_workdir="../.."),
           T.TransferItem(id=3, job_id=1, direction=common_pb2.TRANSFER_DIRECTION_IN, location_alias="aps",
                          remote_path="/../../etc/passwd", local_path="ok", job_workdir="w1")]
    answer = asyncio.run(service.accept(bad))
    errors = [i.error for i in answer.transfers.items]
    assert all(i.state == T.TRANSFER_STATE_ERROR for i in answer.transfers.items)
    assert "leaves the job's workdir" in errors[0] and "not inside the site's data folder" in errors[1]
    assert "leaves the root" in errors[2]


# ---------------------------------------------------------------------------- rsync

def _item(direction: str, recursive: bool = False) -> Item:
    return Item(id=1, job_id=1, direction=direction, location="r", remote="/run1/raw.h5" if not recursive else "/calib",
                local=Path("/site/data/w1/raw.h5" if not recursive else "/site/data/w1/calib"), recursive=recursive)


def test_rsync_argv():
    loc = parse_location("r", "rsync://alice@dtn.example.org:2222/srv")
    settings = RsyncSettings(extra_args=["--bwlimit=100M"])
    argv = rsync_argv(_item(IN), loc, settings)
    assert argv == ["rsync", "-lptgoD", "--chmod=go-rwx", "--partial", "--mkpath", "--stats", "-e",
                    "ssh -o BatchMode=yes -p 2222",
                    "--bwlimit=100M", "alice@dtn.example.org:/srv/run1/raw.h5", "/site/data/w1/raw.h5"]
    argv = rsync_argv(_item(OUT, recursive=True), parse_location("r", "rsync://bob@h/"), RsyncSettings())
    assert argv[1] == "-a" and argv[-2:] == ["/site/data/w1/calib/", "bob@h:/calib/"]
    assert argv[argv.index("-e") + 1] == "ssh -o BatchMode=yes"
    with pytest.raises(LocationError):
        rsync_argv(Item(id=1, job_id=1, direction=IN, location="r", remote="/../x", local=Path("/w/x")),
                   parse_location("r", "rsync://a@h/srv"), RsyncSettings())


STATS = """
Number of files: 3 (reg: 2, dir: 1)
Number of created files: 2 (reg: 2)
Number of regular files transferred: 2
Total file size: 1,048,586 bytes
Total transferred file size: 1,048,586 bytes
sent 1,049,000 bytes  received 60 bytes  2,098,120.00 bytes/sec
"""


def test_rsync_stats_and_failures():
    assert parse_stats(STATS) == (2, 1_048_586, 1_048_586)
    assert parse_stats("garbage") == (0, 0, 0)
    msg = describe_failure(23, 'rsync: [sender] link_stat "/srv/x" failed: No such file or directory (2)\n')
    assert msg.startswith("rsync exit 23 (partial transfer due to error)") and "No such file" in msg
    assert "ssh failed" in describe_failure(255, "")


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed")
def test_rsync_real_run_through_a_stand_in_ssh(tmp_path):
    """rsync really runs: the "ssh" is a script that drops the host and runs the remote
    side locally, so no ssh server is needed."""
    fake_ssh = tmp_path / "fake-ssh"
    fake_ssh.write_text('#!/bin/sh\n# usage: fake-ssh [options] host command...\n'
                        'while [ "${1#-}" != "$1" ]; do case "$1" in -p|-o|-l) shift 2;; *) shift;; esac; done\n'
                        'shift\nexec sh -c "$*"\n')
    fake_ssh.chmod(fake_ssh.stat().st_mode | stat.S_IEXEC)
    remote = tmp_path / "remote"
    _tree(remote / "calib")
    loc = parse_location("r", f"rsync://me@nohost{remote}")
    backend = RsyncBackend(loc, RsyncSettings(ssh_command=str(fake_ssh)), data_dir=tmp_path / "site",
                           wake=lambda: None)
    work = tmp_path / "site" / "w1"
    items = [Item(id=1, job_id=1, direction=IN, location="r", remote="/calib", local=work / "calib", recursive=True),
             Item(id=2, job_id=1, direction=IN, location="r", remote="/calib/a.txt", local=work / "a.txt"),
             Item(id=3, job_id=1, direction=IN, location="r", remote="/missing.txt", local=work / "m.txt")]
    task = Task(key="k1", location="r", direction=IN, items=items)

    async def run_task(task: Task) -> object:
        await backend.submit(task)
        while True:
            status = await backend.poll(task)
            if status.done:
                return status
            await asyncio.sleep(0.05)

    status = asyncio.run(run_task(task))
    assert (work / "calib" / "sub" / "b.txt").read_text() == "beta!"
    assert (work / "a.txt").read_text() == "alpha"
    assert status.outcomes[1].ok and status.outcomes[1].bytes == 10 and status.outcomes[1].files == 2
    assert status.outcomes[2].ok and status.outcomes[2].bytes == 5
    assert not status.outcomes[3].ok and "rsync exit 23" in status.outcomes[3].error
    assert not status.ok
    for path in (work, work / "calib", work / "calib" / "sub"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    assert stat.S_IMODE((work / "a.txt").stat().st_mode) == 0o600

    # A symlink planted in the workdir after intake: refused, nothing written outside.
    outside = tmp_path / "outside"
    outside.mkdir()
    (work / "planted").symlink_to(outside, target_is_directory=True)
    task = Task(key="k2", location="r", direction=IN, items=[
        Item(id=4, job_id=1, direction=IN, location="r", remote="/calib/a.txt", local=work / "planted" / "a.txt")])
    status = asyncio.run(run_task(task))
    assert not status.outcomes[4].ok and "refused" in status.outcomes[4].error
    assert list(outside.iterdir()) == []
