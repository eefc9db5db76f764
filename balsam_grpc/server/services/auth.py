"""AuthService: password login, the current user, user creation (admins), and tokens.

Token secrets leave the server exactly once, in the Login/CreateToken answer; the store
keeps only their sha256. A site-scoped token can never mint tokens or create users, so a
compromised site daemon cannot escalate to its owner's full rights.
"""

from __future__ import annotations

import asyncio
import re
from datetime import timedelta
from typing import Any

import grpc
from sqlalchemy import Connection, select
from sqlalchemy.exc import IntegrityError

from balsam_grpc.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from balsam_grpc.server.admission import peer_address
from balsam_grpc.server.auth import hash_password, verify_password
from balsam_grpc.server.convert import EnumCodec, aware, to_timestamp, utcnow
from balsam_grpc.server.notify import REVOKED, notify_control
from balsam_grpc.server.principal import Principal
from balsam_grpc.server.rpc import unary
from balsam_grpc.server.state import ServerState
from balsam_grpc.server.store import users as user_store
from balsam_grpc.server.store.tables import sites, tokens
from balsam_grpc.v1 import auth_service_pb2 as pb
from balsam_grpc.v1 import auth_service_pb2_grpc

USERNAME_RE = re.compile(r"[A-Za-z0-9_.@-]{1,150}")
MIN_PASSWORD = 8
MAX_PASSWORD = 1024
MAX_DESCRIPTION = 1000
WRONG_LOGIN = "wrong user name or password"

SCOPES = EnumCodec(pb.TokenScope, "TOKEN_SCOPE_")

# A real scrypt hash to verify against when the user does not exist, so that an unknown
# user name costs the same time as a wrong password (computed once, on first use).
_dummy_hash: str | None = None


def _dummy() -> str:
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = hash_password("not the password of anyone")
    return _dummy_hash


# -- rows to messages (the only place) ---------------------------------------------------

def user_msg(row: dict[str, Any]) -> pb.User:
    return pb.User(id=row["id"], username=row["username"], admin=bool(row["admin"]),
                   create_time=to_timestamp(row["create_time"]), disabled=user_store.is_disabled(row))


def token_msg(row: dict[str, Any]) -> pb.TokenInfo:
    return pb.TokenInfo(
        id=row["id"], scope=SCOPES.number(row["scope"]), site_id=row["site_id"] or 0,
        description=row["description"] or "", create_time=to_timestamp(row["create_time"]),
        expire_time=to_timestamp(row["expire_time"]), revoked=bool(row["revoked"]),
    )


# -- small store queries this service alone needs ----------------------------------------

def _get_token(conn: Connection, user_id: int, token_id: str) -> dict[str, Any] | None:
    row = conn.execute(select(tokens).where(tokens.c.id == token_id, tokens.c.user_id == user_id)).first()
    return dict(row._mapping) if row else None


def _current(conn: Connection, user_id: int, token_id: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    return user_store.get_user(conn, user_id), _get_token(conn, user_id, token_id)


def _issue_for_site(conn: Connection, user_id: int, site_id: int, ttl: timedelta,
                    description: str) -> tuple[str, dict[str, Any]]:
    """Issue a site token, checking ownership in the same transaction."""
    owned = conn.execute(select(sites.c.id).where(sites.c.id == site_id, sites.c.owner_id == user_id)).first()
    if owned is None:
        raise NotFound(f"site {site_id} not found", reason="REFERENCE_NOT_FOUND", field="site_id")
    return user_store.issue_token(conn, user_id, scope="SITE", site_id=site_id, ttl=ttl,
                                  description=description, now=utcnow())


class AuthServicer(auth_service_pb2_grpc.AuthServiceServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state

    def _ttl(self, seconds: int) -> timedelta:
        if seconds < 0:
            raise InvalidArgument("ttl_seconds must not be negative (0 means the server default)",
                                  field="ttl_seconds")
        limit = self.state.settings.token_ttl_seconds
        return timedelta(seconds=min(seconds, limit) if seconds else limit)

    @unary(public=True)
    async def Login(self, request: pb.LoginRequest, context: grpc.aio.ServicerContext,
                    principal: None) -> pb.LoginResponse:
        ttl = self._ttl(request.ttl_seconds)
        # Refused before any password is verified once too many attempts failed (admission.py).
        address = peer_address(context.peer())
        await self.state.logins.check(request.username, address)
        user = None
        if USERNAME_RE.fullmatch(request.username) and len(request.password) <= MAX_PASSWORD:
            user = await self.state.db.read(user_store.get_user_by_name, request.username)
        # Always run one scrypt verification, so timing does not tell whether the user exists.
        # (Off the event loop: scrypt takes tens of milliseconds, and so does the first _dummy().)
        ok = await asyncio.to_thread(
            lambda: verify_password(request.password[:MAX_PASSWORD], user["password_hash"] if user else _dummy()))
        if user is None or not ok:
            await self.state.logins.failed(request.username, address)
            raise Unauthenticated(WRONG_LOGIN)
        await self.state.logins.succeeded(request.username, address)
        secret, row = await self.state.db.write(
            lambda conn: user_store.issue_token(conn, user["id"], scope="USER", site_id=None, ttl=ttl,
                                                description="login", now=utcnow()))
        return pb.LoginResponse(token=secret, info=token_msg(row), user=user_msg(user))

    @unary()
    async def GetCurrentUser(self, request: pb.GetCurrentUserRequest, context: grpc.aio.ServicerContext,
                             principal: Principal) -> pb.GetCurrentUserResponse:
        user, token = await self.state.db.read(_current, principal.user_id, principal.token_id)
        if user is None or token is None:  # deleted since the token was cached
            raise Unauthenticated("the user or token behind this token no longer exists; log in again")
        return pb.GetCurrentUserResponse(user=user_msg(user), token=token_msg(token))

    @unary()
    async def CreateUser(self, request: pb.CreateUserRequest, context: grpc.aio.ServicerContext,
                         principal: Principal) -> pb.CreateUserResponse:
        principal.require_admin("create users")
        if not USERNAME_RE.fullmatch(request.username):
            raise InvalidArgument("username must be 1-150 characters of letters, digits and _ . @ -",
                                  field="username")
        if not MIN_PASSWORD <= len(request.password) <= MAX_PASSWORD:
            raise InvalidArgument(f"password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters long",
                                  field="password")
        password_hash = await asyncio.to_thread(hash_password, request.password)
        try:
            row = await self.state.db.write(
                lambda conn: user_store.create_user(conn, request.username, password_hash, request.admin, utcnow()))
        except IntegrityError:  # a concurrent CreateUser of the same name won the race
            raise AlreadyExists(f"user {request.username!r} already exists", field="username") from None
        return pb.CreateUserResponse(user=user_msg(row))

    @unary()
    async def CreateToken(self, request: pb.CreateTokenRequest, context: grpc.aio.ServicerContext,
                          principal: Principal) -> pb.CreateTokenResponse:
        principal.require_user_scope("create tokens")
        scope = "USER" if request.scope == pb.TOKEN_SCOPE_UNSPECIFIED else SCOPES.name(request.scope, "scope")
        ttl = self._ttl(request.ttl_seconds)
        if len(request.description) > MAX_DESCRIPTION:
            raise InvalidArgument(f"description is longer than {MAX_DESCRIPTION} characters",
                                  field="description")
        if scope == "SITE":
            if request.site_id <= 0:
                raise InvalidArgument("a SITE token needs the site_id of one of your sites", field="site_id")
            secret, row = await self.state.db.write(_issue_for_site, principal.user_id, request.site_id, ttl,
                                                    request.description)
        else:
            if request.site_id:
                raise InvalidArgument("site_id is only for TOKEN_SCOPE_SITE tokens", field="site_id")
            secret, row = await self.state.db.write(
                lambda conn: user_store.issue_token(conn, principal.user_id, scope="USER", site_id=None, ttl=ttl,
                                                    description=request.description, now=utcnow()))
        return pb.CreateTokenResponse(token=secret, info=token_msg(row))

    @unary()
    async def ListTokens(self, request: pb.ListTokensRequest, context: grpc.aio.ServicerContext,
                         principal: Principal) -> pb.ListTokensResponse:
        principal.require_user_scope("list tokens")
        rows = await self.state.db.read(user_store.list_tokens, principal.user_id)
        if not request.include_inactive:
            now = utcnow()
            rows = [r for r in rows if not r["revoked"] and aware(r["expire_time"]) > now]
        return pb.ListTokensResponse(tokens=[token_msg(r) for r in rows])

    @unary()
    async def RevokeToken(self, request: pb.RevokeTokenRequest, context: grpc.aio.ServicerContext,
                          principal: Principal) -> pb.RevokeTokenResponse:
        if not request.id:
            raise InvalidArgument("id is required", field="id")
        if principal.is_site and request.id != principal.token_id:
            raise PermissionDenied("a site-scoped token can revoke only itself; use a user token")
        def revoke(conn: Any) -> dict[str, Any] | None:
            row = user_store.revoke_token(conn, principal.user_id, request.id)
            if row is not None and conn.dialect.name == "postgresql":
                notify_control(conn, REVOKED, request.id)  # other replicas forget it at commit
            return row

        row = await self.state.db.write(revoke)
        if row is None:
            raise NotFound(f"token {request.id!r} not found", field="id")
        self.state.auth.forget(request.id)
        return pb.RevokeTokenResponse(token=token_msg(row))

    @unary()
    async def ListUsers(self, request: pb.ListUsersRequest, context: grpc.aio.ServicerContext,
                        principal: Principal) -> pb.ListUsersResponse:
        principal.require_admin("list users")
        rows = await self.state.db.read(user_store.list_users)
        return pb.ListUsersResponse(users=[user_msg(r) for r in rows])

    @unary()
    async def SetPassword(self, request: pb.SetPasswordRequest, context: grpc.aio.ServicerContext,
                          principal: Principal) -> pb.SetPasswordResponse:
        principal.require_user_scope("set passwords")
        username = request.username or principal.username
        if username != principal.username:
            principal.require_admin("set another user's password")
        if not MIN_PASSWORD <= len(request.password) <= MAX_PASSWORD:
            raise InvalidArgument(f"password must be {MIN_PASSWORD} to {MAX_PASSWORD} characters long",
                                  field="password")
        password_hash = await asyncio.to_thread(hash_password, request.password)
        row = await self.state.db.write(user_store.set_password, username, password_hash)
        if row is None:
            raise NotFound(f"no user {username!r}", field="username")
        return pb.SetPasswordResponse(user=user_msg(row))

    @unary()
    async def DisableUser(self, request: pb.DisableUserRequest, context: grpc.aio.ServicerContext,
                          principal: Principal) -> pb.DisableUserResponse:
        principal.require_admin("disable users")
        if not request.username:
            raise InvalidArgument("username is required", field="username")
        if request.username == principal.username:
            raise FailedPrecondition("you cannot disable yourself; ask another administrator",
                                     field="username")
        found = await self.state.db.write(user_store.disable_user, request.username)
        if found is None:
            raise NotFound(f"no user {request.username!r}", field="username")
        row, revoked = found
        for token_id in revoked:
            self.state.auth.forget(token_id, reason="the user was disabled")
        return pb.DisableUserResponse(user=user_msg(row), revoked_tokens=len(revoked))
