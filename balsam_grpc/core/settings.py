"""Where things live and how every component finds the server.

One environment variable moves everything: BALSAM_HOME (default: the platform's user
data directory). The database, the server's secret and the profile file live under it.
Clients (SDK, CLI, site, launcher) read the server address and token from BALSAM_SERVER
and BALSAM_TOKEN (in a job: BALSAM_JOB_TOKEN first), else from the profile file
(BALSAM_PROFILE, default $BALSAM_HOME/profile.json).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import platformdirs

from balsam_grpc.core.jobenv import JOB_TOKEN_ENV

DEFAULT_ADDRESS = "127.0.0.1:50051"


def balsam_home() -> Path:
    env = os.environ.get("BALSAM_HOME")
    return Path(env).expanduser() if env else Path(platformdirs.user_data_dir("balsam-grpc"))


def default_database_url() -> str:
    env = os.environ.get("BALSAM_DATABASE_URL")
    return env or f"sqlite:///{balsam_home() / 'balsam.db'}"


def profile_path() -> Path:
    env = os.environ.get("BALSAM_PROFILE")
    return Path(env).expanduser() if env else balsam_home() / "profile.json"


@dataclass
class Profile:
    """How a client reaches the server. Written with mode 0600: it holds a token."""

    server: str = DEFAULT_ADDRESS
    token: str = ""
    username: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None = None, *, apply_env: bool = True) -> Profile:
        path = path or profile_path()
        data = json.loads(path.read_text()) if path.exists() else {}
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        profile = cls(**known)
        if apply_env:
            profile.server = os.environ.get("BALSAM_SERVER", profile.server)
            # Inside a job, its run's own token (core/jobenv.py) is the one to use.
            profile.token = os.environ.get(JOB_TOKEN_ENV) or os.environ.get("BALSAM_TOKEN", profile.token)
        return profile

    def save(self, path: Path | None = None) -> Path:
        path = path or profile_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(self), fh, indent=2)
        os.replace(tmp, path)
        return path
