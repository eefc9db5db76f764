"""TLS and mTLS end to end: a server with certificates from a throwaway CA, clients built
with balsam_grpc.core.channel.make_channel; and the refusal to listen on a non-loopback
address in the clear."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import threading
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

from balsam_grpc.core.channel import auth_metadata, channel_options, make_channel, service_config
from balsam_grpc.core.settings import Profile
from balsam_grpc.server.app import BalsamServer
from balsam_grpc.server.state import ServerSettings
from balsam_grpc.v1 import auth_service_pb2 as pb
from balsam_grpc.v1 import auth_service_pb2_grpc

POSTGRES_URL = os.environ.get("BALSAM_TEST_DATABASE_URL", "")
CALL_TIMEOUT = 15
NO_RETRY = (("grpc.enable_retries", 0),)


# -- a throwaway PKI -------------------------------------------------------------------

def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> tuple[str, str]:
    path.with_suffix(".key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path.with_suffix(".crt")), str(path.with_suffix(".key"))


def _builder(subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)))


@dataclass
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str  # a CA that signed nothing the server uses


def _make_ca(directory: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (_builder(name, subject, key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write(directory / name, key, cert)
    return key, cert


def _leaf(directory: Path, name: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
          usage: x509.ObjectIdentifier, san: list[x509.GeneralName] | None = None) -> tuple[str, str]:
    key = _key()
    builder = (_builder(name, ca_cert.subject, key)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return _write(directory / name, key, builder.sign(ca_key, hashes.SHA256()))


def make_pki(directory: Path) -> Pki:
    ca_key, ca_cert = _make_ca(directory, "test-ca")
    server_cert, server_key = _leaf(directory, "server", ca_key, ca_cert, ExtendedKeyUsageOID.SERVER_AUTH,
                                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client_cert, client_key = _leaf(directory, "client", ca_key, ca_cert, ExtendedKeyUsageOID.CLIENT_AUTH)
    _make_ca(directory, "other-ca")
    return Pki(ca=str(directory / "test-ca.crt"), server_cert=server_cert, server_key=server_key,
               client_cert=client_cert, client_key=client_key, other_ca=str(directory / "other-ca.crt"))


# -- a server on a background loop ----------------------------------------------------

class RunningServer:
    """A BalsamServer on its own asyncio loop thread; its first-start profile (with the
    local user's token) goes to a private file, not the shared test profile."""

    def __init__(self, settings: ServerSettings, profile: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="tls-server-loop")
        self.thread.start()
        self.profile_path = profile
        self.server = BalsamServer(settings)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("BALSAM_PROFILE", str(profile))
            self.port = self._run(self.server.start())
        self.token = Profile.load(profile, apply_env=False).token

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        try:
            self._run(self.server.stop(0.2))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


def _database_url(backend: str, tmp: Path) -> str:
    # PostgreSQL: the same database as the shared harness; migrations and the local-user
    # bootstrap are idempotent, so sharing it is harmless.
    return POSTGRES_URL if backend == "postgres" else f"sqlite:///{tmp / 'balsam.db'}"


_pg_skip = pytest.mark.skipif(not POSTGRES_URL, reason="BALSAM_TEST_DATABASE_URL not set")
BACKENDS = [pytest.param("sqlite", id="sqlite"), pytest.param("postgres", id="postgres", marks=_pg_skip)]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


def _start(tmp: Path, backend: str, **settings: Any) -> RunningServer:
    return RunningServer(ServerSettings(address="127.0.0.1:0", database_url=_database_url(backend, tmp),
                                        grace_seconds=0.2, **settings), tmp / "profile.json")


@pytest.fixture(scope="module")
def tls_server(pki: Pki, backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = _start(tmp_path_factory.mktemp("tls"), backend, tls_cert=pki.server_cert, tls_key=pki.server_key)
    yield server
    server.close()


@pytest.fixture(scope="module")
def mtls_server(pki: Pki, backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    server = _start(tmp_path_factory.mktemp("mtls"), backend, tls_cert=pki.server_cert, tls_key=pki.server_key,
                    tls_client_ca=pki.ca)
    yield server
    server.close()


def whoami(channel: grpc.Channel, token: str) -> pb.GetCurrentUserResponse:
    stub = auth_service_pb2_grpc.AuthServiceStub(channel)
    return stub.GetCurrentUser(pb.GetCurrentUserRequest(), metadata=auth_metadata(token), timeout=CALL_TIMEOUT)


def fails_unavailable(channel: grpc.Channel, token: str) -> None:
    """The call fails with UNAVAILABLE (a failed handshake). Channels here are built with
    retries off, or the read-only retry policy would spend ~3 s per case on backoff."""
    with channel, pytest.raises(grpc.RpcError) as caught:
        whoami(channel, token)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value


# -- TLS -------------------------------------------------------------------------------

def test_tls_call_with_profile(tls_server: RunningServer, pki: Pki) -> None:
    profile = Profile(server=tls_server.target, token=tls_server.token, tls_ca=pki.ca)
    with make_channel(profile) as channel:
        me = whoami(channel, profile.token)
    assert me.user.admin and me.token.scope == pb.TOKEN_SCOPE_USER


def test_tls_by_host_name(tls_server: RunningServer, pki: Pki) -> None:
    with make_channel(f"localhost:{tls_server.port}", tls_ca=pki.ca) as channel:
        assert whoami(channel, tls_server.token).user.id > 0


def test_tls_client_rejects_a_server_from_another_ca(tls_server: RunningServer, pki: Pki) -> None:
    fails_unavailable(make_channel(tls_server.target, tls_ca=pki.other_ca, options=NO_RETRY), tls_server.token)


def test_insecure_client_against_tls_port_fails(tls_server: RunningServer) -> None:
    fails_unavailable(make_channel(tls_server.target, options=NO_RETRY), tls_server.token)


# -- mTLS ------------------------------------------------------------------------------

def test_mtls_without_client_cert_fails(mtls_server: RunningServer, pki: Pki) -> None:
    fails_unavailable(make_channel(mtls_server.target, tls_ca=pki.ca, options=NO_RETRY), mtls_server.token)


def test_mtls_with_client_cert_from_another_ca_fails(mtls_server: RunningServer, pki: Pki,
                                                     tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    other_key = load_pem_private_key(Path(pki.other_ca).with_suffix(".key").read_bytes(), None)
    other_cert = x509.load_pem_x509_certificate(Path(pki.other_ca).read_bytes())
    cert, key = _leaf(tmp_path, "intruder", other_key, other_cert, ExtendedKeyUsageOID.CLIENT_AUTH)  # type: ignore[arg-type]
    fails_unavailable(make_channel(mtls_server.target, tls_ca=pki.ca, tls_cert=cert, tls_key=key, options=NO_RETRY),
                      mtls_server.token)


def test_mtls_with_client_cert_works(mtls_server: RunningServer, pki: Pki) -> None:
    profile = Profile(server=mtls_server.target, token=mtls_server.token, tls_ca=pki.ca,
                      tls_cert=pki.client_cert, tls_key=pki.client_key)
    with make_channel(profile) as channel:
        assert whoami(channel, profile.token).user.admin


def test_mtls_still_needs_a_token(mtls_server: RunningServer, pki: Pki) -> None:
    with make_channel(mtls_server.target, tls_ca=pki.ca, tls_cert=pki.client_cert,
                      tls_key=pki.client_key) as channel, pytest.raises(grpc.RpcError) as caught:
        auth_service_pb2_grpc.AuthServiceStub(channel).GetCurrentUser(pb.GetCurrentUserRequest(),
                                                                      timeout=CALL_TIMEOUT)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_client_cert_needs_its_key(pki: Pki) -> None:
    with pytest.raises(ValueError, match="tls_key"):
        make_channel("127.0.0.1:1", tls_ca=pki.ca, tls_cert=pki.client_cert)


# -- the channel's policy ---------------------------------------------------------------

def test_retry_policy_covers_read_only_methods_only() -> None:
    config = json.loads(service_config())
    (entry,) = config["methodConfig"]
    assert entry["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    names = {(n["service"], n["method"]) for n in entry["name"]}
    for read in [("balsam.v1.JobService", "GetJob"), ("balsam.v1.JobService", "ListJobs"),
                 ("balsam.v1.JobService", "CountJobs"), ("balsam.v1.EventService", "WatchEvents"),
                 ("balsam.v1.AuthService", "GetCurrentUser"), ("balsam.v1.SiteService", "ListSites")]:
        assert read in names
    for write in [("balsam.v1.JobService", "CreateJob"), ("balsam.v1.JobService", "BatchUpdateJobs"),
                  ("balsam.v1.AuthService", "Login"), ("balsam.v1.AuthService", "CreateToken"),
                  ("balsam.v1.SessionService", "Connect"), ("balsam.v1.SiteService", "Connect")]:
        assert write not in names
    assert len({s for s, _ in names}) == 8


def test_channel_options() -> None:
    options = dict(channel_options())
    assert options["grpc.keepalive_time_ms"] == 20_000 and options["grpc.keepalive_timeout_ms"] == 10_000
    assert options["grpc.http2.ping_timeout_ms"] > 0 and options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.max_receive_message_length"] == options["grpc.max_send_message_length"] == 64 * 2**20
    assert auth_metadata("t") == (("authorization", "Bearer t"),)


# -- plaintext only on loopback --------------------------------------------------------

def test_refuses_non_loopback_without_tls(tmp_path: Path) -> None:
    server = BalsamServer(ServerSettings(address="0.0.0.0:0", database_url=f"sqlite:///{tmp_path / 'b.db'}"))
    with pytest.raises(SystemExit) as caught:
        asyncio.run(server.start())
    assert "TLS" in str(caught.value.code)
    assert server.db is None  # refused before touching anything


def test_non_loopback_allowed_when_insecure_remote_is_explicit(tmp_path: Path) -> None:
    settings = ServerSettings(address="0.0.0.0:0", database_url=f"sqlite:///{tmp_path / 'balsam.db'}",
                              allow_insecure_remote=True, grace_seconds=0.2)
    remote = RunningServer(settings, tmp_path / "profile.json")
    try:
        with make_channel(f"127.0.0.1:{remote.port}") as channel:
            assert whoami(channel, remote.token).user.id > 0
    finally:
        remote.close()


def test_non_loopback_with_tls_is_allowed(pki: Pki, tmp_path: Path) -> None:
    settings = ServerSettings(address="0.0.0.0:0", database_url=f"sqlite:///{tmp_path / 'balsam.db'}",
                              tls_cert=pki.server_cert, tls_key=pki.server_key, grace_seconds=0.2)
    remote = RunningServer(settings, tmp_path / "profile.json")
    try:
        with make_channel(f"127.0.0.1:{remote.port}", tls_ca=pki.ca) as channel:
            assert whoami(channel, remote.token).user.id > 0
    finally:
        remote.close()
