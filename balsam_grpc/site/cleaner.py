"""File cleaner: delete an app's cleanup globs inside a finished job's workdir, and never
anything outside it (no `..`, no absolute globs, no symlink that leads out)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from balsam_grpc.core.errors import InvalidArgument


def job_workdir(data_dir: Path, workdir: str) -> Path:
    """The absolute workdir of a job; refuses a workdir that escapes the data folder."""
    data = data_dir.resolve()
    path = (data / workdir).resolve()
    if not workdir or path == data or not path.is_relative_to(data):
        raise InvalidArgument(f"workdir {workdir!r} is not inside the site's data folder {data}", field="workdir")
    return path


@dataclass
class CleanupPlan:
    targets: list[Path] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def plan_cleanup(workdir: Path, globs: list[str]) -> CleanupPlan:
    """Paths the globs select inside `workdir` (resolved), and the globs or matches refused
    because they point outside it."""
    root = workdir.resolve()
    plan = CleanupPlan()
    seen: set[Path] = set()
    for pattern in globs:
        if not pattern or Path(pattern).is_absolute() or ".." in Path(pattern).parts:
            plan.refused.append(f"{pattern!r}: only relative globs inside the workdir are allowed")
            continue
        for match in sorted(root.glob(pattern)):
            # A symlink itself is deleted (unlink), never followed; anything else must
            # resolve inside the workdir.
            parent = match.parent.resolve()
            target = parent / match.name
            if not target.is_relative_to(root) or target == root:
                plan.refused.append(f"{match}: outside the workdir {root}")
                continue
            if not match.is_symlink() and not match.resolve().is_relative_to(root):
                plan.refused.append(f"{match}: resolves outside the workdir {root}")
                continue
            if target not in seen:
                seen.add(target)
                plan.targets.append(target)
    return plan


def clean_workdir(workdir: Path, globs: list[str]) -> tuple[int, list[str]]:
    """Delete what the globs select inside workdir: (files removed, errors)."""
    if not workdir.exists():
        return 0, []
    plan = plan_cleanup(workdir, globs)
    removed = 0
    errors = list(plan.refused)
    for target in plan.targets:
        try:
            if target.is_symlink() or target.is_file():
                target.unlink()
                removed += 1
            elif target.is_dir():
                removed += sum(1 for p in target.rglob("*") if p.is_file() or p.is_symlink())
                shutil.rmtree(target)
        except FileNotFoundError:
            continue
        except OSError as exc:
            errors.append(f"{target}: {exc}")
    return removed, errors
