"""Secrets never reach a log line or an error message.

Real processes with DEBUG logging: a server (its database URL carries a password on
PostgreSQL), `balsamctl login` with right and wrong passwords and `whoami`, `site init`
and a site daemon whose token is revoked and renewed while it runs; plus the error
messages callers get for wrong passwords, revoked and malformed tokens, and the server's
in-process structlog events for the same calls. Every captured byte is scanned for every
secret (tokens, their random part, passwords, the database password).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog

from balsam_grpc.core.channel import auth_metadata
from balsam_grpc.core.settings import Profile
from balsam_grpc.v1 import auth_service_pb2 as pb
from balsam_grpc.v1 import auth_service_pb2_grpc, site_service_pb2, site_service_pb2_grpc
from tests.support.waiting import wait_until

POSTGRES_URL = os.environ.get("BALSAM_TEST_DATABASE_URL", "")
BALSAMCTL = str(Path(sys.executable).with_name("balsamctl"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _database(tmp: Path, db_password: str) -> str:
    if not POSTGRES_URL:
        return f"sqlite:///{tmp / 'balsam.db'}"
    from sqlalchemy.engine import make_url

    from tests.support.databases import fresh_postgres

    base = make_url(fresh_postgres(POSTGRES_URL, "secrets"))
    # Trust authentication ignores the password; the server must still never print it.
    return base.set(password=db_password).render_as_string(hide_password=False)


def random_part(token: str) -> str:
    """The secret after "blsm_<id>_". Not rsplit("_"): token_urlsafe output contains "_"
    itself, which made a one-character "secret" that logs contained by chance."""
    return token.split("_", 2)[2]


class Scene:
    """Everything the processes printed, and the secrets that must not be in it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.secrets: dict[str, str] = {}
        self.captured: dict[str, str] = {}
        self.procs: list[subprocess.Popen[bytes]] = []

    def secret(self, name: str, value: str) -> str:
        self.secrets[name] = value
        if value.startswith("blsm_"):
            self.secrets[f"{name} (random part)"] = random_part(value)
        return value

    def env(self, home: Path, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BALSAM_")}
        env.update(BALSAM_HOME=str(home), BALSAM_LOG_LEVEL="DEBUG", BALSAM_LOG_FORMAT="json", **extra)
        return env

    def run(self, label: str, argv: list[str], env: dict[str, str], stdin: str = "") -> subprocess.CompletedProcess[str]:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120, env=env,
                              cwd=self.tmp)
        self.captured[label] = done.stdout + done.stderr
        return done

    def leaks(self) -> list[str]:
        found = []
        for where, text in self.captured.items():
            for name, value in self.secrets.items():
                if value and value in text:
                    found.append(f"{name} in {where}")
        return found


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[Scene]:
    s = Scene(tmp_path)
    yield s
    for p in s.procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def test_no_secret_in_any_log_or_error(scene: Scene, tmp_path: Path) -> None:
    db_password = scene.secret("database password", f"pgpw-{secrets.token_hex(8)}")
    url = _database(tmp_path, db_password)
    port = _free_port()
    server_home = tmp_path / "server-home"
    server_home.mkdir()
    server_log = tmp_path / "server.log"
    with open(server_log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "balsam_grpc.server", "--address", f"127.0.0.1:{port}",
                                   "--database", url], env=scene.env(server_home), stdout=out, stderr=out)
    scene.procs.append(server)
    profile_file = server_home / "profile.json"
    wait_until(lambda: profile_file.exists() and Profile.load(profile_file, apply_env=False).token,
               "the server's first-start profile")
    admin_token = scene.secret("admin token", Profile.load(profile_file, apply_env=False).token)
    target = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(target)
    auth = auth_service_pb2_grpc.AuthServiceStub(channel)
    errors: list[str] = []

    # A user with a password, logging in through the CLI.
    name = f"sec-{secrets.token_hex(3)}"
    password = scene.secret("password", f"pw-{secrets.token_hex(10)}")
    wrong = scene.secret("wrong password", f"nope-{secrets.token_hex(10)}")
    auth.CreateUser(pb.CreateUserRequest(username=name, password=password), metadata=auth_metadata(admin_token),
                    timeout=30)
    user_home = tmp_path / "user-home"
    user_home.mkdir()
    env = scene.env(user_home)
    bad = scene.run("balsamctl login (wrong password)", [BALSAMCTL, "login", "--server", target, "-u", name,
                                                         "--password-stdin"], env, stdin=wrong + "\n")
    assert bad.returncode != 0
    good = scene.run("balsamctl login", [BALSAMCTL, "login", "--server", target, "-u", name, "--password-stdin"],
                     env, stdin=password + "\n")
    assert good.returncode == 0, good.stderr
    user_token = scene.secret("user token", Profile.load(user_home / "profile.json", apply_env=False).token)
    assert scene.run("balsamctl whoami", [BALSAMCTL, "whoami"], env).returncode == 0

    # A site: init issues a site token into <dir>/.token; the daemon runs with it.
    site_dir = tmp_path / "site"
    init = scene.run("site init", [sys.executable, "-m", "balsam_grpc.site", "init", str(site_dir),
                                   "--platform", "local", "--no-elastic"], env)
    assert init.returncode == 0, init.stderr
    site_token = scene.secret("site token", (site_dir / ".token").read_text().strip())
    daemon_out = tmp_path / "daemon.out"
    with open(daemon_out, "wb") as out:
        daemon = subprocess.Popen([sys.executable, "-m", "balsam_grpc.site", "--site-dir", str(site_dir)],
                                  env=env, stdout=out, stderr=out, cwd=site_dir)
    scene.procs.append(daemon)
    sites = site_service_pb2_grpc.SiteServiceStub(channel)
    user_md = auth_metadata(user_token)

    def connected_count() -> int:
        listed = sites.ListSites(site_service_pb2.ListSitesRequest(), metadata=user_md, timeout=30).sites
        return sum(1 for s in listed if s.liveness.connected)

    wait_until(lambda: connected_count() == 1, "the site daemon connected", timeout=60)
    site_info = auth.GetCurrentUser(pb.GetCurrentUserRequest(), metadata=auth_metadata(site_token), timeout=30)
    # Renew: a new site token in the file, then the old one revoked (the daemon reconnects).
    renewed = auth.CreateToken(pb.CreateTokenRequest(scope=pb.TOKEN_SCOPE_SITE, site_id=site_info.token.site_id,
                                                     description="renewed"), metadata=user_md, timeout=30)
    scene.secret("renewed site token", renewed.token)
    tmp_token = site_dir / ".token.new"
    tmp_token.write_text(renewed.token + "\n")
    tmp_token.replace(site_dir / ".token")
    auth.RevokeToken(pb.RevokeTokenRequest(id=site_info.token.id), metadata=user_md, timeout=30)

    def reconnected() -> bool:
        logs = [daemon_out, site_dir / "logs" / "site.log"]
        return sum(p.read_text(errors="replace").count("connected to server") for p in logs if p.exists()) >= 2

    wait_until(reconnected, "the daemon reconnected with the renewed token", timeout=60)

    # Error messages callers see.
    for label, call in [
        ("login with a wrong password", lambda: auth.Login(pb.LoginRequest(username=name, password=wrong),
                                                           timeout=30)),
        ("revoked token", lambda: auth.GetCurrentUser(pb.GetCurrentUserRequest(),
                                                      metadata=auth_metadata(site_token), timeout=30)),
        ("malformed header", lambda: auth.GetCurrentUser(pb.GetCurrentUserRequest(),
                                                         metadata=(("authorization", f"Token {user_token}"),),
                                                         timeout=30)),
        ("unknown token", lambda: auth.GetCurrentUser(pb.GetCurrentUserRequest(),
                                                      metadata=auth_metadata(user_token + "x"), timeout=30)),
        ("short password", lambda: auth.CreateUser(pb.CreateUserRequest(username="x" + name, password="short"),
                                                   metadata=auth_metadata(admin_token), timeout=30)),
    ]:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        errors.append(f"{label}: {caught.value.code().name} {caught.value.details()} "
                      f"{caught.value.trailing_metadata()}")
    scene.captured["error messages"] = "\n".join(errors)
    channel.close()

    for p in (daemon, server):
        p.send_signal(signal.SIGTERM)
        p.wait(30)
    scene.captured["server log"] = server_log.read_text(errors="replace")
    scene.captured["daemon output"] = daemon_out.read_text(errors="replace")
    for log_file in (site_dir / "logs").rglob("*"):
        if log_file.is_file():
            scene.captured[f"site log {log_file.name}"] = log_file.read_text(errors="replace")

    assert "rpc refused" in scene.captured["server log"]  # the server did log these calls
    assert "site token reloaded" in scene.captured["daemon output"] + scene.captured.get("site log site.log", "")
    assert not scene.leaks(), scene.leaks()


def test_in_process_structlog_events_carry_no_secret(harness: Any) -> None:
    """The server's own structlog events (captured as dicts, before rendering) for logins,
    token calls and refusals hold none of the secrets sent or issued."""
    password = f"pw-{secrets.token_hex(10)}"
    admin = harness.user(admin=True)
    auth = auth_service_pb2_grpc.AuthServiceStub(harness.channel)
    name = f"sl-{secrets.token_hex(3)}"
    with structlog.testing.capture_logs() as events:
        auth.CreateUser(pb.CreateUserRequest(username=name, password=password), metadata=admin.metadata, timeout=30)
        with pytest.raises(grpc.RpcError):
            auth.Login(pb.LoginRequest(username=name, password=password + "x"), timeout=30)
        token = auth.Login(pb.LoginRequest(username=name, password=password), timeout=30).token
        made = auth.CreateToken(pb.CreateTokenRequest(description="ci"), metadata=auth_metadata(token), timeout=30)
        auth.RevokeToken(pb.RevokeTokenRequest(id=made.info.id), metadata=auth_metadata(token), timeout=30)
        with pytest.raises(grpc.RpcError):
            auth.GetCurrentUser(pb.GetCurrentUserRequest(), metadata=auth_metadata(made.token), timeout=30)
    text = "\n".join(repr(e) for e in events)
    assert "rpc refused" in text
    for value in (password, password + "x", token, made.token, admin.token, random_part(token)):
        assert value not in text
