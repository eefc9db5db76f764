"""Authentication: bearer tokens in metadata resolved to a Principal, and password hashing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time

import grpc

from balsam_grpc.core.errors import Unauthenticated
from balsam_grpc.server.convert import aware, utcnow
from balsam_grpc.server.rpc import Principal
from balsam_grpc.server.store import users as user_store
from balsam_grpc.server.store.db import Database

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

    Resolved tokens are cached for a few seconds: a revocation takes effect within
    `cache_seconds` (revoke() also drops the cache entry at once in this process).
    """

    def __init__(self, db: Database, cache_seconds: float = 5.0) -> None:
        self.db = db
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, Principal, float]] = {}

    @staticmethod
    def _bearer(context: grpc.aio.ServicerContext) -> str:
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                scheme, _, token = value.partition(" ")
                if scheme.lower() != "bearer" or not token.strip():
                    raise Unauthenticated("malformed authorization metadata; send 'authorization: Bearer <token>'")
                return token.strip()
        raise Unauthenticated("no token sent; run 'balsamctl login' or set BALSAM_TOKEN")

    async def authenticate(self, context: grpc.aio.ServicerContext) -> Principal:
        secret = self._bearer(context)
        now = time.time()
        hit = self._cache.get(secret)
        if hit and hit[0] > now:
            if hit[2] <= now:
                raise Unauthenticated("token expired; log in again with 'balsamctl login'")
            return hit[1]
        row = await self.db.read(user_store.resolve_token, secret)
        if row is None:
            raise Unauthenticated("unknown token; log in again with 'balsamctl login'")
        if row["revoked"]:
            raise Unauthenticated("token revoked; log in again with 'balsamctl login'")
        expires = aware(row["expire_time"]).timestamp()
        if expires <= utcnow().timestamp():
            raise Unauthenticated("token expired; log in again with 'balsamctl login'")
        principal = Principal(user_id=row["user_id"], username=row["username"], admin=row["admin"],
                              token_id=row["id"], scope=row["scope"], site_id=row["site_id"])
        self._cache[secret] = (now + self.cache_seconds, principal, expires)
        return principal

    def forget(self, token_id: str) -> None:
        for secret, (_, principal, _) in list(self._cache.items()):
            if principal.token_id == token_id:
                del self._cache[secret]
