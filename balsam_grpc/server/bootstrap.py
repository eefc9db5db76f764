"""First start on a machine: a user for the local account and a token in the profile
file, so the CLI and SDK on this machine work with no login step."""

from __future__ import annotations

import getpass
import secrets
from datetime import timedelta

import structlog

from balsam_grpc.core.settings import Profile
from balsam_grpc.server.auth import hash_password
from balsam_grpc.server.convert import aware, utcnow
from balsam_grpc.server.state import ServerState
from balsam_grpc.server.store import users as user_store

log = structlog.get_logger(__name__)


async def ensure_local_user(state: ServerState, address: str) -> None:
    username = getpass.getuser()
    profile = Profile.load(apply_env=False)

    def work(conn):  # type: ignore[no-untyped-def]
        now = utcnow()
        user = user_store.get_user_by_name(conn, username)
        if user is None:
            # Random password: the local user authenticates with the profile token;
            # `balsamctl login` on another machine needs a password: `balsamctl user passwd`.
            user = user_store.create_user(conn, username, hash_password(secrets.token_urlsafe(24)),
                                          admin=True, now=now)
            log.info("created local user (an administrator; `balsamctl user passwd` sets a password for "
                     "logins from elsewhere, `balsamctl user add` adds users)", username=username)
        if profile.token:
            row = user_store.resolve_token(conn, profile.token)
            if row and row["user_id"] == user["id"] and not row["revoked"] and aware(row["expire_time"]) > now:
                return None
        secret, _ = user_store.issue_token(conn, user["id"], scope="USER", site_id=None,
                                           ttl=timedelta(seconds=state.settings.token_ttl_seconds),
                                           description="local user (written at server start)", now=now)
        return secret

    secret = await state.db.write(work)
    if secret is not None or profile.server != address:
        profile.server = address
        profile.username = username
        if secret is not None:
            profile.token = secret
        path = profile.save()
        log.info("wrote client profile", path=str(path), server=address)
