"""Isolation of every resource (site, app, batch job, transfer item, session).

Rules under test:
- another user's objects do not exist: NOT_FOUND on Get/Update/Delete by id, absent from
  every List (with or without filters naming them), and not usable as references;
- a site-scoped token acts only for its site: an object of the same user at another site,
  addressed by id, is PERMISSION_DENIED; lists are restricted to the token's site; it may
  not create or delete sites.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy import select

from balsam_grpc.server.store.tables import jobs, sessions
from balsam_grpc.v1 import (
    app_pb2,
    app_service_pb2,
    batch_job_pb2,
    batch_job_service_pb2,
    session_service_pb2,
    site_pb2,
    site_service_pb2,
    transfer_item_pb2,
    transfer_item_service_pb2,
)
from tests.support.resources import Api, expect_error, insert_job, insert_session, insert_transfer

Code = grpc.StatusCode
Mask = field_mask_pb2.FieldMask
Call = Callable[[Api, Any], Any]


@dataclass
class World:
    """Alice's objects at two sites; ids[resource] = (id at site 1, id at site 2)."""

    alice: Api
    ids: dict[str, tuple[Any, Any]]
    running_jobs: tuple[int, int]


@pytest.fixture
def world(harness: Any, alice: Any) -> World:
    api = Api(alice)
    s1, s2 = api.site("one").id, api.site("two").id
    a1, a2 = api.app(s1).id, api.app(s2).id
    b1, b2 = api.batch_job(s1).id, api.batch_job(s2).id
    owner = alice.user_id
    j1, j2 = insert_job(harness, owner, s1, a1), insert_job(harness, owner, s2, a2)
    t1 = insert_transfer(harness, owner, s1, j1, state="ERROR", error="denied")
    t2 = insert_transfer(harness, owner, s2, j2, state="ERROR", error="denied")
    x1, x2 = insert_session(harness, owner, s1), insert_session(harness, owner, s2)
    r1 = insert_job(harness, owner, s1, a1, state="RUN_DONE", session_id=x1)
    r2 = insert_job(harness, owner, s2, a2, state="RUN_DONE", session_id=x2)
    return World(api, {"site": (s1, s2), "app": (a1, a2), "batch_job": (b1, b2), "transfer_item": (t1, t2),
                       "session": (x1, x2)}, (r1, r2))


# Per resource: how to Get, Update and Delete one by id (None where the API has no such RPC).
OPS: dict[str, dict[str, Call | None]] = {
    "site": {
        "get": lambda api, i: api.sites.GetSite(site_service_pb2.GetSiteRequest(id=i)),
        "update": lambda api, i: api.sites.UpdateSite(site_service_pb2.UpdateSiteRequest(
            site=site_pb2.Site(id=i, hostname="changed"), update_mask=Mask(paths=["hostname"]))),
        "delete": lambda api, i: api.sites.DeleteSite(site_service_pb2.DeleteSiteRequest(id=i)),
    },
    "app": {
        "get": lambda api, i: api.apps.GetApp(app_service_pb2.GetAppRequest(id=i)),
        "update": lambda api, i: api.apps.UpdateApp(app_service_pb2.UpdateAppRequest(
            app=app_pb2.App(id=i, description="changed"), update_mask=Mask(paths=["description"]))),
        "delete": lambda api, i: api.apps.DeleteApp(app_service_pb2.DeleteAppRequest(id=i, force=True)),
    },
    "batch_job": {
        "get": lambda api, i: api.batch.GetBatchJob(batch_job_service_pb2.GetBatchJobRequest(id=i)),
        "update": lambda api, i: api.batch.UpdateBatchJob(batch_job_service_pb2.UpdateBatchJobRequest(
            batch_job=batch_job_pb2.BatchJob(id=i, state=batch_job_pb2.BATCH_JOB_STATE_PENDING_DELETION),
            update_mask=Mask(paths=["state"]))),
        "delete": lambda api, i: api.batch.DeleteBatchJob(batch_job_service_pb2.DeleteBatchJobRequest(id=i)),
    },
    "transfer_item": {
        "get": lambda api, i: api.transfers.GetTransferItem(transfer_item_service_pb2.GetTransferItemRequest(id=i)),
        "update": lambda api, i: api.transfers.UpdateTransferItem(transfer_item_service_pb2.UpdateTransferItemRequest(
            transfer_item=transfer_item_pb2.TransferItem(id=i, state=transfer_item_pb2.TRANSFER_STATE_PENDING),
            update_mask=Mask(paths=["state"]))),
        "delete": None,
    },
    "session": {
        "get": lambda api, i: api.sessions.GetSession(session_service_pb2.GetSessionRequest(id=i)),
        "update": None,
        "delete": lambda api, i: api.sessions.DeleteSession(session_service_pb2.DeleteSessionRequest(id=i)),
    },
}

# Per resource: list everything, and list with filters that name the objects explicitly.
LISTS: dict[str, Callable[[Api, World], list[Any]]] = {
    "site": lambda api, w: api.list_sites() + api.list_sites(ids=list(w.ids["site"])) +
    api.list_sites(names=["one", "two"]),
    "app": lambda api, w: api.list_apps() + api.list_apps(ids=list(w.ids["app"])) +
    api.list_apps(site_ids=list(w.ids["site"])),
    "batch_job": lambda api, w: api.list_batch_jobs() + api.list_batch_jobs(ids=list(w.ids["batch_job"])) +
    api.list_batch_jobs(site_ids=list(w.ids["site"])),
    "transfer_item": lambda api, w: api.list_transfers() + api.list_transfers(ids=list(w.ids["transfer_item"])) +
    api.list_transfers(site_ids=list(w.ids["site"])),
    "session": lambda api, w: api.list_sessions() + api.list_sessions(ids=list(w.ids["session"])) +
    api.list_sessions(site_ids=list(w.ids["site"])),
}

RESOURCES = list(OPS)


def _snapshot(w: World) -> dict[str, list[Any]]:
    """Everything Alice has, as she sees it (to prove nothing changed)."""
    return {r: [OPS[r]["get"](w.alice, i) for i in w.ids[r]] for r in RESOURCES}  # type: ignore[misc]


# -- another user ------------------------------------------------------------------------

@pytest.mark.parametrize("resource", RESOURCES)
def test_other_user_gets_not_found_by_id(world: World, bob: Any, resource: str) -> None:
    before = _snapshot(world)
    intruder = Api(bob)
    for op in ("get", "update", "delete"):
        call = OPS[resource][op]
        if call is None:
            continue
        for obj_id in world.ids[resource]:
            err = expect_error(lambda: call(intruder, obj_id), Code.NOT_FOUND)  # noqa: B023
            assert "permission" not in err.details().lower()
    assert _snapshot(world) == before


@pytest.mark.parametrize("resource", RESOURCES)
def test_other_user_lists_none_of_them(world: World, bob: Any, resource: str) -> None:
    intruder = Api(bob)
    assert LISTS[resource](intruder, world) == []
    assert LISTS[resource](world.alice, world) != []


def test_other_user_cannot_reference_alices_objects(harness: Any, world: World, bob: Any) -> None:
    intruder = Api(bob)
    s1 = world.ids["site"][0]
    expect_error(lambda: intruder.app(s1), Code.NOT_FOUND, field="app.site_id")
    expect_error(lambda: intruder.batch_job(s1), Code.NOT_FOUND, field="batch_job.site_id")
    assert intruder.list_apps() == [] and intruder.list_batch_jobs() == []
    assert len(world.alice.list_apps()) == 2 and len(world.alice.list_batch_jobs()) == 2


def test_other_user_may_reuse_names_and_request_ids(world: World, bob: Any) -> None:
    req = site_service_pb2.CreateSiteRequest(site=site_pb2.Site(name="shared"), request_id="same-request")
    mine = world.alice.sites.CreateSite(req).site
    theirs = Api(bob).sites.CreateSite(req).site
    assert theirs.id != mine.id and theirs.owner == bob.username and mine.owner == world.alice.caller.username
    assert [s.id for s in Api(bob).list_sites()] == [theirs.id]


def test_other_user_cannot_close_a_session_or_touch_its_jobs(harness: Any, world: World, bob: Any) -> None:
    x1, _ = world.ids["session"]
    running = insert_job(harness, world.alice.caller.user_id, world.ids["site"][0], world.ids["app"][0],
                         state="RUNNING", session_id=x1)
    expect_error(lambda: Api(bob).sessions.DeleteSession(session_service_pb2.DeleteSessionRequest(id=x1)),
                 Code.NOT_FOUND)
    state = harness.db.read_sync(lambda conn: conn.execute(select(jobs.c.state).where(jobs.c.id == running)).one()[0])
    assert state == "RUNNING"
    active = harness.db.read_sync(
        lambda conn: conn.execute(select(sessions.c.state).where(sessions.c.id == x1)).one()[0])
    assert active == "ACTIVE"


def test_other_users_site_token_gets_not_found(harness: Any, world: World, bob: Any) -> None:
    bobs_site = Api(bob).site()
    token = Api(harness.user(bob.username, scope="SITE", site_id=bobs_site.id))
    for resource in RESOURCES:
        for op in ("get", "update", "delete"):
            call = OPS[resource][op]
            if call is not None:
                for obj_id in world.ids[resource]:
                    expect_error(lambda: call(token, obj_id), Code.NOT_FOUND)  # noqa: B023
        assert not {x.id for x in LISTS[resource](token, world)} & set(world.ids[resource])


# -- a site-scoped token of the same user ------------------------------------------------

@pytest.fixture
def site_token(harness: Any, world: World) -> Api:
    return Api(harness.user(world.alice.caller.username, scope="SITE", site_id=world.ids["site"][0]))


@pytest.mark.parametrize("resource", RESOURCES)
def test_site_token_cannot_read_or_change_another_site(world: World, site_token: Api, resource: str) -> None:
    before = _snapshot(world)
    own, other = world.ids[resource]
    for op in ("get", "update", "delete"):
        call = OPS[resource][op]
        if call is not None:
            expect_error(lambda: call(site_token, other), Code.PERMISSION_DENIED)  # noqa: B023
    assert _snapshot(world) == before
    # Lists show only the token's own site.
    listed = LISTS[resource](site_token, world)
    assert listed and {x.id for x in listed} == {own}
    assert OPS[resource]["get"](site_token, own)  # type: ignore[misc]


def test_site_token_acts_for_its_own_site(world: World, site_token: Api) -> None:
    s1, s2 = world.ids["site"]
    updated = OPS["site"]["update"](site_token, s1).site  # type: ignore[misc]
    assert updated.hostname == "changed"
    assert site_token.app(s1, "synced").site_id == s1
    assert site_token.batch_job(s1).site_id == s1
    expect_error(lambda: site_token.app(s2, "synced"), Code.PERMISSION_DENIED)
    expect_error(lambda: site_token.batch_job(s2), Code.PERMISSION_DENIED)
    assert len(world.alice.list_apps(site_ids=[s2])) == 1


def test_site_token_cannot_create_or_delete_sites(world: World, site_token: Api) -> None:
    expect_error(lambda: site_token.site("new"), Code.PERMISSION_DENIED)
    expect_error(lambda: OPS["site"]["delete"](site_token, world.ids["site"][0]),  # type: ignore[misc]
                 Code.PERMISSION_DENIED)
    assert len(world.alice.list_sites()) == 2
