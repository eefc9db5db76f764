"""`balsamctl login` and `balsamctl whoami`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from balsam_grpc.cli import output as out
from balsam_grpc.cli.errors import fail, usage
from balsam_grpc.core.settings import Profile, profile_path
from balsam_grpc.sdk.client import Client
from balsam_grpc.v1 import auth_service_pb2


def login(
    server: Annotated[str | None, typer.Option("--server", help="server host:port (default: the profile's)")] = None,
    username: Annotated[str | None, typer.Option("--username", "-u", help="user name (prompted when "
                                                                          "omitted)")] = None,
    password_stdin: Annotated[bool, typer.Option("--password-stdin", help="read the password from stdin "
                                                                          "(scripts)")] = False,
    token: Annotated[str | None, typer.Option("--token", help="use this token instead of a password "
                                                              "(checked with the server; visible to ps: "
                                                              "prefer --token-stdin)")] = None,
    token_stdin: Annotated[bool, typer.Option("--token-stdin", help="read the token from stdin")] = False,
    tls_ca: Annotated[str | None, typer.Option("--tls-ca", help="CA certificate (PEM) that verifies the "
                                                                "server; turns TLS on")] = None,
    tls_cert: Annotated[str | None, typer.Option("--tls-cert", help="client certificate (PEM) for "
                                                                    "mTLS")] = None,
    tls_key: Annotated[str | None, typer.Option("--tls-key", help="client key (PEM) for mTLS")] = None,
    ttl_days: Annotated[float, typer.Option("--ttl-days", help="token lifetime (0: server default)")] = 0,
) -> None:
    """Log in to a server and save the address, TLS files and token in the profile
    ($BALSAM_PROFILE or $BALSAM_HOME/profile.json, mode 0600).

    Examples:

      balsamctl login --server balsam.example.org:50051 --tls-ca ca.pem -u alice

      echo "$PASSWORD" | balsamctl login -u alice --password-stdin

      balsamctl login --server 127.0.0.1:50051 --token-stdin < token.txt
    """
    profile = Profile.load(apply_env=False)
    profile.server = server or profile.server
    for name, value in (("tls_ca", tls_ca), ("tls_cert", tls_cert), ("tls_key", tls_key)):
        if value is not None:
            if value and not Path(value).expanduser().is_file():
                usage(f"--{name.replace('_', '-')}: no such file {value}")
            setattr(profile, name, str(Path(value).expanduser().resolve()) if value else "")
    if bool(profile.tls_cert) != bool(profile.tls_key):
        usage("a client certificate needs both --tls-cert and --tls-key")
    if token_stdin:
        if token or password_stdin:
            usage("--token-stdin reads the token from stdin: give neither --token nor --password-stdin")
        token = sys.stdin.readline().strip()
        if not token:
            usage("--token-stdin: stdin held no token")
    if token and (username or password_stdin):
        usage("give either a token or a user name and password")
    if ttl_days < 0:
        usage("--ttl-days must not be negative")
    if token:
        with Client(profile.server, token=token, profile=profile) as client:
            me = client.whoami()
        profile.token, profile.username = token, me.user.username
    else:
        username = username or _prompt("user name", hide=False)
        password = sys.stdin.readline().rstrip("\n") if password_stdin else _prompt("password", hide=True)
        if not password:
            usage("empty password")
        with Client(profile.server, token="", profile=profile) as client:
            response = client.call("AuthService", "Login", auth_service_pb2.LoginRequest(
                username=username, password=password, ttl_seconds=int(ttl_days * 86400)))
        profile.token, profile.username = response.token, response.user.username
    path = profile.save()
    out.write(f"logged in to {profile.server} as {profile.username} (profile {path})")


def _prompt(what: str, *, hide: bool) -> str:
    if not sys.stdin.isatty():
        usage(f"no {what} given and stdin is not a terminal (use --username/--password-stdin or --token-stdin)")
    return str(typer.prompt(what.capitalize(), hide_input=hide, err=True))


def whoami() -> None:
    """Show the user and token scope this CLI acts as, and where its profile is.

    Example: balsamctl whoami
    """
    from balsam_grpc.cli.context import client

    c = client()
    me = c.whoami()
    scope = out.enum_name(auth_service_pb2.TokenScope, me.token.scope, "TOKEN_SCOPE_")
    admin = " (admin)" if me.user.admin else ""
    expires = out.fmt_time(me.token.expire_time)
    out.write(f"{me.user.username}{admin} at {c.server}, {scope.lower()} token {me.token.id}"
              + (f", expires {expires}" if expires else "") + f"; profile {profile_path()}")
    if not me.user.username:
        fail("the server did not say who you are")
