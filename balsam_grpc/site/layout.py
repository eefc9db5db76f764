"""Where things are inside a site directory, and the lock that allows one daemon per site.

    <site dir>/settings.yml   settings (see balsam_grpc.site.settings)
               apps/          ApplicationDefinition files
               data/          job workdirs (Job.workdir is relative to this)
               logs/          site.log (daemon), launcher logs
               qsubmit/       rendered batch scripts
               state/         the daemon's journal of submitted batch jobs
               .token         site-scoped token (mode 0600), when `site init` issued one
               .site.lock     fcntl lock held by the running daemon; holds its pid
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from balsam_grpc.core.errors import FailedPrecondition
from balsam_grpc.core.pidlock import SITE_LOCK_FILE


@dataclass(frozen=True)
class SiteLayout:
    root: Path

    @classmethod
    def at(cls, path: str | Path) -> SiteLayout:
        return cls(Path(path).expanduser().resolve())

    @property
    def settings_file(self) -> Path:
        return self.root / "settings.yml"

    @property
    def apps_dir(self) -> Path:
        return self.root / "apps"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def qsubmit_dir(self) -> Path:
        return self.root / "qsubmit"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def token_file(self) -> Path:
        return self.root / ".token"

    @property
    def lock_file(self) -> Path:
        return self.root / SITE_LOCK_FILE

    @property
    def log_file(self) -> Path:
        return self.logs_dir / "site.log"

    def dirs(self) -> tuple[Path, ...]:
        """The folders every site directory has."""
        return (self.apps_dir, self.data_dir, self.logs_dir, self.qsubmit_dir, self.state_dir)

    def make_dirs(self) -> None:
        for d in self.dirs():
            d.mkdir(parents=True, exist_ok=True)

    def read_token(self) -> str:
        return self.token_file.read_text().strip() if self.token_file.exists() else ""

    def write_token(self, token: str) -> None:
        fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")


class SiteLock:
    """Exclusive fcntl lock on `.site.lock`; released by the kernel when the process dies
    (even on kill -9), so a stale file never blocks a restart."""

    def __init__(self, lock_file: Path) -> None:
        self.lock_file = lock_file
        self._fh = None

    def acquire(self) -> None:
        fh = open(self.lock_file, "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.seek(0)
            pid = fh.read().strip() or "unknown"
            fh.close()
            raise FailedPrecondition(
                f"another site daemon (pid {pid}) already runs for {self.lock_file.parent}; "
                f"stop it with `balsamctl site stop {self.lock_file.parent}`", reason="SITE_LOCKED") from exc
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.seek(0)
            self._fh.truncate()
            self._fh.flush()
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> SiteLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
