"""Whether an address a process listens on is reachable from this machine only (the
server and the dashboard accept plaintext without TLS there and nowhere else)."""

from __future__ import annotations

import ipaddress


def is_loopback_host(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (brackets allowed)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_address(address: str) -> bool:
    """The same for host:port ([::1]:50051 for IPv6)."""
    return is_loopback_host(address.rsplit(":", 1)[0])
