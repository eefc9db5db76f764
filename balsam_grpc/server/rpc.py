"""The one place where RPCs are authenticated, logged and their errors mapped.

Every servicer method is wrapped with `unary` or `server_stream`/`bidi_stream`: the
wrapper resolves the caller's token to a Principal, binds request context for the logs,
and turns a BalsamError into a status with a google.rpc.ErrorInfo detail. Anything
unexpected becomes INTERNAL with an incident id that is also in the server log, never
UNKNOWN and never a stack trace sent to the caller.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from balsam_grpc.core.errors import ERROR_DOMAIN, BalsamError, PermissionDenied

log = structlog.get_logger("balsam.rpc")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a user, possibly through a token scoped to one site."""

    user_id: int
    username: str
    admin: bool
    token_id: str
    scope: str  # "USER" or "SITE"
    site_id: int | None = None

    @property
    def is_site(self) -> bool:
        return self.scope == "SITE"

    def require_user_scope(self, action: str) -> None:
        if self.is_site:
            raise PermissionDenied(f"a site-scoped token cannot {action}; use a user token")

    def check_site(self, site_id: int) -> None:
        """A site token may act only for its own site."""
        if self.is_site and site_id != self.site_id:
            raise PermissionDenied(
                f"this token is scoped to site {self.site_id} and cannot act for site {site_id}")


def to_status(err: BalsamError) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=ERROR_DOMAIN, metadata=err.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=err.code.value[0], message=err.message, details=[detail])
    return rpc_status.to_status(status)


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


async def _fail(context: grpc.aio.ServicerContext, method: str, exc: BaseException, started: float) -> None:
    elapsed_ms = round((time.perf_counter() - started) * 1000, 2)
    if isinstance(exc, BalsamError):
        log.info("rpc refused", method=method, code=exc.code.name, reason=exc.reason,
                 error=exc.message, ms=elapsed_ms)
        await context.abort_with_status(to_status(exc))
    incident = uuid.uuid4().hex[:12]
    log.error("rpc failed", method=method, incident=incident, ms=elapsed_ms, exc_info=exc)
    await context.abort_with_status(_internal_status(incident))


def unary(*, public: bool = False) -> Callable[[Handler], Callable[..., Awaitable[Any]]]:
    """Wrap a unary servicer method `fn(self, request, context, principal)`."""

    def decorate(fn: Handler) -> Callable[..., Awaitable[Any]]:
        method = _method_name(fn)

        @functools.wraps(fn)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            try:
                principal = None if public else await self.state.auth.authenticate(context)
                return await fn(self, request, context, principal)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - mapped to a status right here
                await _fail(context, method, exc, started)

        return wrapper

    return decorate


def stream(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """Wrap a server-streaming or bidi servicer method (an async generator)
    `fn(self, request_or_iterator, context, principal)`."""
    method = _method_name(fn)

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        started = time.perf_counter()
        try:
            principal = await self.state.auth.authenticate(context)
            async for item in fn(self, request, context, principal):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            await _fail(context, method, exc, started)

    return wrapper
