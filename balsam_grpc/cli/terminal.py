"""Text bound for the terminal: the characters that would act on it instead of showing
are written as escapes. Used by the tables (cli/output) and the error lines (cli/errors)."""

from __future__ import annotations

import re

__all__ = ["visible"]

# C0 and C1 control characters but newline and tab, DEL, and the bidirectional controls
# that reorder what follows them on screen.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def visible(text: str) -> str:
    """`text` with the characters that act on a terminal written as escapes."""
    return _UNSAFE.sub(_escape, text)
