"""The `local` scheduler's per-job record: one small JSON file per job in the state
directory, written atomically (temp file + rename) so a reader never sees half a record.
Stdlib only: the detached monitor (local_runner) imports it too."""

from __future__ import annotations

import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def process_identity(pid: int) -> str | None:
    """What tells this process from a later one given the same pid, whatever the wall
    clock does: its start in clock ticks since boot (Linux). None where /proc has no such
    field (then the record's start time is compared, with a tolerance)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()  # the name may hold spaces and parentheses
    return f"boot-ticks:{int(fields[19])}" if len(fields) > 19 else None


def read_record(path: Path) -> dict | None:
    """The record, or None when the file is missing or not a JSON object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_record(path: Path, record: dict) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
