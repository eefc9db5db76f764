"""AuthService and the authentication every RPC goes through: login, tokens and their
scopes, revocation, error details; plus health and reflection."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_status import rpc_status
from sqlalchemy import insert

from balsam_grpc.core.channel import auth_metadata
from balsam_grpc.server.convert import utcnow
from balsam_grpc.server.store.tables import sites
from balsam_grpc.v1 import auth_service_pb2 as pb
from balsam_grpc.v1 import auth_service_pb2_grpc

PASSWORD = "correct horse battery"  # what the harness gives every user it creates
SERVICES = {"balsam.v1.SiteService", "balsam.v1.AppService", "balsam.v1.JobService",
            "balsam.v1.BatchJobService", "balsam.v1.TransferService", "balsam.v1.SessionService",
            "balsam.v1.EventService", "balsam.v1.AuthService"}

Code = grpc.StatusCode


def expect_error(call: Callable[[], Any], code: grpc.StatusCode, reason: str | None = None) -> grpc.RpcError:
    """Run `call`, check the status code and that the status carries a balsam.v1 ErrorInfo."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    err = caught.value
    assert err.code() == code, err.details()
    status = rpc_status.from_call(err)
    assert status is not None, "status has no details"
    info = error_details_pb2.ErrorInfo()
    assert status.details and status.details[0].Unpack(info)
    assert info.domain == "balsam.v1"
    assert info.reason == (reason or code.name)
    return err


def anonymous(harness: Any) -> auth_service_pb2_grpc.AuthServiceStub:
    return auth_service_pb2_grpc.AuthServiceStub(harness.channel)


def add_site(harness: Any, owner_id: int) -> int:
    now = utcnow()
    values = dict(owner_id=owner_id, name=f"site-{secrets.token_hex(4)}", hostname="h", path="/p",
                  create_time=now, update_time=now)
    return harness.db.write_sync(lambda conn: conn.execute(insert(sites).values(**values)).inserted_primary_key[0])


def whoami(harness: Any, token: str) -> pb.GetCurrentUserResponse:
    return anonymous(harness).GetCurrentUser(pb.GetCurrentUserRequest(), metadata=auth_metadata(token), timeout=30)


# -- login -----------------------------------------------------------------------------

def test_login_issues_a_working_user_token(harness: Any, alice: Any) -> None:
    resp = anonymous(harness).Login(pb.LoginRequest(username=alice.username, password=PASSWORD, ttl_seconds=60))
    assert resp.token and resp.user.username == alice.username and resp.user.id == alice.user_id
    assert resp.info.scope == pb.TOKEN_SCOPE_USER and not resp.info.revoked
    lifetime = resp.info.expire_time.ToDatetime() - resp.info.create_time.ToDatetime()
    assert lifetime == timedelta(seconds=60)
    me = whoami(harness, resp.token)
    assert me.user.username == alice.username and me.token.id == resp.info.id


def test_login_ttl_is_capped_by_the_server(harness: Any, alice: Any) -> None:
    resp = anonymous(harness).Login(pb.LoginRequest(username=alice.username, password=PASSWORD,
                                                    ttl_seconds=10**9))
    lifetime = resp.info.expire_time.ToDatetime() - resp.info.create_time.ToDatetime()
    assert lifetime == timedelta(seconds=harness.server.settings.token_ttl_seconds)
    expect_error(lambda: anonymous(harness).Login(
        pb.LoginRequest(username=alice.username, password=PASSWORD, ttl_seconds=-5)),
        Code.INVALID_ARGUMENT, "INVALID_FIELD")


def test_wrong_password_and_unknown_user_look_the_same(harness: Any, alice: Any) -> None:
    wrong = expect_error(lambda: anonymous(harness).Login(
        pb.LoginRequest(username=alice.username, password="not it at all")), Code.UNAUTHENTICATED)
    unknown = expect_error(lambda: anonymous(harness).Login(
        pb.LoginRequest(username="nobody-" + secrets.token_hex(4), password=PASSWORD)), Code.UNAUTHENTICATED)
    invalid_name = expect_error(lambda: anonymous(harness).Login(
        pb.LoginRequest(username="", password="")), Code.UNAUTHENTICATED)
    assert wrong.details() == unknown.details() == invalid_name.details() == "wrong user name or password"


# -- the token on every call -----------------------------------------------------------

@pytest.mark.parametrize("value", ["Basic dXNlcjpwYXNz", "Bearer", "blsm_abc", "bearer "])
def test_malformed_authorization_header(harness: Any, value: str) -> None:
    err = expect_error(lambda: anonymous(harness).GetCurrentUser(
        pb.GetCurrentUserRequest(), metadata=(("authorization", value),)), Code.UNAUTHENTICATED)
    assert "Bearer" in err.details()


def test_missing_token(harness: Any) -> None:
    err = expect_error(lambda: anonymous(harness).GetCurrentUser(pb.GetCurrentUserRequest()), Code.UNAUTHENTICATED)
    assert "no token" in err.details()


def test_unknown_token(harness: Any) -> None:
    err = expect_error(lambda: whoami(harness, "blsm_0000_" + secrets.token_urlsafe(32)), Code.UNAUTHENTICATED)
    assert "unknown token" in err.details()


def test_expired_token(harness: Any) -> None:
    old = harness.user(ttl=timedelta(seconds=-1))
    err = expect_error(lambda: whoami(harness, old.token), Code.UNAUTHENTICATED)
    assert "expired" in err.details()


def test_revoked_token_is_rejected_at_once(harness: Any, alice: Any) -> None:
    auth = alice.stub(auth_service_pb2_grpc.AuthServiceStub)
    extra = auth.CreateToken(pb.CreateTokenRequest(scope=pb.TOKEN_SCOPE_USER, description="laptop"))
    assert whoami(harness, extra.token).token.id == extra.info.id  # now in the server's token cache
    revoked = auth.RevokeToken(pb.RevokeTokenRequest(id=extra.info.id))
    assert revoked.token.revoked
    err = expect_error(lambda: whoami(harness, extra.token), Code.UNAUTHENTICATED)
    assert "revoked" in err.details()
    assert whoami(harness, alice.token).user.id == alice.user_id  # the other token is untouched


def test_current_user(harness: Any, alice: Any) -> None:
    me = alice.stub(auth_service_pb2_grpc.AuthServiceStub).GetCurrentUser(pb.GetCurrentUserRequest())
    assert me.user.id == alice.user_id and me.user.username == alice.username and not me.user.admin
    assert me.token.scope == pb.TOKEN_SCOPE_USER and me.token.site_id == 0
    assert me.user.create_time.seconds > 0 and me.token.expire_time.seconds > me.token.create_time.seconds


# -- site tokens -----------------------------------------------------------------------

def test_site_token_for_own_site(harness: Any, alice: Any) -> None:
    site_id = add_site(harness, alice.user_id)
    auth = alice.stub(auth_service_pb2_grpc.AuthServiceStub)
    resp = auth.CreateToken(pb.CreateTokenRequest(scope=pb.TOKEN_SCOPE_SITE, site_id=site_id, ttl_seconds=3600,
                                                  description="theta daemon"))
    assert resp.info.scope == pb.TOKEN_SCOPE_SITE and resp.info.site_id == site_id
    assert resp.info.description == "theta daemon"
    me = whoami(harness, resp.token)
    assert me.user.id == alice.user_id and me.token.scope == pb.TOKEN_SCOPE_SITE and me.token.site_id == site_id


def test_site_token_needs_an_owned_site(harness: Any, alice: Any, bob: Any) -> None:
    auth = alice.stub(auth_service_pb2_grpc.AuthServiceStub)
    bobs_site = add_site(harness, bob.user_id)
    expect_error(lambda: auth.CreateToken(pb.CreateTokenRequest(scope=pb.TOKEN_SCOPE_SITE, site_id=bobs_site)),
                 Code.NOT_FOUND, "REFERENCE_NOT_FOUND")
    expect_error(lambda: auth.CreateToken(pb.CreateTokenRequest(scope=pb.TOKEN_SCOPE_SITE, site_id=10**12)),
                 Code.NOT_FOUND, "REFERENCE_NOT_FOUND")
    expect_error(lambda: auth.CreateToken(pb.CreateTokenRequest(scope=pb.TOKEN_SCOPE_SITE)),
                 Code.INVALID_ARGUMENT, "INVALID_FIELD")
    expect_error(lambda: auth.CreateToken(pb.CreateTokenRequest(scope=pb.TOKEN_SCOPE_USER, site_id=bobs_site)),
                 Code.INVALID_ARGUMENT, "INVALID_FIELD")
    expect_error(lambda: auth.CreateToken(pb.CreateTokenRequest(scope=7)), Code.INVALID_ARGUMENT, "INVALID_FIELD")


def test_site_token_cannot_mint_tokens_or_users(harness: Any) -> None:
    admin = harness.user(admin=True)
    site_id = add_site(harness, admin.user_id)
    site = harness.user(admin.username, scope="SITE", site_id=site_id)
    auth = site.stub(auth_service_pb2_grpc.AuthServiceStub)
    for scope in (pb.TOKEN_SCOPE_USER, pb.TOKEN_SCOPE_SITE):
        expect_error(lambda: auth.CreateToken(pb.CreateTokenRequest(scope=scope, site_id=site_id)),
                     Code.PERMISSION_DENIED)
    expect_error(lambda: auth.CreateUser(pb.CreateUserRequest(username="sneaky-" + secrets.token_hex(3),
                                                              password="long enough pw", admin=True)),
                 Code.PERMISSION_DENIED)
    expect_error(lambda: auth.ListTokens(pb.ListTokensRequest()), Code.PERMISSION_DENIED)
    # ... nor revoke its user's other tokens, but it can retire itself.
    expect_error(lambda: auth.RevokeToken(pb.RevokeTokenRequest(id=whoami(harness, admin.token).token.id)),
                 Code.PERMISSION_DENIED)
    assert whoami(harness, admin.token).user.admin
    own_id = whoami(harness, site.token).token.id
    auth.RevokeToken(pb.RevokeTokenRequest(id=own_id))
    expect_error(lambda: whoami(harness, site.token), Code.UNAUTHENTICATED)


# -- users -----------------------------------------------------------------------------

def test_non_admin_cannot_create_users(harness: Any, alice: Any) -> None:
    auth = alice.stub(auth_service_pb2_grpc.AuthServiceStub)
    expect_error(lambda: auth.CreateUser(pb.CreateUserRequest(username="x" + secrets.token_hex(3),
                                                              password="long enough pw")),
                 Code.PERMISSION_DENIED)


def test_admin_creates_a_user_who_can_log_in(harness: Any) -> None:
    auth = harness.user(admin=True).stub(auth_service_pb2_grpc.AuthServiceStub)
    name = f"carol.{secrets.token_hex(3)}@lab-1"
    created = auth.CreateUser(pb.CreateUserRequest(username=name, password="s3cret-enough"))
    assert created.user.username == name and created.user.id > 0 and not created.user.admin
    expect_error(lambda: auth.CreateUser(pb.CreateUserRequest(username=name, password="another-pw")),
                 Code.ALREADY_EXISTS)
    login = anonymous(harness).Login(pb.LoginRequest(username=name, password="s3cret-enough"))
    assert login.user.id == created.user.id
    expect_error(lambda: anonymous(harness).Login(pb.LoginRequest(username=name, password="another-pw")),
                 Code.UNAUTHENTICATED)


@pytest.mark.parametrize("username,password,field", [
    ("ok-" + "a" * 10, "short", "password"),
    ("", "long enough pw", "username"),
    ("has space", "long enough pw", "username"),
    ("slash/y", "long enough pw", "username"),
    ("u" * 151, "long enough pw", "username"),
])
def test_create_user_validation(harness: Any, username: str, password: str, field: str) -> None:
    auth = harness.user(admin=True).stub(auth_service_pb2_grpc.AuthServiceStub)
    err = expect_error(lambda: auth.CreateUser(pb.CreateUserRequest(username=username, password=password)),
                       Code.INVALID_ARGUMENT, "INVALID_FIELD")
    assert rpc_status.from_call(err) is not None
    info = error_details_pb2.ErrorInfo()
    rpc_status.from_call(err).details[0].Unpack(info)
    assert info.metadata["field"] == field


# -- listing and revoking --------------------------------------------------------------

def test_list_tokens_own_only_and_no_secrets(harness: Any, alice: Any, bob: Any) -> None:
    auth = alice.stub(auth_service_pb2_grpc.AuthServiceStub)
    made = auth.CreateToken(pb.CreateTokenRequest(description="ci"))
    gone = auth.CreateToken(pb.CreateTokenRequest(description="old"))
    auth.RevokeToken(pb.RevokeTokenRequest(id=gone.info.id))
    bobs = whoami(harness, bob.token).token.id

    listed = auth.ListTokens(pb.ListTokensRequest())
    ids = [t.id for t in listed.tokens]
    assert made.info.id in ids and gone.info.id not in ids and bobs not in ids
    assert whoami(harness, alice.token).token.id in ids
    wire = listed.SerializeToString()
    for secret in (made.token, gone.token, alice.token, bob.token):
        assert secret.encode() not in wire
        # blsm_<id>_<secret>: the random part may itself contain "_"
        assert secret.split("_", 2)[2].encode() not in wire
    assert set(pb.TokenInfo.DESCRIPTOR.fields_by_name) == {
        "id", "scope", "site_id", "description", "create_time", "expire_time", "revoked"}

    everything = auth.ListTokens(pb.ListTokensRequest(include_inactive=True))
    revoked = {t.id: t.revoked for t in everything.tokens}
    assert revoked[gone.info.id] is True and revoked[made.info.id] is False and bobs not in revoked


def test_expired_tokens_listed_only_when_inactive_included(harness: Any) -> None:
    user = harness.user()
    old = harness.user(user.username, ttl=timedelta(seconds=-1))
    auth = user.stub(auth_service_pb2_grpc.AuthServiceStub)
    active = {t.description for t in auth.ListTokens(pb.ListTokensRequest()).tokens}
    assert len(auth.ListTokens(pb.ListTokensRequest()).tokens) == 1 and active == {"test"}
    assert len(auth.ListTokens(pb.ListTokensRequest(include_inactive=True)).tokens) == 2
    assert old.user_id == user.user_id


def test_revoking_another_users_token_is_not_found(harness: Any, alice: Any, bob: Any) -> None:
    bobs = whoami(harness, bob.token).token.id
    auth = alice.stub(auth_service_pb2_grpc.AuthServiceStub)
    expect_error(lambda: auth.RevokeToken(pb.RevokeTokenRequest(id=bobs)), Code.NOT_FOUND)
    expect_error(lambda: auth.RevokeToken(pb.RevokeTokenRequest(id="nonexistent")), Code.NOT_FOUND)
    expect_error(lambda: auth.RevokeToken(pb.RevokeTokenRequest()), Code.INVALID_ARGUMENT, "INVALID_FIELD")
    assert whoami(harness, bob.token).user.id == bob.user_id


# -- health and reflection -------------------------------------------------------------

def test_reflection_lists_all_eight_services(harness: Any) -> None:
    db = ProtoReflectionDescriptorDatabase(harness.channel)
    services = set(db.get_services())
    assert SERVICES <= services
    assert {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
    assert len({s for s in services if s.startswith("balsam.v1.")}) == 8
    # The descriptors come with them, so tools need no .proto files.
    from google.protobuf.descriptor_pool import DescriptorPool
    pool = DescriptorPool(db)
    methods = {m.name for m in pool.FindServiceByName("balsam.v1.AuthService").methods}
    assert methods == {"Login", "GetCurrentUser", "CreateUser", "CreateToken", "ListTokens", "RevokeToken",
                       "ListUsers", "SetPassword", "DisableUser"}


def test_health_reports_serving(harness: Any) -> None:
    health = health_pb2_grpc.HealthStub(harness.channel)
    for name in ("", *sorted(SERVICES)):
        resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=30)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, name


# -- user administration ---------------------------------------------------------------

def test_only_admins_list_users(harness: Any, alice: Any) -> None:
    admin = harness.user(admin=True)
    listed = admin.stub(auth_service_pb2_grpc.AuthServiceStub).ListUsers(pb.ListUsersRequest()).users
    assert {alice.username, admin.username} <= {u.username for u in listed}
    assert [u.id for u in listed] == sorted(u.id for u in listed)
    expect_error(lambda: alice.stub(auth_service_pb2_grpc.AuthServiceStub).ListUsers(pb.ListUsersRequest()),
                 Code.PERMISSION_DENIED)
    site = harness.user(admin.username, scope="SITE", site_id=add_site(harness, admin.user_id))
    expect_error(lambda: site.stub(auth_service_pb2_grpc.AuthServiceStub).ListUsers(pb.ListUsersRequest()),
                 Code.PERMISSION_DENIED)


def test_set_password_own_or_as_admin(harness: Any, alice: Any, bob: Any) -> None:
    mine = alice.stub(auth_service_pb2_grpc.AuthServiceStub)
    assert mine.SetPassword(pb.SetPasswordRequest(password="alice's new pw")).user.username == alice.username
    assert anonymous(harness).Login(pb.LoginRequest(username=alice.username, password="alice's new pw")).token
    expect_error(lambda: mine.SetPassword(pb.SetPasswordRequest(username=bob.username, password="taken over")),
                 Code.PERMISSION_DENIED)
    expect_error(lambda: mine.SetPassword(pb.SetPasswordRequest(password="short")), Code.INVALID_ARGUMENT,
                 "INVALID_FIELD")
    admin = harness.user(admin=True).stub(auth_service_pb2_grpc.AuthServiceStub)
    admin.SetPassword(pb.SetPasswordRequest(username=bob.username, password="set by the admin"))
    assert anonymous(harness).Login(pb.LoginRequest(username=bob.username, password="set by the admin")).token
    expect_error(lambda: admin.SetPassword(pb.SetPasswordRequest(username="nobody-" + secrets.token_hex(3),
                                                                 password="long enough pw")), Code.NOT_FOUND)
    site = harness.user(alice.username, scope="SITE", site_id=add_site(harness, alice.user_id))
    expect_error(lambda: site.stub(auth_service_pb2_grpc.AuthServiceStub).SetPassword(
        pb.SetPasswordRequest(password="from a site token")), Code.PERMISSION_DENIED)


def test_disabling_a_user_revokes_its_tokens_and_login(harness: Any) -> None:
    admin_caller = harness.user(admin=True)
    admin = admin_caller.stub(auth_service_pb2_grpc.AuthServiceStub)
    carol = harness.user()
    carol_site = harness.user(carol.username, scope="SITE", site_id=add_site(harness, carol.user_id))
    expect_error(lambda: carol.stub(auth_service_pb2_grpc.AuthServiceStub).DisableUser(
        pb.DisableUserRequest(username=admin_caller.username)), Code.PERMISSION_DENIED)
    expect_error(lambda: admin.DisableUser(pb.DisableUserRequest(username=admin_caller.username)),
                 Code.FAILED_PRECONDITION)

    disabled = admin.DisableUser(pb.DisableUserRequest(username=carol.username))
    assert disabled.user.disabled and disabled.revoked_tokens == 2
    for token in (carol.token, carol_site.token):
        expect_error(lambda token=token: whoami(harness, token), Code.UNAUTHENTICATED)
    expect_error(lambda: anonymous(harness).Login(pb.LoginRequest(username=carol.username, password=PASSWORD)),
                 Code.UNAUTHENTICATED)
    listed = {u.username: u for u in admin.ListUsers(pb.ListUsersRequest()).users}
    assert listed[carol.username].disabled and not listed[admin_caller.username].disabled
    expect_error(lambda: admin.DisableUser(pb.DisableUserRequest(username="nobody-" + secrets.token_hex(3))),
                 Code.NOT_FOUND)

    admin.SetPassword(pb.SetPasswordRequest(username=carol.username, password="a fresh start"))
    back = anonymous(harness).Login(pb.LoginRequest(username=carol.username, password="a fresh start"))
    assert not back.user.disabled and whoami(harness, back.token).user.username == carol.username
