"""Records the server tests make through the generated stubs (a site and an app of the
caller's own), and the structured error detail of a refused call."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from balsam_grpc.v1 import (
    app_pb2,
    app_service_pb2,
    app_service_pb2_grpc,
    job_service_pb2_grpc,
    site_pb2,
    site_service_pb2,
    site_service_pb2_grpc,
)


def make_site_app(caller: Any, **app_fields: Any) -> tuple[site_pb2.Site, app_pb2.App]:
    """A new site of the caller's and an app on it: `echo {{ x }}` with a required int x,
    unless `app_fields` say otherwise."""
    site = caller.stub(site_service_pb2_grpc.SiteServiceStub).CreateSite(
        site_service_pb2.CreateSiteRequest(site=site_pb2.Site(name=f"site-{uuid.uuid4().hex[:6]}"))).site
    fields = {"name": "hello", "command_template": "echo {{ x }}",
              "parameters": [app_pb2.AppParameter(name="x", required=True, type=app_pb2.PARAMETER_TYPE_INT)]}
    fields.update(app_fields)
    app = caller.stub(app_service_pb2_grpc.AppServiceStub).CreateApp(
        app_service_pb2.CreateAppRequest(app=app_pb2.App(site_id=site.id, **fields))).app
    return site, app


def jobs_stub(caller: Any) -> Any:
    return caller.stub(job_service_pb2_grpc.JobServiceStub)


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo a refused call carries as its first status detail."""
    status = rpc_status.from_call(err)
    assert status is not None and status.details, err
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


def error_reason(err: grpc.RpcError) -> str:
    return error_info(err).reason
