"""Authentication: bearer tokens in metadata resolved to a Principal, and password hashing.

Nothing here knows about servicers or statuses: server/rpc.py decides, from the call's
metadata alone, who is calling (before the request body is read) and maps refusals."""

from __future__ import annotations

import asyncio
import base64
import contextvars
import hashlib
import hmac
import os
import re
from collections.abc import Callable, Iterable

import structlog
from sqlalchemy import Connection, select

from balsam_grpc.core.errors import Unauthenticated
from balsam_grpc.server.convert import aware, utcnow
from balsam_grpc.server.job_tokens import PREFIX as JOB_TOKEN_PREFIX
from balsam_grpc.server.job_tokens import JobTokens
from balsam_grpc.server.principal import Principal
from balsam_grpc.server.store import users as user_store
from balsam_grpc.server.store.db import Database
from balsam_grpc.server.store.tables import tokens

log = structlog.get_logger("balsam.auth")

# The shape of every secret store/users.py issues: one that does not match is unknown
# without a database read (a flood of made-up tokens costs no queries).
_SECRET_SHAPE = re.compile(rf"{re.escape(user_store.TOKEN_PREFIX)}[0-9a-f]{{16}}_[A-Za-z0-9_-]{{43}}")

# scrypt parameters (RFC 7914; n=2**14, r=8, p=1 is the common interactive-login choice).
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=32)
    enc = base64.b64encode
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${enc(salt).decode()}${enc(key).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        algo, n, r, p, salt, key = stored.split("$")
        if algo != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(base64.b64decode(key)))
        return hmac.compare_digest(got, base64.b64decode(key))
    except (ValueError, TypeError):
        return False


class Authenticator:
    """Resolves `authorization: Bearer <token>` to a Principal.

    Resolved tokens are cached for a few seconds. A revocation through this server takes
    effect at once: RevokeToken calls forget(), which drops the cache entry and ends the
    streams opened with that token (watch()). Another server process sharing the
    database honours it within `cache_seconds` for calls, and within the stream
    recheck period (server/stream_guard.py) for open streams: one re-read of the token's
    row per period for all the streams opened with it (one user's 2,000 watch streams
    cost one query per period, not 2,000 arriving together).
    """

    MAX_CACHED = 10_000

    def __init__(self, db: Database, cache_seconds: float = 5.0) -> None:
        self.db = db
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, Principal, float]] = {}
        self._expiry: dict[str, float] = {}  # token id -> expiry (epoch seconds)
        self._watchers: dict[str, dict[int, Callable[[Unauthenticated], None]]] = {}
        self._rechecks: dict[str, asyncio.Task[None]] = {}  # token id -> its periodic re-read
        self.job_tokens = JobTokens(db)

    @staticmethod
    def _bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
        for key, value in metadata or ():
            if key == "authorization":
                if isinstance(value, bytes):
                    value = value.decode("utf-8", "replace")
                scheme, _, token = value.partition(" ")
                if scheme.lower() != "bearer" or not token.strip():
                    raise Unauthenticated("malformed authorization metadata; send 'authorization: Bearer <token>'")
                return token.strip()
        raise Unauthenticated("no token sent; run 'balsamctl login' or set BALSAM_TOKEN")

    async def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        """The caller named by the call's `authorization` metadata, or Unauthenticated."""
        secret = self._bearer(metadata)
        if secret.startswith(JOB_TOKEN_PREFIX):  # never cached: valid only while its run lasts
            return await self.job_tokens.authenticate(secret)
        now = utcnow().timestamp()  # token expiry was stamped on the database's clock
        hit = self._cache.get(secret)
        if hit and hit[0] > now:
            if hit[2] <= now:
                raise Unauthenticated("token expired; log in again with 'balsamctl login'")
            return hit[1]
        row = await self.db.read_now(user_store.resolve_token, secret) if _SECRET_SHAPE.fullmatch(secret) else None
        if row is None:
            raise Unauthenticated("unknown token; log in again with 'balsamctl login'")
        if row["revoked"]:
            raise Unauthenticated("token revoked; log in again with 'balsamctl login'")
        expires = aware(row["expire_time"]).timestamp()
        if expires <= utcnow().timestamp():
            raise Unauthenticated("token expired; log in again with 'balsamctl login'")
        principal = Principal(user_id=row["user_id"], username=row["username"], admin=row["admin"],
                              token_id=row["id"], scope=row["scope"], site_id=row["site_id"])
        if len(self._cache) >= self.MAX_CACHED:
            self._prune(now)
        self._cache[secret] = (now + self.cache_seconds, principal, expires)
        self._expiry[principal.token_id] = expires
        return principal

    def _prune(self, now: float) -> None:
        for key, (until, _, _) in list(self._cache.items()):
            if until <= now:
                del self._cache[key]
        for token_id, expires in list(self._expiry.items()):
            if expires <= now and token_id not in self._watchers:
                del self._expiry[token_id]

    def expiry(self, token_id: str) -> float | None:
        """When a token resolved by this server expires (epoch seconds)."""
        return self._expiry.get(token_id)

    def forget(self, token_id: str, reason: str = "token revoked; log in again with 'balsamctl login'") -> None:
        """The token was revoked: no cached answer for it, and its streams end now."""
        for secret, (_, principal, _) in list(self._cache.items()):
            if principal.token_id == token_id:
                del self._cache[secret]
        for callback in list(self._watchers.get(token_id, {}).values()):
            callback(Unauthenticated(reason))

    def watch(self, token_id: str, callback: Callable[[Unauthenticated], None],
              recheck_seconds: float = 0.0) -> Callable[[], None]:
        """Call `callback` when `token_id` is revoked here, or (with `recheck_seconds`)
        when a re-read of its row, shared by all its watchers, finds it no longer valid.
        Returns the unwatch function. On the event loop only."""
        watchers = self._watchers.setdefault(token_id, {})
        key = id(callback)
        watchers[key] = callback
        running = self._rechecks.get(token_id)
        if recheck_seconds > 0 and (running is None or running.done()):
            # In a context of its own: not the watching stream's, whose database work is
            # bulk (store/db.py bulk_work) and waits behind other streams' transactions; a
            # revocation must not wait for them.
            self._rechecks[token_id] = asyncio.get_running_loop().create_task(
                self._recheck_loop(token_id, recheck_seconds), name="balsam-token-recheck",
                context=contextvars.Context())

        def unwatch() -> None:
            found = self._watchers.get(token_id)
            if found is not None:
                found.pop(key, None)
                if not found:
                    del self._watchers[token_id]
                    task = self._rechecks.pop(token_id, None)
                    if task is not None:
                        task.cancel()

        return unwatch

    async def _recheck_loop(self, token_id: str, seconds: float) -> None:
        while token_id in self._watchers:
            await asyncio.sleep(seconds)
            try:
                problem = await self.recheck(token_id)
            except Exception as exc:  # noqa: BLE001 - a database hiccup must not end healthy streams
                log.warning("stream token recheck failed", token_id=token_id, error=str(exc))
                continue
            if problem is not None:
                for callback in list(self._watchers.get(token_id, {}).values()):
                    callback(problem)
                return

    async def recheck(self, token_id: str) -> Unauthenticated | None:
        """Read the token's row again (another server may have revoked it): why it is no
        longer valid, or None while it still is."""
        if JobTokens.owns(token_id):
            return await self.job_tokens.recheck(token_id)
        row = await self.db.read_now(_token_state, token_id)
        if row is None:
            return Unauthenticated("the token no longer exists; log in again with 'balsamctl login'")
        if row["revoked"]:
            return Unauthenticated("token revoked; log in again with 'balsamctl login'")
        if aware(row["expire_time"]).timestamp() <= utcnow().timestamp():
            return Unauthenticated("token expired; log in again with 'balsamctl login'")
        return None


def _token_state(conn: Connection, token_id: str) -> dict[str, object] | None:
    row = conn.execute(select(tokens.c.revoked, tokens.c.expire_time).where(tokens.c.id == token_id)).first()
    return dict(row._mapping) if row else None
