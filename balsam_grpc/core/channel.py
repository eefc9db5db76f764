"""How every client (SDK, CLI, site daemon, launcher) opens its channel to the server.

One place for the things every long-lived client needs: keepalive that notices a
silently dropped connection (DESIGN.md section 8: keepalive alone takes ~60 s, so the
HTTP/2 ping timeout is set too), message size limits matching the server, TLS or mTLS
from the profile, and transparent retries on UNAVAILABLE for the read-only methods.
Mutations are never retried here: the callers that retry them send a request_id and do
it themselves.

Imports only grpc, balsam_grpc.core and balsam_grpc.v1 (it is shared by sdk, site and
launcher).
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from balsam_grpc.core.settings import Profile

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000
PING_TIMEOUT_MS = 10_000
# The server accepts a ping at most every 5 s (server.app); a shorter interval earns GOAWAY.
MIN_KEEPALIVE_TIME_MS = 5_000
# gRPC's own reconnect backoff defaults to 1 s growing to 120 s: a launcher whose server
# restarted could then come back after its session's lease ran out. Keep it short.
INITIAL_RECONNECT_BACKOFF_MS = 200
MAX_RECONNECT_BACKOFF_MS = 2_000

READ_ONLY_PREFIXES = ("Get", "List", "Count")
READ_ONLY_METHODS = frozenset({"WatchEvents"})
# Methods that look read-only by name but change state (Login issues a token).
NOT_IDEMPOTENT = frozenset({"AuthService.Login"})

RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.2s",
    "maxBackoff": "5s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def _service_descriptors() -> list[Any]:
    from balsam_grpc.v1 import (
        app_service_pb2,
        auth_service_pb2,
        batch_job_service_pb2,
        event_service_pb2,
        job_service_pb2,
        session_service_pb2,
        site_service_pb2,
        transfer_item_service_pb2,
    )

    modules = (site_service_pb2, app_service_pb2, job_service_pb2, batch_job_service_pb2,
               transfer_item_service_pb2, session_service_pb2, event_service_pb2, auth_service_pb2)
    return [svc for m in modules for svc in m.DESCRIPTOR.services_by_name.values()]


def idempotent_methods() -> list[tuple[str, str]]:
    """(full service name, method name) of every method safe to retry blindly."""
    found = []
    for svc in _service_descriptors():
        for method in svc.methods:
            if f"{svc.name}.{method.name}" in NOT_IDEMPOTENT or method.client_streaming:
                continue
            if method.name.startswith(READ_ONLY_PREFIXES) or method.name in READ_ONLY_METHODS:
                found.append((svc.full_name, method.name))
    return found


def service_config() -> str:
    """Retries for the idempotent methods; calls spread over every address of the target
    (several replicas: a comma-separated list, or a DNS name with several records) by
    gRPC's round_robin, which leaves out a replica whose health service says NOT_SERVING
    (draining) as well as one that is unreachable."""
    names = [{"service": svc, "method": method} for svc, method in idempotent_methods()]
    return json.dumps({"loadBalancingConfig": [{"round_robin": {}}],
                       "healthCheckConfig": {"serviceName": ""},
                       "methodConfig": [{"name": names, "retryPolicy": RETRY_POLICY}]})


def channel_target(address: str) -> str:
    """The gRPC target for a server address: "host:port", a DNS name with several records
    (resolved by gRPC, which keeps watching it), or several replicas as a comma-separated
    "host:port,host:port" list (IP literals: gRPC's ipv4:/ipv6: list targets; names are
    resolved here, once)."""
    parts = [a.strip() for a in address.split(",") if a.strip()]
    if len(parts) <= 1:
        return address.strip()
    v4: list[str] = []
    v6: list[str] = []
    for part in parts:
        host, sep, port = part.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"server address {part!r} in {address!r} needs a port (host:port)")
        host = host.strip("[]")
        try:
            ip = ipaddress.ip_address(host)
            ips = [str(ip)]
        except ValueError:
            infos = socket.getaddrinfo(host, int(port), proto=socket.IPPROTO_TCP)
            ips = sorted({str(info[4][0]) for info in infos})
        for ip_text in ips:
            if ipaddress.ip_address(ip_text).version == 4:
                v4.append(f"{ip_text}:{port}")
            else:
                v6.append(f"[{ip_text}]:{port}")
    if v4 and v6:
        raise ValueError(f"server addresses {address!r} mix IPv4 and IPv6; gRPC takes one family per list")
    return "ipv4:" + ",".join(v4) if v4 else "ipv6:" + ",".join(v6)


def _env_ms(name: str, default: int, minimum: int = 1) -> int:
    value = os.environ.get(name, "")
    return max(minimum, int(value)) if value.strip().isdigit() else default


def keepalive_ms() -> tuple[int, int]:
    """(ping interval, ping timeout) in ms. BALSAM_KEEPALIVE_TIME_MS and
    BALSAM_KEEPALIVE_TIMEOUT_MS override the defaults, so a site on a flaky network (or a
    fault test) notices a black-holed connection within seconds."""
    return (_env_ms("BALSAM_KEEPALIVE_TIME_MS", KEEPALIVE_TIME_MS, MIN_KEEPALIVE_TIME_MS),
            _env_ms("BALSAM_KEEPALIVE_TIMEOUT_MS", KEEPALIVE_TIMEOUT_MS))


def channel_options(extra: Sequence[tuple[str, Any]] = ()) -> list[tuple[str, Any]]:
    interval, timeout = keepalive_ms()
    options: dict[str, Any] = {
        "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
        "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
        "grpc.keepalive_time_ms": interval,
        "grpc.keepalive_timeout_ms": timeout,
        "grpc.http2.ping_timeout_ms": timeout,
        "grpc.keepalive_permit_without_calls": 1,
        "grpc.initial_reconnect_backoff_ms": INITIAL_RECONNECT_BACKOFF_MS,
        "grpc.max_reconnect_backoff_ms": _env_ms("BALSAM_RECONNECT_MAX_MS", MAX_RECONNECT_BACKOFF_MS),
        # Keep pinging an idle connection (the server allows one ping per 5 s).
        "grpc.http2.max_pings_without_data": 0,
        "grpc.enable_retries": 1,
        "grpc.service_config": service_config(),
    }
    options.update(dict(extra))
    return list(options.items())


def _read(path: str) -> bytes | None:
    return Path(path).expanduser().read_bytes() if path else None


def channel_credentials(tls_ca: str = "", tls_cert: str = "", tls_key: str = "") -> grpc.ChannelCredentials:
    """TLS credentials: `tls_ca` verifies the server (empty: the system roots);
    `tls_cert` + `tls_key` are the client certificate for mTLS."""
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("a client certificate needs both tls_cert and tls_key")
    return grpc.ssl_channel_credentials(root_certificates=_read(tls_ca), private_key=_read(tls_key),
                                        certificate_chain=_read(tls_cert))


def make_channel(profile_or_target: Profile | str, *, tls: bool | None = None, tls_ca: str = "",
                 tls_cert: str = "", tls_key: str = "",
                 options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A synchronous channel to the server named by a Profile or a "host:port" target.

    TLS is used when any of tls_ca/tls_cert/tls_key is set (from the profile or the
    keywords), or when `tls=True` (then the system roots verify the server).
    """
    if isinstance(profile_or_target, Profile):
        target = profile_or_target.server
        tls_ca = tls_ca or profile_or_target.tls_ca
        tls_cert = tls_cert or profile_or_target.tls_cert
        tls_key = tls_key or profile_or_target.tls_key
    else:
        target = profile_or_target
    if tls is None:
        tls = bool(tls_ca or tls_cert or tls_key)
    opts = channel_options(options)
    target = channel_target(target)
    if tls:
        return grpc.secure_channel(target, channel_credentials(tls_ca, tls_cert, tls_key), options=opts)
    return grpc.insecure_channel(target, options=opts)


def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that authenticates as the owner of `token`."""
    return (("authorization", f"Bearer {token}"),)
