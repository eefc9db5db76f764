"""One live stream per site across server replicas (services/site_stream.py): a daemon
that reconnects through another replica takes the site over, the replica holding the
older stream ends it (told at commit by NOTIFY), and the site stays connected until the
current stream, not the stale one, goes away. Before, each replica knew only its own
streams: both served the site, and the stale one's end marked it disconnected."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from balsam_grpc.server.embedded import EmbeddedServer
from balsam_grpc.server.state import ServerSettings
from tests.support.records import get_site, make_site
from tests.support.site_stream import SiteClient

Code = grpc.StatusCode


def test_a_daemon_moving_to_another_replica_takes_its_site_over(harness: Any, alice: Any) -> None:
    if harness.backend != "postgres":
        pytest.skip("one server process serves SQLite")
    other = EmbeddedServer(ServerSettings(address="127.0.0.1:0", database_url=harness.url, grace_seconds=0.2))
    channel = grpc.insecure_channel(other.address)
    via_other = SimpleNamespace(token=alice.token, harness=SimpleNamespace(channel=channel))
    streams: list[SiteClient] = []
    try:
        site = make_site(alice)
        old = SiteClient(alice, site.id)
        streams.append(old)
        old.welcome()
        new = SiteClient(via_other, site.id)  # the daemon reconnected through the other replica
        streams.append(new)
        new.welcome()
        err = old.ended()
        assert err is not None and err.code() == Code.ABORTED and "replaced" in err.details()
        new.barrier()  # the new stream serves
        assert get_site(alice, site.id).liveness.connected  # the stale stream's end did not clear it
        new.close()
        deadline = time.monotonic() + 30
        while get_site(alice, site.id).liveness.connected:
            assert time.monotonic() < deadline, "the site stayed connected after its current stream ended"
            time.sleep(0.05)
    finally:
        for s in streams:
            s.close()
        channel.close()
        other.stop()
