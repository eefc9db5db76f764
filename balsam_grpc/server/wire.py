"""Servicer registration with requests that cannot be parsed answered INVALID_ARGUMENT.

grpc parses a request before any servicer code runs; when parsing fails (corrupt wire
format, invalid UTF-8 in a string field, nesting deeper than protobuf's recursion limit)
it answers UNKNOWN "Unexpected DecodeError", which tells the caller nothing and breaks
the rule that a caller's mistake never gets UNKNOWN/INTERNAL. Here every method handler
is built from the service descriptor with a deserializer that turns a parse failure into
an `Undecodable` marker, and the method's behaviour answers such a marker with
INVALID_ARGUMENT naming the message type.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from balsam_grpc.core.errors import InvalidArgument
from balsam_grpc.server.rpc import to_status

log = structlog.get_logger("balsam.rpc")


@dataclass(frozen=True, slots=True)
class Undecodable:
    """Stands in for a request message whose bytes did not parse."""

    type_name: str
    error: str

    def refusal(self) -> InvalidArgument:
        return InvalidArgument(
            f"the request is not a valid {self.type_name} message ({self.error}); send it serialized by a "
            "protobuf library from the balsam.v1 protos", metadata={"message_type": self.type_name})


def _tolerant(parse: Callable[[bytes], Any], type_name: str) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's malformed request
            return Undecodable(type_name, str(exc).removeprefix(f"Error parsing message with type '{type_name}': "))

    return deserialize


async def _refuse(context: grpc.aio.ServicerContext, method: str, bad: Undecodable) -> None:
    err = bad.refusal()
    log.info("rpc refused", method=method, code=err.code.name, reason=err.reason, error=err.message)
    await context.abort_with_status(to_status(err))


def _checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext, method: str) -> AsyncIterator[Any]:
    async def iterate() -> AsyncIterator[Any]:
        async for msg in requests:
            if isinstance(msg, Undecodable):
                await _refuse(context, method, msg)  # sends the status and raises AbortError
            yield msg

    return iterate()


def _handler(method: str, behavior: Callable[..., Any], client_streaming: bool, server_streaming: bool,
             deserialize: Callable[[bytes], Any], serialize: Callable[[Any], bytes]) -> grpc.RpcMethodHandler:
    if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
        # The generated base class's synchronous UNIMPLEMENTED stub: nothing to guard.
        factory = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
                   (True, False): grpc.stream_unary_rpc_method_handler,
                   (True, True): grpc.stream_stream_rpc_method_handler}[client_streaming, server_streaming]
        return factory(behavior, deserialize, serialize)
    if not client_streaming and not server_streaming:
        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                await _refuse(context, method, request)
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, serialize)
    if not client_streaming:
        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await _refuse(context, method, request)
            async for response in behavior(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserialize, serialize)
    if not server_streaming:
        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            return await behavior(_checked(requests, context, method), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, deserialize, serialize)

    async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async for response in behavior(_checked(requests, context, method), context):
            yield response

    return grpc.stream_stream_rpc_method_handler(stream_stream, deserialize, serialize)


def register(server: grpc.aio.Server, servicer: Any, service: ServiceDescriptor) -> None:
    """Add `servicer`'s methods for `service` to `server` (what the generated
    add_*Servicer_to_server does, with tolerant request parsing)."""
    handlers = {}
    for m in service.methods:
        request_cls = message_factory.GetMessageClass(m.input_type)
        response_cls = message_factory.GetMessageClass(m.output_type)
        handlers[m.name] = _handler(
            f"{service.name}.{m.name}", getattr(servicer, m.name), m.client_streaming, m.server_streaming,
            _tolerant(request_cls.FromString, m.input_type.full_name), response_cls.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
