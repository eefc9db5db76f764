"""Who holds a pid lock file: the site daemon's one-per-directory lock, read by the daemon
and by `balsamctl site status|stop` (which must not import the site package)."""

from __future__ import annotations

import errno
import fcntl
from pathlib import Path

# Inside a site directory; the daemon holding it has written its pid there.
SITE_LOCK_FILE = ".site.lock"


def lock_holder(lock_file: Path) -> int | None:
    """Pid of the process holding the fcntl lock on `lock_file`, -1 if it holds it without
    a readable pid, or None when nobody holds it. The kernel drops the lock when its
    holder dies (even on kill -9), so a stale pid in the file means nothing."""
    if not lock_file.exists():
        return None
    with open(lock_file, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            fh.seek(0)
            text = fh.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return None
