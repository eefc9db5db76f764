"""Times a user types: an ISO 8601 time or an age ("30s", "10m", "2h", "1d", "1w": that
long ago). One parser for `balsamctl --since` and the dashboard's since/until boxes."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, tzinfo

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr|d|day|w)s?\s*$", re.IGNORECASE)
_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400, "day": 86400, "w": 604800}


class TimeError(ValueError):
    """The text is not a time; the message says what is accepted."""


def parse_time(text: str, *, now: datetime | None = None, naive: tzinfo | None = None) -> datetime:
    """An aware datetime. An ISO time without a zone is in `naive` (None: this machine's
    local time). TimeError when `text` is neither, or reaches before year 1."""
    match = _AGE.match(text)
    try:
        if match:
            seconds = float(match.group(1)) * _SECONDS[match.group(2).lower()]
            return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
        parsed = datetime.fromisoformat(text.strip())
        if parsed.tzinfo:
            return parsed
        return parsed.replace(tzinfo=naive) if naive is not None else parsed.astimezone()
    except OverflowError:  # an age reaching before year 1
        raise TimeError(f"{text!r} is further back than any time can be") from None
    except ValueError:  # not ISO, or a local time that cannot be placed in a time zone (year 1)
        raise TimeError(f"{text!r} is neither an ISO time (2026-05-01T12:00) nor an age like 10m, 2h or 1d") from None
