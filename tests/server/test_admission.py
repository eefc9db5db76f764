"""Admission control (server/admission.py): overload is refused with RESOURCE_EXHAUSTED
SERVER_BUSY and a retry delay, never by falling over; the SDK retries exactly those
refusals. Deterministic: tiny caps on the shared server, handlers held at a gate."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from balsam_grpc.server.admission import (
    WATCH,
    WORK,
    Admission,
    AdmissionLimits,
    Refused,
    stream_kind,
)
from balsam_grpc.server.services.auth import _current as current_user_read
from balsam_grpc.v1 import auth_service_pb2 as pb
from balsam_grpc.v1 import auth_service_pb2_grpc, event_service_pb2, event_service_pb2_grpc
from tests.support.waiting import wait_until

Code = grpc.StatusCode
WAIT = 20.0  # bound on every wait below (never reached when things work)


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(err)
    assert status is not None and status.details
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


@pytest.fixture
def limits(harness: Any) -> Iterator[Callable[..., Admission]]:
    """Swap in tiny caps on the shared server for one test; restore afterwards."""
    state = harness.server.state
    original = state.admission

    def set_limits(**kw: Any) -> Admission:
        state.admission = Admission(AdmissionLimits(**kw))
        return state.admission

    yield set_limits
    state.admission = original


class Gate:
    """Holds GetCurrentUser's database read (the handler these tests call) until opened.

    Only that read: the shared server's own reads go on. Holding every read also held the
    session reaper's periodic one (and those of streams earlier tests left on this
    server), which then counted as a third waiter: `waiting == 2` was never seen and the
    test timed out (CI, test_server_cap_refuses_with_retry_after_and_recovers[sqlite])."""

    def __init__(self, harness: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened = threading.Event()
        self.waiting = 0
        db = harness.db
        real_read = db.read

        async def gated_read(fn: Any, *args: Any, **kwargs: Any) -> Any:
            import asyncio

            if fn is not current_user_read:
                return await real_read(fn, *args, **kwargs)
            self.waiting += 1
            try:
                await asyncio.to_thread(self.opened.wait, WAIT)
            finally:
                self.waiting -= 1
            return await real_read(fn, *args, **kwargs)

        monkeypatch.setattr(db, "read", gated_read)

    def open(self) -> None:
        self.opened.set()


def whoami_future(caller: Any) -> grpc.Future:
    stub = auth_service_pb2_grpc.AuthServiceStub(caller.harness.channel)
    return stub.GetCurrentUser.future(pb.GetCurrentUserRequest(), metadata=caller.metadata, timeout=WAIT * 2)


# -- pure bookkeeping ---------------------------------------------------------------------

def test_calls_are_counted_in_and_out() -> None:
    adm = Admission(AdmissionLimits(max_unary_in_flight=2, max_unary_in_flight_per_user=1, retry_after_ms=40))
    a = adm.enter(1)
    with pytest.raises(Refused) as caught:
        adm.enter(1)  # the user's cap
    assert caught.value.reason == "SERVER_BUSY" and caught.value.metadata["retry_after_ms"] == "40"
    assert "this user has 1 calls in flight" in str(caught.value)
    assert caught.value.code == Code.RESOURCE_EXHAUSTED
    b = adm.enter(2)
    with pytest.raises(Refused) as caught:
        adm.enter(3)  # the server's cap
    assert "2 calls in flight" in str(caught.value)
    assert adm.in_flight == 2 and adm.per_user == {1: 1, 2: 1}  # a refusal counts nothing in
    adm.leave(a)
    assert adm.in_flight == 1 and adm.per_user == {2: 1}
    c = adm.enter(None)  # a public call (Login) counts too
    adm.leave(b)
    adm.leave(c)
    assert adm.in_flight == 0 and adm.per_user == {} and adm.refused == 2


def test_streams_per_user() -> None:
    adm = Admission(AdmissionLimits(max_streams_per_user=2, retry_after_ms=10))
    first, second = adm.open_stream(7), adm.open_stream(7)
    with pytest.raises(Refused) as caught:
        adm.open_stream(7)
    assert caught.value.reason == "TOO_MANY_STREAMS"
    other = adm.open_stream(8)  # another user is not affected
    first()
    first()
    third = adm.open_stream(7)
    for release in (second, third, other):
        release()
    assert adm.streams == {}


def test_watch_streams_do_not_crowd_out_work_streams() -> None:
    """A user's runaway watchers (a dashboard left open many times) must not keep that
    user's own site daemon and launchers from connecting: each kind has its own budget."""
    adm = Admission(AdmissionLimits(max_streams_per_user=2, retry_after_ms=10))
    watches = [adm.open_stream(7, WATCH), adm.open_stream(7, WATCH)]
    with pytest.raises(Refused):
        adm.open_stream(7, WATCH)
    site, session = adm.open_stream(7, WORK), adm.open_stream(7, WORK)
    with pytest.raises(Refused) as caught:
        adm.open_stream(7, WORK)
    assert "site and launcher" in str(caught.value)
    for release in (*watches, site, session):
        release()
    assert adm.streams == {}


def test_stream_kind_of_each_streaming_method() -> None:
    assert stream_kind("EventService.WatchEvents") == WATCH
    assert stream_kind("SiteService.Connect") == WORK
    assert stream_kind("SessionService.Connect") == WORK


# -- on the wire --------------------------------------------------------------------------

def test_server_cap_refuses_with_retry_after_and_recovers(harness: Any, alice: Any, bob: Any,
                                                          limits: Callable[..., Admission],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    adm = limits(max_unary_in_flight=2, max_unary_in_flight_per_user=2, retry_after_ms=300)
    gate = Gate(harness, monkeypatch)
    held = [whoami_future(alice), whoami_future(bob)]
    wait_until(lambda: adm.in_flight == 2 and gate.waiting == 2, "two handlers held at the gate")

    with pytest.raises(grpc.RpcError) as caught:
        whoami_future(bob).result()
    err = caught.value
    assert err.code() == Code.RESOURCE_EXHAUSTED
    assert "busy" in err.details()
    info = error_info(err)
    assert info.reason == "SERVER_BUSY" and info.metadata["retry_after_ms"] == "300"
    assert dict(err.trailing_metadata())["retry-after-ms"] == "300"

    gate.open()
    assert [f.result().user.id for f in held] == [alice.user_id, bob.user_id]
    wait_until(lambda: adm.in_flight == 0, "slots released")
    assert whoami_future(bob).result().user.id == bob.user_id
    assert adm.refused == 1


def test_per_user_cap_leaves_other_users_served(harness: Any, alice: Any, bob: Any,
                                                limits: Callable[..., Admission],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    adm = limits(max_unary_in_flight=10, max_unary_in_flight_per_user=1)
    gate = Gate(harness, monkeypatch)
    alices = whoami_future(alice)
    wait_until(lambda: adm.per_user.get(alice.user_id) == 1, "alice's call admitted")
    with pytest.raises(grpc.RpcError) as caught:
        whoami_future(alice).result()
    assert caught.value.code() == Code.RESOURCE_EXHAUSTED and error_info(caught.value).reason == "SERVER_BUSY"
    bobs = whoami_future(bob)  # admitted: bob has his own budget
    wait_until(lambda: adm.per_user.get(bob.user_id) == 1, "bob's call admitted")
    gate.open()
    assert alices.result().user.id == alice.user_id and bobs.result().user.id == bob.user_id
    assert adm.refused == 1


def test_sdk_retries_server_busy_after_the_delay(harness: Any, alice: Any,
                                                 limits: Callable[..., Admission]) -> None:
    from balsam_grpc.sdk import Client

    adm = limits(max_unary_in_flight=1, max_unary_in_flight_per_user=1, retry_after_ms=50)
    held = harness.embedded.loop.run(_enter(adm, alice.user_id))  # the only slot, held by "another call"
    result: dict[str, Any] = {}
    with Client(harness.address, token=alice.token, mutation_attempts=50) as client:
        worker = threading.Thread(target=lambda: result.setdefault("me", client.whoami()))
        worker.start()
        wait_until(lambda: adm.refused >= 2, "the SDK's call refused and retried")
        assert "me" not in result and worker.is_alive()
        harness.embedded.loop.run(_leave(adm, held))
        worker.join(WAIT)
    assert result["me"].user.id == alice.user_id


def test_sdk_does_not_retry_other_resource_exhausted(harness: Any, alice: Any,
                                                     limits: Callable[..., Admission]) -> None:
    from balsam_grpc.sdk import Client
    from balsam_grpc.sdk.client import server_busy_delay

    adm = limits(max_streams_per_user=0)
    with Client(harness.address, token=alice.token) as client:
        calls = client.open_stream("EventService", "WatchEvents", event_service_pb2.WatchEventsRequest())
        with pytest.raises(grpc.RpcError) as caught:
            next(iter(calls))
        assert caught.value.code() == Code.RESOURCE_EXHAUSTED
        assert error_info(caught.value).reason == "TOO_MANY_STREAMS"
        assert server_busy_delay(caught.value) is None
        assert client.whoami().user.id == alice.user_id  # unary calls are not streams
    assert adm.refused == 1  # refused once, not retried


def test_stream_cap_per_user(harness: Any, alice: Any, bob: Any, limits: Callable[..., Admission]) -> None:
    adm = limits(max_streams_per_user=1)
    stub = event_service_pb2_grpc.EventServiceStub(harness.channel)
    first = stub.WatchEvents(event_service_pb2.WatchEventsRequest(), metadata=alice.metadata)
    assert next(first).cursor  # open and served
    second = stub.WatchEvents(event_service_pb2.WatchEventsRequest(), metadata=alice.metadata)
    with pytest.raises(grpc.RpcError) as caught:
        next(second)
    assert caught.value.code() == Code.RESOURCE_EXHAUSTED
    info = error_info(caught.value)
    assert info.reason == "TOO_MANY_STREAMS" and int(info.metadata["retry_after_ms"]) > 0
    bobs = stub.WatchEvents(event_service_pb2.WatchEventsRequest(), metadata=bob.metadata)
    assert next(bobs).cursor
    first.cancel()
    wait_until(lambda: adm.held(alice.user_id) == 0, "alice's stream released")
    again = stub.WatchEvents(event_service_pb2.WatchEventsRequest(), metadata=alice.metadata)
    assert next(again).cursor
    again.cancel()
    bobs.cancel()
    wait_until(lambda: adm.streams == {}, "every stream released")


async def _enter(adm: Admission, user_id: int) -> int:
    return adm.enter(user_id)


async def _leave(adm: Admission, user: int) -> None:
    adm.leave(user)


def test_a_burst_is_answered_ok_or_resource_exhausted(harness: Any, alice: Any) -> None:
    """3,000 calls at once on one connection: more than gRPC core's default pending-call
    limit (1,000, beyond which it cancels calls with CANCELLED). With the server's
    options every call reaches admission control: OK or RESOURCE_EXHAUSTED, nothing else,
    and the server answers normally afterwards."""
    import asyncio
    from collections import Counter

    from balsam_grpc.v1 import job_service_pb2, job_service_pb2_grpc

    async def burst() -> Counter[str]:
        codes: Counter[str] = Counter()
        async with grpc.aio.insecure_channel(harness.address) as channel:
            stub = job_service_pb2_grpc.JobServiceStub(channel)

            async def one() -> None:
                try:
                    await stub.CountJobs(job_service_pb2.CountJobsRequest(), metadata=alice.metadata, timeout=120)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as err:
                    codes[err.code().name] += 1

            await asyncio.gather(*(one() for _ in range(3000)))
        return codes

    codes = asyncio.run(burst())
    assert sum(codes.values()) == 3000 and codes["OK"] > 0
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert whoami_future(alice).result().user.id == alice.user_id


# -- the load script ----------------------------------------------------------------------

@pytest.mark.timeout(180)
def test_load_script_runs_and_reports(tmp_path: Any) -> None:
    """scripts/bench_load.py, small (SQLite, 20,000 jobs, a few seconds): it runs and
    reports every figure; the overload burst is answered with OK or RESOURCE_EXHAUSTED
    only, and the server still serves afterwards. No timing is asserted."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_load.py"
    env = {k: v for k, v in os.environ.items() if k != "BALSAM_TEST_DATABASE_URL"}
    done = subprocess.run([sys.executable, str(script), "--database", f"sqlite:///{tmp_path / 'load.db'}",
                           "--jobs", "20000", "--duration", "6", "--clients", "4", "--sites", "5",
                           "--sessions", "10", "--burst", "600", "--lease-backlog", "2000", "--json"],
                          capture_output=True, text=True, timeout=170, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["jobs_seeded"] == 20000 and figures["seed_jobs_per_s"] > 0
    for key in ("list_p50_ms", "list_p99_ms", "create_p50_ms", "create_p99_ms", "server_rss_mb_over_time",
                "errors_by_code", "requests_per_s"):
        assert key in figures
    assert {"create", "list", "update"} <= set(figures["requests_per_s"])
    # The capacity figure and the generator's own CPU (whether it took the server's share).
    assert figures["unary_calls_per_server_cpu_s"] > 0 and figures["generator_cpu_percent_of_one_core"] > 0
    # Leases the server made, counted in the database: the sessions drew on the backlog.
    assert figures["jobs_leased_per_s"] > 0 and 0 <= figures["lease_backlog_left"] < 2000
    assert figures["server_rss_mb_over_time"] and figures["server_alive"]
    burst = figures["burst"]
    assert sum(burst["codes"].values()) == 600 and set(burst["codes"]) <= {"OK", "RESOURCE_EXHAUSTED"}
    assert burst["call_after_burst"] == "OK"
    assert not {code for code in figures["errors_by_code"] if "INTERNAL" in code or "UNKNOWN" in code}



def test_a_call_leaves_the_admission_it_entered(harness: Any, alice: Any, limits: Callable[..., Admission],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # The caps may be replaced while calls are in flight (the fixture does it between
    # tests): a call ends in the bookkeeping it was admitted by, never in the new one.
    first = limits(max_unary_in_flight=4, max_unary_in_flight_per_user=4)
    gate = Gate(harness, monkeypatch)
    held = whoami_future(alice)
    wait_until(lambda: first.in_flight == 1 and gate.waiting == 1, "the handler held at the gate")
    second = limits(max_unary_in_flight=4, max_unary_in_flight_per_user=4)
    gate.open()
    assert held.result().user.id == alice.user_id
    wait_until(lambda: first.in_flight == 0, "the slot released where it was taken")
    assert second.in_flight == 0 and second.per_user == {} and first.per_user == {}
