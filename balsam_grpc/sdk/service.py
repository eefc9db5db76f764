"""`ServiceClient`: one channel to the server, authenticated calls with deadlines, mapped errors.

- Where the server is: arguments, else BALSAM_SERVER / BALSAM_TOKEN, else the profile
  file (BALSAM_PROFILE or $BALSAM_HOME/profile.json). TLS from arguments, else
  BALSAM_TLS_CA / BALSAM_TLS_CLIENT_CERT / BALSAM_TLS_CLIENT_KEY, else the profile.
- The channel (core.channel) has keepalive with a ping timeout and retries the read-only
  methods on UNAVAILABLE through the gRPC service config.
- Every unary call gets a deadline (`timeout`, default 30 s; per call overridable);
  streams get none.
- Mutations carry a request_id made once per logical call. On UNAVAILABLE the SDK
  resends the same request (same id), so the server answers a retried create with the
  first answer instead of creating twice.
- RESOURCE_EXHAUSTED with reason SERVER_BUSY (the server's admission control refused
  the call before doing anything) is retried for any method, after at least the delay
  the server asked for; other RESOURCE_EXHAUSTED answers are not retried.
- Failures are raised as the BalsamError hierarchy (sdk.errors) with the server's
  reason and field.
- The first call of a client first checks (within CONNECT_TIMEOUT) that a server is
  there: one that is not (connection refused, unknown host) is reported at once with the
  address tried and how to start one, instead of after the read-only retries' back-off;
  a check whose answer was lost is repeated, not taken for a missing server. A
  connection still in progress then is left to the call's deadline.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, Self

import grpc
import structlog
from google.protobuf.message import Message

from balsam_grpc.core.backoff import Backoff
from balsam_grpc.core.channel import auth_metadata, make_channel
from balsam_grpc.core.services import SERVICES
from balsam_grpc.core.settings import Profile
from balsam_grpc.sdk.errors import Unavailable, error_from_rpc
from balsam_grpc.v1 import auth_service_pb2

log = structlog.get_logger("balsam.sdk")

DEFAULT_TIMEOUT = 30.0
MUTATION_ATTEMPTS = 5
BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 5.0
# The missing-server check's time (the report comes within 2 s).
CONNECT_TIMEOUT = 1.5
HEALTH_CHECK = "/grpc.health.v1.Health/Check"  # an empty HealthCheckRequest is b""
_USE_DEFAULT: Any = object()

STUBS: dict[str, Callable[[grpc.Channel], Any]] = {name: s.stub for name, s in SERVICES.items()}


def new_request_id() -> str:
    return uuid.uuid4().hex


def server_busy_delay(err: grpc.RpcError) -> float | None:
    """Seconds to wait before resending a call the server refused as SERVER_BUSY (its
    admission control: nothing was done), or None when the refusal is not retryable
    (a message too large, a rate-limited login, too many streams)."""
    info = error_from_rpc(err)
    if info.reason != "SERVER_BUSY":
        return None
    try:
        return max(0.0, int(info.metadata.get("retry_after_ms", "0")) / 1000)
    except ValueError:
        return 0.0


def _one_line(err: grpc.RpcError) -> str:
    details = err.details() if hasattr(err, "details") else str(err)  # type: ignore[attr-defined]
    return " ".join(str(details or "").split())


def _code(err: grpc.RpcError) -> grpc.StatusCode | None:
    return err.code() if hasattr(err, "code") else None  # type: ignore[attr-defined]


# How gRPC words a connection nothing accepted (the OS's refusal, a name that does not
# resolve, no route): no server is there, and waiting longer would not change that.
_NOTHING_THERE = ("connection refused", "dns resolution failed", "errors resolving", "name or service not known",
                  "no route to host", "network is unreachable", "no such file or directory")


def _refused(err: grpc.RpcError) -> bool:
    return any(words in _one_line(err).lower() for words in _NOTHING_THERE)


def _has_request_id(request: Message) -> bool:
    return "request_id" in request.DESCRIPTOR.fields_by_name


class Connection(Protocol):
    """What the SDK's models, queries, streams and futures need from a client: calls,
    streams and name lookups. `Client` is one; a test can pass any object that has these."""

    server: str

    def call(self, service: str, method: str, request: Message, *, timeout: float | None = ...) -> Any: ...

    def open_stream(self, service: str, method: str, request: Message) -> Any: ...

    def resolve_names(self, resource: str, names: list[str]) -> list[int]: ...


class ServiceClient:
    """The typed layer over the generated stubs: a channel to one server, authenticated
    unary calls with deadlines and retries, streams, and the missing-server check.
    `Client` (sdk.client) adds the resources, watches and futures on top of it.
    """

    def __init__(self, server: str | None = None, token: str | None = None, *,
                 profile: Profile | str | Path | None = None, tls: bool | None = None,
                 tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT, mutation_attempts: int = MUTATION_ATTEMPTS,
                 channel_options: tuple[tuple[str, Any], ...] = ()) -> None:
        if not isinstance(profile, Profile):
            profile = Profile.load(Path(profile).expanduser() if profile else None)
        self.server = server or profile.server
        self.token = token if token is not None else profile.token
        self.username = profile.username
        tls_ca = tls_ca if tls_ca is not None else os.environ.get("BALSAM_TLS_CA", profile.tls_ca)
        tls_cert = tls_cert if tls_cert is not None else os.environ.get("BALSAM_TLS_CLIENT_CERT", profile.tls_cert)
        tls_key = tls_key if tls_key is not None else os.environ.get("BALSAM_TLS_CLIENT_KEY", profile.tls_key)
        self.timeout = timeout
        self.mutation_attempts = max(1, mutation_attempts)
        # Its own subchannels: gRPC shares them process-wide by default, and a new client
        # would inherit another's reconnect back-off after a server restart (its first
        # call, the connect check, failing against a server that is up again).
        self.channel = make_channel(self.server, tls=tls, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key,
                                    options=(("grpc.use_local_subchannel_pool", 1), *channel_options))
        self.metadata = auth_metadata(self.token) if self.token else ()
        self._stubs = {name: factory(self.channel) for name, factory in STUBS.items()}
        self._lock = threading.Lock()
        self._closed = False
        self._connected = False

    # -- calls --------------------------------------------------------------------

    def stub(self, service: str) -> Any:
        """The generated stub of a service ("JobService"), for calls the SDK does not wrap."""
        return self._stubs[service]

    def call(self, service: str, method: str, request: Message, *, timeout: float | None = _USE_DEFAULT) -> Any:
        """One unary call with auth and a deadline; errors raised as BalsamError.

        A request with a request_id field is a mutation: it gets an id (unless the caller
        set one) and is resent unchanged on UNAVAILABLE within the deadline.
        """
        timeout = self.timeout if timeout is _USE_DEFAULT else timeout
        if not self._connected:
            self._check_server()
        rpc = getattr(self._stubs[service], method)
        mutation = _has_request_id(request)
        if mutation and not request.request_id:  # type: ignore[attr-defined]
            request.request_id = new_request_id()  # type: ignore[attr-defined]
        deadline = None if timeout is None else time.monotonic() + timeout
        delays = Backoff(BACKOFF_INITIAL, BACKOFF_MAX)
        attempt = 0
        while True:
            attempt += 1
            remaining = None if deadline is None else max(deadline - time.monotonic(), 0.001)
            try:
                return rpc(request, metadata=self.metadata, timeout=remaining)
            except grpc.RpcError as err:
                code = err.code() if hasattr(err, "code") else None  # type: ignore[attr-defined]
                busy = server_busy_delay(err) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None
                if busy is not None and attempt < self.mutation_attempts:
                    # The server refused before doing anything (admission control): any
                    # method is safe to resend, after at least the delay it asked for.
                    delay = max(delays.next_delay(), busy)
                    if deadline is None or time.monotonic() + delay < deadline:
                        log.info("server busy, retrying", method=f"{service}.{method}", attempt=attempt,
                                 delay_s=round(delay, 3))
                        time.sleep(delay)
                        continue
                if mutation and code == grpc.StatusCode.UNAVAILABLE and attempt < self.mutation_attempts:
                    delay = delays.next_delay()
                    if deadline is None or time.monotonic() + delay < deadline:
                        log.info("retrying mutation", method=f"{service}.{method}", attempt=attempt,
                                 request_id=request.request_id)  # type: ignore[attr-defined]
                        time.sleep(delay)
                        continue
                raise error_from_rpc(err) from None

    def open_stream(self, service: str, method: str, request: Message) -> Any:
        """A server-streaming call with auth and no deadline (the caller iterates and
        cancels it); errors surface as grpc.RpcError while iterating."""
        if not self._connected:
            self._check_server()
        return getattr(self._stubs[service], method)(request, metadata=self.metadata)

    def _probe(self, timeout: float, *, wait_for_ready: bool = False) -> grpc.RpcError | None:
        """One health-check call (not in the channel's retry policy): None when any server
        answered (even UNIMPLEMENTED or UNAUTHENTICATED mean one is there), else the error."""
        probe = self.channel.unary_unary(HEALTH_CHECK, request_serializer=bytes, response_deserializer=bytes)
        try:
            probe(b"", timeout=max(timeout, 0.001), metadata=self.metadata, wait_for_ready=wait_for_ready)
        except grpc.RpcError as err:
            if _code(err) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return err
        return None

    def _check_server(self, timeout: float = CONNECT_TIMEOUT) -> None:
        """Raise Unavailable when no server is there, within `timeout` seconds.

        A probe fails at once when nothing accepts the connection (refused, unknown host,
        unreachable): that is reported right away, with the address and how to start a
        server, where a first real call would go through the read-only retries' back-off
        for seconds. A probe that failed any other way (the connection was reset, or the
        answer was lost on a connection that reached something) is not taken for a missing
        server: it is sent again, waiting for the channel to (re)connect, for the rest of
        `timeout`, and only if that gets no answer either is the server reported missing.
        A probe that only ran out of time (a slow network) is left to the real call.

        No connectivity subscription (channel.subscribe, channel_ready_future): its polling
        thread can make the process hang at exit (see wait_ready).
        """
        deadline = time.monotonic() + timeout
        err = self._probe(timeout)
        if err is not None and _code(err) == grpc.StatusCode.UNAVAILABLE and not _refused(err):
            err = self._probe(deadline - time.monotonic(), wait_for_ready=True)
        if err is None:
            self._connected = True
        elif _code(err) == grpc.StatusCode.UNAVAILABLE or _refused(err):
            raise Unavailable(
                f"no balsam server answers at {self.server} ({_one_line(err)}): start one with "
                "`balsamctl server start`, or point BALSAM_SERVER (or `balsamctl login --server`) at yours",
                reason="UNAVAILABLE") from None

    def whoami(self) -> auth_service_pb2.GetCurrentUserResponse:
        """The caller's user and token scope."""
        return self.call("AuthService", "GetCurrentUser", auth_service_pb2.GetCurrentUserRequest())

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until a server answers on this channel; Unavailable if not within `timeout`.

        A health-check call that waits for the channel to connect, rather than
        grpc.channel_ready_future: that one subscribes to the channel's connectivity,
        whose polling thread, when the process exits while it is still watching, leaves
        the interpreter's exit blocked in the channel's deallocation for good (a short
        `balsamctl` command hung that way)."""
        if self._probe(timeout, wait_for_ready=True) is not None:
            raise Unavailable(f"server {self.server} not reachable within {timeout} s", reason="UNAVAILABLE")
        # Connected: the first call needs no probe of its own.
        self._connected = True

    # -- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(server={self.server!r}, user={self.username or '?'})"


# The client that models and queries not bound to one use (`Job.objects`): sdk.client
# registers how to make it (its default_client), so nothing below the client imports it.
_default_provider: Callable[[], Any] | None = None


def provide_default(provider: Callable[[], Any]) -> None:
    """Register the function that returns the default client (sdk.client does, on import)."""
    global _default_provider
    _default_provider = provider


def default_connection() -> Any:
    """The default client (`balsam_grpc.sdk.default_client()`)."""
    if _default_provider is None:
        raise RuntimeError("no default client: import balsam_grpc.sdk (or pass a Client explicitly)")
    return _default_provider()


__all__ = ["Connection", "ServiceClient", "default_connection", "provide_default", "server_busy_delay"]
