"""Job futures driven by one WatchEvents stream per client, never by polling.

The client's `JobWatcher` watches every event into a final state (JOB_FINISHED, FAILED,
KILLED) of the caller's jobs. Tracking a job goes:

1. the stream is started and has a position (cursor), so every later transition will
   arrive through it;
2. the job is registered;
3. its current state is read once (a job that is already final resolves at once).

A transition can therefore never slip between the read and the watch. The stream
resumes from its cursor after a disconnect or a server restart, so nothing is missed
while it is away; states that could not be read while the server was down are read
again when the stream reconnects.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import structlog

from balsam_grpc.core import pyvalues
from balsam_grpc.core.states import FINAL_STATES
from balsam_grpc.sdk.errors import BalsamError, DeadlineExceeded, JobFailed, NotFound, Unavailable
from balsam_grpc.sdk.service import Connection, default_connection
from balsam_grpc.sdk.watch import EventStream
from balsam_grpc.v1 import event_pb2, event_service_pb2, job_pb2, job_service_pb2

# A job object (sdk.models.Job, which sits above this module): futures use its message,
# its _client, its state and data, and _replace(message) to give it fresh data.
Job = Any

log = structlog.get_logger("balsam.sdk.futures")

ALL_COMPLETED = "ALL_COMPLETED"
FIRST_COMPLETED = "FIRST_COMPLETED"
FIRST_EXCEPTION = "FIRST_EXCEPTION"
RETURN_WHEN = (ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION)
FAILED_STATES = frozenset({"FAILED", "KILLED"})
READ_CHUNK = 5000
REFRESH_BATCH = 64  # wait(): done jobs' data read this many or more at a time meanwhile
START_TIMEOUT = 30.0


class Client(Connection, Protocol):
    """A connection that owns one JobWatcher (sdk.client.Client)."""

    @property
    def watcher(self) -> JobWatcher: ...


def list_jobs(client: Connection, ids: list[int], view: int = 0) -> Iterator[job_pb2.Job]:
    """The jobs with these ids (those that exist), READ_CHUNK ids per ListJobs page walk."""
    for i in range(0, len(ids), READ_CHUNK):
        chunk = ids[i:i + READ_CHUNK]
        token = ""
        while True:
            request = job_service_pb2.ListJobsRequest(filter=job_pb2.JobFilter(ids=chunk), page_size=len(chunk),
                                                      page_token=token, view=view)  # type: ignore[arg-type]
            response = client.call("JobService", "ListJobs", request)
            yield from response.jobs
            token = response.next_page_token
            if not token:
                break


def _final_state(event: event_pb2.Event) -> str:
    return job_pb2.JobState.Name(event.job_state.to_state).removeprefix("JOB_STATE_")


class JobWatcher:
    """One final-state event stream shared by every future of a client."""

    def __init__(self, client: Connection) -> None:
        self._client = client
        final = [job_pb2.JobState.Value(f"JOB_STATE_{s}") for s in sorted(FINAL_STATES)]
        flt = event_service_pb2.EventFilter(kinds=[event_service_pb2.EVENT_KIND_JOB_STATE], to_states=final)
        self._stream = EventStream(client, flt, on_connect=self._reconfirm)
        self.cond = threading.Condition()
        self._tracked: set[int] = set()
        self._unconfirmed: set[int] = set()
        self.final: dict[int, str] = {}      # job id -> final state
        self.sequence: dict[int, int] = {}   # job id -> order of completion
        self.missing: set[int] = set()       # tracked ids the server does not know
        self.done_log: list[int] = []        # ids as they became done (final or missing), for _Waiting
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._seq = 0

    @property
    def stream(self) -> EventStream:
        return self._stream

    # -- tracking ----------------------------------------------------------------------

    def track(self, ids: Iterable[int], start_timeout: float = START_TIMEOUT) -> None:
        """Start watching these jobs (see the module docstring for the order of steps)."""
        self._start(start_timeout)
        with self.cond:
            new = [i for i in dict.fromkeys(ids) if i not in self._tracked]
            self._tracked.update(new)
            self._unconfirmed.update(new)
        if new:
            self._read_states(new)

    def is_done(self, job_id: int) -> bool:
        return job_id in self.final or job_id in self.missing

    def _start(self, timeout: float) -> None:
        with self.cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="balsam-job-watcher", daemon=True)
                self._thread.start()
        if not self._stream.wait_started(timeout):
            self.raise_error()
            raise Unavailable(f"could not start watching events at {self._client.server} within {timeout} s",
                              reason="UNAVAILABLE")
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            for event in self._stream:
                with self.cond:
                    if event.job_id in self._tracked:
                        self._record(event.job_id, _final_state(event))
        except BaseException as exc:  # noqa: BLE001 - handed to every waiter
            log.warning("job watcher stopped", error=str(exc))
            with self.cond:
                self.error = exc
                self.cond.notify_all()
            self._stream.release_waiters()  # wake a track() waiting for the start

    def _record(self, job_id: int, state: str) -> None:
        """Under self.cond: a tracked job reached a final state."""
        if job_id not in self.final:
            self._seq += 1
            self.final[job_id] = state
            self.sequence[job_id] = self._seq
            self.done_log.append(job_id)
            self.cond.notify_all()

    def _read_states(self, ids: list[int]) -> None:
        """Read current states once; jobs already final resolve now. Connection errors
        leave the ids unconfirmed: they are read again when the stream reconnects."""
        found: dict[int, str] = {}
        try:
            for msg in list_jobs(self._client, ids, view=job_service_pb2.JOB_VIEW_BASIC):
                found[msg.id] = job_pb2.JobState.Name(msg.state).removeprefix("JOB_STATE_")
        except (Unavailable, DeadlineExceeded) as exc:
            log.info("job states not readable now; will read on reconnect", error=str(exc), jobs=len(ids))
            return
        with self.cond:
            for job_id in ids:
                self._unconfirmed.discard(job_id)
                if job_id not in found:
                    self.missing.add(job_id)
                    self.done_log.append(job_id)
                    self.cond.notify_all()
                elif found[job_id] in FINAL_STATES:
                    self._record(job_id, found[job_id])

    def _reconfirm(self) -> None:
        """On every (re)connection of the stream: read what could not be read before."""
        with self.cond:
            pending = sorted(self._unconfirmed)
        if pending:
            self._read_states(pending)

    def close(self) -> None:
        self._stream.close()
        if self._thread is not None:
            self._thread.join(timeout=5)


# ------------------------------------------------------------------------------ waiting

def _client_of(jobs: list[Job], client: Client | None) -> Client:
    if client is not None:
        return client
    for job in jobs:
        if job._client is not None:
            return job._client
    return default_connection()  # type: ignore[no-any-return]


def _ids(jobs: list[Job]) -> list[int]:
    ids = []
    for job in jobs:
        if not job.message.id:
            raise ValueError("a job must be saved before it can be waited for")
        ids.append(job.message.id)
    return ids


def _refresh(client: Client, jobs: list[Job], watcher: JobWatcher, *, strict: bool = False) -> None:
    """Give the objects their final state at once, then their full data from the server
    (best effort unless `strict`: the answer of wait() does not depend on it)."""
    by_id: dict[int, list[Job]] = {}
    for job in jobs:
        by_id.setdefault(job.message.id, []).append(job)
        state = watcher.final.get(job.message.id)
        if state is not None:
            job.message.state = job_pb2.JobState.Value(f"JOB_STATE_{state}")
    if not by_id:
        return
    try:
        for msg in list_jobs(client, list(by_id)):
            for job in by_id.get(msg.id, []):
                job._replace(msg)
    except (Unavailable, DeadlineExceeded):
        if strict:
            raise


class _Waiting:
    """Under the watcher's cond: which of a wait's jobs are done. Each wake-up reads only
    the completions logged since the last one (watcher.done_log), not every pending id:
    waiting for n jobs that end one at a time costs O(n), not O(n^2)."""

    def __init__(self, watcher: JobWatcher, ids: Iterable[int]) -> None:
        self._watcher = watcher
        self._position = len(watcher.done_log)
        unique = list(dict.fromkeys(ids))
        self.done = {i for i in unique if watcher.is_done(i)}
        self.left = set(unique) - self.done
        self.failed = any(self._failed(i) for i in self.done)

    def _failed(self, job_id: int) -> bool:
        return job_id in self._watcher.missing or self._watcher.final.get(job_id) in FAILED_STATES

    def catch_up(self) -> list[int]:
        """The wait's jobs done since the last call, in completion order."""
        log = self._watcher.done_log
        new = [i for i in log[self._position:] if i in self.left]
        self._position = len(log)
        self.left.difference_update(new)
        self.done.update(new)
        self.failed = self.failed or any(self._failed(i) for i in new)
        return new

    def holds(self, return_when: str) -> bool:
        if not self.left:
            return True
        if return_when == FIRST_COMPLETED:
            return bool(self.done)
        return return_when == FIRST_EXCEPTION and self.failed


def wait(jobs: list[Job], timeout: float | None = None, return_when: str = ALL_COMPLETED,
         client: Client | None = None, *, refresh: bool = True) -> tuple[set[Job], set[Job]]:
    """Like concurrent.futures.wait: (done, not_done) once `return_when` holds or
    `timeout` seconds pass. Done jobs are refreshed with their final data."""
    if return_when not in RETURN_WHEN:
        raise ValueError(f"return_when must be one of {', '.join(RETURN_WHEN)}, not {return_when!r}")
    ids = _ids(jobs)
    if not ids:
        return set(), set()
    client = _client_of(jobs, client)
    watcher = client.watcher
    deadline = None if timeout is None else time.monotonic() + timeout
    watcher.track(ids, start_timeout=START_TIMEOUT if timeout is None else max(timeout, 5.0))
    by_id: dict[int, list[Job]] = {}
    for job in jobs:
        by_id.setdefault(job.message.id, []).append(job)
    with watcher.cond:
        waiting = _Waiting(watcher, ids)
    # Done jobs whose data is not read yet. It is read while the others run, REFRESH_BATCH
    # or more at a time, so the wait returns after reading only the last few: read at the
    # end, 1,000 jobs' data took 34-100 ms after the last one ended.
    unread = list(waiting.done) if refresh else []
    while True:
        with watcher.cond:
            while True:
                watcher.raise_error()
                # First: jobs may have ended while the lock was let go for a read.
                new = waiting.catch_up()
                if refresh:
                    unread += new
                remaining = None if deadline is None else deadline - time.monotonic()
                over = waiting.holds(return_when) or (remaining is not None and remaining <= 0)
                if over or len(unread) >= REFRESH_BATCH:
                    break
                watcher.cond.wait(remaining)
        if over:
            break
        _refresh(client, [job for i in unread for job in by_id[i]], watcher)
        unread = []
    _refresh(client, [job for i in unread for job in by_id[i]], watcher)
    return ({j for j in jobs if j.message.id in waiting.done},
            {j for j in jobs if j.message.id not in waiting.done})


def as_completed(jobs: list[Job], timeout: float | None = None, client: Client | None = None) -> Iterator[Job]:
    """Yield the jobs as they reach a final state (already-final ones first);
    TimeoutError if `timeout` seconds pass before all have."""
    ids = _ids(jobs)
    if not ids:
        return
    client = _client_of(jobs, client)
    watcher = client.watcher
    deadline = None if timeout is None else time.monotonic() + timeout
    watcher.track(ids, start_timeout=START_TIMEOUT if timeout is None else max(timeout, 5.0))
    by_id: dict[int, list[Job]] = {}
    for job in jobs:
        by_id.setdefault(job.message.id, []).append(job)
    with watcher.cond:
        waiting = _Waiting(watcher, by_id)
        ready = sorted(waiting.done, key=lambda i: watcher.sequence.get(i, 0))
    while True:
        if ready:
            batch = [job for i in ready for job in by_id[i]]
            _refresh(client, batch, watcher)
            yield from batch
        if not waiting.left:
            return
        with watcher.cond:
            while True:
                watcher.raise_error()
                ready = waiting.catch_up()
                if ready:
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"{len(waiting.left)} of {len(by_id)} jobs not final after {timeout} s")
                watcher.cond.wait(remaining)


def job_result(job: Job, timeout: float | None = None) -> Any:
    """See Job.result."""
    client = _client_of([job], None)
    done, _ = wait([job], timeout=timeout, client=client, refresh=False)
    if not done:
        raise TimeoutError(f"job {job.message.id} not final after {timeout} s (last seen {job.state})")
    if job.message.id in client.watcher.missing:
        raise NotFound(f"job {job.message.id} no longer exists", reason="NOT_FOUND")
    _refresh(client, [job], client.watcher, strict=True)
    data = job.data
    if job.state == "JOB_FINISHED":
        if pyvalues.RESULT_KEY in data:  # a Python-function app's return value, as it was
            return pyvalues.decode(data[pyvalues.RESULT_KEY])
        return data["result"] if "result" in data else data
    if pyvalues.EXCEPTION_KEY in data:
        # What the app raised, re-raised here; its traceback in the launcher is the cause.
        remote = pyvalues.decode(data[pyvalues.EXCEPTION_KEY])
        if isinstance(remote, BaseException):
            raise remote from pyvalues.RemoteTraceback(job.error_tail or job.state_message)
    message = f"job {job.message.id} ended {job.state}"
    if job.state_message:
        message += f": {job.state_message}"
    if job.error_tail:
        message += f"\n{job.error_tail}"
    raise JobFailed(job, message)


__all__ = ["ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION", "BalsamError", "JobWatcher", "as_completed",
           "job_result", "list_jobs", "wait"]
