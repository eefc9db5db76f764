"""Job futures resolved by WatchEvents: another client changes the jobs through the
API (as a launcher or a user would) and the waiting side learns it from the stream, not
by re-reading. Every wait is bounded by a timeout; no test sleeps."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from google.protobuf import struct_pb2

from balsam_grpc.sdk import (
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    App,
    Client,
    Job,
    JobFailed,
    as_completed,
    wait,
)

from balsam_grpc.v1 import job_pb2
from tests.support.launcher import client_run_job

WAIT = 30  # seconds; only an upper bound for a broken implementation


class CallCounter:
    """Counts the unary calls a client makes, by method."""

    def __init__(self, client: Client) -> None:
        self.calls: list[str] = []
        self._original = client.call

        def counting(service: str, method: str, request: Any, **kw: Any) -> Any:
            self.calls.append(method)
            return self._original(service, method, request, **kw)

        client.call = counting  # type: ignore[method-assign]


@pytest.fixture
def jobs(client: Client, app: App) -> list[Job]:
    return [app.submit(f"fut/{app.id}/{i}", word=str(i)) for i in range(3)]


def finish(other: Client, job_id: int, result: Any) -> None:
    """What a launcher does, through another connection: run, then finish with data."""
    data = struct_pb2.Struct()
    data.update({"result": result})
    client_run_job(other, job_id, job_pb2.JOB_STATE_RUN_DONE, return_code=0, data=data)


def fail(other: Client, job_id: int) -> None:
    # no error hook and no retry policy: the server fails it
    client_run_job(other, job_id, job_pb2.JOB_STATE_RUN_ERROR, return_code=139, message="segfault in rank 3",
                   error_tail="Segmentation fault (core dumped)")


def test_result_resolves_on_another_clients_change(client: Client, other_client: Client, jobs: list[Job]) -> None:
    job = jobs[0]
    tracking = threading.Event()
    outcome: dict[str, Any] = {}

    def waiter() -> None:
        client.watcher.track([job.id])  # watch started and state read: now waiting on events only
        tracking.set()
        try:
            outcome["value"] = job.result(timeout=WAIT)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    counter = CallCounter(client)
    thread = threading.Thread(target=waiter)
    thread.start()
    assert tracking.wait(WAIT)
    assert not job.done()  # still PREPROCESSED
    finish(other_client, job.id, {"answer": 42})
    thread.join(WAIT)
    assert not thread.is_alive() and "error" not in outcome, outcome.get("error")
    assert outcome["value"] == {"answer": 42}
    assert job.state == "JOB_FINISHED" and job.return_code == 0
    assert client.watcher.final[job.id] == "JOB_FINISHED"  # learnt from the stream
    # One state read when tracking started, then only the final refresh: no polling.
    assert counter.calls.count("ListJobs") <= 3 and "GetJob" not in counter.calls


def test_result_raises_job_failed_with_state_message(client: Client, other_client: Client, jobs: list[Job]) -> None:
    job = jobs[1]
    client.watcher.track([job.id])
    fail(other_client, job.id)
    with pytest.raises(JobFailed) as caught:
        job.result(timeout=WAIT)
    assert caught.value.state == "FAILED"
    assert "segfault in rank 3" in str(caught.value) and "Segmentation fault" in caught.value.error_tail
    # Already final: answered from the state read, no event needed.
    with pytest.raises(JobFailed):
        other_client.jobs.get(id=job.id).result(timeout=WAIT)


def test_timeouts(client: Client, jobs: list[Job]) -> None:
    with pytest.raises(TimeoutError, match="not final"):
        jobs[0].result(timeout=0.3)
    done, not_done = wait(jobs, timeout=0.2, client=client)
    assert done == set() and not_done == set(jobs)
    assert not jobs[0].done()


def test_wait_first_completed_and_first_exception(client: Client, other_client: Client, jobs: list[Job]) -> None:
    client.watcher.track([j.id for j in jobs])
    other_client.jobs.get(id=jobs[2].id).kill("not needed")
    done, not_done = client.jobs.wait(jobs, timeout=WAIT, return_when=FIRST_COMPLETED)
    assert done == {jobs[2]} and not_done == {jobs[0], jobs[1]}
    assert jobs[2].state == "KILLED"  # refreshed

    finish(other_client, jobs[0].id, 1)
    done, not_done = wait(jobs, timeout=WAIT, return_when=FIRST_EXCEPTION)
    # jobs[2] was KILLED: FIRST_EXCEPTION holds at once.
    assert jobs[2] in done and jobs[1] in not_done
    fail(other_client, jobs[1].id)
    done, not_done = wait(jobs, timeout=WAIT)
    assert done == set(jobs) and not not_done
    assert {j.state for j in jobs} == {"JOB_FINISHED", "FAILED", "KILLED"}


def test_as_completed_yields_in_completion_order(client: Client, other_client: Client, app: App) -> None:
    jobs = [app.submit(f"asc/{app.id}/{i}", word=str(i)) for i in range(4)]
    finish(other_client, jobs[3].id, "already")  # final before anyone watches
    client.watcher.track([j.id for j in jobs])
    order = [jobs[2], jobs[0], jobs[1]]
    results: list[Job] = []
    started = threading.Event()

    def consume() -> None:
        for job in client.jobs.as_completed(jobs, timeout=WAIT):
            results.append(job)
            started.set()

    thread = threading.Thread(target=consume)
    thread.start()
    assert started.wait(WAIT)  # the already-final job comes first
    for job in order:
        finish(other_client, job.id, job.id)
    thread.join(WAIT)
    assert not thread.is_alive()
    assert [j.id for j in results] == [jobs[3].id] + [j.id for j in order]
    assert all(j.state == "JOB_FINISHED" for j in results)


def test_as_completed_times_out(client: Client, jobs: list[Job]) -> None:
    with pytest.raises(TimeoutError, match="3 of 3 jobs not final"):
        list(as_completed(jobs, timeout=0.3, client=client))


def test_one_watcher_per_client_for_many_futures(client: Client, other_client: Client, app: App) -> None:
    many = client.jobs.bulk_create([Job(workdir=f"many/{app.id}/{i}", app=app, parameters={"word": "x"})
                                    for i in range(200)])
    watcher = client.watcher
    watcher.track([j.id for j in many])
    assert other_client.jobs.filter(id=[j.id for j in many]).update(state="KILLED").succeeded == 200
    done, not_done = client.jobs.wait(many, timeout=WAIT)
    assert len(done) == 200 and not not_done
    assert client.watcher is watcher and watcher.stream.reconnects == 0


def test_retry_from_the_sdk(client: Client, other_client: Client, jobs: list[Job]) -> None:
    """Job.retry() and the query's .retry(): failed jobs run again, others are refused."""
    from balsam_grpc.sdk.errors import FailedPrecondition

    fail(other_client, jobs[0].id)
    job = client.jobs.get(id=jobs[0].id)
    assert job.state == "FAILED" and job.run_count == 1
    assert job.retry(reset_run_count=True) is job
    assert job.state == "RESTART_READY" and job.run_count == 0
    with pytest.raises(FailedPrecondition, match="only FAILED, KILLED, RUN_ERROR, RUN_TIMEOUT"):
        client.jobs.get(id=jobs[1].id).retry()  # PREPROCESSED: nothing to retry
    fail(other_client, jobs[1].id)
    result = client.jobs.filter(id=[jobs[1].id, jobs[2].id]).retry()
    assert (result.succeeded, result.failed) == (1, 1)
    assert [(o.id, o.reason) for o in result.failures] == [(jobs[2].id, "NOT_RETRYABLE")]
    assert client.jobs.get(id=jobs[1].id).state == "RESTART_READY"


class _Waited:
    """The part of an SDK Job that waiting reads."""

    def __init__(self, job_id: int) -> None:
        self.message = job_pb2.Job(id=job_id)
        self._client = None


class _CountingCondition(threading.Condition):
    """Lets the test hand the waiter one completion per wake-up."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = threading.Semaphore(0)

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.release()
        return super().wait(timeout)


def _fake_watcher(cond: threading.Condition | None = None) -> tuple[Any, Any]:
    """A client whose JobWatcher never starts its stream: the test records the events."""
    from balsam_grpc.sdk.futures import JobWatcher

    client = type("FakeClient", (), {"server": "fake"})()
    watcher = JobWatcher(client)
    watcher._start = lambda timeout: None  # type: ignore[method-assign]
    watcher._read_states = lambda ids: None  # type: ignore[method-assign]
    if cond is not None:
        watcher.cond = cond
    client.watcher = watcher
    return client, watcher


@pytest.mark.parametrize("how", ["wait", "as_completed"])
def test_waiting_for_many_jobs_reads_each_completion_once(how: str) -> None:
    """Waiting for n jobs that end one at a time looked at every pending job on each
    wake-up: n^2 checks (25 million for 5,000 jobs, seconds of a client's CPU).
    Counted, not timed: the watcher is asked about each job a bounded number of times."""

    n = 2000
    client, watcher = _fake_watcher(_CountingCondition())
    asked = [0]
    is_done = watcher.is_done

    def counted(job_id: int) -> bool:
        asked[0] += 1
        return is_done(job_id)

    watcher.is_done = counted  # type: ignore[method-assign]
    jobs = [_Waited(i) for i in range(1, n + 1)]
    seen: list[int] = []

    def waiter() -> None:
        if how == "wait":
            done, not_done = wait(jobs, timeout=WAIT, client=client, refresh=False)
            seen.extend(sorted(j.message.id for j in done))
            assert not not_done
        else:
            seen.extend(j.message.id for j in as_completed(jobs, timeout=WAIT, client=client))

    if how == "as_completed":  # it refreshes what it yields: nothing to read here
        import balsam_grpc.sdk.futures as futures

        original = futures._refresh
        futures._refresh = lambda *a, **kw: None
    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        for job in jobs:
            assert watcher.cond.waits.acquire(timeout=WAIT)  # the waiter sleeps again
            with watcher.cond:
                watcher._record(job.message.id, "JOB_FINISHED")
        thread.join(WAIT)
    finally:
        if how == "as_completed":
            futures._refresh = original
    assert not thread.is_alive()
    assert seen == list(range(1, n + 1))
    assert asked[0] <= 3 * n, f"{asked[0]} checks for {n} jobs"


def test_wait_reads_the_data_of_done_jobs_while_the_others_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """wait() read every done job's final data after the last one ended: for 1,000 jobs
    34-100 ms between the last job's end and the answer. Now what ended is read meanwhile,
    REFRESH_BATCH or more at a time, and only the last few are read at the end."""
    import balsam_grpc.sdk.futures as futures
    from balsam_grpc.sdk.futures import REFRESH_BATCH

    n = 1000
    client, watcher = _fake_watcher(_CountingCondition())
    reads: list[list[int]] = []
    monkeypatch.setattr(futures, "_refresh", lambda c, jobs, w, **kw: reads.append([j.message.id for j in jobs]))
    jobs = [_Waited(i) for i in range(1, n + 1)]
    answer: list[Any] = []
    thread = threading.Thread(target=lambda: answer.append(wait(jobs, timeout=WAIT, client=client)))
    thread.start()
    for first in range(1, n + 1, 10):  # ten jobs end per wake-up
        assert watcher.cond.waits.acquire(timeout=WAIT)  # the waiter sleeps again
        with watcher.cond:
            for job_id in range(first, first + 10):
                watcher._record(job_id, "JOB_FINISHED")
    thread.join(WAIT)
    assert not thread.is_alive()
    done, not_done = answer[0]
    assert len(done) == n and not not_done
    assert sorted(i for batch in reads for i in batch) == list(range(1, n + 1))  # each read once
    assert len(reads[-1]) < REFRESH_BATCH + 10, f"{len(reads[-1])} jobs read after the last one ended"
    assert len(reads) <= n // REFRESH_BATCH + 1  # in batches, not a call per job


def test_wait_sees_jobs_that_end_while_it_reads_others(monkeypatch: pytest.MonkeyPatch) -> None:
    """The jobs that end while wait() reads the data of earlier ones (outside the watcher's
    lock) count: it does not go back to sleep on a notification it missed."""
    import balsam_grpc.sdk.futures as futures
    from balsam_grpc.sdk.futures import REFRESH_BATCH

    n = REFRESH_BATCH * 2
    client, watcher = _fake_watcher()
    reads: list[int] = []

    def read(c: Any, jobs: list[Any], w: Any, **kw: Any) -> None:
        reads.append(len(jobs))
        if len(reads) == 1:  # the rest end meanwhile
            with watcher.cond:
                for job_id in range(REFRESH_BATCH + 1, n + 1):
                    watcher._record(job_id, "JOB_FINISHED")

    monkeypatch.setattr(futures, "_refresh", read)
    jobs = [_Waited(i) for i in range(1, n + 1)]
    with watcher.cond:
        for job_id in range(1, REFRESH_BATCH + 1):
            watcher._record(job_id, "JOB_FINISHED")
    answer: list[Any] = []
    thread = threading.Thread(target=lambda: answer.append(wait(jobs, client=client)), daemon=True)
    thread.start()
    thread.join(WAIT)  # no timeout of its own: one that missed the rest would sleep for good
    stuck = thread.is_alive()
    with watcher.cond:
        watcher.cond.notify_all()  # lets a stuck one out, so the test ends either way
    thread.join(WAIT)
    assert not stuck, "wait() went back to sleep on the jobs that ended while it read"
    done, not_done = answer[0]
    assert len(done) == n and not not_done
    assert sum(reads) == n
