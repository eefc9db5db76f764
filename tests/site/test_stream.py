"""The stream client against a scripted SiteService: hello, ack on take, result, credit,
outbox kept until ResultAck and resent after a reconnect, a re-offered item not run twice,
a failing handler reported as a failure result, jittered backoff."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest

from balsam_grpc.core.backoff import Backoff
from balsam_grpc.site.stream import SiteStream
from balsam_grpc.v1 import site_service_pb2 as S
from balsam_grpc.v1 import site_service_pb2_grpc

pytestmark = pytest.mark.timeout(60)


def cleanup(job_id: int) -> S.WorkItem:
    return S.WorkItem(id=f"cleanup:{job_id}", cleanup=S.CleanupJob(job_id=job_id, workdir=f"w/{job_id}"))


class ScriptedSite(site_service_pb2_grpc.SiteServiceServicer):
    """Connection 1: offers two items, never acknowledges results, then drops the stream.
    Connection 2: offers item 1 again, acknowledges every result, stays open."""

    def __init__(self) -> None:
        self.connections: list[list[S.SiteServiceConnectRequest]] = []
        self.drop = asyncio.Event()

    async def Connect(self, request_iterator, context):  # noqa: N802
        seen: list[S.SiteServiceConnectRequest] = []
        self.connections.append(seen)
        n = len(self.connections)
        first = await request_iterator.__anext__()
        seen.append(first)
        yield S.SiteServiceConnectResponse(welcome=S.SiteWelcome(server_version="test"))
        if n == 1:
            yield S.SiteServiceConnectResponse(work=cleanup(1))
            yield S.SiteServiceConnectResponse(work=cleanup(2))
            async for msg in request_iterator:
                seen.append(msg)
                if kinds(seen).count("result") == 2 and kinds(seen).count("credit") == 2:
                    return  # drop the stream without acknowledging anything
        else:
            yield S.SiteServiceConnectResponse(work=cleanup(1))
            async for msg in request_iterator:
                seen.append(msg)
                if msg.WhichOneof("message") == "result":
                    yield S.SiteServiceConnectResponse(result_ack=S.ResultAck(work_ids=[msg.result.work_id]))


def kinds(msgs):
    return [m.WhichOneof("message") for m in msgs]


async def _scenario():
    server = grpc.aio.server()
    scripted = ScriptedSite()
    site_service_pb2_grpc.add_SiteServiceServicer_to_server(scripted, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    runs: list[str] = []

    async def handler(item):
        runs.append(item.id)
        if item.cleanup.job_id == 2:
            raise RuntimeError("disk on fire")
        return S.WorkResult(cleanup=S.CleanupResult(job_id=item.cleanup.job_id, removed_files=3))

    def on_error(item, exc):
        return S.WorkResult(cleanup=S.CleanupResult(job_id=item.cleanup.job_id, error=str(exc)))

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stream = SiteStream(channel, site_id=5, token="t", capabilities=["cleanup"], max_in_flight=4,
                        handler=handler, on_error=on_error, backoff=Backoff(initial=0.05, maximum=0.1))
    task = asyncio.create_task(stream.run())

    async def until(cond):
        for _ in range(400):
            if cond():
                return
            await asyncio.sleep(0.02)
        raise AssertionError("condition not reached")

    await until(lambda: len(scripted.connections) == 2 and len(stream.outbox) == 0)
    await stream.stop()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await channel.close()
    await server.stop(0)
    return scripted, stream, runs


def test_outbox_resend_and_no_double_run():
    scripted, stream, runs = asyncio.run(_scenario())
    first, second = scripted.connections
    hello = first[0].hello
    assert hello.site_id == 5 and hello.capabilities == ["cleanup"] and hello.max_in_flight == 4
    # Each item is acknowledged when taken, answered, and its credit returned.
    assert kinds(first).count("ack") == 2 and kinds(first).count("result") == 2 and kinds(first).count("credit") == 2
    results = {m.result.work_id: m.result.cleanup for m in first if m.WhichOneof("message") == "result"}
    assert results["cleanup:1"].removed_files == 3
    assert results["cleanup:2"].error == "disk on fire"  # a failing handler is a failure result, not a crash
    # After the reconnect both unacknowledged results are resent; the re-offered item 1 is
    # answered from the outbox without running again.
    resent = [m.result.work_id for m in second if m.WhichOneof("message") == "result"]
    assert set(resent) == {"cleanup:1", "cleanup:2"}
    assert runs.count("cleanup:1") == 1 and runs.count("cleanup:2") == 1
    assert kinds(second)[0] == "hello" and stream.connections == 2


def test_backoff_is_jittered_and_capped():
    b = Backoff(initial=1, maximum=8, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(8)]
    assert all(0.5 <= d <= 8 for d in delays)
    assert delays[0] <= 1 and max(delays[4:]) > 4 and len(set(delays)) == len(delays)
    b.reset()
    assert b.next_delay() <= 1
