"""What every servicer shares: settings, the database, the authenticator, the event bus."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

from balsam_grpc.core.settings import DEFAULT_ADDRESS, default_database_url
from balsam_grpc.server.admission import Admission, AdmissionLimits, LoginLimiter, LoginLimits
from balsam_grpc.server.auth import Authenticator
from balsam_grpc.server.drain import Drain
from balsam_grpc.server.fanout import Fanout
from balsam_grpc.server.metrics import Metrics
from balsam_grpc.server.notify import REVOKED, Listener
from balsam_grpc.server.session_keeper import SessionKeeper
from balsam_grpc.server.store.db import Database


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else default


@dataclass
class ServerSettings:
    address: str = field(default_factory=lambda: os.environ.get("BALSAM_SERVER_ADDRESS", DEFAULT_ADDRESS))
    database_url: str = field(default_factory=default_database_url)
    tls_cert: str = field(default_factory=lambda: os.environ.get("BALSAM_TLS_CERT", ""))
    tls_key: str = field(default_factory=lambda: os.environ.get("BALSAM_TLS_KEY", ""))
    # A client CA turns on mTLS: clients must present a certificate it signed.
    tls_client_ca: str = field(default_factory=lambda: os.environ.get("BALSAM_TLS_CLIENT_CA", ""))
    allow_insecure_remote: bool = False
    lease_timeout_seconds: int = 20
    max_jobs_per_call: int = 10_000
    max_map_entries: int = 64
    max_map_value_bytes: int = 4096
    max_message_bytes: int = 64 * 1024 * 1024
    token_ttl_seconds: int = 30 * 24 * 3600
    grace_seconds: float = 5.0
    # Stopping (SIGTERM): streams are ended (clients reconnect to another replica) and
    # their cleanup awaited for at most this long, before the grace for unary calls.
    drain_seconds: float = 5.0
    # Admission control (server/admission.py): overload is refused with RESOURCE_EXHAUSTED.
    max_unary_in_flight: int = 512
    max_unary_in_flight_per_user: int = 128
    max_streams_per_user: int = 2000
    busy_retry_after_ms: int = 250
    # Calls gRPC core may queue before the event loop takes them (then admission decides).
    max_pending_requests: int = 20_000
    # Login attempts: after this many wrong passwords for a user from one address (or from
    # one address for any users) within the window, Login from there is refused for the
    # lockout time, doubled by each later failure (admission.py LoginLimiter).
    login_max_failures_per_user: int = 5
    login_max_failures_per_address: int = 20
    login_window_seconds: float = 300.0
    login_lockout_seconds: float = 60.0
    # Database threads (store/db.py Workers) and how many of them bulk work (streams'
    # transactions) may always have while it waits; unary calls go first on the rest.
    database_threads: int = field(default_factory=lambda: _env_int("BALSAM_SERVER_DATABASE_THREADS", 6))
    database_bulk_reserved: int = field(default_factory=lambda: _env_int("BALSAM_SERVER_DATABASE_BULK_RESERVED", 2))
    # Open streams re-read their token this often (revocation through another server).
    stream_token_recheck_seconds: float = 30.0
    # Pings on every connection find dead peers (a site or launcher behind a black hole):
    # without them a half-open stream holds its site or session until TCP gives up.
    keepalive_time_ms: int = field(default_factory=lambda: _env_int("BALSAM_SERVER_KEEPALIVE_TIME_MS", 20_000))
    keepalive_timeout_ms: int = field(default_factory=lambda: _env_int("BALSAM_SERVER_KEEPALIVE_TIMEOUT_MS", 10_000))
    # "host:port" to serve Prometheus metrics on (/metrics); empty: not served.
    metrics_address: str = field(default_factory=lambda: os.environ.get("BALSAM_METRICS_ADDRESS", ""))
    # Connections that do not finish TLS and the HTTP/2 preface within this are closed.
    handshake_timeout_ms: int = field(
        default_factory=lambda: _env_int("BALSAM_SERVER_HANDSHAKE_TIMEOUT_MS", 10_000))
    # Connections without any call for this long are closed (clients reconnect on demand).
    connection_idle_ms: int = field(default_factory=lambda: _env_int("BALSAM_SERVER_CONNECTION_IDLE_MS", 300_000))


class EventBus:
    """The event horizon (every event with id <= it is committed or never will be) and a
    wake-up when it may have grown (no polling).

    With `ordered_commits` (SQLite: one writer, ids visible in commit order) a local
    commit's highest id is a horizon. Otherwise (PostgreSQL, writers on several replicas)
    a commit only pokes the one waiter, the Fanout (server/fanout.py), which asks the
    database for the horizon, reads the new events once and wakes only the streams they
    concern."""

    def __init__(self, ordered_commits: bool = True) -> None:
        self.ordered_commits = ordered_commits
        self.high_water = 0
        self._poked = False
        self._changed = asyncio.Event()

    def published(self, max_event_id: int) -> None:
        """A local transaction committed events up to `max_event_id`."""
        if self.ordered_commits:
            self.advance(max_event_id)
        else:
            self.poke()

    def advance(self, horizon: int) -> None:
        if horizon > self.high_water:
            self.high_water = horizon
            self._wake()

    def poke(self) -> None:
        """New events may exist (a commit here or on another replica): look."""
        self._poked = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_beyond(self, cursor: int, timeout: float) -> bool:
        """True when an event newer than `cursor` may exist (or the bus was poked since
        the last call), False on timeout."""
        if self.high_water > cursor or self._poked:
            self._poked = False
            return True
        try:
            # Not wait_for: on Python 3.11 it can swallow a cancellation that arrives as
            # the event is set, and the dispatcher would outlive its server.
            async with asyncio.timeout(timeout):
                await self._changed.wait()
        except TimeoutError:
            return False
        self._poked = False
        return True


class ServerState:
    def __init__(self, settings: ServerSettings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.auth = Authenticator(db)
        self.admission = Admission(AdmissionLimits(
            max_unary_in_flight=settings.max_unary_in_flight,
            max_unary_in_flight_per_user=settings.max_unary_in_flight_per_user,
            max_streams_per_user=settings.max_streams_per_user, retry_after_ms=settings.busy_retry_after_ms))
        self.logins = LoginLimiter(db, LoginLimits(
            max_failures_per_user=settings.login_max_failures_per_user,
            max_failures_per_address=settings.login_max_failures_per_address,
            window_seconds=settings.login_window_seconds, lockout_seconds=settings.login_lockout_seconds))
        # Prometheus metrics of this replica (served on settings.metrics_address).
        self.metrics = Metrics()
        self.metrics.watch_pool(db.engine)
        self.bus = EventBus(ordered_commits=not db.is_postgres)
        db.on_events = self.bus.published
        # Site streams, launcher sessions and event watchers subscribe here.
        self.fanout = Fanout(db, self.bus, self.metrics)
        # PostgreSQL: what other replicas commit (and news such as revocations) arrives by
        # LISTEN/NOTIFY; started and stopped with the server (app.py).
        self.listener: Listener | None = None
        if db.is_postgres:
            self.listener = Listener(settings.database_url, self.fanout.hint)
            self.listener.on_reconnect(self.bus.poke)
            # A token revoked through any replica: no cached answer here, its streams end.
            self.listener.on_control(REVOKED, self.auth.forget)
        # Launcher session liveness: started and stopped with the server (app.py).
        self.sessions = SessionKeeper(db, settings.lease_timeout_seconds, self.metrics)
        # The streams this process holds, ended (and new ones refused) when it drains.
        self.drain = Drain()
