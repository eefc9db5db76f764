"""`balsamctl user add|ls|passwd|disable` and `balsamctl token create|ls|revoke`.

Passwords never go on the command line (ps shows it): they are prompted for (twice) at a
terminal, or read from stdin with --password-stdin. A token's secret is printed once, on
stdout alone, so `balsamctl token create ... > token.txt` captures just the secret.
"""

from __future__ import annotations

import re
import sys
from typing import Annotated

import typer

from balsam_grpc.cli import output as out
from balsam_grpc.cli.context import client, resolve_site, site_name
from balsam_grpc.cli.errors import usage
from balsam_grpc.cli.filters import parse_ref
from balsam_grpc.v1 import auth_service_pb2 as pb

user_app = typer.Typer(help="Manage users (administrators) and your password.", no_args_is_help=True)
token_app = typer.Typer(help="Issue, list and revoke API tokens.", no_args_is_help=True)

PasswordStdinOpt = Annotated[bool, typer.Option("--password-stdin",
                                                help="read the password from stdin's first line (scripts)")]

USER_COLUMNS = [
    out.Column("ID", lambda u: u.id, justify="right"),
    out.Column("USERNAME", lambda u: u.username),
    out.Column("ADMIN", lambda u: "yes" if u.admin else ""),
    out.Column("STATUS", lambda u: "disabled" if u.disabled else "active"),
    out.Column("CREATED", lambda u: u.create_time),
]
TOKEN_COLUMNS = [
    out.Column("ID", lambda t: t.id, no_wrap=True),
    out.Column("SCOPE", lambda t: out.enum_name(pb.TokenScope, t.scope, "TOKEN_SCOPE_")),
    out.Column("SITE", lambda t: site_name(t.site_id) if t.site_id else ""),
    out.Column("CREATED", lambda t: t.create_time),
    out.Column("EXPIRES", lambda t: t.expire_time),
    out.Column("STATUS", lambda t: "revoked" if t.revoked else "active"),
    out.Column("DESCRIPTION", lambda t: t.description, ratio=1),
]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")
_UNIT_SECONDS = {"": 86400, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_ttl(text: str) -> int:
    """'30d', '12h', '90m', '3600s', '2w' or a number of days -> seconds (0 = server default)."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match:
        usage(f"--ttl {text!r}: expected a number with a unit s, m, h, d or w (e.g. 30d, 12h)")
    return int(float(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def _read_password(stdin: bool, *, confirm: bool = True) -> str:
    if stdin:
        password = sys.stdin.readline().rstrip("\n")
    elif sys.stdin.isatty():
        password = str(typer.prompt("Password", hide_input=True, confirmation_prompt=confirm, err=True))
    else:
        usage("no password: stdin is not a terminal (pass --password-stdin and write it to stdin)")
    if not password:
        usage("empty password")
    return password


# ---------------------------------------------------------------------------- users

@user_app.command("add")
def user_add(
    username: Annotated[str, typer.Argument(help="the new user's name")],
    admin: Annotated[bool, typer.Option("--admin", help="may manage users")] = False,
    password_stdin: PasswordStdinOpt = False,
) -> None:
    """Create a user (administrators only). The password is prompted for, or read from stdin.

    Example: echo "$PW" | balsamctl user add alice --password-stdin
    """
    password = _read_password(password_stdin)
    user = client().call("AuthService", "CreateUser",
                         pb.CreateUserRequest(username=username, password=password, admin=admin)).user
    out.write(f"created user {user.username} (id {user.id}{', admin' if user.admin else ''}); "
              f"they log in with: balsamctl login --server {client().server} -u {user.username}")


@user_app.command("ls")
def user_ls(output: out.OutputOpt = out.Format.table, no_header: out.NoHeaderOpt = False) -> None:
    """Every user of the server (administrators only).

    Example: balsamctl user ls
    """
    users = client().call("AuthService", "ListUsers", pb.ListUsersRequest()).users
    out.render(list(users), USER_COLUMNS, output, no_header=no_header)


@user_app.command("passwd")
def user_passwd(
    username: Annotated[str, typer.Argument(help="whose password (default: yours; others' for administrators)")] = "",
    password_stdin: PasswordStdinOpt = False,
) -> None:
    """Set a password: your own, or (administrators) anyone's. Enables a disabled user.

    Example: balsamctl user passwd alice
    """
    password = _read_password(password_stdin)
    user = client().call("AuthService", "SetPassword", pb.SetPasswordRequest(username=username, password=password)).user
    out.write(f"password of {user.username} set")


@user_app.command("disable")
def user_disable(
    username: Annotated[str, typer.Argument(help="the user to disable")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
) -> None:
    """Disable a user (administrators only): its password stops working and all its tokens,
    site tokens included, are revoked now. `user passwd` enables it again.

    Example: balsamctl user disable mallory --yes
    """
    out.confirm(f"Disable {username} and revoke all their tokens (their site daemons stop)?", assume_yes=yes,
                what=f"disable {username}")
    response = client().call("AuthService", "DisableUser", pb.DisableUserRequest(username=username))
    out.write(f"disabled {response.user.username}; revoked {response.revoked_tokens} token(s)")


# --------------------------------------------------------------------------- tokens

@token_app.command("create")
def token_create(
    site: Annotated[str | None, typer.Option("--site", help="a site token (name or id): only what that site's "
                                                            "daemon and launchers need")] = None,
    ttl: Annotated[str, typer.Option("--ttl", help="lifetime: 30d, 12h, 2w... (0: the server's default, "
                                                   "which is also the maximum)")] = "0",
    description: Annotated[str, typer.Option("--description", "-d", help="what it is for")] = "",
) -> None:
    """Issue a token; its secret is printed once, alone on stdout.

    Examples:

      balsamctl token create --ttl 30d -d "beamline agent" > agent-token.txt

      balsamctl token create --site polaris --ttl 90d
    """
    request = pb.CreateTokenRequest(ttl_seconds=parse_ttl(ttl), description=description,
                                    scope=pb.TOKEN_SCOPE_USER)
    if site is not None:
        request.scope = pb.TOKEN_SCOPE_SITE
        request.site_id = resolve_site(parse_ref(site, "--site")).id
    response = client().call("AuthService", "CreateToken", request)
    info = response.info
    scope = out.enum_name(pb.TokenScope, info.scope, "TOKEN_SCOPE_").lower()
    sys.stderr.write(f"{scope} token {info.id}, expires {out.fmt_time(info.expire_time)}; the secret is shown "
                     "only now:\n")
    out.write(response.token)


@token_app.command("ls")
def token_ls(
    show_all: Annotated[bool, typer.Option("--all", help="also revoked and expired tokens")] = False,
    output: out.OutputOpt = out.Format.table,
    no_header: out.NoHeaderOpt = False,
) -> None:
    """Your tokens (never their secrets).

    Example: balsamctl token ls --all
    """
    tokens = client().call("AuthService", "ListTokens", pb.ListTokensRequest(include_inactive=show_all)).tokens
    out.render(list(tokens), TOKEN_COLUMNS, output, no_header=no_header)


@token_app.command("revoke")
def token_revoke(token_id: Annotated[str, typer.Argument(help="the token's id (from `token ls`)")]) -> None:
    """Revoke one of your tokens now (its open streams end too).

    Example: balsamctl token revoke 3f2a9c1d0b4e5f67
    """
    info = client().call("AuthService", "RevokeToken", pb.RevokeTokenRequest(id=token_id)).token
    out.write(f"revoked token {info.id}")
