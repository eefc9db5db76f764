"""Pure input checks shared by the server (on every request) and clients (before sending)."""

from __future__ import annotations

import posixpath
import re

from balsam_grpc.core.errors import InvalidArgument

MAX_WORKDIR = 1024
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TAG_KEY = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")


def clean_workdir(workdir: str, field: str = "workdir") -> str:
    """A workdir relative to the site's data folder, normalised; never escapes it."""
    if not workdir or not workdir.strip():
        raise InvalidArgument(f"{field} is required (a path relative to the site's data folder)", field=field)
    if "\x00" in workdir or len(workdir) > MAX_WORKDIR:
        raise InvalidArgument(f"{field} must be at most {MAX_WORKDIR} characters without NUL bytes", field=field)
    if workdir.startswith("/") or workdir.startswith("~"):
        raise InvalidArgument(f"{field} {workdir!r} must be relative to the site's data folder, not absolute",
                              field=field)
    norm = posixpath.normpath(workdir)
    if norm == "." or norm == ".." or norm.startswith("../"):
        raise InvalidArgument(f"{field} {workdir!r} escapes the site's data folder", field=field)
    if norm.startswith("~"):  # "a/../~" normalises to "~", which a shell expands to a home directory
        raise InvalidArgument(f"{field} {workdir!r} must be relative to the site's data folder, not start at '~'",
                              field=field)
    return norm


def check_identifier(name: str, field: str) -> None:
    if not _IDENTIFIER.match(name or ""):
        raise InvalidArgument(f"{field} {name!r} must be an identifier (letters, digits, underscore)", field=field)


def check_string_map(values: dict[str, str], field: str, *, max_entries: int, max_value_bytes: int,
                     keys: re.Pattern[str] | None = _TAG_KEY) -> None:
    if len(values) > max_entries:
        raise InvalidArgument(f"{field} has {len(values)} entries; at most {max_entries} are allowed",
                              field=field, reason="TOO_LARGE")
    for key, value in values.items():
        if keys is not None and not keys.match(key):
            raise InvalidArgument(
                f"{field} key {key!r} is invalid: use 1-64 characters from letters, digits and _.:/-", field=field)
        if len(value.encode()) > max_value_bytes:
            raise InvalidArgument(f"{field}[{key!r}] is longer than {max_value_bytes} bytes",
                                  field=field, reason="TOO_LARGE")


def parse_tag(text: str) -> tuple[str, str]:
    """'key=value' as typed on a command line."""
    key, sep, value = text.partition("=")
    if not sep or not _TAG_KEY.match(key):
        raise InvalidArgument(f"tag {text!r} must look like key=value (key: letters, digits, _.:/-)", field="tags")
    return key, value
