"""Transfer settings (settings.yml `transfers:` and `transfer_locations:`) and location
URLs. Pure: parsing and validation only; every error names the key to fix."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from pydantic import Field

from balsam_grpc.core.errors import InvalidArgument
from balsam_grpc.site.schema import Section, Text

SCHEMES = ("globus", "file", "rsync")
SYNC_LEVELS = ("", "exists", "size", "mtime", "checksum")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


class GlobusSettings(Section):
    # Native (user login) or confidential (client credentials) app registered at Globus.
    client_id: Text = ""
    # Client credentials: the secret is read from this environment variable (never from
    # the settings file); empty variable = user login.
    client_secret_env: Text = "BALSAM_GLOBUS_CLIENT_SECRET"
    # The Globus collection that serves this site's filesystem (the job workdirs).
    local_collection: Text = ""
    # Site path prefix -> collection path prefix, longest prefix first wins, for
    # collections rooted elsewhere than "/" (a GCS collection rooted at /lus/eagle).
    path_map: dict[str, Text] = Field(default_factory=dict)
    # Skip files already at the destination: "", exists, size, mtime or checksum.
    sync_level: Text = ""
    verify_checksum: bool = True
    # Collections whose data_access consent the login asks for (GCS v5 mapped collections).
    data_access_collections: list[Text] = Field(default_factory=list)


class RsyncSettings(Section):
    # Remote shell for rsync -e; BatchMode: never wait for a password prompt.
    ssh_command: Text = "ssh -o BatchMode=yes"
    extra_args: list[Text] = Field(default_factory=list)


class TransferSettings(Section):
    # Items per backend task (one Globus task, one copy job).
    batch_size: int = 100
    # How long a not-full batch waits for more items before it is submitted.
    batch_linger_s: float = 0.5
    # Tasks in flight per location at once.
    max_tasks_per_location: int = 5
    # How often active tasks are polled (Globus' API, never our server).
    poll_seconds: float = 10.0
    # A task not finished after this long is cancelled and its items fail.
    task_deadline_s: float = 24 * 3600.0
    # Attempts of a failing API call (unreachable service) before the items fail.
    api_attempts: int = 5
    # First retry delay (doubled each time, capped at 60 s).
    api_backoff_s: float = 2.0
    # Local copies: limit in MB/s (0 = none).
    local_bandwidth_mb_s: float = 0.0
    globus: GlobusSettings = Field(default_factory=GlobusSettings)
    rsync: RsyncSettings = Field(default_factory=RsyncSettings)


class LocationError(InvalidArgument):
    """A transfer location URL is invalid."""


@dataclass(frozen=True)
class Location:
    """A parsed transfer location: `globus://<collection>[/root]`, `file:///root`,
    `rsync://user@host[:port]/root`."""

    alias: str
    url: str
    scheme: str
    host: str = ""       # globus: the collection id; rsync: the host
    user: str = ""       # rsync
    port: int = 0        # rsync
    root: str = "/"      # remote paths are joined under it and may not leave it

    def resolve(self, path: str) -> str:
        """The location's absolute path for a job's `alias:path`, refusing `..` escapes."""
        joined = posixpath.normpath(posixpath.join(self.root, path.lstrip("/")))
        root = posixpath.normpath(self.root)
        if joined != root and not joined.startswith(root.rstrip("/") + "/"):
            raise LocationError(f"path {path!r} leaves the root {root!r} of location {self.alias!r}")
        return joined


def parse_location(alias: str, url: str) -> Location:
    key = f"transfer_locations.{alias}"
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise LocationError(f"{key}: {url!r} must start with globus://, file:// or rsync://", field=key)
    root = unquote(parts.path) or "/"
    if not root.startswith("/"):
        root = "/" + root
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise LocationError(f"{key}: file:// locations are on this machine (file:///path), got {url!r}", field=key)
        return Location(alias, url, scheme, root=root)
    if scheme == "globus":
        if not _UUID.match(parts.netloc or ""):
            raise LocationError(f"{key}: {url!r} must name a collection id (globus://<uuid>)", field=key)
        return Location(alias, url, scheme, host=parts.netloc.lower(), root=root)
    if not parts.hostname or not parts.username:
        raise LocationError(f"{key}: {url!r} must look like rsync://user@host[:port]/path", field=key)
    try:
        port = parts.port or 0
    except ValueError:
        raise LocationError(f"{key}: bad port in {url!r}", field=key) from None
    return Location(alias, url, scheme, host=parts.hostname, user=parts.username, port=port, root=root)


def parse_locations(locations: dict[str, str]) -> dict[str, Location]:
    return {alias: parse_location(alias, url) for alias, url in locations.items()}


def check_transfer_settings(s: TransferSettings) -> None:
    """Ranges and rules across fields (pydantic has checked the types)."""
    def positive(value: float, key: str) -> None:
        if value <= 0:
            raise InvalidArgument(f"transfers.{key} must be > 0, got {value}", field=f"transfers.{key}")

    positive(s.batch_size, "batch_size")
    positive(s.max_tasks_per_location, "max_tasks_per_location")
    positive(s.poll_seconds, "poll_seconds")
    positive(s.task_deadline_s, "task_deadline_s")
    positive(s.api_attempts, "api_attempts")
    if s.batch_linger_s < 0 or s.api_backoff_s < 0 or s.local_bandwidth_mb_s < 0:
        raise InvalidArgument("transfers.batch_linger_s, api_backoff_s and local_bandwidth_mb_s must be >= 0",
                              field="transfers")
    if s.globus.sync_level not in SYNC_LEVELS:
        raise InvalidArgument(f"transfers.globus.sync_level must be one of {', '.join(SYNC_LEVELS[1:])} or empty, "
                              f"got {s.globus.sync_level!r}", field="transfers.globus.sync_level")
    for site_prefix, collection_prefix in s.globus.path_map.items():
        if not site_prefix.startswith("/") or not collection_prefix.startswith("/"):
            raise InvalidArgument(f"transfers.globus.path_map: {site_prefix!r}: {collection_prefix!r} must map an "
                                  "absolute path to an absolute path", field="transfers.globus.path_map")


def map_path(path: str, path_map: dict[str, str]) -> str:
    """The collection path of a site path: the longest matching prefix of `path_map` is
    replaced (on whole path components); unmapped paths are used as they are."""
    best = ""
    for prefix in path_map:
        p = prefix.rstrip("/") or "/"
        if (path == p or path.startswith(p.rstrip("/") + "/")) and len(p) > len(best):
            best = p
    if not best:
        return path
    target = path_map[best if best in path_map else best + "/"].rstrip("/") or "/"
    rest = path[len(best):].lstrip("/")
    return posixpath.join(target, rest) if rest else target
