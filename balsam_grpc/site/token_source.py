"""The site daemon's token, re-read from `<site dir>/.token` when the file changes.

A renewed token (`balsamctl site token renew`, or any tool that rewrites the file) is
picked up by the running daemon without a restart: every call and every reconnect asks
the source for the current token, and the source re-reads the file when its mtime, size
or inode changed (one stat per call; no reads otherwise). `refresh()` forces a re-read,
for the reconnect after an UNAUTHENTICATED answer.

A token from BALSAM_TOKEN or the user's profile has no file to watch: the source then
always answers that fixed token.
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


class TokenSource:
    def __init__(self, token: str, path: Path | None = None) -> None:
        self.path = path
        self._token = token
        self._stamp: tuple[int, int, int] | None = self._stat()

    def _stat(self) -> tuple[int, int, int] | None:
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def __call__(self) -> str:
        if self.path is not None:
            stamp = self._stat()
            if stamp is not None and stamp != self._stamp:
                self._reload(stamp)
        return self._token

    def refresh(self) -> str:
        """Re-read the file now (the server refused the token we hold)."""
        if self.path is not None:
            self._reload(self._stat())
        return self._token

    def _reload(self, stamp: tuple[int, int, int] | None) -> None:
        try:
            text = self.path.read_text().strip() if self.path is not None else ""
        except OSError as exc:
            log.warning("token file not readable; keeping the current token", path=str(self.path), error=str(exc))
            return
        self._stamp = stamp
        if text and text != self._token:
            self._token = text
            # Never the token itself: only that it changed and where from.
            log.info("site token reloaded", path=str(self.path))

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self()}"),)
