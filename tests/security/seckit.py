"""Helpers for the security tests (imported as `seckit`; tests/security is on sys.path): sites and apps through the real API, bidi streams
driven from a thread, and waits bounded in time."""

from __future__ import annotations

import queue
import secrets
import threading
from collections.abc import Iterator
from typing import Any

import grpc

from balsam_grpc.v1 import app_pb2, app_service_pb2, app_service_pb2_grpc, site_pb2, site_service_pb2
from balsam_grpc.v1 import site_service_pb2_grpc

WAIT = 20.0  # bound on every wait (never reached when things work)


def make_site(caller: Any, name: str | None = None) -> site_pb2.Site:
    stub = caller.stub(site_service_pb2_grpc.SiteServiceStub)
    return stub.CreateSite(site_service_pb2.CreateSiteRequest(
        site=site_pb2.Site(name=name or f"site-{secrets.token_hex(4)}", hostname="login1", path="/p"))).site


def make_app(caller: Any, site_id: int, name: str = "echo") -> app_pb2.App:
    stub = caller.stub(app_service_pb2_grpc.AppServiceStub)
    return stub.CreateApp(app_service_pb2.CreateAppRequest(app=app_pb2.App(
        site_id=site_id, name=name, command_template="echo {{ x }}",
        parameters=[app_pb2.AppParameter(name="x")]))).app


class StreamClient:
    """One bidi (or server) stream: requests from a queue, responses read by a thread."""

    def __init__(self, method: Any, metadata: Any, request: Any = None) -> None:
        self.outgoing: queue.Queue[Any] = queue.Queue()
        self.incoming: queue.Queue[Any] = queue.Queue()
        self.error: grpc.RpcError | None = None
        self.ended = threading.Event()
        self.call = method(self._requests() if request is None else request, metadata=metadata)
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _requests(self) -> Iterator[Any]:
        while True:
            msg = self.outgoing.get()
            if msg is None:
                return
            yield msg

    def _pump(self) -> None:
        try:
            for msg in self.call:
                self.incoming.put(msg)
        except grpc.RpcError as err:
            self.error = err
        finally:
            self.ended.set()

    def send(self, msg: Any) -> None:
        self.outgoing.put(msg)

    def next(self, timeout: float = WAIT) -> Any:
        return self.incoming.get(timeout=timeout)

    def wait_ended(self, timeout: float = WAIT) -> grpc.RpcError:
        assert self.ended.wait(timeout), "the stream did not end"
        assert self.error is not None, "the stream ended without an error"
        return self.error

    def close(self) -> None:
        self.outgoing.put(None)
        self.call.cancel()
