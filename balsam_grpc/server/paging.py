"""Opaque keyset page tokens bound to the query that produced them.

A token holds the sort values of the last row returned and a fingerprint of the query
(method, filter, order); a token presented with a different query is refused with
INVALID_PAGE_TOKEN instead of silently returning the wrong rows.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from balsam_grpc.core.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 10_000
# Every list and watch answer stays under this many bytes, whatever its page size: the
# receive limit gRPC clients have by default (4 MiB) less room for the envelope. One item
# always fits (core/validation.py FIELD_LIMITS keeps each far smaller).
MAX_RESPONSE_BYTES = 4 * 1024 * 1024 - 64 * 1024
_ITEM_FRAMING = 6  # a repeated field's tag and length prefix, per item


def fitting(messages: Any, budget: int = MAX_RESPONSE_BYTES) -> int:
    """How many of `messages` (a list or repeated field), from the first, fit in one
    answer of `budget` bytes; at least one. A page cut here continues after the last
    item kept: build its page token from that item."""
    used = 0
    for i, message in enumerate(messages):
        used += message.ByteSize() + _ITEM_FRAMING
        if used > budget:
            return max(i, 1)
    return len(messages)


def page_size(requested: int, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE) -> int:
    if requested < 0:
        raise InvalidArgument(f"page_size must be >= 0, got {requested}", field="page_size")
    return min(requested or default, maximum)


def fingerprint(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def encode(fp: str, last: list[Any]) -> str:
    raw = json.dumps({"q": fp, "k": last}, separators=(",", ":"), default=str).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(token: str, fp: str) -> list[Any] | None:
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        last, query = data["k"], data["q"]
        if not isinstance(last, list):
            raise ValueError
    except Exception:  # noqa: BLE001 - any corruption is the caller's bad token
        raise InvalidArgument("page_token is corrupt; pass the next_page_token of the previous "
                              "response unchanged", reason="INVALID_PAGE_TOKEN", field="page_token") from None
    if query != fp:
        raise InvalidArgument("page_token belongs to a different query; repeat the original filter "
                              "and order_by, or start again without a token",
                              reason="INVALID_PAGE_TOKEN", field="page_token")
    return last
