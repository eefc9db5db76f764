"""Client construction (arguments, environment, profile), error mapping with the
server's reason and field, deadlines, and mutation retries that reuse the request_id."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import grpc
import pytest

from balsam_grpc.sdk import (
    AlreadyExists,
    App,
    BalsamError,
    Client,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Site,
    Unauthenticated,
    Unavailable,
)
from balsam_grpc.v1 import job_service_pb2

from tests.support.server_proc import free_port


def test_client_from_arguments_env_and_profile(harness: Any, alice: Any, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"server": harness.address, "token": alice.token, "username": alice.username}))
    with Client(profile=profile) as c:
        assert c.whoami().user.username == alice.username
    monkeypatch.setenv("BALSAM_PROFILE", str(profile))
    monkeypatch.setenv("BALSAM_TOKEN", "not-a-token")
    with Client() as c, pytest.raises(Unauthenticated) as caught:
        c.whoami()
    assert caught.value.reason == "UNAUTHENTICATED"
    monkeypatch.delenv("BALSAM_TOKEN")
    monkeypatch.setenv("BALSAM_SERVER", "127.0.0.1:1")
    with Client(harness.address) as c:  # arguments beat the environment
        assert c.whoami().user.username == alice.username


def test_error_mapping_carries_reason_and_field(client: Client, site: Site, app: App) -> None:
    with pytest.raises(InvalidArgument) as bad:
        client.sites.create(name="", hostname="h", path="/p")
    assert bad.value.reason == "INVALID_FIELD" and bad.value.field == "site.name"
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(AlreadyExists) as dup:
        client.apps.create(site_id=site.id, name=app.name, command_template="true")
    assert dup.value.reason == "ALREADY_EXISTS"
    with pytest.raises(NotFound) as missing:
        client.sites.get(id=10**9)
    assert missing.value.reason == "NOT_FOUND"
    assert isinstance(missing.value, BalsamError)


def test_other_users_objects_are_not_found(harness: Any, client: Client, app: App, bob: Any) -> None:
    job = app.submit("mine/1", word="x")
    with Client(harness.address, token=bob.token) as theirs:
        with pytest.raises(NotFound):
            theirs.jobs.get(id=job.id)
        assert theirs.jobs.filter(id=job.id).count() == 0


def test_site_token_is_confined(harness: Any, alice: Any, site: Site, client: Client) -> None:
    other = client.sites.create(name=site.name + "-b", hostname="h", path="/p")
    caller = harness.user(alice.username, scope="SITE", site_id=site.id)
    with Client(harness.address, token=caller.token) as site_client, pytest.raises(PermissionDenied) as denied:
        site_client.apps.create(site_id=other.id, name="x", command_template="true")
    assert denied.value.reason == "PERMISSION_DENIED"


def test_unreachable_server_is_unavailable_within_the_deadline() -> None:
    with Client(f"127.0.0.1:{free_port()}", token="t", timeout=2) as c:
        with pytest.raises((Unavailable, DeadlineExceeded)):
            c.sites.count()
        with pytest.raises(Unavailable):
            c.wait_ready(timeout=0.5)


def test_missing_server_is_reported_by_the_first_call_with_address_and_remedy() -> None:
    """Not the read-only retries' "failed to connect to all addresses" after their
    back-off: one health-check probe, then what was tried and how to start a server."""
    address = f"127.0.0.1:{free_port()}"
    with Client(address, token="t", timeout=60) as c:
        with pytest.raises(Unavailable) as caught:
            c.jobs.filter(state="RUNNING").count()
    assert f"no balsam server answers at {address}" in caught.value.message
    assert "balsamctl server start" in caught.value.message


def test_a_lost_first_answer_is_not_taken_for_a_missing_server(harness: Any, alice: Any) -> None:
    """The first call's server check goes out while a proxy swallows every answer (then
    resets the connection): the server is there, so the check is sent again once the
    connection is back, and the call works, once. It used to report "no balsam server"."""
    from tests.support.proxy import Proxy

    name = f"lost-probe-{free_port()}"
    with Proxy(harness.address) as proxy, Client(harness.address, token=alice.token) as direct:
        proxy.drop_responses(0.5)
        with Client(proxy.address, token=alice.token) as through:
            through.sites.create(name=name, hostname="login1", path="/home/u/site")
        assert proxy.swallowed > 0, "no answer was swallowed: the fault did not happen"
        assert direct.sites.filter(name=name).count() == 1


def test_default_deadline_applies_to_unary_calls() -> None:
    # A listener that accepts connections but never speaks HTTP/2: calls hang until
    # their deadline, which the client sets by default.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        with Client(address, token="t", timeout=0.5) as c, pytest.raises(DeadlineExceeded) as caught:
            c.jobs.count()
    assert caught.value.reason == "DEADLINE_EXCEEDED"


class LostAnswer:
    """Wraps a stub method: the first call reaches the server but its answer is "lost"
    (raised as UNAVAILABLE), as when a connection drops after the commit."""

    def __init__(self, method: Any) -> None:
        self.method = method
        self.requests: list[Any] = []

    def __call__(self, request: Any, **kw: Any) -> Any:
        self.requests.append(request.SerializeToString())
        answer = self.method(request, **kw)
        if len(self.requests) == 1:
            raise _Unavailable()
        return answer


class _Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection reset"


def test_retried_mutation_reuses_its_request_id(client: Client, app: App) -> None:
    stub = client.stub("JobService")
    lossy = LostAnswer(stub.CreateJob)
    stub.CreateJob = lossy
    job = app.submit("retried/1", word="x")
    assert len(lossy.requests) == 2 and lossy.requests[0] == lossy.requests[1]  # same request_id
    sent = job_service_pb2.CreateJobRequest.FromString(lossy.requests[0])
    assert sent.request_id and sent.job.workdir == "retried/1"
    assert [j.id for j in client.jobs.filter(workdir__contains="retried/1")] == [job.id]
