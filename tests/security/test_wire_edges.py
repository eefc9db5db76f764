"""The server's edges against a real server process: memory before authentication,
per-method receive limits, and connections that never become calls.

- A flood of 40 MiB BatchCreateJobs with a made-up token is refused UNAUTHENTICATED
  before the body is read: the server's resident memory stays within 100 MB of where it
  started (it used to parse every body first: 87 MB -> 3.1 GB, never returned).
- An authenticated request over its method's limit is refused RESOURCE_EXHAUSTED
  naming the limit, before parsing; and memory comes back after a large legitimate one.
- Hundreds of TCP connections that send nothing (or half an HTTP/2 preface) are closed
  by the server after its handshake timeout, while a real client keeps working.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from balsam_grpc.v1 import job_pb2, job_service_pb2
from tests.support.server_proc import ServerProcess

MiB = 1024 * 1024
HANDSHAKE_TIMEOUT_MS = 1500
WAIT = 60.0  # bound on every wait (never reached when things work)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    home = tmp_path_factory.mktemp("edges")
    proc = ServerProcess(home, f"sqlite:///{home / 'balsam.db'}",
                         extra_env={"BALSAM_SERVER_HANDSHAKE_TIMEOUT_MS": str(HANDSHAKE_TIMEOUT_MS)})
    proc.start()
    yield proc
    proc.stop()


def bulk_create_bytes(total: int) -> bytes:
    """A serialized BatchCreateJobsRequest of about `total` bytes (10,000 jobs)."""
    per_job = total // 10_000
    request = job_service_pb2.BatchCreateJobsRequest(jobs=[
        job_pb2.Job(app_id=1, workdir=f"flood/{i}", parameters={"p": "x" * per_job}) for i in range(10_000)])
    return request.SerializeToString()


def call_raw(channel: grpc.Channel, body: bytes, token: str) -> grpc.RpcError | bytes:
    method = channel.unary_unary("/balsam.v1.JobService/BatchCreateJobs")  # bytes in, bytes out
    try:
        return method(body, metadata=(("authorization", f"Bearer {token}"),), timeout=WAIT)
    except grpc.RpcError as err:
        return err


@pytest.mark.edge("10 rounds of 3 x 40 MiB BatchCreateJobs with a made-up token",
                   "UNAUTHENTICATED; server RSS within 100 MiB of its start")
def test_bogus_token_flood_leaves_memory_alone(server: ServerProcess, record_property) -> None:
    assert server.proc is not None
    body = bulk_create_bytes(40 * MiB)
    assert len(body) >= 40 * MiB
    options = [("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(server.address, options=options) as channel:
        grpc.channel_ready_future(channel).result(timeout=WAIT)
        start = rss_bytes(server.proc.pid)
        for _ in range(10):
            results: list[grpc.RpcError | bytes] = []
            threads = [threading.Thread(target=lambda: results.append(call_raw(channel, body, "made-up-token")))
                       for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(WAIT)
            assert len(results) == 3
            for r in results:
                assert isinstance(r, grpc.RpcError) and r.code() == grpc.StatusCode.UNAUTHENTICATED, r
        grown = rss_bytes(server.proc.pid) - start
    record_property("observed", f"30 x UNAUTHENTICATED; RSS grew {grown / MiB:.0f} MiB")
    assert grown < 100 * MiB, f"server RSS grew by {grown / MiB:.0f} MiB under a bogus-token flood"
    # The server still answers real clients.
    with server.client() as client:
        assert client.whoami().user.username


@pytest.mark.edge("a 2 MiB GetJob; a 62 MiB BatchCreateJobs",
                   "RESOURCE_EXHAUSTED naming the method and its limit, before parsing")
def test_method_limit_refused_before_parsing(server: ServerProcess) -> None:
    """A GetJob of 2 MiB (its limit is 1 MiB) and a BatchCreateJobs over its own limit."""
    options = [("grpc.max_send_message_length", -1)]
    with grpc.insecure_channel(server.address, options=options) as channel:
        get = channel.unary_unary("/balsam.v1.JobService/GetJob")
        with pytest.raises(grpc.RpcError) as caught:
            # field 99 (unknown): bytes a GetJob never carries, and never parsed
            get(b"\x9a\x06" + _varint(2 * MiB) + b"x" * (2 * MiB), timeout=WAIT,
                metadata=(("authorization", f"Bearer {server.token}"),))
        err = caught.value
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert "1,048,576 bytes" in err.details() and "JobService.GetJob" in err.details()
        result = call_raw(channel, bulk_create_bytes(62 * MiB), server.token)
        assert isinstance(result, grpc.RpcError) and result.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, result
        assert "61,440,000 bytes" in result.details()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _closed_by_peer(sock: socket.socket) -> bool:
    """True once the server closed the connection (EOF or reset), False while open."""
    sock.setblocking(False)
    try:
        while sock.recv(65536):  # the server's SETTINGS (and a GOAWAY) arrive before the EOF
            pass
        return True
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


@pytest.mark.edge("300 silent TCP connections + 20 half prefaces",
                   "closed after the handshake grace; real clients served meanwhile")
def test_idle_connections_are_closed(server: ServerProcess, record_property) -> None:
    silent = [socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) for _ in range(300)]
    partial = []
    for _ in range(20):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
        s.sendall(b"PRI * HTTP/2.0\r\n")  # half a client preface, then nothing
        partial.append(s)
    opened = time.monotonic()
    try:
        with server.client() as client:
            open_socks = silent + partial
            # 10x the handshake timeout: generous on a loaded machine, and well under the
            # 30 s after which keepalive alone (ping every 20 s, 10 s to answer) used to end them.
            deadline = opened + 10 * HANDSHAKE_TIMEOUT_MS / 1000
            while open_socks:
                assert time.monotonic() < deadline, f"{len(open_socks)} idle connections still open"
                assert client.whoami().user.username  # a real client keeps working meanwhile
                open_socks = [s for s in open_socks if not _closed_by_peer(s)]
                time.sleep(0.2)
            record_property("observed", f"all 320 closed after {time.monotonic() - opened:.1f} s")
            # Not closed before the handshake timeout: the grace is honoured.
            assert time.monotonic() - opened >= HANDSHAKE_TIMEOUT_MS / 1000 * 0.9
    finally:
        for s in silent + partial:
            s.close()


def _legitimate_bulk(app_id: int, tag: str, jobs: int) -> bytes:
    """A BatchCreateJobsRequest of `jobs` jobs with 4 KB of parameters each (40 MiB at 10,000)."""
    return job_service_pb2.BatchCreateJobsRequest(jobs=[
        job_pb2.Job(app_id=app_id, workdir=f"{tag}/{i}", parameters={"p": "x" * 4000}) for i in range(jobs)
    ]).SerializeToString()


@pytest.mark.edge("2 rounds of 3 concurrent legitimate 10 MiB BatchCreateJobs (2,500 jobs each)",
                   "server RSS back within 40 MiB of its start")
def test_memory_comes_back_after_large_legitimate_requests(server: ServerProcess, record_property) -> None:
    """Concurrent large creates: the memory of each, not only of the first to finish, is
    handed back (the trim after the first reset the count, so the others' stayed), and
    in few malloc arenas. Measured with 3 rounds of 3 x 40 MiB (the issue's size, too slow
    for the suite): 98 -> 285 MiB before, 97 -> 129 MiB after (see server/wire.py)."""
    from balsam_grpc.v1 import app_pb2, app_service_pb2, app_service_pb2_grpc, site_pb2, site_service_pb2
    from balsam_grpc.v1 import site_service_pb2_grpc

    assert server.proc is not None
    md = (("authorization", f"Bearer {server.token}"),)
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(server.address, options=options) as channel:
        site = site_service_pb2_grpc.SiteServiceStub(channel).CreateSite(
            site_service_pb2.CreateSiteRequest(site=site_pb2.Site(name="memory")), metadata=md, timeout=WAIT).site
        app = app_service_pb2_grpc.AppServiceStub(channel).CreateApp(app_service_pb2.CreateAppRequest(
            app=app_pb2.App(site_id=site.id, name="mem", command_template="echo {{ p }}",
                            parameters=[app_pb2.AppParameter(name="p")])), metadata=md, timeout=WAIT).app
        start = rss_bytes(server.proc.pid)
        seen = []
        for r in range(2):
            bodies = [_legitimate_bulk(app.id, f"m{r}-{k}", 2500) for k in range(3)]
            results: list[grpc.RpcError | bytes] = []
            threads = [threading.Thread(target=lambda b=b: results.append(call_raw(channel, b, server.token)))  # noqa: F821 - deleted below, after the threads ran
                       for b in bodies]
            for t in threads:
                t.start()
            for t in threads:
                t.join(WAIT * 2)
            assert len(results) == 3 and all(isinstance(x, bytes) for x in results), results
            del bodies, results
            # The trim runs half a second after the last request settles (server/wire.py).
            time.sleep(1.5)
            seen.append(rss_bytes(server.proc.pid))
    grown = seen[-1] - start
    record_property("observed", f"RSS {start / MiB:.0f} -> " + " -> ".join(f"{x / MiB:.0f}" for x in seen) + " MiB")
    # Before: +70 MiB for these rounds (98 -> 159 -> 168), now about +10.
    assert grown < 40 * MiB, f"server RSS grew by {grown / MiB:.0f} MiB after legitimate large requests"
