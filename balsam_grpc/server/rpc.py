"""The one place where RPCs are authenticated, logged and their errors mapped.

Authentication happens in `Authentication`, a server interceptor: it sees the method
and the metadata before gRPC reads the request body, so a call without a valid token is
refused UNAUTHENTICATED without its body ever being received or parsed (a flood of
large bodies with a made-up token costs the server nothing). The Principal it resolves
reaches the handler through a context variable (the interceptor and the handler run in
one contextvars.Context per call).

Every servicer method is wrapped with `unary` or `stream`: the wrapper takes the
Principal, admits the call (server/admission.py), marks a stream's database work as bulk
(store/db.py Lanes: unary calls' transactions go first), and turns a BalsamError into a status
with a google.rpc.ErrorInfo detail. Anything unexpected becomes INTERNAL with an incident
id that is also in the server log, never UNKNOWN and never a stack trace sent to the
caller.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import time
import uuid
from time import perf_counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import grpc
import structlog
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from balsam_grpc.core.errors import ERROR_DOMAIN, BalsamError, ResourceExhausted, Unauthenticated, Unavailable
from balsam_grpc.server.admission import stream_kind
from balsam_grpc.server.auth import Authenticator
from balsam_grpc.server.principal import Principal
from balsam_grpc.server.store.db import bulk_work
from balsam_grpc.server.stream_guard import StreamGuard
from balsam_grpc.server.unstorable import nul_refusal

log = structlog.get_logger("balsam.rpc")


_PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("balsam_principal", default=None)


def to_status(err: BalsamError) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=ERROR_DOMAIN, metadata=err.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=err.code.value[0], message=err.message, details=[detail])
    converted = rpc_status.to_status(status)
    extra = getattr(err, "trailing_metadata", ())  # e.g. retry-after-ms (server/admission.py)
    if extra:
        converted = _Status(converted.code, converted.details, (*converted.trailing_metadata, *extra))
    return converted


class _Status(collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status):
    """A status with extra trailers (grpc_status's own type has no room for them)."""


def _internal_status(incident: str) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason="INTERNAL", domain=ERROR_DOMAIN, metadata={"incident": incident})
    detail = any_pb2.Any()
    detail.Pack(info)
    return rpc_status.to_status(status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=f"internal server error (incident {incident}); the server log has the details",
        details=[detail]))


Handler = Callable[[Any, Any, grpc.aio.ServicerContext, Principal], Awaitable[Any]]


def _method_name(fn: Callable[..., Any]) -> str:
    return fn.__qualname__.replace("Servicer", "")


def database_unavailable(exc: BaseException) -> Unavailable | None:
    """The database went away (PostgreSQL restarting, a connection cut, the pool out of
    connections): UNAVAILABLE, which callers retry (mutations with their request_id), not
    INTERNAL. SQLAlchemy has already invalidated the dead pooled connections."""
    from sqlalchemy import exc as sa_exc

    transient = isinstance(exc, sa_exc.DisconnectionError | sa_exc.TimeoutError) or (
        isinstance(exc, sa_exc.DBAPIError) and (exc.connection_invalidated or _connection_error(exc.orig)))
    if not transient:
        return None
    return Unavailable("the database is unavailable; retry shortly", reason="DATABASE_UNAVAILABLE")


def _connection_error(orig: BaseException | None) -> bool:
    # psycopg raises OperationalError for refused, lost and administrator-terminated
    # connections (SQLite's OperationalError also means locked or malformed: not these).
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a server dependency
        return False
    return isinstance(orig, psycopg.OperationalError)


async def _fail(context: grpc.aio.ServicerContext, method: str, exc: BaseException, started: float,
                request: Any = None) -> None:
    elapsed_ms = round((time.perf_counter() - started) * 1000, 2)
    exc = nul_refusal(exc, request) or exc
    unavailable = database_unavailable(exc)
    if unavailable is not None:
        log.warning("rpc failed: database unavailable", method=method, ms=elapsed_ms, error=(str(exc).splitlines() or [""])[0])
        exc = unavailable
    if isinstance(exc, BalsamError):
        log.info("rpc refused", method=method, code=exc.code.name, reason=exc.reason,
                 error=exc.message, ms=elapsed_ms)
        await context.abort_with_status(to_status(exc))
    incident = uuid.uuid4().hex[:12]
    log.error("rpc failed", method=method, incident=incident, ms=elapsed_ms, exc_info=exc)
    await context.abort_with_status(_internal_status(incident))


def _refused(state: Any) -> None:
    state.metrics.admission_rejections.labels("unary").inc()


def _code_name(exc: BaseException) -> str:
    """The status code a failure is answered with (for metrics)."""
    if isinstance(exc, BalsamError):
        return str(exc.code.name)
    return "UNAVAILABLE" if database_unavailable(exc) is not None else "INTERNAL"


def _record(state: Any, method: str, code: str, started: float) -> None:
    state.metrics.call(method, code, time.perf_counter() - started)


class Authentication(grpc.aio.ServerInterceptor):
    """Resolves the caller from the call's metadata before the request is read.

    Every method is protected except those in `public` (full names, "/pkg.Service/Method")
    and those of the services in `public_services` (health, reflection). A refused call
    gets a handler that never reads the request: its status is sent while the client's
    body, whatever its size, is still unread in the client's send window."""

    def __init__(self, auth: Authenticator, public: Collection[str] = (), public_services: Collection[str] = (),
                 on_refused: Callable[[], None] | None = None) -> None:
        self.auth = auth
        self.public = public
        self.public_services = tuple(f"/{name}/" for name in public_services)
        # Called for each refusal: gRPC core may have buffered part of the unread body
        # (up to the stream's flow-control window), freed when the call ends.
        self.on_refused = on_refused

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        method = details.method
        if handler is None or method in self.public or method.startswith(self.public_services):
            return handler
        started = time.perf_counter()
        try:
            _PRINCIPAL.set(await self.auth.authenticate(details.invocation_metadata))
        except Exception as exc:  # noqa: BLE001 - mapped to a status right here
            if self.on_refused is not None:
                self.on_refused()
            return _refusal(method.rsplit("/", 1)[-1], exc, started)
        return handler


def _refusal(method: str, exc: BaseException, started: float) -> grpc.RpcMethodHandler:
    """A handler that answers `exc` as a status and reads nothing of the request (the
    request side is declared streaming, so gRPC waits for the behaviour to ask)."""

    async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
        if isinstance(exc, Unauthenticated):  # expected, and possibly a flood: keep it quiet
            await context.abort_with_status(to_status(exc))
        await _fail(context, method, exc, started)

    return grpc.stream_unary_rpc_method_handler(refuse)


def current_principal() -> Principal:
    """The caller of the RPC being handled (resolved by Authentication)."""
    principal = _PRINCIPAL.get()
    if principal is None:  # a protected method reached without the interceptor: a wiring bug
        raise RuntimeError("no authenticated principal for this call; is the Authentication interceptor installed?")
    return principal


def unary(*, public: bool = False, job_token: bool = False) -> Callable[[Handler], Callable[..., Awaitable[Any]]]:
    """Wrap a unary servicer method `fn(self, request, context, principal)`. `job_token`:
    a job's run may call it with its job token (server/job_tokens.py)."""

    def decorate(fn: Handler) -> Callable[..., Awaitable[Any]]:
        method = _method_name(fn)

        @functools.wraps(fn)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = perf_counter()
            code = "OK"
            state = self.state
            try:
                if public:
                    principal = None
                else:
                    principal = _PRINCIPAL.get()
                    if principal is None:
                        principal = current_principal()  # raises: a wiring bug
                    if not job_token and principal.scope == "JOB":
                        principal.check_job_method(job_token, method)  # raises PermissionDenied
                admission = state.admission  # left where entered, whatever replaces it meanwhile
                try:
                    user = admission.enter(None if principal is None else principal.user_id)
                except ResourceExhausted:
                    _refused(state)
                    raise
                try:
                    return await fn(self, request, context, principal)
                finally:
                    admission.leave(user)
            except grpc.aio.AbortError:
                code = "ABORTED_BY_HANDLER"
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status right here
                code = _code_name(exc)
                await _fail(context, method, exc, started, request)
            finally:
                state.metrics.call(method, code, perf_counter() - started)

        wrapper.public = public  # type: ignore[attr-defined]  # read by wire.register
        return wrapper

    return decorate


def stream(fn: Callable[..., AsyncIterator[Any]] | None = None, *,
           job_token: bool = False) -> Any:
    """Wrap a server-streaming or bidi servicer method (an async generator)
    `fn(self, request_or_iterator, context, principal)`; `@stream(job_token=True)` as in
    `unary`."""
    if fn is None:
        return functools.partial(stream, job_token=job_token)
    method = _method_name(fn)
    kind = stream_kind(method)

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        started = time.perf_counter()
        # A stream's transactions wait while unary calls have theirs to run (store/db.py
        # Lanes): a person waiting on a call goes before a daemon's next batch.
        bulk_work()
        guard = release = None
        code = "OK"
        open_streams = self.state.metrics.streams_open.labels(method)
        try:
            principal = current_principal()
            principal.check_job_method(job_token, method)
            drain = self.state.drain
            drain.admit()  # a draining server takes no new stream
            try:
                release = self.state.admission.open_stream(principal.user_id, kind)
            except ResourceExhausted:
                self.state.metrics.admission_rejections.labels("stream").inc()
                raise
            open_streams.inc()
            # Ends the stream when its token is revoked or expires (server/stream_guard.py).
            guard = StreamGuard(self.state.auth, principal,
                                recheck_seconds=self.state.settings.stream_token_recheck_seconds)
            drain.add(guard)  # and when the server drains (server/drain.py); no await since admit()
            async for item in fn(self, request, context, principal):
                guard.check()
                guard.sending = True
                yield item
                guard.sending = False
        except grpc.aio.AbortError:
            code = "ABORTED_BY_HANDLER"
            raise
        except asyncio.CancelledError:
            reason = guard.absorb() if guard is not None else None
            if reason is None:
                code = "CANCELLED"
                raise
            code = _code_name(reason)
            await _fail(context, method, reason, started)
        except Exception as exc:  # noqa: BLE001
            code = _code_name(exc)
            await _fail(context, method, exc, started, request)
        finally:
            if guard is not None:
                guard.close()
                self.state.drain.discard(guard)
            if release is not None:
                release()
                open_streams.dec()
            _record(self.state, method, code, started)

    return wrapper
