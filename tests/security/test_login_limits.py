"""Login rate limiting per (user name, address) and per address, in the database, with
backoff: Login answers RESOURCE_EXHAUSTED LOGIN_RATE_LIMITED with a retry delay before
any password is checked (so even the right one is refused from that address until the
lockout ends), and the same user logs in from another address meanwhile."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from sqlalchemy import delete, func, select
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from balsam_grpc.server.admission import LoginLimiter, LoginLimits, Refused, peer_address
from balsam_grpc.server.store.tables import login_failures
from balsam_grpc.v1 import auth_service_pb2 as pb
from balsam_grpc.v1 import auth_service_pb2_grpc

PASSWORD = "correct horse battery"  # what the harness gives every user
Code = grpc.StatusCode


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def limiter(harness: Any, clock: Clock, **kw: Any) -> LoginLimiter:
    defaults = dict(max_failures_per_user=3, max_failures_per_address=5, window_seconds=100, lockout_seconds=30,
                    max_lockout_seconds=100)
    return LoginLimiter(harness.db, LoginLimits(**{**defaults, **kw}), clock=clock)


def refused_ms(lim: LoginLimiter, user: str, address: str) -> int | None:
    try:
        asyncio.run(lim.check(user, address))
    except Refused as exc:
        assert exc.reason == "LOGIN_RATE_LIMITED"
        return exc.retry_after_ms
    return None


def fail(lim: LoginLimiter, user: str, address: str, times: int = 1) -> None:
    for _ in range(times):
        asyncio.run(lim.failed(user, address))


def test_lockout_backs_off_and_is_capped() -> None:
    lim = LoginLimiter(None, LoginLimits(max_failures_per_user=3, max_failures_per_address=5,  # type: ignore[arg-type]
                                         lockout_seconds=30, max_lockout_seconds=100))
    pair, address = ("ann", "10.0.0.1"), ("", "10.0.0.1")
    assert [lim.lockout(pair, n) for n in (1, 2)] == [None, None]
    assert [lim.lockout(pair, n).total_seconds() for n in (3, 4, 5, 6)] == [30, 60, 100, 100]
    assert lim.lockout(address, 4) is None and lim.lockout(address, 5).total_seconds() == 30


@pytest.mark.edge("wrong passwords for alice from one address",
                   "that (user, address) blocked with backoff; alice still logs in from another")
def test_a_user_locked_out_from_one_address_logs_in_from_another(harness: Any, alice: Any) -> None:
    """Item 9 of issue 12: five wrong passwords used to lock the user out from anywhere."""
    clock = Clock()
    lim = limiter(harness, clock)
    user = alice.username
    fail(lim, user, "10.6.6.6", 3)
    assert refused_ms(lim, user, "10.6.6.6") == 30_000  # the attacker's address is blocked
    assert refused_ms(lim, user, "10.0.0.2") is None  # the user, elsewhere, is not
    clock.advance(10)
    assert refused_ms(lim, user, "10.6.6.6") == 20_000
    clock.advance(21)
    assert refused_ms(lim, user, "10.6.6.6") is None  # the block is over...
    fail(lim, user, "10.6.6.6")
    assert refused_ms(lim, user, "10.6.6.6") == 60_000  # ...and the next failure blocks twice as long
    clock.advance(200)  # out of the window: the count starts over
    fail(lim, user, "10.6.6.6")
    assert refused_ms(lim, user, "10.6.6.6") is None


def test_guessing_across_names_blocks_the_address(harness: Any, alice: Any) -> None:
    clock = Clock()
    lim = limiter(harness, clock)
    for i in range(5):
        fail(lim, f"guess-{uuid.uuid4().hex[:6]}-{i}", "10.7.7.7")
    assert refused_ms(lim, alice.username, "10.7.7.7") == 30_000
    assert refused_ms(lim, alice.username, "10.7.7.8") is None


def test_success_clears_the_pair(harness: Any, alice: Any) -> None:
    clock = Clock()
    lim = limiter(harness, clock)
    fail(lim, alice.username, "10.8.8.8", 2)
    asyncio.run(lim.succeeded(alice.username, "10.8.8.8"))
    fail(lim, alice.username, "10.8.8.8", 2)
    assert refused_ms(lim, alice.username, "10.8.8.8") is None  # two since the success, not four


def test_idle_rows_are_pruned(harness: Any) -> None:
    """A flood of made-up names leaves rows only until the window (and any block) ends."""
    clock = Clock()
    lim = limiter(harness, clock, max_failures_per_address=1000)
    for i in range(30):
        fail(lim, f"made-up-{i}", "10.1.1.1")
    rows = lambda: harness.db.read_sync(lambda conn: conn.execute(select(func.count()).select_from(login_failures)).scalar())  # noqa: E731
    assert rows() == 31  # 30 pairs and the address
    clock.advance(1000)
    fail(lim, "someone", "10.2.2.2")
    assert rows() == 2


def test_counts_are_shared_through_the_database(harness: Any, alice: Any) -> None:
    """Two limiters (two server processes) on one database see the same failures."""
    clock = Clock()
    one, two = limiter(harness, clock), limiter(harness, clock)
    fail(one, alice.username, "10.9.9.9", 2)
    fail(two, alice.username, "10.9.9.9")
    assert refused_ms(one, alice.username, "10.9.9.9") == 30_000


@pytest.mark.parametrize("peer,address", [("ipv4:10.1.2.3:5555", "10.1.2.3"), ("ipv6:[::1]:80", "::1"),
                                          ("unix:/tmp/sock", "unix"), ("", "")])
def test_peer_address(peer: str, address: str) -> None:
    assert peer_address(peer) == address


@pytest.fixture(autouse=True)
def forget_failures(harness: Any) -> Iterator[None]:
    """The counts live in the shared server's database: a block left behind would refuse
    other tests' logins from this address."""
    yield
    harness.db.write_sync(lambda conn: conn.execute(delete(login_failures)))


@pytest.fixture
def tight(harness: Any) -> Iterator[Callable[..., LoginLimiter]]:
    state = harness.server.state
    original = state.logins

    def install(**kw: Any) -> LoginLimiter:
        state.logins = LoginLimiter(harness.db, LoginLimits(**kw))
        return state.logins

    yield install
    state.logins = original


def login(harness: Any, username: str, password: str) -> pb.LoginResponse:
    stub = auth_service_pb2_grpc.AuthServiceStub(harness.channel)
    return stub.Login(pb.LoginRequest(username=username, password=password), timeout=30)


def test_login_is_refused_after_failures(harness: Any, alice: Any, bob: Any,
                                         tight: Callable[..., LoginLimiter]) -> None:
    lim = tight(max_failures_per_user=2, max_failures_per_address=100, lockout_seconds=60)
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
    # The block is on (alice, this client's address): from elsewhere alice is not refused.
    asyncio.run(lim.check(alice.username, "192.0.2.10"))
    with pytest.raises(Refused):
        asyncio.run(lim.check(alice.username, "127.0.0.1"))


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
