"""`balsamctl user ...` and `balsamctl token ...` as an administrator and a user run them
(the server's rules for these RPCs are tested on both databases in tests/server)."""

from __future__ import annotations

import json

import pytest

from tests.cli.conftest import CliServer, one_error_line


@pytest.fixture(scope="module")
def cli_server(sqlite_cli_server: CliServer) -> CliServer:
    return sqlite_cli_server


def test_admin_adds_a_user_who_logs_in_changes_password_and_is_disabled(cli_server: CliServer, tmp_path) -> None:
    added = cli_server.run("user", "add", "dora", "--password-stdin", input="first password\n")
    assert added.returncode == 0, added.stderr
    assert "created user dora" in added.stdout and "balsamctl login" in added.stdout
    no_password = cli_server.run("user", "add", "eve")  # stdin is not a terminal, no --password-stdin
    assert no_password.returncode == 2 and "--password-stdin" in one_error_line(no_password)

    dora = {"BALSAM_PROFILE": str(tmp_path / "dora.json")}
    login = cli_server.run("login", "--server", cli_server.address, "-u", "dora", "--password-stdin",
                           input="first password\n", env=dora)
    assert login.returncode == 0, login.stderr
    changed = cli_server.run("user", "passwd", "--password-stdin", input="second password\n", env=dora)
    assert changed.returncode == 0 and "password of dora set" in changed.stdout
    not_admin = cli_server.run("user", "ls", env=dora)
    assert not_admin.returncode == 1 and "PERMISSION_DENIED" in one_error_line(not_admin)

    users = {u["username"]: u for u in cli_server.json("user", "ls")}
    assert not users["dora"].get("disabled") and type(users["dora"]["id"]) is int
    refused = cli_server.run("user", "disable", "dora")
    assert refused.returncode == 1 and "refusing to disable dora" in one_error_line(refused)
    disabled = cli_server.run("user", "disable", "dora", "--yes")
    assert disabled.returncode == 0 and "revoked 1 token(s)" in disabled.stdout
    locked_out = cli_server.run("job", "ls", env=dora)
    assert locked_out.returncode == 1 and "UNAUTHENTICATED" in one_error_line(locked_out)
    table = cli_server.run("user", "ls", "--no-header")
    assert any(line.split()[1:2] == ["dora"] and "disabled" in line for line in table.stdout.splitlines())


def test_tokens_created_listed_and_revoked(cli_server: CliServer) -> None:
    created = cli_server.run("token", "create", "--ttl", "2h", "-d", "beamline agent")
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("blsm_") and len(created.stdout.splitlines()) == 1  # the secret alone on stdout
    who = cli_server.run("whoami", env={"BALSAM_TOKEN": secret})
    assert who.returncode == 0, who.stderr

    site = cli_server.run("site", "init", str(cli_server.home / "token-site"), "--name", "token-site")
    assert site.returncode == 0, site.stderr
    site_token = cli_server.run("token", "create", "--site", "token-site", "--ttl", "1d")
    assert site_token.returncode == 0 and "site token" in site_token.stderr
    listed = cli_server.json("token", "ls")
    agent = next(t for t in listed if t["description"] == "beamline agent")
    assert agent["scope"] == "USER" and "secret" not in json.dumps(listed)
    assert any(t["scope"] == "SITE" for t in listed)
    table = cli_server.run("token", "ls")
    assert "token-site" in table.stdout  # site tokens show their site's name

    revoked = cli_server.run("token", "revoke", agent["id"])
    assert revoked.returncode == 0 and f"revoked token {agent['id']}" in revoked.stdout
    gone = cli_server.run("whoami", env={"BALSAM_TOKEN": secret})
    assert gone.returncode == 1 and "UNAUTHENTICATED" in one_error_line(gone)
    assert agent["id"] not in {t["id"] for t in cli_server.json("token", "ls")}
    assert agent["id"] in {t["id"] for t in cli_server.json("token", "ls", "--all")}
    bad_ttl = cli_server.run("token", "create", "--ttl", "forever")
    assert bad_ttl.returncode == 2 and "--ttl 'forever'" in one_error_line(bad_ttl)
