"""Builds and runs the grpc.aio server: servicers, authentication, health, reflection,
keepalive, connection hygiene, TLS, graceful shutdown."""

from __future__ import annotations

import asyncio
import fcntl
import os
import resource
import signal
from pathlib import Path
from typing import IO, Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from balsam_grpc.core.addresses import is_loopback_address
from balsam_grpc.core.services import SERVICES
from balsam_grpc.server import rpc, wire
from balsam_grpc.server.clock import DatabaseClock
from balsam_grpc.server.state import ServerSettings, ServerState
from balsam_grpc.server.store.db import Database
from balsam_grpc.server.store import durability
from balsam_grpc.server.store.migrate import upgrade

log = structlog.get_logger("balsam.server")


MAX_STREAMS_PER_CONNECTION = 8192


def service_names() -> list[str]:
    return [s.full_name for s in SERVICES.values()]


def channel_options(settings: ServerSettings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Detect dead peers on long streams: ping every 20 s, give up after 10 s (settings).
        ("grpc.keepalive_time_ms", settings.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.keepalive_timeout_ms),
        ("grpc.http2.ping_timeout_ms", settings.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        # Let clients ping as often as every 5 s without GOAWAY too_many_pings.
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_pings_without_data", 0),
        # gRPC core sheds calls the event loop has not picked up yet beyond 1,000 (hard
        # 3,000) by cancelling them (CANCELLED, which no client retries). Let the admission
        # control (server/admission.py) answer them instead: RESOURCE_EXHAUSTED SERVER_BUSY
        # with a retry delay costs microseconds per call.
        ("grpc.server.max_pending_requests", settings.max_pending_requests),
        ("grpc.server.max_pending_requests_hard_limit", 2 * settings.max_pending_requests),
        # Connection hygiene: a connection that has not completed TLS and the HTTP/2 preface
        # within the handshake timeout is closed (a socket that never sends a byte holds a
        # file descriptor for nothing), and so is one without a call for the idle time
        # (clients reconnect on their next call). Connection age is not bounded: a site,
        # launcher or watch stream lives for days on one connection, and age would cut it.
        ("grpc.server_handshake_timeout_ms", settings.handshake_timeout_ms),
        ("grpc.max_connection_idle_ms", settings.connection_idle_ms),
        # Streams per connection (gRPC's default is unlimited): a bound on what one
        # connection can make gRPC core hold. Calls beyond it fail UNAVAILABLE at once, so
        # it sits well above what admission lets through (a client's burst of thousands
        # of calls on one channel must still reach admission and get SERVER_BUSY).
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        # No bandwidth-delay probing of what clients send: with it, gRPC core widens every
        # new stream's receive window to the link's capacity (tens of MiB on loopback)
        # and buffers that much of a body before the interceptor has decided on the
        # token; measured, 3 x 40 MiB bogus-token calls then held 100-200 MiB. Without
        # it an unread body costs one 64 KiB window, and a body being read still gets the
        # window its message needs (40 MiB uploads took the same time either way).
        ("grpc.http2.bdp_probe", 0),
    ]


def _add_servicers(server: grpc.aio.Server, state: ServerState, trimmer: wire.MemoryTrimmer) -> list[str]:
    """Register every servicer; returns the methods that need no token."""
    from balsam_grpc.server.services import registry

    limits = wire.receive_limits(state.settings.max_message_bytes, state.settings.max_jobs_per_call)
    public: list[str] = []
    table = wire.MethodTable()  # one lookup for every method of every service
    for name, servicer in registry.servicers(state).items():
        public += wire.register(server, servicer, SERVICES[name].descriptor, limits=limits, trimmer=trimmer,
                                field_limits=wire.REQUEST_LIMITS, table=table)
    server.add_generic_rpc_handlers((table,))
    return public


class GenericOnly:
    """The server as the generated add_*Servicer_to_server functions see it: their
    generic handler (every method of the service) is added, their registration of the
    same methods is not. grpc.aio keeps a pending request task per registered method
    and waits on all of them (asyncio.wait) for every call, of any method: health's
    three and reflection's one made five futures to wait on per call instead of one
    (wire.register registers none, for the same reason)."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        pass  # the generic handler added with them serves these methods


def raise_fd_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit (every connection is a
    descriptor; the default soft limit of 1024 is a few hundred clients). Returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1_048_576)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-file limit", soft=soft, hard=hard, error=str(exc))
    return soft


def _credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert:
        return None
    with open(settings.tls_cert, "rb") as c, open(settings.tls_key, "rb") as k:
        pair = [(k.read(), c.read())]
    if settings.tls_client_ca:
        with open(settings.tls_client_ca, "rb") as ca:
            return grpc.ssl_server_credentials(pair, root_certificates=ca.read(), require_client_auth=True)
    return grpc.ssl_server_credentials(pair)


class BalsamServer:
    """A running server. `await start()` returns the bound port (useful with port 0)."""

    def __init__(self, settings: ServerSettings | None = None) -> None:
        self.settings = settings or ServerSettings()
        self.db: Database | None = None
        self.state: ServerState | None = None
        self.server: grpc.aio.Server | None = None
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port = 0
        self._sqlite_lock: IO[str] | None = None
        self.clock: DatabaseClock | None = None

    async def start(self) -> int:
        settings = self.settings
        creds = _credentials(settings)
        if creds is None and not is_loopback_address(settings.address) and not settings.allow_insecure_remote:
            raise SystemExit(
                f"refusing to listen on {settings.address} without TLS: pass --tls-cert/--tls-key, "
                "or --allow-insecure-remote if the network is trusted")
        self._sqlite_lock = hold_sqlite_lock(settings.database_url)
        await asyncio.to_thread(upgrade, settings.database_url)
        self.db = Database(settings.database_url, workers=settings.database_threads,
                           bulk_reserved=settings.database_bulk_reserved)
        if not self.db.is_sqlite:
            for warning in durability.warnings(await self.db.read(durability.read_settings)):
                log.warning("PostgreSQL setting", detail=warning)
        self.clock = DatabaseClock(self.db)
        await self.clock.start()  # before anything is stamped
        if self.db.is_sqlite:
            # One process serves SQLite, so no daemon holds a stream before this server
            # serves: clear what a crash left. (On PostgreSQL other replicas may hold them.)
            from balsam_grpc.server.store.sites import reset_connected

            await self.db.write(reset_connected)
        self.state = ServerState(settings, self.db)
        await self.state.auth.job_tokens.load()
        # Filled by _add_servicers below, before the server takes its first call.
        public: set[str] = set()
        self.trimmer = wire.MemoryTrimmer()
        self.server = grpc.aio.server(options=channel_options(settings), interceptors=[rpc.Authentication(
            self.state.auth, public, public_services=(health.SERVICE_NAME, reflection.SERVICE_NAME),
            on_refused=self.trimmer.refused)])
        public.update(_add_servicers(self.server, self.state, self.trimmer))
        generic_only = GenericOnly(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, generic_only)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer(
            [*service_names(), health.SERVICE_NAME, reflection.SERVICE_NAME]), generic_only)
        if creds is None:
            self.port = self.server.add_insecure_port(settings.address)
        else:
            self.port = self.server.add_secure_port(settings.address, creds)
        if self.port == 0:
            raise SystemExit(f"could not bind {settings.address}: address in use or not available")
        await self.server.start()
        await self._bootstrap()
        if self.state.listener is not None:
            await self.state.listener.start()  # before the horizon is read: no commit falls between
        await self.state.fanout.start()
        await self.state.sessions.start()
        if settings.metrics_address:
            self.metrics_port = self.state.metrics.serve(settings.metrics_address)
            log.info("metrics served", address=settings.metrics_address, port=self.metrics_port)
        for name in ["", *service_names()]:
            await self._set_health(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("server started", address=settings.address, port=self.port, tls=creds is not None,
                 mtls=bool(settings.tls_client_ca), database=_redact(settings.database_url),
                 event_loop=type(asyncio.get_running_loop()).__module__)
        return self.port

    async def _bootstrap(self) -> None:
        from balsam_grpc.server.bootstrap import ensure_local_user

        host = self.settings.address.rsplit(":", 1)[0]
        await ensure_local_user(self.state, f"{host}:{self.port}")

    async def _set_health(self, name: str, status: int) -> None:
        result = self.health.set(name, status)
        if asyncio.iscoroutine(result):
            await result

    async def stop(self, grace: float | None = None) -> None:
        if self.server is None:
            return
        grace = self.settings.grace_seconds if grace is None else grace
        # Drain (server/drain.py): NOT_SERVING first, so clients' round_robin stops
        # picking this replica; then the streams are ended with UNAVAILABLE DRAINING and
        # their clients reconnect elsewhere at once; then unary calls get the grace.
        for name in ["", *service_names()]:
            await self._set_health(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("server draining", streams=len(self.state.drain.streams), grace_seconds=grace)
        await self.state.drain.start(self.settings.drain_seconds)
        await self.server.stop(grace)
        await self.state.sessions.stop()
        if self.state.listener is not None:
            await self.state.listener.stop()
        await self.state.fanout.stop()
        if self.clock is not None:
            await self.clock.stop()
        await asyncio.to_thread(self.state.metrics.stop)
        await asyncio.to_thread(self.db.dispose)
        if self._sqlite_lock is not None:
            self._sqlite_lock.close()  # releases the lock
            self._sqlite_lock = None
        self.server = None
        log.info("server stopped")

    async def wait(self) -> None:
        assert self.server is not None
        await self.server.wait_for_termination()


def hold_sqlite_lock(url: str) -> IO[str] | None:
    """SQLite serves one server process: hold an exclusive lock on "<database>.lock" for
    as long as this server runs (the kernel drops it if the process dies), and refuse to
    start when another process holds it. None for PostgreSQL and in-memory SQLite."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    path = Path(parsed.database).expanduser().resolve().with_name(Path(parsed.database).name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")  # noqa: SIM115 - held open for the server's lifetime
    try:
        # A POSIX record lock belongs to the process: servers of one process (tests) share
        # it, a second process is refused.
        fcntl.lockf(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise SystemExit(
            f"another balsam server (pid {holder}) already serves the SQLite database {parsed.database}; "
            "SQLite allows one server process. To run several replicas, put them on one PostgreSQL database "
            "(--database postgresql+psycopg://... or BALSAM_DATABASE_URL)") from None
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


async def serve(settings: ServerSettings) -> None:
    log.info("open-file limit", soft=raise_fd_limit())
    server = BalsamServer(settings)
    await server.start()
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop()
