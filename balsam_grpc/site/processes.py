"""Processes on this host found by their command line: one scan of the process table, shared
by the site's batch submissions (a submit command left running by a killed daemon) and the
local scheduler (a job runner about to record itself)."""

from __future__ import annotations

import os
from pathlib import Path

import psutil


def processes_naming(path: str | Path, *, program: str | None = None, with_arg: str | None = None) -> list[int]:
    """Pids of the processes other than this one that have `path` as one of their arguments
    (argv[1:], exactly). `program`: only those whose argv[0] has this base name; `with_arg`:
    only those that also have this argument. Processes that vanish or cannot be read during
    the scan are skipped."""
    target = str(path)
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            argv = proc.info["cmdline"] or []
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if not argv or proc.pid == me or target not in argv[1:]:
            continue
        if program is not None and os.path.basename(argv[0]) != program:
            continue
        if with_arg is not None and with_arg not in argv[1:]:
            continue
        found.append(proc.pid)
    return found
