"""`balsamctl dashboard`: the command (registered by cli/main.py). Starlette and uvicorn
come with the `dashboard` extra and are imported only when the command runs."""

from __future__ import annotations

from typing import Annotated

import typer


def dashboard(
    address: Annotated[str, typer.Option(help="where to listen (host:port); a non-loopback address needs TLS")]
        = "127.0.0.1:8080",
    tls_cert: Annotated[str, typer.Option(help="certificate (PEM) for HTTPS; required off loopback")] = "",
    tls_key: Annotated[str, typer.Option(help="private key (PEM) for HTTPS")] = "",
    server: Annotated[str, typer.Option(help="balsam server (default: the profile / BALSAM_SERVER)")] = "",
) -> None:
    """Serve the live web dashboard: sites, backlogs and nodes, job counts, throughput
    and latency charts, jobs with filters and paging, a job's history, kill; updated from
    the event stream as things happen.

    On loopback (the default) it shows what your profile's token sees, without a login.
    Elsewhere it needs --tls-cert/--tls-key and each viewer logs in with their balsam user.

    Example: balsamctl dashboard --address 127.0.0.1:8080
    """
    try:
        from balsam_grpc.dashboard.serve import DashboardSetupError, serve
    except ImportError as err:
        raise typer.BadParameter(f"the dashboard needs its extra: pip install 'balsam-grpc[dashboard]' ({err})") \
            from None
    try:
        serve(address, tls_cert=tls_cert, tls_key=tls_key, server=server or None)
    except DashboardSetupError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
