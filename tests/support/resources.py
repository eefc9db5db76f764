"""Helpers of the resource service tests (sites, apps, batch jobs, transfer items,
sessions): a caller's five stubs, rows written straight into the database, and the check
of a refused call's code, ErrorInfo and named field."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import insert

from balsam_grpc.server.convert import utcnow
from balsam_grpc.server.store.tables import jobs, sessions, transfer_items
from balsam_grpc.v1 import (
    app_pb2,
    app_service_pb2,
    app_service_pb2_grpc,
    batch_job_pb2,
    batch_job_service_pb2,
    batch_job_service_pb2_grpc,
    session_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
    site_pb2,
    site_service_pb2,
    site_service_pb2_grpc,
    transfer_item_pb2,
    transfer_item_service_pb2,
    transfer_item_service_pb2_grpc,
)

BJ = batch_job_pb2
TS = transfer_item_pb2


def expect_error(call: Callable[[], Any], code: grpc.StatusCode, *, field: str | None = None,
                 reason: str | None = None) -> grpc.RpcError:
    """Run `call`; check the code, the balsam.v1 ErrorInfo, and that the message names `field`."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    err = caught.value
    assert err.code() == code, f"{err.code()}: {err.details()}"
    status = rpc_status.from_call(err)
    assert status is not None and status.details, "status has no ErrorInfo"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info) and info.domain == "balsam.v1"
    if reason:
        assert info.reason == reason, info.reason
    if field:
        assert field in err.details(), f"{field!r} not named in {err.details()!r}"
        assert field in info.metadata.get("field", ""), dict(info.metadata)
    return err


class Api:
    """The five resource stubs of one caller."""

    def __init__(self, caller: Any) -> None:
        self.caller = caller
        self.sites = caller.stub(site_service_pb2_grpc.SiteServiceStub)
        self.apps = caller.stub(app_service_pb2_grpc.AppServiceStub)
        self.batch = caller.stub(batch_job_service_pb2_grpc.BatchJobServiceStub)
        self.transfers = caller.stub(transfer_item_service_pb2_grpc.TransferServiceStub)
        self.sessions = caller.stub(session_service_pb2_grpc.SessionServiceStub)

    def site(self, name: str | None = None, **kw: Any) -> site_pb2.Site:
        site = site_pb2.Site(name=name or f"site-{secrets.token_hex(4)}", hostname="login1", path="/home/u/site",
                             **kw)
        return self.sites.CreateSite(site_service_pb2.CreateSiteRequest(site=site)).site

    def app(self, site_id: int, name: str = "hello", **kw: Any) -> app_pb2.App:
        app = app_pb2.App(site_id=site_id, name=name, command_template="echo {{ who }}",
                          parameters=[app_pb2.AppParameter(name="who", default_value="world")], **kw)
        return self.apps.CreateApp(app_service_pb2.CreateAppRequest(app=app)).app

    def batch_job(self, site_id: int, **kw: Any) -> BJ.BatchJob:
        kw.setdefault("num_nodes", 2)
        kw.setdefault("wall_time_min", 30)
        return self.batch.CreateBatchJob(batch_job_service_pb2.CreateBatchJobRequest(
            batch_job=BJ.BatchJob(site_id=site_id, **kw))).batch_job

    def list_sites(self, **filt: Any) -> list[site_pb2.Site]:
        return list(self.sites.ListSites(site_service_pb2.ListSitesRequest(
            filter=site_service_pb2.SiteFilter(**filt))).sites)

    def list_apps(self, **filt: Any) -> list[app_pb2.App]:
        return list(self.apps.ListApps(app_service_pb2.ListAppsRequest(filter=app_service_pb2.AppFilter(**filt))).apps)

    def list_batch_jobs(self, **filt: Any) -> list[BJ.BatchJob]:
        return list(self.batch.ListBatchJobs(batch_job_service_pb2.ListBatchJobsRequest(
            filter=batch_job_service_pb2.BatchJobFilter(**filt))).batch_jobs)

    def list_transfers(self, **filt: Any) -> list[TS.TransferItem]:
        return list(self.transfers.ListTransferItems(transfer_item_service_pb2.ListTransferItemsRequest(
            filter=transfer_item_service_pb2.TransferItemFilter(**filt))).transfer_items)

    def list_sessions(self, **filt: Any) -> list[session_pb2.Session]:
        return list(self.sessions.ListSessions(session_service_pb2.ListSessionsRequest(
            filter=session_service_pb2.SessionFilter(**filt))).sessions)


def insert_job(harness: Any, owner_id: int, site_id: int, app_id: int, state: str = "READY",
               session_id: str | None = None) -> int:
    now = utcnow()
    values = dict(owner_id=owner_id, site_id=site_id, app_id=app_id, workdir=f"w/{secrets.token_hex(6)}",
                  state=state, session_id=session_id, create_time=now, update_time=now, state_time=now)
    return harness.db.write_sync(lambda conn: conn.execute(insert(jobs).values(**values)).inserted_primary_key[0])


def insert_transfer(harness: Any, owner_id: int, site_id: int, job_id: int, *, state: str = "PENDING",
                    direction: str = "IN", task_id: str = "", error: str = "") -> int:
    now = utcnow()
    values = dict(owner_id=owner_id, site_id=site_id, job_id=job_id, direction=direction, slot="data",
                  location_alias="aps", remote_path="/data/run1", local_path="input", recursive=False,
                  state=state, task_id=task_id, error=error, create_time=now, update_time=now)
    return harness.db.write_sync(
        lambda conn: conn.execute(insert(transfer_items).values(**values)).inserted_primary_key[0])


def insert_session(harness: Any, owner_id: int, site_id: int, *, state: str = "ACTIVE",
                   created: Any = None, batch_job_id: int | None = None) -> str:
    now = utcnow()
    sid = secrets.token_hex(16)
    values = dict(id=sid, owner_id=owner_id, site_id=site_id, batch_job_id=batch_job_id, job_mode="SERIAL",
                  nodes=[{"hostname": "nid0001", "cpus": 64, "gpus": 4}], state=state, hostname="nid0001",
                  create_time=created or now, heartbeat_time=now, expire_time=now + timedelta(seconds=20))
    harness.db.write_sync(lambda conn: conn.execute(insert(sessions).values(**values)))
    return sid
