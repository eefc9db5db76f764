"""Replicas and their clients: a second server process on one SQLite database is
refused with a clear error (PostgreSQL is the database for several replicas), and
clients turn several server addresses into one gRPC target that round_robin spreads
over, leaving out replicas that are down or report NOT_SERVING."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from balsam_grpc.core.channel import channel_target, service_config
from tests.support.server_proc import REPO, ServerProcess


def test_a_second_server_on_one_sqlite_database_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'balsam.db'}"
    first = ServerProcess(tmp_path / "first", url)
    first.start()
    try:
        second = subprocess.run(
            [sys.executable, "-m", "balsam_grpc.server", "--address", "127.0.0.1:0", "--database", url],
            cwd=REPO, env={**first.env, "BALSAM_HOME": str(tmp_path / "second")}, capture_output=True, text=True,
            timeout=120, check=False)
        assert second.returncode != 0
        assert "already serves the SQLite database" in second.stderr + second.stdout
        assert "PostgreSQL" in second.stderr + second.stdout
        # The first one still serves.
        with first.client() as client:
            assert client.sites.count() >= 0
    finally:
        first.stop()
    # Its lock went with it: the database can be served again.
    again = ServerProcess(tmp_path / "again", url)
    again.start()
    again.stop()


def test_several_addresses_become_one_balanced_target() -> None:
    assert channel_target("127.0.0.1:5001") == "127.0.0.1:5001"
    assert channel_target("127.0.0.1:5001, 127.0.0.1:5002") == "ipv4:127.0.0.1:5001,127.0.0.1:5002"
    assert channel_target("[::1]:5001,[::1]:5002") == "ipv6:[::1]:5001,[::1]:5002"
    assert channel_target("localhost:5001,127.0.0.1:5002").startswith("ipv")
    with pytest.raises(ValueError, match="needs a port"):
        channel_target("127.0.0.1,127.0.0.1:5002")
    config = json.loads(service_config())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": ""}


def test_calls_go_around_a_replica_that_is_down(tmp_path: Path) -> None:
    from balsam_grpc.sdk import Client
    from tests.support.server_proc import free_port

    url = f"sqlite:///{tmp_path / 'balsam.db'}"
    server = ServerProcess(tmp_path / "home", url)
    server.start()
    try:
        dead = f"127.0.0.1:{free_port()}"  # nothing listens there
        with Client(f"{dead},{server.address}", token=server.token, timeout=20) as client:
            for _ in range(6):  # round_robin would send every other call to the dead one
                assert client.sites.count() >= 0
    except grpc.RpcError as exc:  # pragma: no cover - shown on failure
        raise AssertionError(f"a call went to the replica that is down: {exc}") from exc
    finally:
        server.stop()
