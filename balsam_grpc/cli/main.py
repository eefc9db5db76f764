"""balsamctl entry point. The full command set grows in the SDK/CLI issue; the server
commands are here from the start."""

from __future__ import annotations

import os
import sys

import typer

from balsam_grpc.cli import analytics, apps, auth, events, jobs, queue, users
from balsam_grpc.cli.errors import BalsamTyper, require_extra
from balsam_grpc.core.settings import DEFAULT_ADDRESS

# BalsamTyper: errors a user can cause end as one "error: ..." line and an exit code.
app = BalsamTyper(help="balsam-grpc: run analysis jobs on HPC machines from anywhere.", no_args_is_help=True,
                  rich_markup_mode="markdown")
server_app = typer.Typer(help="Run and maintain the server.", no_args_is_help=True)
app.add_typer(server_app, name="server")
app.command("login")(auth.login)
app.command("whoami")(auth.whoami)
app.add_typer(apps.app_app, name="app")
app.add_typer(jobs.job_app, name="job")
app.add_typer(queue.queue_app, name="queue")
app.add_typer(users.user_app, name="user")
app.add_typer(users.token_app, name="token")
app.command("events")(events.events)
app.command("analytics")(analytics.analytics)
app.command("results")(__import__("balsam_grpc.cli.results", fromlist=["results"]).results)
app.command("route")(__import__("balsam_grpc.cli.route", fromlist=["route"]).route)
app.command("launcher")(__import__("balsam_grpc.cli.launcher", fromlist=["launcher"]).launcher)
app.add_typer(__import__("balsam_grpc.cli.site", fromlist=["site_app"]).site_app, name="site")
app.add_typer(__import__("balsam_grpc.cli.transfers", fromlist=["transfers_app"]).transfers_app, name="transfers")
app.command("dashboard")(__import__("balsam_grpc.dashboard.command", fromlist=["dashboard"]).dashboard)


@server_app.command("start")
def server_start(
    address: str = typer.Option(None, help=f"bind address, default $BALSAM_SERVER_ADDRESS or {DEFAULT_ADDRESS}"),
    database: str = typer.Option(None, help="database URL, default $BALSAM_DATABASE_URL or SQLite in $BALSAM_HOME"),
    tls_cert: str = typer.Option("", help="server certificate (PEM)"),
    tls_key: str = typer.Option("", help="server private key (PEM)"),
    tls_client_ca: str = typer.Option("", help="CA for client certificates (turns on mTLS)"),
    allow_insecure_remote: bool = typer.Option(False, help="listen on a non-loopback address without TLS"),
    metrics_address: str = typer.Option("", help="serve Prometheus metrics at http://HOST:PORT/metrics"),
) -> None:
    """Start the server in the foreground (SIGTERM drains, then stops). Several servers
    on one PostgreSQL database serve as replicas (docs/architecture.md).

    Example: balsamctl server start --address 127.0.0.1:50051 --metrics-address 127.0.0.1:9464
    """
    argv = []
    for flag, value in (("--address", address), ("--database", database), ("--tls-cert", tls_cert),
                        ("--tls-key", tls_key), ("--tls-client-ca", tls_client_ca),
                        ("--metrics-address", metrics_address)):
        if value:
            argv += [flag, value]
    if allow_insecure_remote:
        argv.append("--allow-insecure-remote")
    _exec_server(argv)


@server_app.command("migrate")
def server_migrate(database: str = typer.Option(None, help="database URL (default as for start)")) -> None:
    """Apply database migrations up to the newest revision.

    Example: balsamctl server migrate --database postgresql://postgres@127.0.0.1/balsam
    """
    _exec_server(["--migrate-only", *(["--database", database] if database else [])])


def _exec_server(argv: list[str]) -> None:
    """The CLI starts the server as its own process (layering: cli talks to the server
    only over gRPC); exec keeps signals and the exit code the server's own."""
    require_extra("server", "sqlalchemy", "alembic", "grpc_health", "grpc_reflection")
    os.execv(sys.executable, [sys.executable, "-m", "balsam_grpc.server", *argv])


if __name__ == "__main__":
    app()
