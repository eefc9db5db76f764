"""request_id handling: a retried mutation gets the first answer, in the same
transaction as the mutation itself (so the answer exists iff the change committed)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TypeVar

from google.protobuf.message import Message
from sqlalchemy import Connection, bindparam, insert, select

from balsam_grpc.core.errors import InvalidArgument
from balsam_grpc.server.convert import utcnow
from balsam_grpc.server.store.driver import driver_rows, driver_statement
from balsam_grpc.server.store.tables import idempotency_keys

R = TypeVar("R", bound=Message)
MAX_REQUEST_ID = 128
# An id completed by the database (id_tag) is written as a varint of this many bytes.
ID_VARINT_BYTES = 9


def request_id_of(request: Message) -> str:
    """The request's request_id ("" when none), refused when too long."""
    request_id = getattr(request, "request_id", "")
    if len(request_id) > MAX_REQUEST_ID:
        raise InvalidArgument(f"request_id is longer than {MAX_REQUEST_ID} characters", field="request_id")
    return request_id


def request_hash(request: Message) -> str:
    return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()


def replay(method: str, request_id: str, body: str, stored_hash: str, stored_response: bytes,
           response_type: type[R]) -> R:
    """The first answer to `request_id`, if this request (hash `body`) is the one it was for."""
    if stored_hash != body:
        raise InvalidArgument(
            f"request_id {request_id!r} was already used for a different {method} request; "
            "use a new request_id for a new request", reason="REQUEST_ID_REUSED", field="request_id")
    return response_type.FromString(stored_response)


def id_tag(response_type: type[Message], field: str) -> bytes:
    """Bytes that, appended to a serialized `response_type` whose message `field` has no
    id yet and followed by an id as an ID_VARINT_BYTES varint, set that id: protobuf
    merges a message field that occurs twice, and reads an over-long varint as its value.
    So a statement that draws the id can store the complete answer itself
    (store/jobs.at_once_statement)."""
    full = response_type(**{field: {"id": 2**63 - 1}}).SerializeToString()
    return full[:-ID_VARINT_BYTES]


def one_item_id_tag(response: Message, field: str) -> tuple[bytes, bytes]:
    """id_tag for a response whose repeated message `field` holds one item without an id:
    (the answer to store, the tag). A repeated field that occurs twice gets a second item,
    so the id goes inside the item instead: the answer ends with the item's own fields,
    under a length that counts the tag and the id to come (the item's fields may come in
    any order; a field that occurs twice takes the last value)."""
    (item,) = getattr(response, field)
    body = item.SerializeToString()
    tag = id_tag_of(type(item))
    number = response.DESCRIPTOR.fields_by_name[field].number
    return _varint(number << 3 | 2) + _varint(len(body) + len(tag) + ID_VARINT_BYTES) + body, tag


def id_tag_of(message_type: type[Message]) -> bytes:
    """The key of `message_type`'s id field, which an ID_VARINT_BYTES varint follows."""
    return message_type(id=2**63 - 1).SerializeToString()[:-ID_VARINT_BYTES]


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def idempotent(conn: Connection, owner_id: int, method: str, request: Message, response_type: type[R],
               build: Callable[[], R]) -> R:
    """Run `build()` once per (owner, method, request.request_id); replay its answer after."""
    request_id = request_id_of(request)
    if not request_id:
        return build()
    body = request_hash(request)
    stored = stored_answer(conn, owner_id, method, request_id)
    if stored is not None:
        return replay(method, request_id, body, *stored, response_type)
    response = build()
    record_answer(conn, owner_id, method, request_id, body, response.SerializeToString())
    return response


# Both statements on the driver's cursor (store.driver): SQLAlchemy's execution cost
# more than the database's work, in every mutation that carries a request_id.
_STORED = select(idempotency_keys.c.request_hash, idempotency_keys.c.response).where(
    idempotency_keys.c.owner_id == bindparam("owner_id"), idempotency_keys.c.method == bindparam("method"),
    idempotency_keys.c.request_id == bindparam("request_id"))
_RECORD = insert(idempotency_keys).values(
    owner_id=bindparam("owner_id"), method=bindparam("method"), request_id=bindparam("request_id"),
    request_hash=bindparam("request_hash"), response=bindparam("response"),
    create_time=bindparam("create_time", type_=idempotency_keys.c.create_time.type))


def stored_answer(conn: Connection, owner_id: int, method: str, request_id: str) -> tuple[str, bytes] | None:
    """(request hash, answer) recorded for this request_id, None when there is none."""
    rows = driver_rows(conn, driver_statement("idempotency.stored", lambda: _STORED, conn.dialect),
                       {"owner_id": owner_id, "method": method, "request_id": request_id})
    return None if not rows else (rows[0][0], bytes(rows[0][1]))


def record_answer(conn: Connection, owner_id: int, method: str, request_id: str, body: str, answer: bytes) -> None:
    """Record `answer` to the request (hash `body`) with this request_id, in `conn`'s
    transaction: the answer exists iff the change committed."""
    driver_rows(conn, driver_statement("idempotency.record", lambda: _RECORD, conn.dialect),
                {"owner_id": owner_id, "method": method, "request_id": request_id, "request_hash": body,
                 "response": answer, "create_time": utcnow()})
