"""Who is calling an RPC: resolved from the call's token by server/auth.py (user and site
tokens) or server/job_tokens.py (a job's run), handed to every servicer method by
server/rpc.py. Depends on nothing of the server, so every part of it can import it."""

from __future__ import annotations

from dataclasses import dataclass

from balsam_grpc.core.errors import PermissionDenied


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a user, possibly through a token scoped to one site, or one run of
    a job (server/job_tokens.py), which is scoped to the job's site and further limited."""

    user_id: int
    username: str
    admin: bool
    token_id: str
    scope: str  # "USER", "SITE" or "JOB"
    site_id: int | None = None
    job_id: int | None = None  # scope "JOB": the job whose run holds the token

    @property
    def is_site(self) -> bool:
        """Scoped to one site (a job token is too, with fewer methods)."""
        return self.scope in ("SITE", "JOB")

    @property
    def is_job(self) -> bool:
        return self.scope == "JOB"

    def check_job_method(self, allowed: bool, method: str) -> None:
        if self.is_job and not allowed:
            raise PermissionDenied(
                f"a job token cannot call {method}: it may read its site's jobs, apps and events, "
                "create jobs at its site and update its own job")

    def check_own_job(self, job_id: int) -> None:
        """A job token may change only its own job."""
        if self.is_job and job_id != self.job_id:
            raise PermissionDenied(f"this job token belongs to job {self.job_id} and cannot change job {job_id}")

    def require_user_scope(self, action: str) -> None:
        if self.is_site:
            raise PermissionDenied(f"a site-scoped token cannot {action}; use a user token")

    def require_admin(self, action: str) -> None:
        """Only an administrator's user token may `action` (a site token never may)."""
        self.require_user_scope(action)
        if not self.admin:
            raise PermissionDenied(
                f"only administrators can {action} and user {self.username!r} is not one; ask an "
                "administrator (the server's first user, created at its first start, is one) to do it")

    def check_site(self, site_id: int) -> None:
        """A site token may act only for its own site."""
        if self.is_site and site_id != self.site_id:
            raise PermissionDenied(
                f"this token is scoped to site {self.site_id} and cannot act for site {site_id}")
