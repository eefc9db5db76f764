"""Helpers shared by the resource servicers: update masks, map and string limits, ids,
keyset pagination, request_id handling, and site scoping of site tokens."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from google.protobuf import field_mask_pb2
from google.protobuf.message import Message
from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError

from balsam_grpc.core.errors import BalsamError, InvalidArgument
from balsam_grpc.core.validation import check_printable, check_string_map
from balsam_grpc.server import paging
from balsam_grpc.server.idempotency import idempotent, replay, request_hash, request_id_of, stored_answer
from balsam_grpc.server.principal import Principal
from balsam_grpc.server.state import ServerSettings, ServerState

R = TypeVar("R", bound=Message)
M = TypeVar("M", bound=Message)
# Keys of non-tag maps (environment, optional batch-job parameters): any printable text.
_MAP_KEY = re.compile(r"^[^\x00-\x1f]{1,256}$")



def mask_paths(mask: field_mask_pb2.FieldMask, *, resource: str, mutable: Iterable[str],
               output_only: Iterable[str] = (), immutable: Iterable[str] = (), example: str = "") -> list[str]:
    """The distinct paths of an update mask, refusing unknown, output-only and immutable
    ones with INVALID_ARGUMENT naming the path. With an `example` (of a change), an empty
    mask is refused too, the example showing what to name."""
    if example and not mask.paths:
        raise InvalidArgument(f"update_mask is required: name the fields to change (for example {example})",
                              field="update_mask")
    mutable, output_only, immutable = set(mutable), set(output_only), set(immutable)
    out: list[str] = []
    for path in mask.paths:
        if path in mutable:
            if path not in out:
                out.append(path)
            continue
        if path in output_only:
            why = f"{resource}.{path} is output only and cannot be changed"
        elif path in immutable:
            why = f"{resource}.{path} cannot be changed after creation"
        else:
            why = f"unknown field path {path!r} for {resource}"
        raise InvalidArgument(f"update_mask: {why}; updatable fields: {', '.join(sorted(mutable))}",
                              field="update_mask")
    return out


def check_map(values: dict[str, str], field: str, settings: ServerSettings, *, tag_keys: bool = False
              ) -> dict[str, str]:
    """Bound a string map (entries, bytes per value); tag maps also get the tag key rule."""
    if tag_keys:
        check_string_map(values, field, max_entries=settings.max_map_entries,
                         max_value_bytes=settings.max_map_value_bytes)
    else:
        check_string_map(values, field, max_entries=settings.max_map_entries,
                         max_value_bytes=settings.max_map_value_bytes, keys=_MAP_KEY)
    return dict(values)


def too_large(message: str, field: str) -> InvalidArgument:
    """Oversized input: INVALID_ARGUMENT with reason TOO_LARGE, as core.validation does."""
    return InvalidArgument(message, field=field, reason="TOO_LARGE")


def check_strings(values: Sequence[str], field: str, settings: ServerSettings) -> list[str]:
    """A list of non-empty strings, bounded like a map; duplicates dropped, order kept."""
    if len(values) > settings.max_map_entries:
        raise too_large(f"{field} has {len(values)} entries; at most {settings.max_map_entries} are allowed", field)
    out: list[str] = []
    for i, v in enumerate(values):
        if not v.strip():
            raise InvalidArgument(f"{field}[{i}] is empty", field=field)
        if len(v.encode()) > settings.max_map_value_bytes:
            raise too_large(f"{field}[{i}] is longer than {settings.max_map_value_bytes} bytes", field)
        if v not in out:
            out.append(v)
    return out


def check_name(value: str, field: str, *, max_len: int = 200) -> str:
    """A site or app name: printable text (core.validation.check_printable), not blank, no
    whitespace at its ends, and not all ASCII digits: balsamctl reads such a reference as
    an id, so a site named "1" could never be named (--site 1 is the site with id 1)."""
    if not value or not value.strip():
        raise InvalidArgument(f"{field} is required", field=field)
    if value != value.strip():
        raise InvalidArgument(f"{field} must not start or end with whitespace", field=field)
    if len(value) > max_len:
        raise InvalidArgument(f"{field} is {len(value)} characters long; at most {max_len} are allowed", field=field)
    check_printable(value, field)
    if value.isascii() and value.isdigit():
        kind = field.split(".")[0]
        raise InvalidArgument(f"{field} {value!r} is all digits, which balsamctl reads as an id (--{kind} {value} "
                              f"means the {kind} with id {value}, not this name): add a letter, for example "
                              f"'{kind}-{value}'", field=field)
    return value


def require_id(value: int, field: str = "id") -> int:
    if value <= 0:
        raise InvalidArgument(f"{field} is required (a positive id)", field=field)
    return value


class Page:
    """Keyset pagination of one List call, bound to its method, caller and filter."""

    def __init__(self, method: str, principal: Principal, request: Any, *extra: Any) -> None:
        self.fp = paging.fingerprint(method, principal.user_id, principal.site_id,
                                     request.filter.SerializeToString(deterministic=True).hex(), *extra)
        self.size = paging.page_size(request.page_size)
        self.last = paging.decode(request.page_token, self.fp)

    def after_id(self) -> int | None:
        if self.last is None:
            return None
        if len(self.last) != 1 or not isinstance(self.last[0], int) or isinstance(self.last[0], bool):
            raise InvalidArgument("page_token is corrupt; pass the next_page_token of the previous response "
                                  "unchanged", reason="INVALID_PAGE_TOKEN", field="page_token")
        return self.last[0]

    @property
    def limit(self) -> int:
        """Rows to fetch: one more than a page tells whether another page exists."""
        return self.size + 1

    def finish(self, rows: list[dict[str, Any]], to_message: Callable[[dict[str, Any]], M],
               key: Callable[[dict[str, Any]], list[Any]] | None = None) -> tuple[list[M], str]:
        """The page's messages, cut by count and by bytes (paging.fitting), and the token
        of the page after them ("" when none)."""
        messages = [to_message(r) for r in rows[: self.size]]
        kept = paging.fitting(messages)
        if kept == len(rows):
            return messages, ""
        last = rows[kept - 1]
        return messages[:kept], paging.encode(self.fp, key(last) if key else [last["id"]])


async def mutate(state: ServerState, principal: Principal, method: str, request: Message,
                 response_type: type[R], build: Callable[[Connection], R]) -> R:
    """Run `build(conn)` in one write transaction; a repeated request_id gets the first answer."""

    def work(conn: Connection) -> R:
        return idempotent(conn, principal.user_id, method, request, response_type, lambda: build(conn))

    try:
        return await state.db.write(work)
    except (BalsamError, IntegrityError):
        # A twin of this request (a client's retry that overlapped it) may have committed
        # while this one ran: on PostgreSQL neither saw the other's record, and this one
        # then failed on the rows the twin wrote (a workdir taken, the record itself). The
        # twin's answer is this request's answer too.
        request_id = request_id_of(request)
        if not request_id:
            raise
        stored = await state.db.read_now(stored_answer, principal.user_id, method, request_id)
        if stored is None:
            raise
        return replay(method, request_id, request_hash(request), *stored, response_type)


def only_site(principal: Principal) -> int | None:
    return principal.site_id if principal.is_site else None
