"""Start the dashboard under uvicorn: loopback without login, anything else only with TLS
and a login (the same rule the server applies to its own address)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from balsam_grpc.core.addresses import is_loopback_host
from balsam_grpc.sdk.client import Client
from balsam_grpc.sdk.errors import BalsamError


class DashboardSetupError(Exception):
    """The dashboard cannot start as asked; the message says what to change."""


@dataclass(frozen=True)
class BindAddress:
    host: str
    port: int

    @property
    def loopback(self) -> bool:
        return is_loopback_host(self.host)

    def url(self, tls: bool) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if tls else 'http'}://{host}:{self.port}/"


def parse_address(text: str) -> BindAddress:
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise DashboardSetupError(f"--address {text!r}: give host:port, e.g. 127.0.0.1:8080")
    return BindAddress(host, int(port))


def serve(address: str = "127.0.0.1:8080", *, tls_cert: str = "", tls_key: str = "", server: str | None = None,
          announce: bool = True) -> None:
    """Run until interrupted. The pages read through the server named by `server` (else
    the profile / BALSAM_SERVER), as the profile's user on loopback, as each logged-in
    user otherwise."""
    import uvicorn

    from balsam_grpc.dashboard.app import DashboardConfig, create_app

    bind = parse_address(address)
    tls = bool(tls_cert or tls_key)
    if tls and not (tls_cert and tls_key):
        raise DashboardSetupError("TLS needs both --tls-cert and --tls-key")
    if not bind.loopback and not tls:
        raise DashboardSetupError(f"{bind.host} is not a loopback address: a remote dashboard needs "
                                  "--tls-cert and --tls-key (viewers then log in with their balsam password)")

    def make_client(token: str | None) -> Client:
        return Client(server, token=token)

    if bind.loopback:
        probe = make_client(None)
        try:
            if not probe.token:
                raise DashboardSetupError("no token: run `balsamctl login` (or start a server on this machine) first")
            probe.whoami()
        except BalsamError as err:
            raise DashboardSetupError(f"the server at {probe.server} refused or is unreachable: {err.message}") \
                from None
        finally:
            probe.close()
    config = DashboardConfig(login_required=not bind.loopback, make_client=make_client,
                             allowed_hosts=["127.0.0.1", "localhost", "::1", "[::1]"] if bind.loopback else ["*"],
                             secure_cookies=tls)
    app = create_app(config)
    if announce:
        print(f"dashboard at {bind.url(tls)}" + ("" if bind.loopback else " (log in with your balsam user)"),
              flush=True)
    from balsam_grpc.dashboard.live import stop_all

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            stop_all()  # open event streams never end by themselves: end them, then drain
            super().handle_exit(sig, frame)

    Server(uvicorn.Config(app, host=bind.host, port=bind.port, ssl_certfile=tls_cert or None,
                          ssl_keyfile=tls_key or None, log_level="warning", timeout_graceful_shutdown=10,
                          proxy_headers=False)).run()
