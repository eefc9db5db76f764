"""Admission control: overload is refused with RESOURCE_EXHAUSTED, not by falling over.

- Unary RPCs: a cap on those in flight in this server process, and a lower one per user,
  so one busy client cannot take every slot. A call over either cap is refused at once
  (before any database work) with reason SERVER_BUSY and a retry delay, both in the
  ErrorInfo metadata (`retry_after_ms`) and in the `retry-after-ms` trailer. The SDK
  retries exactly these refusals: nothing ran, so any method is safe to resend.
- Streams: a cap on the long-lived streams one user holds, so a reconnect storm or a leak
  in a client cannot exhaust the server's tasks and memory. Watch streams and the work
  streams of site daemons and launchers count separately: a user's runaway watchers
  (a dashboard open in many tabs) cannot keep that user's own sites and pilots out.
- Login attempts: after N wrong passwords for a user name from one address (or M from
  that address for any names) within a window, Login from there is refused for a while,
  with backoff, before any password is verified (LoginLimiter), so passwords cannot be
  guessed at the speed of scrypt and nobody can lock a user out from elsewhere.

Call and stream admission is pure bookkeeping on the event loop thread (no locks, no
awaits); the login counts live in the database, shared by every server process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from balsam_grpc.core.errors import ResourceExhausted
from balsam_grpc.server.convert import utcnow
from balsam_grpc.server.store import logins
from balsam_grpc.server.store.db import Database

SERVER_BUSY = "SERVER_BUSY"
TOO_MANY_STREAMS = "TOO_MANY_STREAMS"
LOGIN_RATE_LIMITED = "LOGIN_RATE_LIMITED"
RETRY_AFTER_KEY = "retry_after_ms"
RETRY_AFTER_TRAILER = "retry-after-ms"
# Public calls (Login) have no user yet; they share one per-user budget.
ANONYMOUS = -1
# Stream kinds, each with its own per-user budget.
WATCH = "watch"
WORK = "work"
_KIND_NAMES = {WATCH: "watch streams", WORK: "site and launcher streams"}


def stream_kind(method: str) -> str:
    """WATCH for read-only event streams, WORK for the site and session streams."""
    return WATCH if method.rpartition(".")[2].startswith("Watch") else WORK


class Refused(ResourceExhausted):
    """RESOURCE_EXHAUSTED that tells the caller when to come back.

    `trailing_metadata` is sent with the status (server/rpc.py `to_status`)."""

    def __init__(self, message: str, *, reason: str, retry_after_ms: int) -> None:
        super().__init__(message, reason=reason, metadata={RETRY_AFTER_KEY: str(retry_after_ms)})
        self.retry_after_ms = retry_after_ms
        self.trailing_metadata: tuple[tuple[str, str], ...] = ((RETRY_AFTER_TRAILER, str(retry_after_ms)),)


@dataclass(frozen=True, slots=True)
class AdmissionLimits:
    max_unary_in_flight: int = 512
    max_unary_in_flight_per_user: int = 128
    max_streams_per_user: int = 2000
    retry_after_ms: int = 250


class Admission:
    """Counts unary calls in flight (total and per user) and streams per user."""

    def __init__(self, limits: AdmissionLimits | None = None) -> None:
        self.limits = limits or AdmissionLimits()
        self.in_flight = 0
        self.per_user: dict[int, int] = {}
        self.streams: dict[tuple[int, str], int] = {}
        self.refused = 0  # since start, for logs and benchmarks

    def enter(self, user_id: int | None) -> int:
        """Count one unary call in, or raise Refused (SERVER_BUSY) when a cap is reached.
        Returns the key to hand to leave(), exactly once, when the call ends."""
        user = ANONYMOUS if user_id is None else user_id
        limits = self.limits
        mine = self.per_user.get(user, 0)
        if self.in_flight >= limits.max_unary_in_flight:
            self.refused += 1
            raise Refused(f"server busy: {self.in_flight} calls in flight; retry after {limits.retry_after_ms} ms",
                          reason=SERVER_BUSY, retry_after_ms=limits.retry_after_ms)
        if mine >= limits.max_unary_in_flight_per_user:
            self.refused += 1
            raise Refused(f"server busy: this user has {mine} calls in flight; retry after "
                          f"{limits.retry_after_ms} ms", reason=SERVER_BUSY, retry_after_ms=limits.retry_after_ms)
        self.in_flight += 1
        self.per_user[user] = mine + 1
        return user

    def leave(self, user: int) -> None:
        self.in_flight -= 1
        left = self.per_user[user] - 1
        if left:
            self.per_user[user] = left
        else:
            del self.per_user[user]

    def held(self, user_id: int, kind: str | None = None) -> int:
        """Streams `user_id` holds now, of `kind` or of every kind."""
        return sum(n for (user, k), n in self.streams.items() if user == user_id and kind in (None, k))

    def open_stream(self, user_id: int, kind: str = WORK) -> Callable[[], None]:
        """Count one stream of `user_id` of `kind`; returns its release function (idempotent)."""
        key = (user_id, kind)
        held = self.streams.get(key, 0)
        if held >= self.limits.max_streams_per_user:
            self.refused += 1
            # Streams reconnect with their own backoff; a longer hint spreads a storm out.
            retry = self.limits.retry_after_ms * 4
            raise Refused(f"this user already holds {held} {_KIND_NAMES[kind]} (the limit); close some or retry "
                          f"after {retry} ms", reason=TOO_MANY_STREAMS, retry_after_ms=retry)
        self.streams[key] = held + 1
        done = False

        def release() -> None:
            nonlocal done
            if done:
                return
            done = True
            left = self.streams[key] - 1
            if left:
                self.streams[key] = left
            else:
                del self.streams[key]

        return release


# ---------------------------------------------------------------------------- logins

@dataclass(frozen=True, slots=True)
class LoginLimits:
    # Wrong passwords for one user name from one address before that pair is blocked.
    max_failures_per_user: int = 5
    # Wrong passwords from one address, whatever the names, before the address is blocked.
    max_failures_per_address: int = 20
    window_seconds: float = 300.0
    lockout_seconds: float = 60.0
    # Each failure after a block ended doubles the next block, up to this.
    max_lockout_seconds: float = 900.0


class LoginLimiter:
    """Wrong-password limits per (user name, client address), and per address across
    names, with exponential backoff; kept in the database (store/logins.py) so every
    server process on it enforces the same counts.

    Failures from one address block only that (name, address) pair and, past a higher
    count, that address: an attacker elsewhere cannot lock a user out (five wrong
    passwords used to block the name from everywhere). A blocked pair is refused before
    any password is verified, and refused attempts count nothing. After the block ends,
    each further failure within the window blocks again for twice as long (capped). A
    successful login clears its pair. Rows idle longer than the window are deleted, so a
    flood of made-up names leaves little behind.
    """

    def __init__(self, db: Database, limits: LoginLimits | None = None,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.db = db
        self.limits = limits or LoginLimits()
        self.clock = clock

    @staticmethod
    def keys(username: str, address: str) -> list[tuple[str, str]]:
        """The pair's key, and the address's own (user name ""; the names a client may
        log in with are never empty)."""
        return [(username[:200], address[:64]), ("", address[:64])]

    def lockout(self, key: tuple[str, str], failures: int) -> timedelta | None:
        """How long `key` is blocked after its `failures`-th failure in the window."""
        limits = self.limits
        threshold = limits.max_failures_per_address if key[0] == "" else limits.max_failures_per_user
        if failures < threshold:
            return None
        seconds = limits.lockout_seconds * 2 ** min(failures - threshold, 32)
        return timedelta(seconds=min(seconds, limits.max_lockout_seconds))

    async def check(self, username: str, address: str) -> None:
        """Raise Refused (LOGIN_RATE_LIMITED) while the pair or the address is blocked."""
        until = await self.db.read(logins.blocked_until, self.keys(username, address))
        wait = (until - self.clock()).total_seconds() if until is not None else 0.0
        if wait > 0:
            ms = max(1, int(wait * 1000))
            raise Refused(f"too many failed logins from this address; retry after {max(1, round(wait))} s",
                          reason=LOGIN_RATE_LIMITED, retry_after_ms=ms)

    async def failed(self, username: str, address: str) -> None:
        await self.db.write(logins.record_failure, self.keys(username, address), self.clock(),
                            timedelta(seconds=self.limits.window_seconds), self.lockout)

    async def succeeded(self, username: str, address: str) -> None:
        await self.db.write(logins.clear, self.keys(username, address)[0])


def peer_address(peer: str | None) -> str:
    """The client's host from a gRPC peer string ("ipv4:1.2.3.4:5678", "ipv6:[::1]:5678",
    "unix:/path"); empty when unknown."""
    if not peer:
        return ""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return kind
