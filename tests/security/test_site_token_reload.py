"""A site daemon picks up a renewed token without a restart: the site stream re-reads
`<site dir>/.token` when the file changes, and after the server ends the stream with
UNAUTHENTICATED (the old token revoked) it reconnects with the new one."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

from seckit import make_site

from balsam_grpc.core.backoff import Backoff
from balsam_grpc.core.channel import channel_options
from balsam_grpc.site.layout import SiteLayout
from balsam_grpc.site.stream import SiteStream
from balsam_grpc.site.token_source import TokenSource
from balsam_grpc.v1 import auth_service_pb2, auth_service_pb2_grpc
from tests.support.waiting import wait_until


def test_token_source_follows_the_file(tmp_path: Path) -> None:
    layout = SiteLayout.at(tmp_path)
    layout.write_token("blsm_first")
    source = TokenSource(layout.read_token(), layout.token_file)
    assert source() == "blsm_first"
    layout.write_token("blsm_second")
    os.utime(layout.token_file, ns=(1, 1))  # a distinct stamp even within one clock tick
    assert source() == "blsm_second"
    assert source.metadata == (("authorization", "Bearer blsm_second"),)
    layout.token_file.write_text("")  # caught mid-rewrite: keep the last good token
    assert source() == "blsm_second"
    layout.token_file.unlink()
    assert source.refresh() == "blsm_second"
    assert TokenSource("from-env")() == "from-env"  # no file: fixed


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_site_stream_reconnects_with_a_renewed_token(harness: Any, alice: Any, tmp_path: Path) -> None:
    site = make_site(alice)
    auth = alice.stub(auth_service_pb2_grpc.AuthServiceStub)

    def site_token() -> auth_service_pb2.CreateTokenResponse:
        return auth.CreateToken(auth_service_pb2.CreateTokenRequest(
            scope=auth_service_pb2.TOKEN_SCOPE_SITE, site_id=site.id, description="daemon"))

    layout = SiteLayout.at(tmp_path)
    old = site_token()
    layout.write_token(old.token)
    source = TokenSource(layout.read_token(), layout.token_file)
    loop = LoopThread()

    async def start() -> tuple[Any, SiteStream, asyncio.Task[None]]:
        import grpc

        channel = grpc.aio.insecure_channel(harness.address, options=channel_options())

        async def no_work(item: Any) -> None:
            return None

        stream = SiteStream(channel, site_id=site.id, token=source, capabilities=["batch_jobs"], max_in_flight=1,
                            handler=no_work, on_error=lambda item, exc: None,
                            backoff=Backoff(initial=0.05, maximum=0.2))
        return channel, stream, asyncio.ensure_future(stream.run())

    channel, stream, task = loop.run(start())
    try:
        wait_until(lambda: stream.connections == 1, "first connection")
        new = site_token()
        layout.write_token(new.token)  # renewed on disk while the daemon runs
        auth.RevokeToken(auth_service_pb2.RevokeTokenRequest(id=old.info.id))
        wait_until(lambda: stream.connections == 2, "reconnected with the renewed token")
        assert source() == new.token
        listed = {t.id: t for t in auth.ListTokens(auth_service_pb2.ListTokensRequest(include_inactive=True)).tokens}
        assert listed[old.info.id].revoked and not listed[new.info.id].revoked
    finally:
        async def stop() -> None:
            await stream.stop(drain_seconds=0.1)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await channel.close()

        loop.run(stop())
        loop.close()
