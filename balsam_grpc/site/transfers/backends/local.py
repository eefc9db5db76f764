"""file:// locations: copies on this machine, in a worker thread per task.

Every file is copied to a temporary name beside its destination and renamed into place,
so a destination file is either absent or complete. A file already in place with the
size and modification time of its source (copies keep the source's times) is skipped:
after a restart the copy resumes where it stopped and copies nothing twice.

Paths are confined by where they really lead (core/confined.py): every file read must
resolve inside the source side's root and every folder or file written inside the
destination side's, symlinks included. The location's root is one side, the site's data
folder the other; a stage-in writes owner-only folders and files (they are the job's).
A violation fails the item with the reason and reads or writes nothing outside.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import structlog

from balsam_grpc.core.confined import PRIVATE_DIR, PathEscape, inside, make_dirs_inside, open_private
from balsam_grpc.site.transfers.backends.base import TransferFailed
from balsam_grpc.site.transfers.config import Location, LocationError
from balsam_grpc.site.transfers.model import IN, ItemOutcome, Status, Task

log = structlog.get_logger(__name__)

CHUNK = 1 << 20
PART_SUFFIX = ".balsam-part"


class Stopped(Exception):
    """The copy was asked to stop (daemon shutting down)."""


@dataclass
class CopyStats:
    bytes: int = 0      # bytes of the item (copied or already in place)
    files: int = 0
    copied_bytes: int = 0
    skipped_files: int = 0


class Limiter:
    """Keeps a copy under `mb_s` megabytes per second (0 = no limit)."""

    def __init__(self, mb_s: float) -> None:
        self.rate = mb_s * 1e6
        self.start = time.monotonic()
        self.sent = 0

    def account(self, n: int) -> None:
        if self.rate <= 0:
            return
        self.sent += n
        ahead = self.sent / self.rate - (time.monotonic() - self.start)
        if ahead > 0:
            time.sleep(ahead)


@dataclass(frozen=True)
class Sides:
    """The folders a copy's source and destination must stay in, and whether what it
    writes is the job's (owner-only)."""

    source_root: Path
    destination_root: Path
    private: bool = False


def _same(src: os.stat_result, dst: Path) -> bool:
    try:
        st = dst.lstat()
    except FileNotFoundError:
        return False
    return st.st_size == src.st_size and st.st_mtime_ns == src.st_mtime_ns


def copy_file(src: Path, dst: Path, sides: Sides, stats: CopyStats, limiter: Limiter, stop: threading.Event) -> None:
    src = inside(src, sides.source_root, what="source file")
    st = src.stat()
    stats.files += 1
    stats.bytes += st.st_size
    if _same(st, dst):
        stats.skipped_files += 1
        return
    make_dirs_inside(dst.parent, sides.destination_root, mode=PRIVATE_DIR if sides.private else 0o777,
                     what="destination folder")
    tmp = dst.with_name(f".{dst.name}{PART_SUFFIX}")
    fd = open_private(tmp) if sides.private else open_private(tmp, mode=0o666)
    with open(src, "rb") as fin, os.fdopen(fd, "wb") as fout:
        while True:
            if stop.is_set():
                raise Stopped()
            chunk = fin.read(CHUNK)
            if not chunk:
                break
            fout.write(chunk)
            stats.copied_bytes += len(chunk)
            limiter.account(len(chunk))
    shutil.copystat(src, tmp, follow_symlinks=False)
    if sides.private:
        os.chmod(tmp, st.st_mode & 0o700, follow_symlinks=False)
    os.replace(tmp, dst)


def copy_path(src: Path, dst: Path, recursive: bool, sides: Sides, *, bandwidth_mb_s: float = 0.0,
              stop: threading.Event | None = None) -> CopyStats:
    """Copy a file, or a directory tree when `recursive`; raises TransferFailed with a
    clear message for what the user can fix (missing source, a directory in a file slot,
    a path leading outside its root)."""
    stop = stop or threading.Event()
    stats = CopyStats()
    limiter = Limiter(bandwidth_mb_s)
    try:
        src = inside(src, sides.source_root, what="source")
        dst = inside(dst, sides.destination_root, what="destination")
        if not src.exists():
            raise TransferFailed(f"source not found: {src}")
        if src.is_dir():
            if not recursive:
                raise TransferFailed(f"source {src} is a directory, but the app's transfer slot is not recursive")
            mode = PRIVATE_DIR if sides.private else 0o777
            make_dirs_inside(dst, sides.destination_root, mode=mode, what="destination", allow_root=True)
            for root, dirs, files in os.walk(src):  # never descends into a symlinked folder
                dirs.sort()
                rel = Path(root).relative_to(src)
                make_dirs_inside(dst / rel, sides.destination_root, mode=mode, what="destination folder",
                                 allow_root=True)
                for name in sorted(files):
                    if name.endswith(PART_SUFFIX):
                        continue
                    copy_file(Path(root) / name, dst / rel / name, sides, stats, limiter, stop)
            return stats
        if dst.is_dir():
            raise TransferFailed(f"destination {dst} is a directory; the slot names a file")
        copy_file(src, dst, sides, stats, limiter, stop)
    except PathEscape as exc:
        raise TransferFailed(f"refused: {exc}") from None
    return stats


class LocalBackend:
    can_adopt = False

    def __init__(self, location: Location, *, data_dir: Path, bandwidth_mb_s: float = 0.0,
                 wake: Callable[[], None]) -> None:
        self.location = location
        self.data_dir = data_dir
        self.bandwidth_mb_s = bandwidth_mb_s
        self.wake = wake
        self.running: dict[str, Future[dict[int, ItemOutcome]]] = {}
        self.started: dict[str, float] = {}
        self.stop = threading.Event()

    def _paths(self, item_remote: str, item_local: Path, direction: str) -> tuple[Path, Path, Sides]:
        remote = Path(self.location.resolve(item_remote))
        root = Path(self.location.root)
        if direction == IN:
            return remote, item_local, Sides(root, self.data_dir, private=True)
        return item_local, remote, Sides(self.data_dir, root)

    def _run(self, task: Task) -> dict[int, ItemOutcome]:
        out: dict[int, ItemOutcome] = {}
        for item in task.items:
            try:
                src, dst, sides = self._paths(item.remote, item.local, item.direction)
                stats = copy_path(src, dst, item.recursive, sides, bandwidth_mb_s=self.bandwidth_mb_s, stop=self.stop)
            except Stopped:
                raise
            except (TransferFailed, LocationError) as exc:
                out[item.id] = ItemOutcome(ok=False, error=str(exc))
            except OSError as exc:
                out[item.id] = ItemOutcome(ok=False, error=f"copy failed: {exc}")
            else:
                out[item.id] = ItemOutcome(ok=True, bytes=stats.bytes, files=stats.files)
                log.debug("copied", item_id=item.id, task=task.key, bytes=stats.bytes, files=stats.files,
                         copied_bytes=stats.copied_bytes, skipped_files=stats.skipped_files)
        return out

    def _start(self, task: Task) -> None:
        loop = asyncio.get_running_loop()
        future: Future[dict[int, ItemOutcome]] = Future()

        def work() -> None:
            try:
                future.set_result(self._run(task))
            except BaseException as exc:  # noqa: BLE001 - delivered to poll()
                future.set_exception(exc)
            finally:
                if not self.stop.is_set():
                    loop.call_soon_threadsafe(self.wake)

        self.running[task.key] = future
        self.started[task.key] = time.monotonic()
        threading.Thread(target=work, name=f"copy {task.key}", daemon=True).start()

    async def prepare(self, task: Task) -> None:
        return None

    async def submit(self, task: Task) -> str:
        if task.key not in self.running:
            self._start(task)
        return f"local-{task.key}"

    async def poll(self, task: Task) -> Status:
        future = self.running.get(task.key)
        if future is None:  # started by an earlier process: resume (files in place are skipped)
            self._start(task)
            return Status(done=False, detail="resumed")
        if not future.done():
            return Status(done=False)
        self.running.pop(task.key, None)
        exc = future.exception()
        if exc is not None:
            return Status(done=True, ok=False, error=f"copy failed: {type(exc).__name__}: {exc}")
        outcomes = future.result()
        ok = all(o.ok for o in outcomes.values())
        return Status(done=True, ok=ok, outcomes=outcomes, bytes=sum(o.bytes for o in outcomes.values()),
                      files=sum(o.files for o in outcomes.values()))

    async def cancel(self, task: Task) -> None:
        # Threads cannot be killed; the copy ends at its next chunk only when the daemon
        # stops. A task past its deadline is reported failed; its thread finishes or dies
        # with the process.
        self.running.pop(task.key, None)

    def close(self) -> None:
        self.stop.set()
