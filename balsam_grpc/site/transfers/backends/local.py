"""file:// locations: copies on this machine, in a worker thread per task.

Every file is copied to a temporary name beside its destination and renamed into place,
so a destination file is either absent or complete. A file already in place with the
size and modification time of its source (copies keep the source's times) is skipped:
after a restart the copy resumes where it stopped and copies nothing twice.
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


def _same(src: os.stat_result, dst: Path) -> bool:
    try:
        st = dst.stat()
    except FileNotFoundError:
        return False
    return st.st_size == src.st_size and st.st_mtime_ns == src.st_mtime_ns


def copy_file(src: Path, dst: Path, stats: CopyStats, limiter: Limiter, stop: threading.Event) -> None:
    st = src.stat()
    stats.files += 1
    stats.bytes += st.st_size
    if _same(st, dst):
        stats.skipped_files += 1
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}{PART_SUFFIX}")
    with open(src, "rb") as fin, open(tmp, "wb") as fout:
        while True:
            if stop.is_set():
                raise Stopped()
            chunk = fin.read(CHUNK)
            if not chunk:
                break
            fout.write(chunk)
            stats.copied_bytes += len(chunk)
            limiter.account(len(chunk))
    shutil.copystat(src, tmp)
    os.replace(tmp, dst)


def copy_path(src: Path, dst: Path, recursive: bool, *, bandwidth_mb_s: float = 0.0,
              stop: threading.Event | None = None) -> CopyStats:
    """Copy a file, or a directory tree when `recursive`; raises TransferFailed with a
    clear message for what the user can fix (missing source, a directory in a file slot)."""
    stop = stop or threading.Event()
    stats = CopyStats()
    limiter = Limiter(bandwidth_mb_s)
    if not src.exists():
        raise TransferFailed(f"source not found: {src}")
    if src.is_dir():
        if not recursive:
            raise TransferFailed(f"source {src} is a directory, but the app's transfer slot is not recursive")
        dst.mkdir(parents=True, exist_ok=True)
        for root, dirs, files in os.walk(src):
            dirs.sort()
            rel = Path(root).relative_to(src)
            (dst / rel).mkdir(parents=True, exist_ok=True)
            for name in sorted(files):
                if name.endswith(PART_SUFFIX):
                    continue
                copy_file(Path(root) / name, dst / rel / name, stats, limiter, stop)
        return stats
    if dst.is_dir():
        raise TransferFailed(f"destination {dst} is a directory; the slot names a file")
    copy_file(src, dst, stats, limiter, stop)
    return stats


class LocalBackend:
    can_adopt = False

    def __init__(self, location: Location, *, bandwidth_mb_s: float = 0.0, wake: Callable[[], None]) -> None:
        self.location = location
        self.bandwidth_mb_s = bandwidth_mb_s
        self.wake = wake
        self.running: dict[str, Future[dict[int, ItemOutcome]]] = {}
        self.started: dict[str, float] = {}
        self.stop = threading.Event()

    def _paths(self, task: Task, item_remote: str, item_local: Path, direction: str) -> tuple[Path, Path]:
        remote = Path(self.location.resolve(item_remote))
        return (remote, item_local) if direction == IN else (item_local, remote)

    def _run(self, task: Task) -> dict[int, ItemOutcome]:
        out: dict[int, ItemOutcome] = {}
        for item in task.items:
            try:
                src, dst = self._paths(task, item.remote, item.local, item.direction)
                stats = copy_path(src, dst, item.recursive, bandwidth_mb_s=self.bandwidth_mb_s, stop=self.stop)
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
