"""Pilot creation is idempotent: the PilotDriver's CreateBatchJob carries a request_id that
is journaled before it is sent and kept until an answer is seen, so an answer lost on the
wire (the proxy swallows it, then resets the connection: UNAVAILABLE) is retried with the
same request and the server answers with the first pilot; and a daemon killed before the
answer sends the same request again after its restart. Real server (SQLite, and PostgreSQL
when BALSAM_TEST_DATABASE_URL is set), real aio channel, the fault-injection proxy."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import grpc

from balsam_grpc.site.elastic import PilotRequest as PlannedPilot
from balsam_grpc.site.elastic import Plan
from balsam_grpc.site.journal import Journal, PilotRequest
from balsam_grpc.site.pilots import PilotDriver
from balsam_grpc.site.settings import QueueMaintainerSettings, SiteSettings
from balsam_grpc.v1 import (
    batch_job_pb2,
    batch_job_service_pb2,
    batch_job_service_pb2_grpc,
    site_pb2,
    site_service_pb2,
    site_service_pb2_grpc,
)
from tests.support.proxy import Proxy

DROP_SECONDS = 0.5


def make_site(alice) -> int:
    req = site_service_pb2.CreateSiteRequest(site=site_pb2.Site(name=f"pilots-{secrets.token_hex(4)}"))
    return alice.stub(site_service_pb2_grpc.SiteServiceStub).CreateSite(req).site.id


def site_settings(site_id: int) -> SiteSettings:
    return SiteSettings(site_id=site_id, name="pilots", queue_maintainer=QueueMaintainerSettings(
        enabled=True, queue="debug", num_queued=1, nodes=1, wall_time_min=10))


def driver(channel, alice, site_id: int, journal: Journal) -> PilotDriver:
    async def never_queued(batch_job_id: int) -> bool:
        return False

    d = PilotDriver(settings=site_settings(site_id), channel=channel, token=alice.token, journal=journal,
                    windows=list, still_queued=never_queued)
    d.retry_delays_s = (1.0, 1.0, 2.0)  # past the drop window, so the retry gets through
    return d


def pilots_of(alice, site_id: int) -> list[batch_job_pb2.BatchJob]:
    req = batch_job_service_pb2.ListBatchJobsRequest(filter=batch_job_service_pb2.BatchJobFilter(site_ids=[site_id]))
    return list(alice.stub(batch_job_service_pb2_grpc.BatchJobServiceStub).ListBatchJobs(req).batch_jobs)


def test_lost_create_answer_is_retried_into_the_same_pilot(harness, alice, tmp_path: Path):
    site_id = make_site(alice)
    journal = Journal(tmp_path / "journal.json")
    proxy = Proxy(harness.address)
    plan = Plan(create=(PlannedPilot(1, 10, "debug", "", "serial", "test"),))

    async def scenario() -> tuple[int, int]:
        async with grpc.aio.insecure_channel(proxy.address) as channel:
            d = driver(channel, alice, site_id, journal)
            await d.list_pilots()  # connected before the fault
            swallowed, accepted = proxy.swallowed, proxy.accepted
            proxy.drop_responses(DROP_SECONDS)
            await d.apply(plan, "maintainer")
            assert proxy.swallowed > swallowed, "no answer was dropped: the fault did not happen"
            assert proxy.accepted > accepted, "the request was not sent again on a new connection"
            # The maintainer now counts the pilot as its own: nothing more is created.
            await d.evaluate()
            await d.evaluate()
            return swallowed, accepted

    try:
        asyncio.run(scenario())
    finally:
        proxy.close()
    pilots = pilots_of(alice, site_id)
    assert len(pilots) == 1, [p.id for p in pilots]
    assert journal.pilot_origin(pilots[0].id) == "maintainer" and journal.pilot_requests() == []


def test_request_unanswered_at_a_crash_is_resent_not_duplicated(harness, alice, tmp_path: Path):
    site_id = make_site(alice)
    journal = Journal(tmp_path / "journal.json")
    # The driver journaled its request and sent it; the server created the pilot; the
    # daemon was killed before the answer arrived (so no origin was recorded).
    request = PilotRequest(request_id=f"pilot-{site_id}-maintainer-{secrets.token_hex(8)}", origin="maintainer",
                           batch_job={"site_id": site_id, "num_nodes": 1, "wall_time_min": 10, "queue": "debug",
                                      "project": "", "job_mode": 1}, reason="test")
    journal.record_pilot_request(request)
    stub = alice.stub(batch_job_service_pb2_grpc.BatchJobServiceStub)
    first = stub.CreateBatchJob(batch_job_service_pb2.CreateBatchJobRequest(
        batch_job=batch_job_pb2.BatchJob(**request.batch_job), request_id=request.request_id)).batch_job
    assert journal.pilot_origin(first.id) == ""

    async def restarted() -> None:
        async with grpc.aio.insecure_channel(harness.address) as channel:
            d = driver(channel, alice, site_id, Journal(tmp_path / "journal.json"))
            await d.evaluate()
            await d.evaluate()

    asyncio.run(restarted())
    pilots = pilots_of(alice, site_id)
    assert [p.id for p in pilots] == [first.id]  # the maintainer wanted 1 and has exactly 1
    after = Journal(tmp_path / "journal.json")
    assert after.pilot_origin(first.id) == "maintainer" and after.pilot_requests() == []


def test_refused_request_is_dropped(harness, alice, tmp_path: Path):
    site_id = make_site(alice)
    journal = Journal(tmp_path / "journal.json")
    bad = PilotRequest(request_id="pilot-bad", origin="elastic",
                       batch_job={"site_id": site_id, "num_nodes": 0, "wall_time_min": 10, "queue": "debug"})
    journal.record_pilot_request(bad)

    async def scenario() -> int | None:
        async with grpc.aio.insecure_channel(harness.address) as channel:
            return await driver(channel, alice, site_id, journal).create(bad)

    assert asyncio.run(scenario()) is None
    assert journal.pilot_requests() == [] and pilots_of(alice, site_id) == []
