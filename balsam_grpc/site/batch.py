"""Batch jobs at the site: validate, render, submit, mirror scheduler states, cancel,
recover after a restart.

`check_batch_job` is pure. `BatchJobs` does the I/O through the scheduler adapter
(`balsam_grpc.site.schedulers`) and reports through the stream: a solicited result for
"submit:<id>"/"cancel:<id>" work, unsolicited BatchJobUpdates when the scheduler shows a
change, and a SchedulerSnapshot after each look at the scheduler.

Exactly once: every submission is journaled as an intent (batch job id + the pilot's
deterministic scheduler job name) before the scheduler is asked, and its scheduler id when
it answers. An intent left without a scheduler id (the daemon died in between, or the
submit command timed out) is resolved by asking the scheduler for that name: a job found is
adopted; only a definite "no such job" leads to a submission; "cannot tell now" leaves the
work unanswered (offered again after the next reconnect) rather than risk a second pilot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
from google.protobuf import timestamp_pb2

from balsam_grpc.core.backoff import Backoff
from balsam_grpc.site.processes import processes_naming
from balsam_grpc.core.validation import FIELD_LIMITS, clip_utf8
from balsam_grpc.site.journal import Journal, SubmitIntent, SubmittedJob
from balsam_grpc.site.schedulers import (
    SchedulerJob,
    SchedulerUnavailable,
    SubmitError,
    adoption_order,
    pilot_job_name,
    submitted_since,
)
from balsam_grpc.site.settings import SiteSettings
from balsam_grpc.v1 import batch_job_pb2, site_pb2, site_service_pb2

log = structlog.get_logger(__name__)

BJ = batch_job_pb2
# A job the scheduler no longer reports for this long is considered ended.
VANISHED_AFTER_S = 120.0
CANCEL_ATTEMPTS = 4
# Pauses between name lookups the scheduler could not answer (about a minute in all);
# after the last one the submission stays unanswered until the work is offered again.
FIND_DELAYS_S: tuple[float, ...] = (1, 2, 4, 8, 16, 30)
SNAPSHOT_REFRESH_S = 60.0

_SCHEDULER_TO_STATE = {
    "queued": BJ.BATCH_JOB_STATE_QUEUED,
    "running": BJ.BATCH_JOB_STATE_RUNNING,
    "finished": BJ.BATCH_JOB_STATE_FINISHED,
    "failed": BJ.BATCH_JOB_STATE_FINISHED,
}
_ORDER = {BJ.BATCH_JOB_STATE_PENDING_SUBMISSION: 0, BJ.BATCH_JOB_STATE_QUEUED: 1, BJ.BATCH_JOB_STATE_RUNNING: 2,
          BJ.BATCH_JOB_STATE_PENDING_DELETION: 2, BJ.BATCH_JOB_STATE_FINISHED: 3}


def check_batch_job(bj: batch_job_pb2.BatchJob, settings: SiteSettings) -> str | None:
    """Why this batch job may not be submitted from this site, or None."""
    if settings.allowed_projects and bj.project not in settings.allowed_projects:
        return (f"project {bj.project!r} is not allowed at site {settings.name}; allowed: "
                f"{', '.join(settings.allowed_projects)}")
    if settings.allowed_queues:
        limits = settings.allowed_queues.get(bj.queue)
        if limits is None:
            return (f"queue {bj.queue!r} is not allowed at site {settings.name}; allowed: "
                    f"{', '.join(settings.allowed_queues)}")
        if limits.max_nodes and bj.num_nodes > limits.max_nodes:
            return f"{bj.num_nodes} nodes exceed the limit of queue {bj.queue!r} ({limits.max_nodes})"
        if limits.max_wall_time_min and bj.wall_time_min > limits.max_wall_time_min:
            return (f"wall time {bj.wall_time_min} min exceeds the limit of queue {bj.queue!r} "
                    f"({limits.max_wall_time_min} min)")
    if bj.num_nodes < 1 or bj.wall_time_min < 1:
        return f"a batch job needs num_nodes >= 1 and wall_time_min >= 1 (got {bj.num_nodes}, {bj.wall_time_min})"
    used = sum(p.num_nodes for p in bj.partitions)
    if used > bj.num_nodes:
        return f"partitions use {used} nodes but the batch job has {bj.num_nodes}"
    return None


def timestamp(dt: datetime | None) -> timestamp_pb2.Timestamp | None:
    if dt is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt if dt.tzinfo else dt.replace(tzinfo=UTC))
    return ts


_STATUS_INFO_LIMIT = FIELD_LIMITS["balsam.v1.BatchJobUpdate.status_info"]


def update(batch_job_id: int, state: int, *, scheduler_id: str = "", status_info: str = "",
           start: datetime | None = None, end: datetime | None = None) -> site_service_pb2.WorkResult:
    msg = site_service_pb2.BatchJobUpdate(batch_job_id=batch_job_id, state=state, scheduler_id=scheduler_id,
                                          status_info=clip_utf8(status_info, _STATUS_INFO_LIMIT))
    if start is not None:
        msg.start_time.CopyFrom(timestamp(start))
    if end is not None:
        msg.end_time.CopyFrom(timestamp(end))
    return site_service_pb2.WorkResult(batch_job=msg)


@dataclass
class Tracked:
    batch_job_id: int
    scheduler_id: str
    queue: str
    reported: int               # last state the server has (or was sent)
    start: datetime | None = None
    missing_since: float | None = None


class BatchJobs:
    def __init__(self, *, settings: SiteSettings, scheduler: Any, journal: Journal, qsubmit_dir: Path,
                 render: Callable[[batch_job_pb2.BatchJob], str],
                 send_update: Callable[[site_service_pb2.WorkResult], bool],
                 send_snapshot: Callable[[site_pb2.SchedulerSnapshot], bool]) -> None:
        self.settings = settings
        self.scheduler = scheduler
        self.journal = journal
        self.qsubmit_dir = qsubmit_dir
        self.render = render
        self.send_update = send_update
        self.send_snapshot = send_snapshot
        self.tracked: dict[int, Tracked] = {}
        self.windows: list[Any] = []
        self._last_snapshot: tuple[bytes, float] = (b"", 0.0)
        self.find_delays_s = FIND_DELAYS_S

    def job_name(self, batch_job_id: int) -> str:
        return pilot_job_name(self.settings.name, batch_job_id)

    # ----- work items -----------------------------------------------------------------
    async def submit(self, bj: batch_job_pb2.BatchJob) -> site_service_pb2.WorkResult | None:
        """The result of "submit:<id>": QUEUED with the scheduler id, SUBMIT_FAILED with the
        reason, or None when the scheduler cannot say whether an interrupted submission
        reached it (left unanswered: the server offers the work again after a reconnect)."""
        earlier = self.journal.submitted(bj.id)
        if earlier is not None:
            # Submitted before a restart, result never acknowledged: report, never resubmit.
            log.info("batch job already submitted", batch_job_id=bj.id, scheduler_id=earlier.scheduler_id)
            self._track(bj.id, earlier.scheduler_id, bj.queue, BJ.BATCH_JOB_STATE_QUEUED)
            return update(bj.id, BJ.BATCH_JOB_STATE_QUEUED, scheduler_id=earlier.scheduler_id,
                          status_info="submitted")
        intent = self.journal.intent(bj.id)
        if intent is not None:
            # The daemon died (or a submit command timed out) between journaling the intent
            # and recording the scheduler's answer: the scheduler may hold the pilot.
            log.warning("resolving an interrupted submission", batch_job_id=bj.id, job_name=intent.job_name)
            found = await self._find(intent)
            if found is None:
                return self._undecided(bj, intent)
            if found:
                return self._adopt(bj, found, intent)
            log.info("interrupted submission never reached the scheduler: submitting", batch_job_id=bj.id,
                     job_name=intent.job_name)
        problem = check_batch_job(bj, self.settings)
        if problem is not None:
            log.warning("batch job refused", batch_job_id=bj.id, reason=problem)
            return self._failed(bj, problem)
        limits = self.settings.allowed_queues.get(bj.queue)
        if limits is not None and limits.max_queued:
            queued = sum(1 for t in self.tracked.values()
                         if t.queue == bj.queue and t.reported == BJ.BATCH_JOB_STATE_QUEUED)
            if queued >= limits.max_queued:
                return self._failed(bj, f"queue {bj.queue!r} already has {queued} batch jobs of this site queued "
                                        f"(allowed_queues.{bj.queue}.max_queued = {limits.max_queued})")
        try:
            text = self.render(bj)
        except Exception as exc:
            log.exception("batch script rendering failed", batch_job_id=bj.id)
            return self._failed(bj, f"batch script template: {exc}")
        script = self.qsubmit_dir / f"batch-{bj.id}.sh"
        script.write_text(text)
        script.chmod(0o700)  # it carries the token in its environment exports
        name = intent.job_name if intent is not None else self.job_name(bj.id)
        # Journaled (fsynced) before the scheduler is asked: from here on a crash leaves a
        # trace that makes the next attempt look for the job instead of submitting again.
        intent = SubmitIntent(name, intent.intent_time if intent is not None else time.time(), str(script))
        self.journal.record_intent(bj.id, intent)
        try:
            scheduler_id = await self.scheduler.submit(
                script, project=bj.project, queue=bj.queue, num_nodes=bj.num_nodes, wall_time_min=bj.wall_time_min,
                job_name=name, cwd=self.qsubmit_dir)
        except SubmitError as exc:
            if not exc.maybe_submitted:
                # Even a refusal can hide an accepted job (Slurm's "Socket timed out on
                # send/recv" after slurmctld queued it): one look by name before failing.
                found = await self._find(intent, retry=False)
                if found:
                    return self._adopt(bj, found, intent)
                log.warning("scheduler refused batch job", batch_job_id=bj.id, error=str(exc))
                return self._failed(bj, str(exc))
            return await self._after_unclear_submit(bj, intent, str(exc))
        except Exception as exc:  # an adapter failure: the command may have run
            log.exception("submission failed unexpectedly", batch_job_id=bj.id)
            return await self._after_unclear_submit(bj, intent, f"{type(exc).__name__}: {exc}")
        scheduler_id = str(scheduler_id)
        self.journal.record_submit(bj.id, SubmittedJob(scheduler_id, time.time(), str(script)))
        self._track(bj.id, scheduler_id, bj.queue, BJ.BATCH_JOB_STATE_QUEUED)
        log.info("batch job submitted", batch_job_id=bj.id, scheduler_id=scheduler_id, nodes=bj.num_nodes,
                 wall_time_min=bj.wall_time_min, queue=bj.queue, job_name=name)
        return update(bj.id, BJ.BATCH_JOB_STATE_QUEUED, scheduler_id=scheduler_id, status_info="submitted")

    def _failed(self, bj: batch_job_pb2.BatchJob, reason: str) -> site_service_pb2.WorkResult:
        """SUBMIT_FAILED: certain that the scheduler has no job for it, so no intent stays."""
        self.journal.drop_intent(bj.id)
        return update(bj.id, BJ.BATCH_JOB_STATE_SUBMIT_FAILED, status_info=reason)

    async def _after_unclear_submit(self, bj: batch_job_pb2.BatchJob, intent: SubmitIntent,
                                    error: str) -> site_service_pb2.WorkResult | None:
        """The submit command failed in a way that does not say whether the scheduler took
        the job (a timeout): the name decides."""
        log.warning("submission outcome unclear: looking the job up by name", batch_job_id=bj.id,
                    job_name=intent.job_name, error=error)
        found = await self._find(intent)
        if found is None:
            return self._undecided(bj, intent)
        if found:
            return self._adopt(bj, found, intent)
        return self._failed(bj, error)

    async def _find(self, intent: SubmitIntent, *, retry: bool = True) -> list[SchedulerJob] | None:
        """The jobs named like the intent, the one to adopt first; [] when the scheduler
        definitively has none; None when it could not say within the retries."""
        for attempt, delay in enumerate((*(self.find_delays_s if retry else ()), None)):
            await self._wait_for_submitters(intent.script)
            try:
                found = await self.scheduler.find_by_name(intent.job_name, submitted_after=intent.intent_time)
            except Exception:
                log.exception("scheduler lookup by name failed", job_name=intent.job_name)
                found = None
            if found is not None:
                return adoption_order(submitted_since(found, intent.intent_time))
            if delay is None:
                break
            log.info("scheduler cannot say yet whether it holds the job; asking again", job_name=intent.job_name,
                     attempt=attempt + 1, in_seconds=delay)
            await asyncio.sleep(delay)
        return None

    async def _wait_for_submitters(self, script: str) -> None:
        """A submit command of a killed daemon runs on (its own session): until it exits,
        the scheduler may not show its job yet. Wait for it, within the command timeout."""
        command = getattr(self.scheduler, "submit_command", "")
        if not command or not script:
            return
        deadline = time.monotonic() + float(getattr(self.scheduler, "timeout_s", 30.0)) + 5.0
        while await asyncio.to_thread(processes_naming, script, program=command) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)

    def _adopt(self, bj: batch_job_pb2.BatchJob, found: list[SchedulerJob],
               intent: SubmitIntent) -> site_service_pb2.WorkResult:
        job = found[0]
        if len(found) > 1:
            log.warning("several scheduler jobs carry this pilot's name; adopting one", batch_job_id=bj.id,
                        job_name=intent.job_name, adopted=job.scheduler_id,
                        others=[j.scheduler_id for j in found[1:]])
        self.journal.record_submit(bj.id, SubmittedJob(job.scheduler_id, time.time(), intent.script))
        self._track(bj.id, job.scheduler_id, bj.queue, BJ.BATCH_JOB_STATE_QUEUED)
        log.info("batch job adopted from the scheduler", batch_job_id=bj.id, scheduler_id=job.scheduler_id,
                 job_name=intent.job_name, scheduler_state=job.state)
        return update(bj.id, BJ.BATCH_JOB_STATE_QUEUED, scheduler_id=job.scheduler_id,
                      status_info=f"submitted (found in the scheduler as {intent.job_name} after an interrupted "
                                  "submission)")

    def _undecided(self, bj: batch_job_pb2.BatchJob, intent: SubmitIntent) -> None:
        log.error("cannot tell whether the scheduler holds this pilot; not submitting it again now",
                  batch_job_id=bj.id, job_name=intent.job_name)

    async def cancel(self, bj: batch_job_pb2.BatchJob) -> site_service_pb2.WorkResult:
        entry = self.journal.submitted(bj.id)
        scheduler_id = bj.scheduler_id or (entry.scheduler_id if entry else "")
        intent = self.journal.intent(bj.id)
        if not scheduler_id and intent is not None:
            # Cancelled while a submission was interrupted: the scheduler may hold it.
            found = await self._find(intent)
            if found is None:
                raise SchedulerUnavailable(
                    f"cannot tell whether the scheduler holds {intent.job_name}; cancel it by hand if it does")
            live = [j for j in found if j.state not in ("finished", "failed")]
            for job in live[1:]:
                await self.scheduler.cancel(job.scheduler_id)
            scheduler_id = live[0].scheduler_id if live else (found[0].scheduler_id if found else "")
        if scheduler_id:
            # A scheduler that cannot answer now (controller restarting) gets a few tries
            # before the work item fails; it is offered again after the next reconnect.
            delays = Backoff(initial=1.0, maximum=4.0)
            for attempt in range(CANCEL_ATTEMPTS):
                try:
                    await self.scheduler.cancel(scheduler_id)
                    break
                except Exception as exc:
                    if attempt == CANCEL_ATTEMPTS - 1:
                        raise
                    log.warning("cancel failed, retrying", batch_job_id=bj.id, scheduler_id=scheduler_id,
                                error=str(exc))
                    await asyncio.sleep(delays.next_delay())
            log.info("batch job cancelled", batch_job_id=bj.id, scheduler_id=scheduler_id)
        self.tracked.pop(bj.id, None)
        self.journal.forget([bj.id])
        info = "cancelled" if scheduler_id else "cancelled before submission"
        return update(bj.id, BJ.BATCH_JOB_STATE_FINISHED, scheduler_id=scheduler_id, status_info=info,
                      end=datetime.now(UTC))

    async def still_queued(self, batch_job_id: int) -> bool:
        """Whether the scheduler shows this batch job queued right now (False when it
        started, ended, or nothing can be said)."""
        entry = self.tracked.get(batch_job_id)
        if entry is None or not entry.scheduler_id:
            return False
        statuses = await self.scheduler.statuses([entry.scheduler_id])
        job = (statuses or {}).get(entry.scheduler_id)
        return job is not None and job.state == "queued"

    # ----- recovery -----------------------------------------------------------------
    def _track(self, batch_job_id: int, scheduler_id: str, queue: str, reported: int) -> None:
        t = self.tracked.get(batch_job_id)
        if t is None:
            self.tracked[batch_job_id] = Tracked(batch_job_id, scheduler_id, queue, reported)
        else:
            t.scheduler_id = scheduler_id or t.scheduler_id
            t.reported = reported

    def reconcile(self, server_jobs: list[batch_job_pb2.BatchJob]) -> None:
        """After (re)connecting: what the server believes about each batch job this site
        submitted, so the next scheduler poll sends every difference (also the ones lost
        with a killed daemon)."""
        by_id = {bj.id: bj for bj in server_jobs}
        for bid in self.journal.intent_ids():
            bj = by_id.get(bid)
            if bj is None or bj.state in (BJ.BATCH_JOB_STATE_FINISHED, BJ.BATCH_JOB_STATE_SUBMIT_FAILED):
                # Never offered again: nothing will resolve it. Name it for a human to check.
                intent = self.journal.intent(bid)
                log.warning("dropping an interrupted submission of a batch job that is gone or final on the server",
                            batch_job_id=bid, job_name=intent.job_name if intent else "")
                self.journal.drop_intent(bid)
        for bid in self.journal.submitted_ids():
            bj = by_id.get(bid)
            if bj is None:  # deleted on the server or already final there
                self.tracked.pop(bid, None)
                self.journal.forget([bid])
                continue
            sid = bj.scheduler_id or self.journal.submitted(bid).scheduler_id  # type: ignore[union-attr]
            self._track(bid, sid, bj.queue, bj.state)
        for bj in server_jobs:
            if bj.id not in self.tracked and bj.scheduler_id and bj.state in (
                    BJ.BATCH_JOB_STATE_QUEUED, BJ.BATCH_JOB_STATE_RUNNING):
                self._track(bj.id, bj.scheduler_id, bj.queue, bj.state)

    # ----- the scheduler poll ---------------------------------------------------------
    async def poll(self) -> int:
        """Look at the scheduler once: send state changes and a snapshot; the number of
        state changes sent."""
        changes = 0
        if self.tracked:
            ids = sorted({t.scheduler_id for t in self.tracked.values() if t.scheduler_id})
            statuses = await self.scheduler.statuses(ids) if ids else {}
            if statuses is not None:
                changes = self._apply(statuses)
        try:
            windows = await self.scheduler.backfill_windows()
        except Exception:
            log.exception("backfill windows unavailable")
            windows = None
        if windows is not None:
            self.windows = list(windows)
        self._maybe_send_snapshot()
        return changes

    def _maybe_send_snapshot(self) -> None:
        """Send the snapshot when it changed, and once a minute anyway: the server writes
        it to the site's row, so an unchanged one every poll would be pointless writes."""
        snap = self.snapshot()
        content = site_pb2.SchedulerSnapshot(queues=snap.queues, backfill_windows=snap.backfill_windows)
        key = content.SerializeToString(deterministic=True)
        last_key, last_time = self._last_snapshot
        if key != last_key or time.monotonic() - last_time > SNAPSHOT_REFRESH_S:
            if self.send_snapshot(snap):
                self._last_snapshot = (key, time.monotonic())

    def _apply(self, statuses: dict[str, Any]) -> int:
        now = time.monotonic()
        changes = 0
        for t in list(self.tracked.values()):
            job = statuses.get(t.scheduler_id)
            if job is None or job.state == "unknown":
                t.missing_since = t.missing_since or now
                if now - t.missing_since < VANISHED_AFTER_S:
                    continue
                state, info = BJ.BATCH_JOB_STATE_FINISHED, "no longer known to the scheduler"
            else:
                t.missing_since = None
                state = _SCHEDULER_TO_STATE[job.state]
                info = job.message or ("ended abnormally in the scheduler" if job.state == "failed" else "")
            if state == t.reported or _ORDER.get(state, 0) < _ORDER.get(t.reported, 0):
                continue
            start = getattr(job, "start_time", None) if job is not None else None
            end = getattr(job, "end_time", None) if job is not None else None
            if state == BJ.BATCH_JOB_STATE_RUNNING:
                start = start or datetime.now(UTC)
                t.start = start
            if state == BJ.BATCH_JOB_STATE_FINISHED:
                end = end or datetime.now(UTC)
                start = start or t.start
            if self.send_update(update(t.batch_job_id, state, scheduler_id=t.scheduler_id, status_info=info,
                                       start=start, end=end)):
                log.info("batch job state", batch_job_id=t.batch_job_id, scheduler_id=t.scheduler_id,
                         state=BJ.BatchJobState.Name(state).removeprefix("BATCH_JOB_STATE_").lower())
                t.reported = state
                changes += 1
                if state == BJ.BATCH_JOB_STATE_FINISHED:
                    self.tracked.pop(t.batch_job_id, None)
                    self.journal.forget([t.batch_job_id])
        return changes

    def snapshot(self) -> site_pb2.SchedulerSnapshot:
        snap = site_pb2.SchedulerSnapshot()
        snap.time.GetCurrentTime()
        per_queue: dict[str, list[int]] = {}
        for t in self.tracked.values():
            counts = per_queue.setdefault(t.queue, [0, 0])
            if t.reported == BJ.BATCH_JOB_STATE_QUEUED:
                counts[0] += 1
            elif t.reported == BJ.BATCH_JOB_STATE_RUNNING:
                counts[1] += 1
        for queue, (queued, running) in sorted(per_queue.items()):
            snap.queues.append(site_pb2.QueueStatus(queue=queue, queued_jobs=queued, running_jobs=running))
        for w in self.windows:
            snap.backfill_windows.append(site_pb2.BackfillWindow(queue=getattr(w, "queue", ""),
                                                                 num_nodes=int(w.num_nodes),
                                                                 wall_time_min=int(w.wall_time_min)))
        return snap
