"""The SDK's event watch resumes only what a reconnect can cure: PERMISSION_DENIED,
INVALID_ARGUMENT and a RESOURCE_EXHAUSTED that is not the server's "come back later"
(an answer over the client's receive limit) are raised at once instead of retried every
second forever; INTERNAL is retried a few times, then raised; UNAVAILABLE and the
server's SERVER_BUSY are resumed."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from balsam_grpc.core.errors import ERROR_DOMAIN
from balsam_grpc.sdk.errors import BalsamError
from balsam_grpc.v1 import event_service_pb2

watch = importlib.import_module("balsam_grpc.sdk.watch")  # the package exports a function of that name

Code = grpc.StatusCode


class Failure(grpc.RpcError, grpc.Call):
    """A failed stream as grpc reports it (with the server's ErrorInfo when `reason`)."""

    def __init__(self, code: grpc.StatusCode, details: str, reason: str = "") -> None:
        self._code, self._details, self._trailers = code, details, ()
        if reason:
            detail = any_pb2.Any()
            detail.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))
            status = status_pb2.Status(code=code.value[0], message=details, details=[detail])
            self._trailers = (("grpc-status-details-bin", status.SerializeToString()),)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailers

    def initial_metadata(self) -> Any:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float | None:
        return None

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: Any) -> bool:
        return False


class FailingCall:
    def __init__(self, failure: Failure | None) -> None:
        self.failure = failure

    def __iter__(self) -> Iterator[event_service_pb2.WatchEventsResponse]:
        if self.failure is None:  # a working stream: one position, then the test stops
            yield event_service_pb2.WatchEventsResponse(cursor="7")
            raise AssertionError("the test reads no further")
        raise self.failure

    def cancel(self) -> None:
        pass


class ScriptedClient:
    """open_stream answers each connection with the next failure of the script."""

    def __init__(self, *script: Failure | None) -> None:
        self.script = list(script)
        self.connections = 0

    def open_stream(self, service: str, method: str, request: Any) -> FailingCall:
        self.connections += 1
        assert self.script, "the watch reconnected more often than the test expected"
        return FailingCall(self.script.pop(0))


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(watch, "BACKOFF_INITIAL", 0.001)
    monkeypatch.setattr(watch, "BACKOFF_MAX", 0.002)


def run(client: ScriptedClient) -> BaseException:
    stream = watch.EventStream(client, event_service_pb2.EventFilter())  # type: ignore[arg-type]
    with pytest.raises(BalsamError) as caught:
        next(stream)
    return caught.value


@pytest.mark.edge("the SDK watcher answered a refusal that repeats",
                   "raised to the caller with the reason, not retried forever")
@pytest.mark.parametrize("failure", [
    Failure(Code.PERMISSION_DENIED, "this token is scoped to site 1 and cannot act for site 2"),
    Failure(Code.INVALID_ARGUMENT, "filter.tags key '\"' is invalid"),
    Failure(Code.RESOURCE_EXHAUSTED, "Received message larger than max (5000000 vs. 4194304)"),
    Failure(Code.UNAUTHENTICATED, "token revoked"),
])
def test_refusals_that_repeat_are_raised_not_retried(failure: Failure) -> None:
    client = ScriptedClient(Failure(Code.UNAVAILABLE, "connection refused"), failure)
    err = run(client)
    assert client.connections == 2  # resumed once after UNAVAILABLE, then gave up
    assert failure.details() in str(err)


def test_internal_is_retried_a_few_times_then_raised() -> None:
    client = ScriptedClient(*[Failure(Code.INTERNAL, "incident 42")] * (watch.MAX_SUSPECT_RETRIES + 1))
    err = run(client)
    assert client.connections == watch.MAX_SUSPECT_RETRIES + 1 and "incident 42" in str(err)


def test_server_busy_and_unavailable_are_resumed() -> None:
    client = ScriptedClient(Failure(Code.RESOURCE_EXHAUSTED, "server busy", reason="SERVER_BUSY"),
                            Failure(Code.UNAVAILABLE, "gone"), *[Failure(Code.INTERNAL, "once")] * 3, None)
    stream = watch.EventStream(client, event_service_pb2.EventFilter())  # type: ignore[arg-type]
    assert stream.wait_started(0) is False
    reader = iter(stream)
    # The working connection yields a position but no event; the generator keeps reading.
    with pytest.raises(AssertionError, match="reads no further"):
        next(reader)
    assert client.connections == 6 and stream.cursor == "7"
