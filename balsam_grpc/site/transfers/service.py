"""The site's transfer service: takes the transfer items the server pushes, batches them
per (direction, location), runs at most N tasks per location at once, polls the active
ones and reports every change back.

    accept(items)  -> the answer to a "transfer:<item>" work item: the item's state here
                      (queued = PENDING, in a task = ACTIVE, finished = DONE / ERROR)
    run()          -> dispatch queued items into tasks, poll tasks, until cancelled

Reports go out through `report(WorkResult)` with work ids "transfer-task:<key>:<phase>";
the stream keeps them until the server acknowledges them. Every task is journaled
before it starts (journal.py), so nothing is lost or started twice across a restart.
Nothing hangs: a submission that keeps failing, a task that fails, or a task still
unfinished after `task_deadline_s` ends as ERROR on its items with a clear message.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from balsam_grpc.core.backoff import Backoff
from balsam_grpc.site.transfers.backends import Backend, TransferFailed, TransferUnavailable, make_backend
from balsam_grpc.site.transfers.config import Location, LocationError, TransferSettings, parse_location
from balsam_grpc.site.transfers.journal import TransferJournal
from balsam_grpc.site.transfers.model import (
    DONE,
    ERROR,
    IN,
    NEW,
    OUT,
    SUBMITTED,
    Item,
    ItemOutcome,
    Task,
    plan_batches,
    share,
)
from balsam_grpc.v1 import common_pb2, site_service_pb2, transfer_item_pb2

log = structlog.get_logger(__name__)

T = transfer_item_pb2
REPORT_PREFIX = "transfer-task"
_DIRECTIONS = {common_pb2.TRANSFER_DIRECTION_IN: IN, common_pb2.TRANSFER_DIRECTION_OUT: OUT}
# Finished tasks are kept this long in the journal (to answer a re-offer of their items).
JOURNAL_RETENTION_S = 7 * 24 * 3600.0
MAX_BACKOFF_S = 60.0


def work_id(task: Task, phase: str) -> str:
    return f"{REPORT_PREFIX}:{task.key}:{phase}"


def _pb_item(item_id: int, state: int, *, task_id: str = "", error: str = "", bytes_: int = 0, files: int = 0,
             duration: float = 0.0) -> T.TransferItem:
    msg = T.TransferItem(id=item_id, state=state, task_id=task_id, error=error[:4000])
    if bytes_ or files or duration:
        msg.metrics.CopyFrom(T.TransferMetrics(bytes=bytes_, files=files, duration_seconds=round(duration, 3)))
    return msg


def task_item_messages(task: Task) -> list[T.TransferItem]:
    """The items of a task in the state the task gives them."""
    if task.state == NEW:
        return [_pb_item(i.id, T.TRANSFER_STATE_PENDING) for i in task.items]
    if task.state == SUBMITTED:
        return [_pb_item(i.id, T.TRANSFER_STATE_ACTIVE, task_id=task.task_id) for i in task.items]
    out = []
    for item in task.items:
        o = task.outcomes.get(item.id) or ItemOutcome(ok=task.state == DONE, error=task.error)
        if o.ok:
            out.append(_pb_item(item.id, T.TRANSFER_STATE_DONE, task_id=task.task_id, bytes_=o.bytes, files=o.files,
                                duration=task.duration))
        else:
            out.append(_pb_item(item.id, T.TRANSFER_STATE_ERROR, task_id=task.task_id,
                                error=o.error or task.error or "transfer failed", duration=task.duration))
    return out


class TransferService:
    def __init__(self, *, settings: TransferSettings, locations: dict[str, str], data_dir: Path,
                 journal: TransferJournal, report: Callable[[site_service_pb2.WorkResult], Any],
                 site_dir: Path | None = None,
                 backend_factory: Callable[[Location], Backend] | None = None) -> None:
        self.settings = settings
        self.data_dir = data_dir.resolve()
        self.site_dir = site_dir or self.data_dir.parent
        self.journal = journal
        self.report = report
        self.locations: dict[str, Location] = {}
        self.location_errors: dict[str, str] = {}
        for alias, url in locations.items():
            try:
                self.locations[alias] = parse_location(alias, url)
            except LocationError as exc:
                self.location_errors[alias] = exc.message
        self._backend_factory = backend_factory or (
            lambda loc: make_backend(loc, settings, site_dir=self.site_dir, data_dir=self.data_dir,
                                     wake=self.wake))
        self.backends: dict[str, Backend] = {}
        # Queued items per (direction, location), with the time they were queued.
        self.queues: dict[tuple[str, str], list[tuple[float, Item]]] = {}
        self.queued: set[int] = set()
        self.tasks: dict[str, Task] = {}            # open tasks (NEW / SUBMITTED)
        self.starting: dict[str, asyncio.Task[None]] = {}
        self.next_poll: dict[str, float] = {}
        self._wake = asyncio.Event()
        self.loaded = False

    # ----- intake ---------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    def backend(self, alias: str) -> Backend:
        backend = self.backends.get(alias)
        if backend is None:
            backend = self.backends[alias] = self._backend_factory(self.locations[alias])
        return backend

    def _local_path(self, msg: T.TransferItem) -> Path:
        workdir = (self.data_dir / msg.job_workdir).resolve()
        if not msg.job_workdir or not workdir.is_relative_to(self.data_dir) or workdir == self.data_dir:
            raise LocationError(f"job workdir {msg.job_workdir!r} is not inside the site's data folder")
        path = (workdir / msg.local_path).resolve()
        if not path.is_relative_to(workdir) or path == workdir:
            raise LocationError(f"local path {msg.local_path!r} leaves the job's workdir")
        return path

    def _item(self, msg: T.TransferItem) -> Item:
        alias = msg.location_alias
        if alias in self.location_errors:
            raise LocationError(f"location {alias!r}: {self.location_errors[alias]}")
        if alias not in self.locations:
            known = ", ".join(sorted(self.locations)) or "none"
            raise LocationError(f"location {alias!r} is not in transfer_locations of the site's settings.yml "
                                f"(known: {known})")
        direction = _DIRECTIONS.get(msg.direction)
        if direction is None:
            raise LocationError("the item has no direction")
        self.locations[alias].resolve(msg.remote_path)  # refuses paths that leave the location's root
        return Item(id=msg.id, job_id=msg.job_id, direction=direction, location=alias, remote=msg.remote_path,
                    local=self._local_path(msg), recursive=msg.recursive, slot=msg.slot)

    def _known(self, msg: T.TransferItem) -> T.TransferItem | None:
        """The item's state from the journal, or None when it must be (re)queued."""
        task = self.journal.task_of_item(msg.id)  # the journal is written on every change
        if task is None:
            return None
        if task.state in (DONE, ERROR) and msg.state == T.TRANSFER_STATE_PENDING and \
                msg.update_time.ToSeconds() > task.finished + 1:
            return None  # the server's item changed after our final report: a retry
        return next(m for m in task_item_messages(task) if m.id == msg.id)

    async def accept(self, items: list[T.TransferItem]) -> site_service_pb2.WorkResult:
        """Take items the server pushed; answer each with its state here at once."""
        self._load()
        answers = []
        for msg in items:
            if msg.id in self.queued:
                answers.append(_pb_item(msg.id, T.TRANSFER_STATE_PENDING))
                continue
            known = self._known(msg)
            if known is not None:
                answers.append(known)
                continue
            try:
                item = self._item(msg)
            except LocationError as exc:
                log.warning("transfer item refused", item_id=msg.id, job_id=msg.job_id, error=exc.message)
                answers.append(_pb_item(msg.id, T.TRANSFER_STATE_ERROR, error=exc.message))
                continue
            if msg.state == T.TRANSFER_STATE_ACTIVE and msg.task_id and self.backend(item.location).can_adopt:
                answers.append(self._adopt(item, msg.task_id))
                continue
            self.queues.setdefault((item.direction, item.location), []).append((time.monotonic(), item))
            self.queued.add(item.id)
            answers.append(_pb_item(msg.id, T.TRANSFER_STATE_PENDING))
        self.wake()
        return site_service_pb2.WorkResult(transfers=site_service_pb2.TransferUpdate(items=answers))

    def _adopt(self, item: Item, task_id: str) -> T.TransferItem:
        """An ACTIVE item whose task this journal does not know (it was lost): track the
        backend task again instead of starting a second one."""
        task = self.journal.task_by_backend_id(item.location, task_id)
        if task is None:
            task = Task(key=uuid.uuid4().hex, location=item.location, direction=item.direction, items=[item],
                        state=SUBMITTED, task_id=task_id, created=time.time(), submitted=time.time())
            self.journal.add_task(task)
            self.tasks[task.key] = task
            log.info("transfer task adopted", task=task.key, task_id=task_id, item_id=item.id)
        else:
            task = self.tasks.get(task.key, task)
            if all(i.id != item.id for i in task.items):
                task.items.append(item)
                self.journal.add_task_item(task, item)
        self.tasks.setdefault(task.key, task)
        return _pb_item(item.id, T.TRANSFER_STATE_ACTIVE, task_id=task_id)

    # ----- the loop -------------------------------------------------------------------
    def _load(self) -> None:
        if self.loaded:
            return
        self.loaded = True
        pruned = self.journal.prune(JOURNAL_RETENTION_S)
        for task in self.journal.open_tasks():
            self.tasks[task.key] = task
        if self.tasks or pruned:
            log.info("transfer journal loaded", open_tasks=len(self.tasks), pruned=pruned)

    async def run(self) -> None:
        self._load()
        try:
            while True:
                self._wake.clear()
                now = time.monotonic()
                self._dispatch(now)
                await self._poll_due(now)
                delay = self._next_timer(time.monotonic())
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
                # cancellation that races with the event, and the service would never stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
        finally:
            for starting in self.starting.values():
                starting.cancel()
            for backend in self.backends.values():
                close = getattr(backend, "close", None)
                if close is not None:
                    close()

    def _in_flight(self, alias: str) -> int:
        return sum(1 for t in self.tasks.values() if t.location == alias)

    def _dispatch(self, now: float) -> None:
        """Queued items into new tasks, within the per-location limit."""
        s = self.settings
        for (direction, alias), queue in list(self.queues.items()):
            if not queue:
                continue
            room = s.max_tasks_per_location - self._in_flight(alias)
            if room <= 0:
                continue
            oldest = queue[0][0]
            if len(queue) < s.batch_size and now - oldest < s.batch_linger_s:
                continue  # let the batch fill a little
            items = [item for _, item in queue]
            for batch in plan_batches(items, s.batch_size, room):
                task = Task(key=uuid.uuid4().hex, location=alias, direction=direction, items=batch,
                            created=time.time())
                self.journal.add_task(task)  # before anything starts
                self.tasks[task.key] = task
                for item in batch:
                    self.queued.discard(item.id)
                del queue[:len(batch)]
                self.starting[task.key] = asyncio.create_task(self._start(task), name=f"transfer start {task.key}")
                log.info("transfer task created", task=task.key, location=alias, direction=direction,
                         items=len(batch))

    def _next_timer(self, now: float) -> float:
        delays = [max(0.0, t - now) for t in self.next_poll.values()]
        for queue in self.queues.values():
            if queue:
                delays.append(max(0.0, queue[0][0] + self.settings.batch_linger_s - now))
        return min(delays, default=3600.0) + 0.001

    async def _start(self, task: Task) -> None:
        """Submit a NEW task (or resubmit one found in the journal after a restart),
        retrying an unreachable backend with backoff."""
        try:
            backend = self.backend(task.location)
            delays = Backoff(initial=max(self.settings.api_backoff_s, 0.01), maximum=MAX_BACKOFF_S)
            while True:
                try:
                    if not task.submission_id:
                        await backend.prepare(task)
                        if task.submission_id:  # journaled BEFORE the submission
                            self.journal.update_task(task, submission_id=task.submission_id)
                    task_id = await backend.submit(task)
                except TransferUnavailable as exc:
                    attempts = task.attempts + 1
                    self.journal.update_task(task, attempts=attempts)
                    if attempts >= self.settings.api_attempts:
                        self._finish(task, ERROR, error=f"{exc} (gave up after {attempts} attempts; the items can be "
                                                        "retried with `balsamctl transfers retry`)")
                        return
                    delay = delays.next_delay()
                    log.warning("transfer submission will be retried", task=task.key, attempt=attempts,
                                in_seconds=round(delay, 3), error=str(exc))
                    await asyncio.sleep(delay)
                    continue
                break
            self.journal.update_task(task, state=SUBMITTED, task_id=task_id, submitted=time.time())
            self.next_poll[task.key] = time.monotonic() + self._poll_period(backend)
            self.report(site_service_pb2.WorkResult(
                work_id=work_id(task, "active"),
                transfers=site_service_pb2.TransferUpdate(items=task_item_messages(task))))
        except asyncio.CancelledError:
            raise
        except TransferFailed as exc:
            self._finish(task, ERROR, error=str(exc))
        except Exception as exc:  # noqa: BLE001 - never leave items hanging
            log.exception("transfer submission failed", task=task.key)
            self._finish(task, ERROR, error=f"submission failed: {type(exc).__name__}: {exc}")
        finally:
            self.starting.pop(task.key, None)
            self.wake()

    def _poll_period(self, backend: Backend) -> float:
        # Local and rsync tasks wake the service when they end; Globus is polled.
        return self.settings.poll_seconds if backend.can_adopt else min(self.settings.poll_seconds, 5.0)

    async def _poll_due(self, now: float) -> None:
        for task in list(self.tasks.values()):
            if task.key in self.starting:
                continue
            if task.state == NEW:
                # Found NEW in the journal after a restart: submit it again (same submission id).
                self.starting[task.key] = asyncio.create_task(self._start(task), name=f"transfer start {task.key}")
                continue
            backend = self.backend(task.location)
            due = self.next_poll.get(task.key, 0.0)
            if due > now and backend.can_adopt:
                continue
            self.next_poll[task.key] = now + self._poll_period(backend)
            await self._poll(task, backend)

    async def _poll(self, task: Task, backend: Backend) -> None:
        overdue = time.time() - task.created > self.settings.task_deadline_s
        try:
            status = await backend.poll(task)
        except TransferUnavailable as exc:
            log.warning("transfer task poll failed", task=task.key, error=str(exc))
            if overdue:
                self._finish(task, ERROR, error=f"transfer task {task.task_id} could not be checked before its deadline "
                                                f"({self.settings.task_deadline_s:g} s): {exc}")
            return
        except TransferFailed as exc:
            self._finish(task, ERROR, error=str(exc))
            return
        except Exception as exc:  # noqa: BLE001
            log.exception("transfer task poll failed", task=task.key)
            self._finish(task, ERROR, error=f"checking the transfer task failed: {type(exc).__name__}: {exc}")
            return
        if status.done:
            outcomes = status.outcomes
            if not outcomes:  # task-level figures only: spread them over the items
                n = len(task.items)
                outcomes = {i.id: ItemOutcome(ok=status.ok, error=status.error, bytes=b, files=f)
                            for i, b, f in zip(task.items, share(status.bytes, n), share(status.files, n),
                                               strict=True)}
            self._finish(task, DONE if status.ok else ERROR, error=status.error, outcomes=outcomes,
                         bytes_=status.bytes, files=status.files)
            return
        if overdue:
            with contextlib.suppress(Exception):
                await backend.cancel(task)
            self._finish(task, ERROR, error=f"transfer task {task.task_id} did not finish within "
                                            f"{self.settings.task_deadline_s:g} s (transfers.task_deadline_s in "
                                            f"settings.yml){'; last status ' + status.detail if status.detail else ''}"
                                            "; it was cancelled")
        elif status.detail:
            log.debug("transfer task active", task=task.key, detail=status.detail)

    def _finish(self, task: Task, state: str, *, error: str = "", outcomes: dict[int, ItemOutcome] | None = None,
                bytes_: int = 0, files: int = 0) -> None:
        outcomes = outcomes or {i.id: ItemOutcome(ok=state == DONE, error=error) for i in task.items}
        self.journal.finish_task(task, state, outcomes, error=error, bytes_=bytes_, files=files)
        self.tasks.pop(task.key, None)
        self.next_poll.pop(task.key, None)
        failed = sum(1 for o in outcomes.values() if not o.ok)
        duration = task.duration
        rate = (task.bytes / duration) if duration > 0 else 0.0
        log.info("transfer task finished", task=task.key, task_id=task.task_id, location=task.location,
                 direction=task.direction, items=len(task.items), failed=failed, bytes=task.bytes, files=task.files,
                 seconds=round(duration, 3), mb_per_s=round(rate / 1e6, 3), error=error[:300])
        self.report(site_service_pb2.WorkResult(
            work_id=work_id(task, "final"), transfers=site_service_pb2.TransferUpdate(items=task_item_messages(task))))
        self.wake()


def transfer_failure(work: site_service_pb2.StartTransfers, message: str) -> site_service_pb2.WorkResult:
    """The answer when taking a StartTransfers failed: its items fail with the message
    (their jobs fail with it rather than wait for a transfer no one runs)."""
    return site_service_pb2.WorkResult(transfers=site_service_pb2.TransferUpdate(
        items=[_pb_item(i.id, T.TRANSFER_STATE_ERROR, error=message) for i in work.items]))
