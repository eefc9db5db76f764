"""Users and tokens. Token secrets are stored only as sha256 digests."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from balsam_grpc.core.errors import AlreadyExists
from balsam_grpc.server.store.tables import jobs, server_keys, tokens, users

TOKEN_PREFIX = "blsm_"
# A disabled user's password hash starts with this (as a locked account in /etc/shadow):
# no password verifies against it, and setting a new password enables the user again.
DISABLED_MARK = "!"


def is_disabled(row: dict[str, Any]) -> bool:
    return str(row["password_hash"]).startswith(DISABLED_MARK)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_user(conn: Connection, username: str, password_hash: str, admin: bool, now: datetime) -> dict[str, Any]:
    if conn.execute(select(users.c.id).where(users.c.username == username)).first():
        raise AlreadyExists(f"user {username!r} already exists", field="username")
    row = conn.execute(
        insert(users).values(username=username, password_hash=password_hash, admin=admin, create_time=now)
        .returning(*users.c)
    ).one()
    return dict(row._mapping)


def get_user_by_name(conn: Connection, username: str) -> dict[str, Any] | None:
    row = conn.execute(select(users).where(users.c.username == username)).first()
    return dict(row._mapping) if row else None


def get_user(conn: Connection, user_id: int) -> dict[str, Any] | None:
    row = conn.execute(select(users).where(users.c.id == user_id)).first()
    return dict(row._mapping) if row else None


def issue_token(conn: Connection, user_id: int, *, scope: str, site_id: int | None, ttl: timedelta,
                description: str, now: datetime) -> tuple[str, dict[str, Any]]:
    token_id = secrets.token_hex(8)
    secret = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
    row = conn.execute(
        insert(tokens).values(
            id=token_id, user_id=user_id, secret_hash=digest(secret), scope=scope, site_id=site_id,
            description=description, create_time=now, expire_time=now + ttl, revoked=False,
        ).returning(*tokens.c)
    ).one()
    return secret, dict(row._mapping)


def resolve_token(conn: Connection, secret: str) -> dict[str, Any] | None:
    """The token row joined with its user, or None (expiry is the caller's check)."""
    row = conn.execute(
        select(tokens, users.c.username, users.c.admin)
        .join(users, users.c.id == tokens.c.user_id)
        .where(tokens.c.secret_hash == digest(secret))
    ).first()
    return dict(row._mapping) if row else None


def list_tokens(conn: Connection, user_id: int) -> list[dict[str, Any]]:
    rows = conn.execute(select(tokens).where(tokens.c.user_id == user_id).order_by(tokens.c.create_time))
    return [dict(r._mapping) for r in rows]


def revoke_token(conn: Connection, user_id: int, token_id: str) -> dict[str, Any] | None:
    row = conn.execute(
        update(tokens).where(tokens.c.id == token_id, tokens.c.user_id == user_id)
        .values(revoked=True).returning(*tokens.c)
    ).first()
    return dict(row._mapping) if row else None


def signing_key(conn: Connection, name: str, now: datetime) -> str:
    """The named server key (hex), created on first use. Two servers starting at once
    may both try to create it; the loser's insert does nothing and both read the winner's."""
    row = conn.execute(select(server_keys.c.secret).where(server_keys.c.name == name)).first()
    if row is not None:
        return row.secret
    dialect_insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    conn.execute(dialect_insert(server_keys).values(name=name, secret=secrets.token_hex(32), create_time=now)
                 .on_conflict_do_nothing())
    return conn.execute(select(server_keys.c.secret).where(server_keys.c.name == name)).one().secret


def job_run(conn: Connection, job_id: int) -> dict[str, Any] | None:
    """What a job token is checked against: the job's owner (with the owner's name), site,
    state and lease generation."""
    row = conn.execute(
        select(jobs.c.owner_id, jobs.c.site_id, jobs.c.state, jobs.c.lease_generation, users.c.username)
        .join(users, users.c.id == jobs.c.owner_id).where(jobs.c.id == job_id)
    ).first()
    return dict(row._mapping) if row else None


def list_users(conn: Connection) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in conn.execute(select(users).order_by(users.c.id))]


def set_password(conn: Connection, username: str, password_hash: str) -> dict[str, Any] | None:
    row = conn.execute(update(users).where(users.c.username == username)
                       .values(password_hash=password_hash).returning(*users.c)).first()
    return dict(row._mapping) if row else None


def disable_user(conn: Connection, username: str) -> tuple[dict[str, Any], list[str]] | None:
    """Lock the password and revoke every active token; (user row, revoked token ids)."""
    user = get_user_by_name(conn, username)
    if user is None:
        return None
    if not is_disabled(user):
        user = dict(conn.execute(update(users).where(users.c.id == user["id"])
                                 .values(password_hash=DISABLED_MARK + user["password_hash"])
                                 .returning(*users.c)).one()._mapping)
    revoked = conn.execute(update(tokens).where(tokens.c.user_id == user["id"], tokens.c.revoked.is_(False))
                           .values(revoked=True).returning(tokens.c.id)).scalars().all()
    return user, list(revoked)
