"""Prometheus metrics of a replica on --metrics-address (server/metrics.py): calls by
method and status code with latency, open streams, leases, events read and delivered by
the fanout, admission refusals and the database pool, scraped over HTTP."""

from __future__ import annotations

import re
import time
import urllib.request
from typing import Any

import grpc

from balsam_grpc.server.embedded import EmbeddedServer
from balsam_grpc.server.state import ServerSettings
from balsam_grpc.v1 import event_service_pb2, event_service_pb2_grpc, job_service_pb2, job_service_pb2_grpc


def _value(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + ("{" if labels else " ")):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_are_served_per_replica(harness: Any, alice: Any, tmp_path: Any) -> None:
    url = harness.url if harness.backend == "postgres" else f"sqlite:///{tmp_path / 'metrics.db'}"
    server = EmbeddedServer(ServerSettings(address="127.0.0.1:0", database_url=url, grace_seconds=0.2,
                                           metrics_address="127.0.0.1:0"))
    channel = grpc.insecure_channel(server.address)
    try:
        token = alice.token if harness.backend == "postgres" else _local_token(server)
        md = (("authorization", f"Bearer {token}"),)
        jobs = job_service_pb2_grpc.JobServiceStub(channel)
        jobs.ListJobs(job_service_pb2.ListJobsRequest(page_size=1), metadata=md, timeout=30)
        try:
            jobs.GetJob(job_service_pb2.GetJobRequest(id=987_654_321), metadata=md, timeout=30)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND
        watch = event_service_pb2_grpc.EventServiceStub(channel).WatchEvents(
            event_service_pb2.WatchEventsRequest(), metadata=md, timeout=60)
        next(watch)  # open

        def scrape() -> str:
            port = server.server.metrics_port
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
                return resp.read().decode()

        text = scrape()
        assert _value(text, "balsam_rpc_calls_total", method="Job.ListJobs", code="OK") == 1
        assert _value(text, "balsam_rpc_calls_total", method="Job.GetJob", code="NOT_FOUND") == 1
        assert _value(text, "balsam_rpc_seconds_count", method="Job.ListJobs") == 1
        assert _value(text, "balsam_streams_open", method="Event.WatchEvents") == 1
        assert re.search(r"^balsam_db_pool_size \d", text, re.M)
        watch.cancel()
        deadline = time.monotonic() + 30
        while _value(scrape(), "balsam_streams_open", method="Event.WatchEvents") != 0:
            assert time.monotonic() < deadline, "the closed stream is still counted open"
            time.sleep(0.05)
    finally:
        channel.close()
        server.stop()


def _local_token(server: EmbeddedServer) -> str:
    from datetime import timedelta

    from balsam_grpc.server.auth import hash_password
    from balsam_grpc.server.convert import utcnow
    from balsam_grpc.server.store import users as user_store

    def work(conn: Any) -> str:
        user = user_store.create_user(conn, "metrics-user", hash_password("x" * 20), admin=False, now=utcnow())
        secret, _ = user_store.issue_token(conn, user["id"], scope="USER", site_id=None, ttl=timedelta(hours=1),
                                           description="test", now=utcnow())
        return secret

    return server.db.write_sync(work)


def test_call_latency_is_a_histogram_of_le_buckets() -> None:
    from prometheus_client import generate_latest

    from balsam_grpc.server.metrics import Metrics

    metrics = Metrics()
    for seconds in (0.001, 0.0011, 0.3, 99.0):  # on a bound, just above it, mid-range, above every bound
        metrics.call("Job.GetJob", "OK", seconds)
    metrics.call("Job.GetJob", "NOT_FOUND", 0.002)
    text = generate_latest(metrics.registry).decode()
    assert _value(text, "balsam_rpc_calls_total", method="Job.GetJob", code="OK") == 4
    assert _value(text, "balsam_rpc_calls_total", method="Job.GetJob", code="NOT_FOUND") == 1
    assert _value(text, "balsam_rpc_seconds_bucket", method="Job.GetJob", le="0.001") == 1
    assert _value(text, "balsam_rpc_seconds_bucket", method="Job.GetJob", le="0.0025") == 3
    assert _value(text, "balsam_rpc_seconds_bucket", method="Job.GetJob", le="0.5") == 4
    assert _value(text, "balsam_rpc_seconds_bucket", method="Job.GetJob", le="30.0") == 4
    assert _value(text, "balsam_rpc_seconds_bucket", method="Job.GetJob", le="+Inf") == 5
    assert _value(text, "balsam_rpc_seconds_count", method="Job.GetJob") == 5
    assert abs(_value(text, "balsam_rpc_seconds_sum", method="Job.GetJob") - 99.3041) < 1e-9
