"""Pure input checks shared by the server (on every request) and clients (before sending)."""

from __future__ import annotations

import posixpath
import re

from balsam_grpc.core.errors import InvalidArgument

MAX_WORKDIR = 1024
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TAG_KEY = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")
# Characters that act on a terminal or reorder the text around them instead of showing:
# the C0 controls (newline and tab too), DEL, the C1 controls (U+009B is a terminal's
# one-byte CSI) and the Unicode bidirectional controls (U+202E shows what follows it
# reversed). Site and app names and workdirs are printed by every tool that lists jobs,
# sites or paths, so they may hold none of them (check_printable); free text (a job's
# name, tag values, messages) may, and balsamctl shows them escaped (cli/terminal.visible).
CONTROL_CHARACTERS = "\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
_CONTROL = re.compile(f"[{CONTROL_CHARACTERS}]")
_BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _control_kind(ch: str) -> str:
    code = ord(ch)
    if ch in _BIDI:
        return "a bidirectional control"
    if code == 0x7F:
        return "DEL"
    if code >= 0x80:
        return "a C1 control"
    return {0x0A: "a newline", 0x0D: "a carriage return", 0x09: "a tab", 0x1B: "ESC", 0x00: "NUL"}.get(
        code, "a C0 control")


def escape_controls(text: str) -> str:
    """`text` with each control character (CONTROL_CHARACTERS) written as \\uXXXX."""
    return _CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def check_printable(value: str, field: str) -> None:
    """Refuse a control character (CONTROL_CHARACTERS) in a name or path with
    INVALID_ARGUMENT naming the field, the character (as \\uXXXX) and where it is."""
    match = _CONTROL.search(value)
    if match is None:
        return
    ch = match.group()
    shown = escape_controls(value if len(value) <= 80 else value[:77] + "...")
    raise InvalidArgument(
        f"{field} \"{shown}\" contains \\u{ord(ch):04x} ({_control_kind(ch)}) at character {match.start() + 1}; "
        "remove it: names and workdirs must be printable text, without control or bidirectional formatting "
        "characters", field=field)


def clean_workdir(workdir: str, field: str = "workdir") -> str:
    """A workdir relative to the site's data folder, normalised; never escapes it."""
    if not workdir or not workdir.strip():
        raise InvalidArgument(f"{field} is required (a path relative to the site's data folder)", field=field)
    if len(workdir) > MAX_WORKDIR:
        raise InvalidArgument(f"{field} is {len(workdir)} characters long; at most {MAX_WORKDIR} are allowed",
                              field=field)
    check_printable(workdir, field)
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


# ---------------------------------------------------------------------------- byte budgets

KiB = 1024
# Every stored free-form field: the most bytes it may hold (UTF-8 for text; the sum of
# keys and values for maps and lists; the serialized size for Structs). Keyed by the
# protobuf message and field. The server checks every unary request against this one
# table before any servicer code runs (server/wire.py `FieldLimits`: INVALID_ARGUMENT
# naming the field and its limit; a large BatchCreateJobs on PostgreSQL is checked a
# chunk of jobs at a time, each before it is read, in the transaction that would write
# them, so a refusal writes nothing); clients may check before sending. The site stream
# checks each WorkResult against it: an oversized result is refused with the field's
# name and nothing of it is stored (a hook's job fails with that message); the site
# daemon cuts what it writes itself (`clip_utf8`) so it never sends one. The session
# stream keeps a job's state change and cuts its report's text to these limits (a
# refused transition would make the launcher stop the job, and its next run report the
# same), noting what was cut.
FIELD_LIMITS: dict[str, int] = {
    "balsam.v1.Job.name": 1 * KiB,
    "balsam.v1.Job.workdir": 4 * KiB,
    "balsam.v1.Job.tags": 32 * KiB,
    "balsam.v1.Job.parameters": 64 * KiB,
    "balsam.v1.Job.data": 256 * KiB,
    "balsam.v1.Job.transfers": 32 * KiB,
    "balsam.v1.Job.state_message": 4 * KiB,
    "balsam.v1.Job.error_tail": 64 * KiB,
    "balsam.v1.JobResources.launch_params": 4 * KiB,
    # Copied into the event of every job a call changes: small, and budgeted per call
    # (check_event_budget).
    "balsam.v1.UpdateJobRequest.event_data": 4 * KiB,
    "balsam.v1.BatchUpdateJobsRequest.event_data": 4 * KiB,
    "balsam.v1.HookResult.event_data": 4 * KiB,
    "balsam.v1.App.description": 4 * KiB,
    "balsam.v1.App.command_template": 64 * KiB,
    "balsam.v1.App.environment": 64 * KiB,
    "balsam.v1.App.preamble": 64 * KiB,
    "balsam.v1.App.cleanup_globs": 16 * KiB,
    "balsam.v1.App.class_path": 1 * KiB,
    "balsam.v1.AppParameter.default_value": 4 * KiB,
    "balsam.v1.AppParameter.help": 4 * KiB,
    "balsam.v1.TransferSlot.local_path": 4 * KiB,
    "balsam.v1.TransferSlot.description": 4 * KiB,
    "balsam.v1.Site.path": 4 * KiB,
    "balsam.v1.Site.optional_batch_job_params": 16 * KiB,
    "balsam.v1.Site.allowed_queues": 16 * KiB,
    "balsam.v1.Site.allowed_projects": 16 * KiB,
    "balsam.v1.BatchJob.project": 1 * KiB,
    "balsam.v1.BatchJob.queue": 1 * KiB,
    "balsam.v1.BatchJob.filter_tags": 16 * KiB,
    "balsam.v1.BatchJob.optional_params": 16 * KiB,
    "balsam.v1.BatchJob.status_info": 4 * KiB,
    "balsam.v1.TransferItem.error": 16 * KiB,
    "balsam.v1.TransferItem.task_id": 1 * KiB,
    # What the site daemon reports on its stream (SiteService.Connect, WorkResult).
    "balsam.v1.HookResult.state_message": 4 * KiB,
    "balsam.v1.BatchJobUpdate.status_info": 4 * KiB,
    "balsam.v1.BatchJobUpdate.scheduler_id": 1 * KiB,
    "balsam.v1.CleanupResult.error": 4 * KiB,
    # What a launcher reports on its session stream (SessionService.Connect).
    "balsam.v1.JobTransition.message": 4 * KiB,
    "balsam.v1.JobTransition.error_tail": 64 * KiB,
    "balsam.v1.JobTransition.data": 256 * KiB,
}
# What one bulk update may copy in all: event_data and state_message go into the event of
# every selected job, and patched data and tags into every selected job (one 2 MiB
# event_data into 100 jobs wrote 197 MiB; ListEvents and watch replays then broke).
MAX_BULK_COPY_BYTES = 16 * 1024 * KiB


def clip_utf8(text: str, limit: int, *, keep_end: bool = False) -> str:
    """`text` cut to at most `limit` bytes of UTF-8 at a character boundary: its start,
    or its end with `keep_end` (the tail of an error output)."""
    if len(text) * 4 <= limit:
        return text
    raw = text.encode()
    if len(raw) <= limit:
        return text
    cut = raw[len(raw) - limit:] if keep_end else raw[:limit]
    return cut.decode("utf-8", "ignore")  # a character split at the cut is dropped


def field_too_large(path: str, size: int, limit: int) -> InvalidArgument:
    return InvalidArgument(f"{path} is {size:,} bytes; the limit is {limit:,} bytes", field=path, reason="TOO_LARGE",
                           metadata={"limit_bytes": str(limit)})


def check_bulk_copy(jobs: int, per_job_bytes: int, field: str = "event_data") -> None:
    """A bulk change copies `per_job_bytes` (event data, message, patched values) to each
    of `jobs` jobs: refuse when that writes more than MAX_BULK_COPY_BYTES."""
    total = jobs * per_job_bytes
    if total > MAX_BULK_COPY_BYTES:
        raise InvalidArgument(
            f"this change copies {per_job_bytes:,} bytes (event_data, state_message and patched data and tags) to "
            f"each of {jobs:,} jobs, {total:,} bytes in all; one call may copy at most {MAX_BULK_COPY_BYTES:,} "
            "bytes: select fewer jobs or send less", field=field, reason="TOO_LARGE",
            metadata={"limit_bytes": str(MAX_BULK_COPY_BYTES)})
