"""Job tokens: the credential one run of a job gets instead of its site's token.

A job token names (job id, lease generation) and carries an HMAC of both under a key
kept in the database (server_keys), so every server process sharing the database can
check what another one issued. Nothing is stored per token: it is valid exactly while
the job is RUNNING under that generation, which authentication reads from the job row.
So it starts with the lease, and ends with the run (any report, a kill, a lease that
expired or moved on) without a write or a revocation list, and a forged or stale token
costs one HMAC and at most one primary-key read.

What it may do (the methods marked `job_token=True` in the servicers; see TokenScope in
auth.proto): the job's own site's jobs, apps and events, as a site token sees them;
create jobs there; update only its own job. Everything else is PERMISSION_DENIED.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

from balsam_grpc.core.errors import Unauthenticated
from balsam_grpc.server.convert import utcnow
from balsam_grpc.server.principal import Principal
from balsam_grpc.server.store import users as user_store
from balsam_grpc.server.store.db import Database

PREFIX = "blsmjob_"
KEY_NAME = "job_token"
_FORMAT = re.compile(r"blsmjob_([1-9][0-9]{0,18})_([0-9]{1,19})_([A-Za-z0-9_-]{43})")
_ID_FORMAT = re.compile(r"job:([0-9]+):([0-9]+)")
ENDED = "this job token ended with its run"


def token_id(job_id: int, generation: int) -> str:
    """The Principal.token_id of a job token (what logs and stream guards name)."""
    return f"job:{job_id}:{generation}"


class JobTokens:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._key: bytes | None = None

    async def load(self) -> None:
        """Read (or create) the signing key; called once when the server starts."""
        secret = await self.db.write(user_store.signing_key, KEY_NAME, utcnow())
        self._key = bytes.fromhex(secret)

    def _mac(self, job_id: int, generation: int) -> str:
        if self._key is None:
            raise RuntimeError("JobTokens.load() was not awaited before use")
        digest = hmac.new(self._key, f"job:{job_id}:{generation}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def mint(self, job_id: int, generation: int) -> str:
        return f"{PREFIX}{job_id}_{generation}_{self._mac(job_id, generation)}"

    async def authenticate(self, secret: str) -> Principal:
        match = _FORMAT.fullmatch(secret)
        if match is None:
            raise Unauthenticated("malformed job token")
        job_id, generation = int(match[1]), int(match[2])
        if not hmac.compare_digest(match[3], self._mac(job_id, generation)):
            raise Unauthenticated("unknown job token")
        problem, row = await self._check(job_id, generation)
        if problem is not None:
            raise problem
        assert row is not None
        return Principal(user_id=row["owner_id"], username=row["username"], admin=False,
                         token_id=token_id(job_id, generation), scope="JOB", site_id=row["site_id"],
                         job_id=job_id)

    async def _check(self, job_id: int, generation: int) -> tuple[Unauthenticated | None, dict | None]:
        row = await self.db.read(user_store.job_run, job_id)
        if row is None:
            return Unauthenticated(f"{ENDED}: job {job_id} no longer exists"), None
        if row["state"] != "RUNNING" or row["lease_generation"] != generation:
            now = row["state"] if row["state"] != "RUNNING" else "running again under a new lease"
            return Unauthenticated(f"{ENDED}: job {job_id} is {now}"), None
        return None, row

    async def recheck(self, principal_token_id: str) -> Unauthenticated | None:
        """For a stream opened with a job token: why it is no longer valid, or None."""
        match = _ID_FORMAT.fullmatch(principal_token_id)
        if match is None:
            return Unauthenticated("not a job token")
        problem, _ = await self._check(int(match[1]), int(match[2]))
        return problem

    @staticmethod
    def owns(principal_token_id: str) -> bool:
        return principal_token_id.startswith("job:")
