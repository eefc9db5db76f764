"""Errors with a canonical gRPC status code and a machine-readable reason.

The server raises these from anywhere below a servicer; one interceptor turns them into
a status with a google.rpc.ErrorInfo detail (domain "balsam.v1"). The SDK turns such a
status back into the same classes, so callers see one hierarchy on both sides.
"""

from __future__ import annotations

import grpc

ERROR_DOMAIN = "balsam.v1"
# UNAVAILABLE with this reason: the server replica is shutting down and ended the stream;
# reconnect at once (through another replica), without backing off.
DRAINING = "DRAINING"


class BalsamError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    default_reason = "UNSPECIFIED"

    def __init__(self, message: str, *, reason: str | None = None, field: str | None = None,
                 metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        if field:
            self.metadata["field"] = field

    @property
    def field(self) -> str | None:
        return self.metadata.get("field")

    def __str__(self) -> str:
        return self.message

    def with_field_prefix(self, old: str, new: str) -> BalsamError:
        """The same error with the field path prefix `old` named `new` (a batch path such
        as "jobs[0]" reported as "job" to a single-item call)."""
        def rename(text: str) -> str:
            return new + text[len(old):] if text.startswith(old) else text

        metadata = dict(self.metadata)
        if "field" in metadata:
            metadata["field"] = rename(metadata["field"])
        return type(self)(rename(self.message), reason=self.reason, metadata=metadata)


class InvalidArgument(BalsamError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_FIELD"


class NotFound(BalsamError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(BalsamError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(BalsamError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(BalsamError):
    code = grpc.StatusCode.ABORTED
    default_reason = "LEASE_LOST"


class PermissionDenied(BalsamError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(BalsamError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(BalsamError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "TOO_LARGE"


class Unavailable(BalsamError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "OVERLOADED"


class DeadlineExceeded(BalsamError):
    """The call's deadline passed before an answer came (raised on the client side)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


ERRORS_BY_CODE: dict[grpc.StatusCode, type[BalsamError]] = {
    cls.code: cls
    for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, Aborted,
                PermissionDenied, Unauthenticated, ResourceExhausted, Unavailable, DeadlineExceeded)
}


def error_reason(err: grpc.RpcError) -> str:
    """The balsam.v1 ErrorInfo reason of a failed call ('' when absent)."""
    from google.rpc import error_details_pb2, status_pb2

    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in (trailers or ()):
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return ""


def is_draining(err: grpc.RpcError) -> bool:
    """The server ended the call because it is shutting down (reconnect elsewhere at once)."""
    code = err.code() if hasattr(err, "code") else None
    return code == grpc.StatusCode.UNAVAILABLE and error_reason(err) == DRAINING
