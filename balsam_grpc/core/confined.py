"""Paths that stay inside a root, symlinks included, and files only their owner can read.

Everything the site and the launcher write for a job (workdirs, job.out, staged files)
goes through here. A path is checked by where it really leads (realpath), so a symlink
inside the root that points out of it is an escape like `..` is. Folders are created
one level at a time with mode 0700 (mkdir -p would give the parents the default mode),
files are opened without following a symlink in their last component, mode 0600.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


class PathEscape(ValueError):
    """A path leads outside the root it must stay in."""


def inside(path: Path | str, root: Path | str, *, what: str = "path", allow_root: bool = True) -> Path:
    """`path` resolved (symlinks followed, as far as it exists); PathEscape unless it is
    `root` or below it."""
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))
    if not real.is_relative_to(real_root) or (real == real_root and not allow_root):
        via = "" if str(real) == os.path.normpath(path) else f" (it resolves to {real})"
        raise PathEscape(f"{what} {path} is not inside {real_root}{via}")
    return real


def make_dirs_inside(path: Path | str, root: Path | str, *, mode: int = PRIVATE_DIR, what: str = "folder",
                     allow_root: bool = False) -> Path:
    """Create `path` and its missing parents below `root` (mode 0700 unless told); returns
    it resolved. PathEscape when it leads outside `root` (before creating anything) or
    when a symlink appeared while it was being created."""
    target = inside(path, root, what=what, allow_root=allow_root)
    missing: list[Path] = []
    probe = target
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, mode)
        except FileExistsError:
            pass
    if Path(os.path.realpath(path)) != target:
        raise PathEscape(f"{what} {path} changed while it was created (a symlink appeared)")
    if not target.is_dir():
        raise PathEscape(f"{what} {path} is not a folder")
    return target


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir_inside(path: str, root: str, *, mode: int = PRIVATE_DIR, what: str = "folder") -> tuple[int, str]:
    """`make_dirs_inside(path, root)` that also opens the folder: (a descriptor of it,
    its path). Each level below `root` is created (mode 0700 unless told) and opened
    relative to its parent's descriptor without following a symlink, so the descriptor
    names a folder inside `root` whatever the path's folders become meanwhile. A path
    with a symlink, a file, `..` or `.` below `root` gets make_dirs_inside's checks (it
    may still lead inside): PathEscape when it leads outside."""
    root = root.rstrip("/") or "/"
    prefix = root if root == "/" else root + "/"
    parts = path.rstrip("/")[len(prefix):].split("/") if path.startswith(prefix) else []
    if parts and not any(p in ("", ".", "..") for p in parts):
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts:
                try:
                    sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    try:
                        os.mkdir(part, mode, dir_fd=fd)
                    except FileExistsError:
                        pass
                    sub = os.open(part, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = sub
            return fd, path.rstrip("/")
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            # A symlink (or a file) on the way: make_dirs_inside decides by where it leads.
    real = make_dirs_inside(path, root, mode=mode, what=what)
    return os.open(real, _DIR_FLAGS), str(real)


def open_private(path: Path | str, *, append: bool = False, mode: int = PRIVATE_FILE,
                 dir_fd: int | None = None) -> int:
    """A file descriptor for writing `path` (relative to the folder `dir_fd` if given;
    created with `mode`, 0600 unless told; an existing file is set to it); refuses a
    symlink in the last component."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
    try:
        fd = os.open(path, flags, mode, dir_fd=dir_fd)
    except OSError as exc:
        try:
            link = stat.S_ISLNK(os.lstat(path, dir_fd=dir_fd).st_mode)
        except OSError:
            link = False
        if link:
            raise PathEscape(f"{path} is a symlink; refusing to write through it") from exc
        raise
    # Only when it differs: a chmod dirties the inode (a journal write on ext4), and a
    # file just created has the mode already unless the umask took bits away.
    if mode == PRIVATE_FILE and stat.S_IMODE(os.fstat(fd).st_mode) != PRIVATE_FILE:
        os.fchmod(fd, PRIVATE_FILE)
    return fd


def write_private(path: Path | str, data: bytes, *, dir_fd: int | None = None) -> None:
    with os.fdopen(open_private(path, dir_fd=dir_fd), "wb") as fh:
        fh.write(data)
