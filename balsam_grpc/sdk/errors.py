"""The SDK's exceptions: the core BalsamError hierarchy, rebuilt from a gRPC status.

The server puts a google.rpc.ErrorInfo (domain "balsam.v1") in every error status; its
reason and metadata["field"] come back here as `err.reason` / `err.field`, so callers
can branch on machine-readable reasons instead of parsing messages.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from balsam_grpc.core.errors import (
    ERROR_DOMAIN,
    ERRORS_BY_CODE,
    Aborted,
    AlreadyExists,
    BalsamError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "Aborted", "AlreadyExists", "BalsamError", "DeadlineExceeded", "FailedPrecondition", "InvalidArgument",
    "JobFailed", "MultipleObjectsReturned", "NotFound", "PermissionDenied", "ResourceExhausted",
    "Unauthenticated", "Unavailable", "error_from_rpc",
]


class MultipleObjectsReturned(BalsamError):
    """`.get(...)` matched more than one object."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "MULTIPLE_OBJECTS_RETURNED"


class JobFailed(BalsamError):
    """A job awaited through `result()` ended FAILED or KILLED."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "JOB_FAILED"

    def __init__(self, job: Any, message: str) -> None:
        super().__init__(message, metadata={"job_id": str(job.id), "state": job.state})
        self.job = job
        self.state: str = job.state
        self.state_message: str = job.state_message
        self.error_tail: str = job.error_tail


def _error_info(err: grpc.Call) -> error_details_pb2.ErrorInfo | None:
    try:
        status = rpc_status.from_call(err)
    except ValueError:  # a status whose message disagrees with the trailers: ignore details
        return None
    if status is None:
        return None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info) and info.domain == ERROR_DOMAIN:
            return info
    return None


def error_from_rpc(err: grpc.RpcError) -> BalsamError:
    """The BalsamError for a failed call; statuses without a balsam.v1 ErrorInfo (a
    connection failure, a deadline) get the status code's name as their reason."""
    code: grpc.StatusCode = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN  # type: ignore[attr-defined]
    message = (err.details() if hasattr(err, "details") else "") or str(code.name)  # type: ignore[attr-defined]
    info = _error_info(err) if isinstance(err, grpc.Call) else None
    reason = info.reason if info is not None and info.reason else code.name
    metadata = dict(info.metadata) if info is not None else {}
    cls = ERRORS_BY_CODE.get(code)
    if cls is None:
        exc = BalsamError(message, reason=reason, metadata=metadata)
        exc.code = code  # INTERNAL, UNKNOWN, CANCELLED...: keep the real code on the instance
        return exc
    return cls(message, reason=reason, metadata=metadata)
