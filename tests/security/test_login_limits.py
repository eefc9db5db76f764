"""Login rate limiting: after N wrong passwords for a user name (or M from one address)
Login answers RESOURCE_EXHAUSTED LOGIN_RATE_LIMITED with a retry delay, before any
password is checked (so even the right one is refused until the lockout ends)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from balsam_grpc.server.admission import LoginLimiter, LoginLimits, Refused, peer_address
from balsam_grpc.v1 import auth_service_pb2 as pb
from balsam_grpc.v1 import auth_service_pb2_grpc

PASSWORD = "correct horse battery"  # what the harness gives every user
Code = grpc.StatusCode


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_window_lockout_and_reset() -> None:
    clock = Clock()
    lim = LoginLimiter(LoginLimits(max_failures_per_user=3, max_failures_per_address=5, window_seconds=100,
                                   lockout_seconds=30), clock=clock)
    for _ in range(2):
        lim.check("ann", "10.0.0.1")
        lim.failed("ann", "10.0.0.1")
    lim.check("ann", "10.0.0.1")  # two failures: still allowed
    lim.failed("ann", "10.0.0.1")
    with pytest.raises(Refused) as caught:
        lim.check("ann", "10.0.0.2")  # the user is blocked from anywhere
    assert caught.value.reason == "LOGIN_RATE_LIMITED" and caught.value.metadata["retry_after_ms"] == "30000"
    clock.now += 10
    with pytest.raises(Refused) as caught:
        lim.check("ann", "10.0.0.1")
    assert caught.value.retry_after_ms == 20_000
    lim.check("bea", "10.0.0.9")  # others are not
    clock.now += 21
    lim.check("ann", "10.0.0.1")  # lockout over (failures still in the window, but old enough)
    lim.succeeded("ann")
    lim.failed("ann", "10.0.0.1")
    lim.check("ann", "10.0.0.1")  # a success cleared the user's count
    # The address: 5 failures across made-up names block that address for every name.
    for i in range(5):
        lim.failed(f"guess{i}", "10.6.6.6")
    with pytest.raises(Refused):
        lim.check("ann", "10.6.6.6")
    clock.now += 200  # out of the window
    lim.check("ann", "10.6.6.6")


def test_limiter_memory_is_bounded() -> None:
    lim = LoginLimiter(LoginLimits(), max_keys=50)
    for i in range(1000):
        lim.failed(f"user{i}", f"10.0.{i // 250}.{i % 250}")
    assert len(lim._failures) <= 50


@pytest.mark.parametrize("peer,address", [("ipv4:10.1.2.3:5555", "10.1.2.3"), ("ipv6:[::1]:80", "::1"),
                                          ("unix:/tmp/sock", "unix"), ("", "")])
def test_peer_address(peer: str, address: str) -> None:
    assert peer_address(peer) == address


@pytest.fixture
def tight(harness: Any) -> Iterator[Callable[..., LoginLimiter]]:
    state = harness.server.state
    original = state.logins

    def install(**kw: Any) -> LoginLimiter:
        state.logins = LoginLimiter(LoginLimits(**kw))
        return state.logins

    yield install
    state.logins = original


def login(harness: Any, username: str, password: str) -> pb.LoginResponse:
    stub = auth_service_pb2_grpc.AuthServiceStub(harness.channel)
    return stub.Login(pb.LoginRequest(username=username, password=password), timeout=30)


def test_login_is_refused_after_failures(harness: Any, alice: Any, bob: Any,
                                         tight: Callable[..., LoginLimiter]) -> None:
    tight(max_failures_per_user=2, max_failures_per_address=100, lockout_seconds=60)
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as caught:
            login(harness, alice.username, "wrong password!")
        assert caught.value.code() == Code.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as caught:
        login(harness, alice.username, PASSWORD)  # the right password, but locked out
    err = caught.value
    assert err.code() == Code.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(err)
    info = error_details_pb2.ErrorInfo()
    assert status is not None and status.details[0].Unpack(info)
    assert info.reason == "LOGIN_RATE_LIMITED" and 0 < int(info.metadata["retry_after_ms"]) <= 60_000
    assert dict(err.trailing_metadata())["retry-after-ms"] == info.metadata["retry_after_ms"]
    assert PASSWORD not in err.details()
    assert login(harness, bob.username, PASSWORD).user.id == bob.user_id  # other users unaffected


def test_address_limit_blocks_guessing_across_names(harness: Any, alice: Any,
                                                    tight: Callable[..., LoginLimiter]) -> None:
    tight(max_failures_per_user=100, max_failures_per_address=3, lockout_seconds=60)
    for name in ("nobody1", "nobody2", "nobody3"):
        with pytest.raises(grpc.RpcError) as caught:
            login(harness, name, "guess guess")
        assert caught.value.code() == Code.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as caught:
        login(harness, alice.username, PASSWORD)
    assert caught.value.code() == Code.RESOURCE_EXHAUSTED


def test_success_resets_the_users_count(harness: Any, alice: Any, tight: Callable[..., LoginLimiter]) -> None:
    tight(max_failures_per_user=2, max_failures_per_address=100)
    with pytest.raises(grpc.RpcError):
        login(harness, alice.username, "wrong password!")
    assert login(harness, alice.username, PASSWORD).user.id == alice.user_id
    with pytest.raises(grpc.RpcError) as caught:
        login(harness, alice.username, "wrong again!!")
    assert caught.value.code() == Code.UNAUTHENTICATED  # one failure since the success, not two
    assert login(harness, alice.username, PASSWORD).token
