"""TLS and mTLS cases tests/server/test_tls.py does not cover, with certificates generated
here: a server certificate for another host name or out of its validity, an expired
client certificate, streams and the SDK over mTLS (the token is still required), and
the plaintext refusal of the real server process on a non-loopback address."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from balsam_grpc.core.channel import auth_metadata, make_channel
from balsam_grpc.core.settings import Profile
from balsam_grpc.server.embedded import EmbeddedServer
from balsam_grpc.server.state import ServerSettings
from balsam_grpc.v1 import auth_service_pb2 as pb
from balsam_grpc.v1 import auth_service_pb2_grpc, event_service_pb2, event_service_pb2_grpc
from tests.support.waiting import wait_until

NO_RETRY = (("grpc.enable_retries", 0),)
LOCAL_SAN = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
NOW = datetime.datetime.now(datetime.UTC)


@dataclass
class Issued:
    cert: str
    key: str


class Ca:
    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (self._builder(self.name, self.key, NOW - datetime.timedelta(days=1), NOW + datetime.timedelta(days=2))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(self.key, hashes.SHA256()))
        self.cert = str(directory / f"{name}.crt")
        Path(self.cert).write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject: x509.Name, key: Any, start: datetime.datetime,
                 end: datetime.datetime) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(self.name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end))

    def issue(self, name: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName] | None = None, *,
              start: datetime.datetime | None = None, end: datetime.datetime | None = None) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        builder = (self._builder(subject, key, start or NOW - datetime.timedelta(hours=1),
                                 end or NOW + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        out = Issued(str(self.directory / f"{name}.crt"), str(self.directory / f"{name}.key"))
        Path(out.cert).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        Path(out.key).write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
        return out


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Ca:
    return Ca(tmp_path_factory.mktemp("pki"), "security-ca")


def start(tmp: Path, monkeypatch: pytest.MonkeyPatch, **settings: Any) -> tuple[EmbeddedServer, str]:
    monkeypatch.setenv("BALSAM_PROFILE", str(tmp / "profile.json"))
    server = EmbeddedServer(ServerSettings(address="127.0.0.1:0", database_url=f"sqlite:///{tmp / 'b.db'}",
                                           grace_seconds=0.2, **settings))
    return server, Profile.load(tmp / "profile.json", apply_env=False).token


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    made: list[EmbeddedServer] = []

    def make(**settings: Any) -> tuple[EmbeddedServer, str]:
        tmp = tmp_path / f"server{len(made)}"
        tmp.mkdir()
        server, token = start(tmp, monkeypatch, **settings)
        made.append(server)
        return server, token

    yield make
    for s in made:
        s.stop()


def whoami(channel: grpc.Channel, token: str) -> pb.GetCurrentUserResponse:
    return auth_service_pb2_grpc.AuthServiceStub(channel).GetCurrentUser(
        pb.GetCurrentUserRequest(), metadata=auth_metadata(token), timeout=15)


def unavailable(channel: grpc.Channel, token: str) -> None:
    with channel, pytest.raises(grpc.RpcError) as caught:
        whoami(channel, token)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_server_certificate_for_another_host_is_refused(ca: Ca, served: Any) -> None:
    cert = ca.issue("elsewhere", ExtendedKeyUsageOID.SERVER_AUTH, [x509.DNSName("elsewhere.example.org")])
    server, token = served(tls_cert=cert.cert, tls_key=cert.key)
    unavailable(make_channel(f"127.0.0.1:{server.port}", tls_ca=ca.cert, options=NO_RETRY), token)
    # The same CA and a certificate naming this host work (the refusal was the name).
    good = ca.issue("here", ExtendedKeyUsageOID.SERVER_AUTH, LOCAL_SAN)
    server2, token2 = served(tls_cert=good.cert, tls_key=good.key)
    with make_channel(f"127.0.0.1:{server2.port}", tls_ca=ca.cert) as channel:
        assert whoami(channel, token2).user.admin


def test_expired_server_certificate_is_refused(ca: Ca, served: Any) -> None:
    old = ca.issue("expired-server", ExtendedKeyUsageOID.SERVER_AUTH, LOCAL_SAN,
                   start=NOW - datetime.timedelta(days=10), end=NOW - datetime.timedelta(days=1))
    server, token = served(tls_cert=old.cert, tls_key=old.key)
    unavailable(make_channel(f"127.0.0.1:{server.port}", tls_ca=ca.cert, options=NO_RETRY), token)


def test_mtls_refuses_an_expired_client_certificate(ca: Ca, served: Any) -> None:
    cert = ca.issue("mtls-server", ExtendedKeyUsageOID.SERVER_AUTH, LOCAL_SAN)
    server, token = served(tls_cert=cert.cert, tls_key=cert.key, tls_client_ca=ca.cert)
    old = ca.issue("old-client", ExtendedKeyUsageOID.CLIENT_AUTH, start=NOW - datetime.timedelta(days=10),
                   end=NOW - datetime.timedelta(days=1))
    unavailable(make_channel(f"127.0.0.1:{server.port}", tls_ca=ca.cert, tls_cert=old.cert, tls_key=old.key,
                             options=NO_RETRY), token)


def test_streams_and_sdk_over_mtls(ca: Ca, served: Any) -> None:
    from balsam_grpc.sdk import Client

    cert = ca.issue("mtls-server2", ExtendedKeyUsageOID.SERVER_AUTH, LOCAL_SAN)
    server, token = served(tls_cert=cert.cert, tls_key=cert.key, tls_client_ca=ca.cert)
    client_cert = ca.issue("client2", ExtendedKeyUsageOID.CLIENT_AUTH)
    target = f"127.0.0.1:{server.port}"
    with make_channel(target, tls_ca=ca.cert, tls_cert=client_cert.cert, tls_key=client_cert.key) as channel:
        stub = event_service_pb2_grpc.EventServiceStub(channel)
        watch = stub.WatchEvents(event_service_pb2.WatchEventsRequest(), metadata=auth_metadata(token))
        assert next(watch).cursor  # a server stream over mTLS
        watch.cancel()
        no_token = stub.WatchEvents(event_service_pb2.WatchEventsRequest())
        with pytest.raises(grpc.RpcError) as caught:
            next(no_token)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED  # the certificate is not a login
    with Client(target, token=token, tls_ca=ca.cert, tls_cert=client_cert.cert, tls_key=client_cert.key) as sdk:
        assert sdk.whoami().user.admin


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_server_process_refuses_plaintext_on_a_public_address(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALSAM_")}
    env["BALSAM_HOME"] = str(tmp_path)
    db = f"sqlite:///{tmp_path / 'b.db'}"
    refused = subprocess.run([sys.executable, "-m", "balsam_grpc.server", "--address", f"0.0.0.0:{_free_port()}",
                              "--database", db], env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "without TLS" in refused.stderr + refused.stdout
    assert not (tmp_path / "b.db").exists()  # refused before touching the database
    # Explicitly allowed: it serves (checked on loopback), then stops on SIGTERM.
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "balsam_grpc.server", "--address", f"0.0.0.0:{port}",
                             "--database", db, "--allow-insecure-remote"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        profile = tmp_path / "profile.json"
        wait_until(lambda: profile.exists() and Profile.load(profile, apply_env=False).token, "the server started",
                   timeout=60)
        with make_channel(f"127.0.0.1:{port}") as channel:
            assert whoami(channel, Profile.load(profile, apply_env=False).token).user.admin
    finally:
        proc.terminate()
        proc.wait(30)
