"""A scripted launcher for tests: a SessionService.Connect stream driven step by step
(open, credit, report, close), with the server's messages sorted by kind. Used where a
test needs jobs really leased and run (through the public API) without a launcher process.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc

from balsam_grpc.v1 import common_pb2, job_pb2, job_service_pb2, session_service_pb2, session_service_pb2_grpc

Req = session_service_pb2.SessionServiceConnectRequest
WAIT = 15.0  # generous bound for anything that should happen "at once"


class Launcher:
    """A scripted launcher: requests go through a queue, responses are sorted by kind."""

    def __init__(self, caller: Any = None, channel: grpc.Channel | None = None,
                 metadata: tuple[tuple[str, str], ...] | None = None) -> None:
        self.requests: queue.Queue[Req | None] = queue.Queue()
        self.inbox: dict[str, queue.Queue[Any]] = {k: queue.Queue() for k in ("opened", "leases", "ack", "kill")}
        self.error: grpc.RpcError | None = None
        self.done = threading.Event()
        self.seq = 0
        stub = session_service_pb2_grpc.SessionServiceStub(channel or caller.harness.channel)
        self.call = stub.Connect(self._iter(), metadata=metadata if metadata is not None else caller.metadata)
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _iter(self) -> Iterator[Req]:
        while True:
            item = self.requests.get()
            if item is None:
                return
            yield item

    def _pump(self) -> None:
        try:
            for response in self.call:
                kind = response.WhichOneof("message")
                self.inbox[kind].put(getattr(response, kind))
        except grpc.RpcError as err:
            self.error = err
        finally:
            self.done.set()

    # -- sending
    def open(self, site_id: int, **fields: Any) -> session_service_pb2.SessionOpened:
        fields.setdefault("job_mode", common_pb2.JOB_MODE_MPI)
        self.requests.put(Req(open=session_service_pb2.SessionOpen(site_id=site_id, hostname="nid0001", **fields)))
        return self.next("opened")

    def credit(self, **fields: Any) -> None:
        fields.setdefault("free_nodes", 1000.0)
        self.requests.put(Req(credit=session_service_pb2.SessionCredit(**fields)))

    def report(self, *transitions: session_service_pb2.JobTransition) -> session_service_pb2.TransitionAck:
        self.requests.put(Req(report=session_service_pb2.TransitionReport(transitions=list(transitions))))
        return self.next("ack")

    def transition(self, leased: session_service_pb2.LeasedJob, state: int, **fields: Any
                   ) -> session_service_pb2.JobTransition:
        self.seq += 1
        return session_service_pb2.JobTransition(seq=self.seq, job_id=leased.job.id,
                                                 lease_generation=leased.lease_generation, state=state, **fields)

    def close(self, reason: str = "done") -> None:
        self.requests.put(Req(close=session_service_pb2.SessionClose(reason=reason)))
        self.half_close()

    def settle(self) -> None:
        """Return once the session has acted on every event delivered to it before this
        call, an acquisition they called for included. One turn of the session's loop
        answers the reports in its inbox, then takes the delivered events and runs what
        they call for; the second of two empty reports is sent after the first's answer,
        so it is answered on a later turn, after all of that."""
        self.report()
        self.report()

    def half_close(self) -> None:
        self.requests.put(None)

    def cancel(self) -> None:
        self.call.cancel()
        self.done.wait(WAIT)

    # -- receiving
    def next(self, kind: str, timeout: float = WAIT) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.inbox[kind].get(timeout=0.05)
            except queue.Empty:
                if self.done.is_set() and self.inbox[kind].empty():
                    raise AssertionError(f"stream ended while waiting for {kind}: {self.error!r}") from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"no {kind} within {timeout} s") from None

    def leased(self, count: int, timeout: float = WAIT) -> list[session_service_pb2.LeasedJob]:
        """Exactly `count` leased jobs (over one or more JobLeases messages)."""
        got: list[session_service_pb2.LeasedJob] = []
        while len(got) < count:
            got += list(self.next("leases", timeout).jobs)
        assert len(got) == count, f"leased {len(got)} jobs, expected {count}"
        return got

    def nothing(self, kind: str, settle: float = 0.5) -> None:
        """No message of `kind` arrives within `settle` seconds (a bounded negative check)."""
        time.sleep(settle)
        assert self.inbox[kind].empty(), f"unexpected {kind}: {self.inbox[kind].queue[0]}"


def run_job(launcher: Launcher, jobs_call: Any, job_id: int, *states: int, **fields: Any) -> None:
    """Lease exactly this job to `launcher` (an open session at its site) and report
    `states` (RUN_DONE, RUN_ERROR, ...; `fields` of JobTransition go with the last). The
    job gets a one-off tag so the credit can ask for it alone; `jobs_call(method,
    request)` is a JobService call of its owner."""
    tag = {"lease-for": uuid.uuid4().hex[:12]}
    tags = dict(jobs_call("GetJob", job_service_pb2.GetJobRequest(id=job_id)).job.tags)
    jobs_call("UpdateJob", job_service_pb2.UpdateJobRequest(job=job_pb2.Job(id=job_id, tags={**tags, **tag}),
                                                            update_mask={"paths": ["tags"]}))
    launcher.credit(max_jobs=1, filter_tags=tag)
    (leased,) = launcher.leased(1)
    assert leased.job.id == job_id, leased
    for i, state in enumerate(states):
        ack = launcher.report(launcher.transition(leased, state, **(fields if i == len(states) - 1 else {})))
        assert not ack.rejections, ack


def client_run_job(client: Any, job_id: int, *states: int, **fields: Any) -> None:
    """run_job through an SDK Client's connection, in a session opened and closed for it."""
    from balsam_grpc.v1 import job_service_pb2

    site_id = client.call("JobService", "GetJob", job_service_pb2.GetJobRequest(id=job_id)).job.site_id
    launcher = Launcher(channel=client.channel, metadata=client.metadata)
    try:
        launcher.open(site_id)
        run_job(launcher, lambda method, request: client.call("JobService", method, request), job_id, *states,
                **fields)
    finally:
        launcher.close()
        launcher.done.wait(WAIT)
