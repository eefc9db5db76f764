"""Tokens expire and can be revoked, and that reaches streams opened before: a site
stream, a launcher session stream and an event watch opened with a token end with
UNAUTHENTICATED within a bounded time when the token is revoked (at once through this
server; through another server sharing the database within the recheck period) or
expires. Other tokens' streams are untouched."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import grpc
import pytest
from seckit import StreamClient, make_site

from balsam_grpc.server.store import users as user_store
from balsam_grpc.v1 import (
    auth_service_pb2,
    auth_service_pb2_grpc,
    event_service_pb2,
    event_service_pb2_grpc,
    session_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
    site_service_pb2,
    site_service_pb2_grpc,
)
from tests.support.waiting import wait_until

Code = grpc.StatusCode


def token_id(harness: Any, caller: Any) -> str:
    stub = auth_service_pb2_grpc.AuthServiceStub(harness.channel)
    return stub.GetCurrentUser(auth_service_pb2.GetCurrentUserRequest(), metadata=caller.metadata,
                               timeout=30).token.id


def site_stream(harness: Any, caller: Any, site_id: int, opened: list[StreamClient]) -> StreamClient:
    s = StreamClient(site_service_pb2_grpc.SiteServiceStub(harness.channel).Connect, caller.metadata)
    opened.append(s)
    s.send(site_service_pb2.SiteServiceConnectRequest(hello=site_service_pb2.SiteHello(
        site_id=site_id, hostname="login1", daemon_version="test", capabilities=["batch_jobs"], max_in_flight=1)))
    assert s.next().WhichOneof("message") == "welcome"
    return s


def session_stream(harness: Any, caller: Any, site_id: int, opened: list[StreamClient]) -> StreamClient:
    s = StreamClient(session_service_pb2_grpc.SessionServiceStub(harness.channel).Connect, caller.metadata)
    opened.append(s)
    s.send(session_service_pb2.SessionServiceConnectRequest(open=session_service_pb2.SessionOpen(
        site_id=site_id, hostname="nid0001", nodes=[session_pb2.NodeInfo(hostname="nid0001", cpus=4)])))
    assert s.next().WhichOneof("message") == "opened"
    return s


def watch_stream(harness: Any, caller: Any, opened: list[StreamClient]) -> StreamClient:
    s = StreamClient(event_service_pb2_grpc.EventServiceStub(harness.channel).WatchEvents, caller.metadata,
                     request=event_service_pb2.WatchEventsRequest())
    opened.append(s)
    assert s.next().cursor
    return s


def assert_unauthenticated(s: StreamClient, word: str) -> None:
    err = s.wait_ended()
    assert err.code() == Code.UNAUTHENTICATED, err.details()
    assert word in err.details()


@pytest.fixture
def recheck(harness: Any) -> Iterator[None]:
    """Streams opened during the test re-read their token every 0.2 s."""
    settings = harness.server.settings
    before = settings.stream_token_recheck_seconds
    settings.stream_token_recheck_seconds = 0.2
    yield
    settings.stream_token_recheck_seconds = before


def test_revoking_a_token_ends_its_streams_at_once(harness: Any, alice: Any, streams: list[StreamClient]) -> None:
    site = make_site(alice)
    site_token = harness.user(alice.username, scope="SITE", site_id=site.id)
    other = harness.user(alice.username)  # another token of the same user
    doomed = [site_stream(harness, site_token, site.id, streams),
              session_stream(harness, site_token, site.id, streams),
              watch_stream(harness, site_token, streams)]
    survivor = watch_stream(harness, other, streams)

    auth = alice.stub(auth_service_pb2_grpc.AuthServiceStub)
    auth.RevokeToken(auth_service_pb2.RevokeTokenRequest(id=token_id(harness, site_token)))
    for s in doomed:
        assert_unauthenticated(s, "revoked")
    assert not survivor.ended.is_set()
    # The site can be connected again with a valid token, and is free to be.
    fresh = harness.user(alice.username, scope="SITE", site_id=site.id)
    site_stream(harness, fresh, site.id, streams)
    wait_until(lambda: harness.server.state.admission.held(alice.user_id) == 2,
               "the revoked streams released their admission slots")


def test_a_stream_ends_when_its_token_expires(harness: Any, streams: list[StreamClient]) -> None:
    short = harness.user(ttl=timedelta(seconds=2))
    s = watch_stream(harness, short, streams)
    assert_unauthenticated(s, "expired")


def test_revocation_by_another_server_reaches_open_streams(harness: Any, alice: Any, recheck: None,
                                                           streams: list[StreamClient]) -> None:
    site = make_site(alice)
    site_token = harness.user(alice.username, scope="SITE", site_id=site.id)
    s = site_stream(harness, site_token, site.id, streams)
    w = watch_stream(harness, site_token, streams)
    tid = token_id(harness, site_token)
    # Written straight to the database, as another server process would: no forget() here.
    harness.db.write_sync(lambda conn: user_store.revoke_token(conn, alice.user_id, tid))
    assert_unauthenticated(s, "revoked")
    assert_unauthenticated(w, "revoked")


def test_streams_of_one_token_share_one_recheck(harness: Any, alice: Any, recheck: None,
                                               streams: list[StreamClient], monkeypatch: pytest.MonkeyPatch) -> None:
    """20 streams of one token re-read its row once per period between them, not once
    each (one user's 2,000 watchers used to bring 2,000 reads together every period)."""
    from balsam_grpc.server import auth as auth_mod

    tid = token_id(harness, alice)
    reads: list[float] = []
    real = auth_mod._token_state

    def counted(conn: Any, token: str) -> Any:
        if token == tid:
            reads.append(time.monotonic())
        return real(conn, token)

    monkeypatch.setattr(auth_mod, "_token_state", counted)
    for _ in range(20):
        watch_stream(harness, alice, streams)
    wait_until(lambda: len(reads) >= 4, "the token re-read a few times")
    first, last = reads[0], reads[-1]
    # Re-reads at least a period apart: at most one per 0.2 s over the span (20 per
    # period when each stream re-read for itself).
    assert len(reads) <= (last - first) / 0.2 + 2, f"{len(reads)} re-reads in {last - first:.2f} s"
    for s in streams:
        assert not s.ended.is_set()


def test_expired_and_revoked_tokens_are_refused_for_new_calls(harness: Any, alice: Any) -> None:
    """The unary side (test_auth covers revocation through RevokeToken): a token revoked
    in the database by another server is refused once this server's cache entry lapses,
    and at once when this server never cached it."""
    fresh = harness.user(alice.username)
    tid = token_id(harness, fresh)  # cached now
    harness.db.write_sync(lambda conn: user_store.revoke_token(conn, alice.user_id, tid))
    harness.server.state.auth.forget(tid)  # what the cache lapse (5 s) does, without the wait
    stub = auth_service_pb2_grpc.AuthServiceStub(harness.channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetCurrentUser(auth_service_pb2.GetCurrentUserRequest(), metadata=fresh.metadata, timeout=30)
    assert caught.value.code() == Code.UNAUTHENTICATED and "revoked" in caught.value.details()
    never_cached = harness.user(alice.username)
    ncid = harness.db.read_sync(lambda conn: user_store.resolve_token(conn, never_cached.token)["id"])
    harness.db.write_sync(lambda conn: user_store.revoke_token(conn, alice.user_id, ncid))
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetCurrentUser(auth_service_pb2.GetCurrentUserRequest(), metadata=never_cached.metadata, timeout=30)
    assert caught.value.code() == Code.UNAUTHENTICATED
