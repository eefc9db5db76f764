"""Stopping a server drains it (server/drain.py): its health turns NOT_SERVING, its open
streams end UNAVAILABLE with reason DRAINING (clients reconnect elsewhere at once, see
tests/faults/test_replicas.py for the handover between replicas), new streams are
refused the same way, and unary calls are still answered until gRPC's own stop."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from balsam_grpc.core.errors import DRAINING, error_reason
from balsam_grpc.v1 import event_service_pb2, event_service_pb2_grpc
from tests.conftest import Harness

pytestmark = pytest.mark.timeout(60)


def _ends_draining(call: object) -> None:
    with pytest.raises(grpc.RpcError) as err:
        for _ in call:  # type: ignore[attr-defined]
            pass
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    assert error_reason(err.value) == DRAINING, err.value.details()


def test_stop_reports_not_serving_and_ends_streams_with_draining(tmp_path: Path) -> None:
    h = Harness("sqlite", f"sqlite:///{tmp_path / 'drain.db'}")
    closed = False
    try:
        events = h.user().stub(event_service_pb2_grpc.EventServiceStub)
        watch = events.WatchEvents(event_service_pb2.WatchEventsRequest())
        assert next(watch).cursor  # the stream is open
        health = health_pb2_grpc.HealthStub(h.channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert next(health).status == health_pb2.HealthCheckResponse.SERVING

        # The drain step alone (stop() runs it after NOT_SERVING, before gRPC's stop).
        h.embedded.loop.run(h.server.state.drain.start(5.0))
        _ends_draining(watch)
        _ends_draining(events.WatchEvents(event_service_pb2.WatchEventsRequest()))  # no new stream
        assert events.ListEvents(event_service_pb2.ListEventsRequest(page_size=1)) is not None  # unary: served
        assert not h.server.state.drain.streams

        h.embedded.stop()
        closed = True
        statuses = []
        with pytest.raises(grpc.RpcError):
            for reply in health:
                statuses.append(reply.status)
        h.channel.close()
        assert statuses[:1] == [health_pb2.HealthCheckResponse.NOT_SERVING]
    finally:
        if not closed:
            h.close()
