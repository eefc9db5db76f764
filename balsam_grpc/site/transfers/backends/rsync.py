"""rsync://user@host[:port]/root locations: rsync over ssh, one rsync per item, the
items of a task one after the other.

`rsync_argv` (pure) builds the command line; `parse_stats` (pure) reads the figures of
`--stats`. rsync itself makes a repeat cheap (files already in place are skipped), so a
task resumed after a restart copies nothing twice.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path

import structlog

from balsam_grpc.core.confined import PathEscape, inside, make_dirs_inside
from balsam_grpc.site.transfers.backends.base import TransferFailed
from balsam_grpc.site.transfers.config import Location, LocationError, RsyncSettings
from balsam_grpc.site.transfers.model import IN, Item, ItemOutcome, Status, Task

log = structlog.get_logger(__name__)

# rsync exit codes whose cause is worth naming (man rsync, EXIT VALUES).
EXIT_REASONS = {
    1: "syntax or usage error", 2: "protocol incompatibility", 3: "errors selecting input/output files",
    5: "error starting client-server protocol", 10: "error in socket I/O", 11: "error in file I/O",
    12: "error in rsync protocol data stream", 23: "partial transfer due to error",
    24: "partial transfer due to vanished source files", 30: "timeout in data send/receive",
    35: "timeout waiting for daemon connection", 255: "ssh failed (host unreachable or login refused)",
}


def rsync_argv(item: Item, location: Location, settings: RsyncSettings, *, rsync: str = "rsync") -> list[str]:
    """The rsync command line of one item. Directories (recursive slots) copy their
    contents into the destination directory (trailing slashes); files copy to the exact
    destination path. --mkpath creates missing destination folders."""
    ssh = settings.ssh_command + (f" -p {location.port}" if location.port else "")
    remote = f"{location.user}@{location.host}:{location.resolve(item.remote)}"
    local = str(item.local)
    src, dst = (remote, local) if item.direction == IN else (local, remote)
    flags = ["-a"] if item.recursive else ["-lptgoD"]  # -a without -r: a file slot never copies a tree
    if item.direction == IN:
        flags.append("--chmod=go-rwx")  # what is staged into a workdir is the job's: owner-only
    if item.recursive:
        src, dst = src.rstrip("/") + "/", dst.rstrip("/") + "/"
    return [rsync, *flags, "--partial", "--mkpath", "--stats", "-e", ssh, *settings.extra_args, src, dst]


_FILES = re.compile(r"Number of regular files transferred:\s*([\d,.]+)")
_SIZE = re.compile(r"Total file size:\s*([\d,.]+)")
_SENT = re.compile(r"Total transferred file size:\s*([\d,.]+)")


def _number(text: str) -> int:
    return int(re.sub(r"[,.]", "", text) or 0)


def parse_stats(output: str) -> tuple[int, int, int]:
    """(files transferred, total size of the item's files, bytes transferred) from --stats."""
    files = _FILES.search(output)
    size = _SIZE.search(output)
    sent = _SENT.search(output)
    return (_number(files.group(1)) if files else 0, _number(size.group(1)) if size else 0,
            _number(sent.group(1)) if sent else 0)


def describe_failure(code: int, stderr: str) -> str:
    reason = EXIT_REASONS.get(code, "failed")
    tail = " | ".join(line.strip() for line in stderr.strip().splitlines()[-3:] if line.strip())
    return f"rsync exit {code} ({reason})" + (f": {tail}" if tail else "")


class RsyncBackend:
    can_adopt = False

    def __init__(self, location: Location, settings: RsyncSettings, *, data_dir: Path,
                 wake: Callable[[], None]) -> None:
        self.location = location
        self.data_dir = data_dir
        self.settings = settings
        self.wake = wake
        self.running: dict[str, asyncio.Task[dict[int, ItemOutcome]]] = {}
        self.rsync = shutil.which("rsync")

    async def _item(self, item: Item) -> ItemOutcome:
        assert self.rsync is not None
        try:
            argv = rsync_argv(item, self.location, self.settings, rsync=self.rsync)
            # The workdir side was confined when the item was taken in; a symlink planted
            # since must not carry the copy out of the site's data folder.
            inside(item.local, self.data_dir, what="local path", allow_root=False)
            if item.direction == IN:
                make_dirs_inside(item.local.parent, self.data_dir, what="local folder")
        except LocationError as exc:
            return ItemOutcome(ok=False, error=str(exc))
        except PathEscape as exc:
            return ItemOutcome(ok=False, error=f"refused: {exc}")
        log.debug("rsync", argv=shlex.join(argv))
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE, start_new_session=True)
        try:
            out, err = await proc.communicate()
        except asyncio.CancelledError:
            proc.kill()
            raise
        if proc.returncode != 0:
            return ItemOutcome(ok=False, error=describe_failure(proc.returncode or 0, err.decode(errors="replace")))
        files, size, _sent = parse_stats(out.decode(errors="replace"))
        return ItemOutcome(ok=True, bytes=size, files=max(files, 1 if size else 0))

    async def _run(self, task: Task) -> dict[int, ItemOutcome]:
        try:
            return {item.id: await self._item(item) for item in task.items}
        finally:
            self.wake()

    async def prepare(self, task: Task) -> None:
        if self.rsync is None:
            raise TransferFailed("rsync is not installed on this machine (needed by location "
                                 f"{self.location.alias!r}: {self.location.url})")

    async def submit(self, task: Task) -> str:
        await self.prepare(task)
        if task.key not in self.running:
            self.running[task.key] = asyncio.create_task(self._run(task), name=f"rsync {task.key}")
        return f"rsync-{task.key}"

    async def poll(self, task: Task) -> Status:
        running = self.running.get(task.key)
        if running is None:
            await self.submit(task)  # started before a restart: rsync skips what is already there
            return Status(done=False, detail="resumed")
        if not running.done():
            return Status(done=False)
        self.running.pop(task.key, None)
        if running.exception() is not None:
            exc = running.exception()
            return Status(done=True, ok=False, error=f"rsync failed: {type(exc).__name__}: {exc}")
        outcomes = running.result()
        return Status(done=True, ok=all(o.ok for o in outcomes.values()), outcomes=outcomes,
                      bytes=sum(o.bytes for o in outcomes.values()), files=sum(o.files for o in outcomes.values()))

    async def cancel(self, task: Task) -> None:
        running = self.running.pop(task.key, None)
        if running is not None:
            running.cancel()

    def close(self) -> None:
        for running in self.running.values():
            running.cancel()
