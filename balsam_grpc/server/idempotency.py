"""request_id handling: a retried mutation gets the first answer, in the same
transaction as the mutation itself (so the answer exists iff the change committed)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TypeVar

from google.protobuf.message import Message
from sqlalchemy import Connection, insert, select

from balsam_grpc.core.errors import InvalidArgument
from balsam_grpc.server.convert import utcnow
from balsam_grpc.server.store.tables import idempotency_keys

R = TypeVar("R", bound=Message)
MAX_REQUEST_ID = 128


def idempotent(conn: Connection, owner_id: int, method: str, request: Message, response_type: type[R],
               build: Callable[[], R]) -> R:
    """Run `build()` once per (owner, method, request.request_id); replay its answer after."""
    request_id = getattr(request, "request_id", "")
    if not request_id:
        return build()
    if len(request_id) > MAX_REQUEST_ID:
        raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID} characters", field="request_id")
    body = hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
    key = (idempotency_keys.c.owner_id == owner_id, idempotency_keys.c.method == method,
           idempotency_keys.c.request_id == request_id)
    row = conn.execute(select(idempotency_keys.c.request_hash, idempotency_keys.c.response).where(*key)).first()
    if row is not None:
        if row.request_hash != body:
            raise InvalidArgument(
                f"request_id {request_id!r} was already used for a different {method} request; "
                "use a new request_id for a new request", reason="REQUEST_ID_REUSED", field="request_id")
        return response_type.FromString(row.response)
    response = build()
    conn.execute(insert(idempotency_keys).values(
        owner_id=owner_id, method=method, request_id=request_id, request_hash=body,
        response=response.SerializeToString(), create_time=utcnow()))
    return response

