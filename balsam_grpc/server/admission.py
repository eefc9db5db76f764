"""Admission control: overload is refused with RESOURCE_EXHAUSTED, not by falling over.

- Unary RPCs: a cap on those in flight in this server process, and a lower one per user,
  so one busy client cannot take every slot. A call over either cap is refused at once
  (before any database work) with reason SERVER_BUSY and a retry delay, both in the
  ErrorInfo metadata (`retry_after_ms`) and in the `retry-after-ms` trailer. The SDK
  retries exactly these refusals: nothing ran, so any method is safe to resend.
- Streams: a cap on the long-lived streams (site, session, watch) one user holds, so a
  reconnect storm or a leak in a client cannot exhaust the server's tasks and memory.
- Login attempts: after N wrong passwords for a user name (or M from one address) within
  a window, Login is refused for a while before any password is verified
  (LoginLimiter), so passwords cannot be guessed at the speed of scrypt.

Everything here is pure bookkeeping on the event loop thread (no locks, no awaits).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from balsam_grpc.core.errors import ResourceExhausted

SERVER_BUSY = "SERVER_BUSY"
TOO_MANY_STREAMS = "TOO_MANY_STREAMS"
LOGIN_RATE_LIMITED = "LOGIN_RATE_LIMITED"
RETRY_AFTER_KEY = "retry_after_ms"
RETRY_AFTER_TRAILER = "retry-after-ms"
# Public calls (Login) have no user yet; they share one per-user budget.
ANONYMOUS = -1


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


class Slot:
    """One admitted unary call; `release()` exactly once (idempotent)."""

    __slots__ = ("_admission", "_user")

    def __init__(self, admission: Admission, user: int) -> None:
        self._admission = admission
        self._user = user

    def release(self) -> None:
        if self._admission is not None:
            self._admission._leave(self._user)
            self._admission = None  # type: ignore[assignment]


class Admission:
    """Counts unary calls in flight (total and per user) and streams per user."""

    def __init__(self, limits: AdmissionLimits | None = None) -> None:
        self.limits = limits or AdmissionLimits()
        self.in_flight = 0
        self.per_user: dict[int, int] = {}
        self.streams: dict[int, int] = {}
        self.refused = 0  # since start, for logs and benchmarks

    def admit(self, user_id: int | None) -> Slot:
        """A slot for one unary call, or Refused (SERVER_BUSY) when a cap is reached."""
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
        return Slot(self, user)

    def _leave(self, user: int) -> None:
        self.in_flight -= 1
        left = self.per_user[user] - 1
        if left:
            self.per_user[user] = left
        else:
            del self.per_user[user]

    def open_stream(self, user_id: int) -> Callable[[], None]:
        """Count one stream of `user_id`; returns its release function (idempotent)."""
        held = self.streams.get(user_id, 0)
        if held >= self.limits.max_streams_per_user:
            self.refused += 1
            # Streams reconnect with their own backoff; a longer hint spreads a storm out.
            retry = self.limits.retry_after_ms * 4
            raise Refused(f"this user already holds {held} streams (the limit); close some or retry after "
                          f"{retry} ms", reason=TOO_MANY_STREAMS, retry_after_ms=retry)
        self.streams[user_id] = held + 1
        done = False

        def release() -> None:
            nonlocal done
            if done:
                return
            done = True
            left = self.streams[user_id] - 1
            if left:
                self.streams[user_id] = left
            else:
                del self.streams[user_id]

        return release


# ---------------------------------------------------------------------------- logins

@dataclass(frozen=True, slots=True)
class LoginLimits:
    max_failures_per_user: int = 5
    max_failures_per_address: int = 20
    window_seconds: float = 300.0
    lockout_seconds: float = 60.0


class LoginLimiter:
    """Wrong-password counts per key ("user:<name>", "addr:<ip>") in a sliding window.

    A key with too many failures in the window is blocked until `lockout_seconds` after
    its latest failure; attempts refused while blocked verify nothing and count nothing
    (they cannot reveal anything). A successful login clears its user name's count, not
    its address's. At most `max_keys` keys are remembered (oldest dropped first), so a
    flood of made-up user names cannot grow the server's memory.
    """

    def __init__(self, limits: LoginLimits | None = None, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 100_000) -> None:
        self.limits = limits or LoginLimits()
        self.clock = clock
        self.max_keys = max_keys
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    def _recent(self, key: str, now: float) -> list[float]:
        times = self._failures.get(key)
        if not times:
            return []
        cutoff = now - self.limits.window_seconds
        while times and times[0] <= cutoff:
            times.pop(0)
        if not times:
            del self._failures[key]
        return times

    def _limit(self, key: str) -> int:
        return self.limits.max_failures_per_user if key.startswith("user:") else self.limits.max_failures_per_address

    def check(self, username: str, address: str) -> None:
        """Raise Refused (LOGIN_RATE_LIMITED) while either key is blocked."""
        now = self.clock()
        wait = 0.0
        for key in self.keys(username, address):
            times = self._recent(key, now)
            if len(times) >= self._limit(key):
                wait = max(wait, times[-1] + self.limits.lockout_seconds - now)
        if wait > 0:
            ms = max(1, int(wait * 1000))
            raise Refused(f"too many failed logins; retry after {ms / 1000:.0f} s", reason=LOGIN_RATE_LIMITED,
                          retry_after_ms=ms)

    def failed(self, username: str, address: str) -> None:
        now = self.clock()
        for key in self.keys(username, address):
            times = self._recent(key, now)
            times.append(now)
            self._failures[key] = times
            self._failures.move_to_end(key)
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)

    def succeeded(self, username: str) -> None:
        self._failures.pop(f"user:{username}", None)

    @staticmethod
    def keys(username: str, address: str) -> list[str]:
        keys = [f"user:{username[:200]}"]
        if address:
            keys.append(f"addr:{address}")
        return keys


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
