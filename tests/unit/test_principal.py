"""Principal's scope and admin checks: one place decides who may administer users."""

from __future__ import annotations

import pytest

from balsam_grpc.core.errors import PermissionDenied
from balsam_grpc.server.principal import Principal


def principal(*, admin: bool, scope: str = "USER") -> Principal:
    return Principal(user_id=1, username="ann", admin=admin, token_id="t", scope=scope,
                     site_id=7 if scope != "USER" else None)


def test_require_admin_admits_only_an_administrators_user_token() -> None:
    principal(admin=True).require_admin("list users")
    with pytest.raises(PermissionDenied, match="only administrators can list users.*'ann' is not one.*ask"):
        principal(admin=False).require_admin("list users")
    for scope in ("SITE", "JOB"):
        with pytest.raises(PermissionDenied, match="site-scoped token cannot list users; use a user token"):
            principal(admin=True, scope=scope).require_admin("list users")
