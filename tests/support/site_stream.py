"""A scripted site daemon for server tests: one SiteService.Connect stream driven step
by step (hello, credit, results), with barriers rather than sleeps: the server handles a
stream's messages in order, so a ResultAck for a throw-away unsolicited result proves that
everything sent before it was processed."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import grpc

from balsam_grpc.v1 import batch_job_pb2, site_service_pb2, site_service_pb2_grpc

pb = site_service_pb2
WAIT = 15.0  # generous bound for a message that should come at once (2-core CI machines)


def kinds_scanned(monkeypatch: Any, site_id: int) -> list[set[str]]:
    """From now on, the work kinds of each work scan of site `site_id`'s stream, in order
    (site_work.find_work spied on; the list fills as the server scans)."""
    from balsam_grpc.server.store import site_work

    asked: list[set[str]] = []
    real = site_work.find_work

    def spy(conn: Any, owner_id: int, site: int, kinds: set[str], *rest: Any) -> Any:
        if site == site_id:
            asked.append(set(kinds))
        return real(conn, owner_id, site, kinds, *rest)

    monkeypatch.setattr(site_work, "find_work", spy)
    return asked


class SiteClient:
    """A scripted site daemon on one stream (sync gRPC, a thread reads responses)."""

    def __init__(self, caller: Any, site_id: int, *, capabilities: tuple[str, ...] = ("batch_jobs", "hooks", "cleanup"),
                 max_in_flight: int = 16, token: str | None = None) -> None:
        self.requests: queue.Queue[pb.SiteServiceConnectRequest | None] = queue.Queue()
        self.responses: queue.Queue[pb.SiteServiceConnectResponse | None] = queue.Queue()
        self.error: grpc.RpcError | None = None
        self.backlogs: list[pb.SiteBacklog] = []
        self.work: list[pb.WorkItem] = []
        self._barrier = 0
        self.send(hello=pb.SiteHello(site_id=site_id, hostname="login1", daemon_version="test",
                                     capabilities=list(capabilities), max_in_flight=max_in_flight))
        metadata = (("authorization", f"Bearer {token or caller.token}"),)
        stub = site_service_pb2_grpc.SiteServiceStub(caller.harness.channel)
        self.call = stub.Connect(self._outgoing(), metadata=metadata, timeout=120)
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _outgoing(self) -> Any:
        while True:
            msg = self.requests.get()
            if msg is None:
                return
            yield msg

    def _pump(self) -> None:
        try:
            for msg in self.call:
                self.responses.put(msg)
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.responses.put(None)

    def send(self, **kw: Any) -> None:
        self.requests.put(pb.SiteServiceConnectRequest(**kw))

    def next(self, kind: str, timeout: float = WAIT) -> Any:
        """The next message of `kind` (others are recorded: backlogs, work items)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.responses.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {kind} within {timeout} s") from None
            if msg is None:
                self.responses.put(None)
                raise AssertionError(f"stream ended waiting for {kind}: {self.error}")
            got = msg.WhichOneof("message")
            if got == "backlog":
                self.backlogs.append(msg.backlog)
            elif got == "work":
                self.work.append(msg.work)
            if got == kind:
                return getattr(msg, kind)

    def welcome(self) -> pb.SiteWelcome:
        return self.next("welcome")

    def _round_trip(self) -> pb.ResultAck:
        self._barrier += 1
        self.send(result=pb.WorkResult(batch_job=pb.BatchJobUpdate(batch_job_id=10**12 + self._barrier,
                                                                   state=batch_job_pb2.BATCH_JOB_STATE_QUEUED)))
        while True:
            ack = self.next("result_ack")
            if any(str(10**12 + self._barrier) in e for e in ack.errors):
                return ack

    def barrier(self) -> tuple[list[pb.WorkItem], pb.ResultAck]:
        """Returns the work items pushed since the last barrier, once the server has acted
        on everything sent before it. Two round trips: the server acknowledges results
        before it pushes the work the same messages made room for, so the second ack
        comes after that work."""
        before = len(self.work)
        self._round_trip()
        ack = self._round_trip()
        return self.work[before:], ack

    def result(self, **kw: Any) -> pb.ResultAck:
        self.send(result=pb.WorkResult(**kw))
        return self.next("result_ack")

    def ended(self, timeout: float = WAIT) -> grpc.RpcError | None:
        """Wait for the server to end the stream; returns the error (None when OK)."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "stream did not end"
        return self.error

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()
        self.thread.join(5)
