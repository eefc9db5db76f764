"""Records the server tests make through the generated stubs (sites, apps, jobs and batch
jobs of the caller's own), and the structured error detail of a refused call."""

from __future__ import annotations

import secrets
import uuid
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from balsam_grpc.v1 import (
    app_pb2,
    app_service_pb2,
    app_service_pb2_grpc,
    batch_job_pb2,
    batch_job_service_pb2,
    batch_job_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
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


def make_site(caller: Any, **kw: Any) -> site_pb2.Site:
    stub = caller.stub(site_service_pb2_grpc.SiteServiceStub)
    site = site_pb2.Site(name=f"site-{secrets.token_hex(4)}", **kw)
    return stub.CreateSite(site_service_pb2.CreateSiteRequest(site=site)).site


def get_site(caller: Any, site_id: int) -> site_pb2.Site:
    stub = caller.stub(site_service_pb2_grpc.SiteServiceStub)
    return stub.GetSite(site_service_pb2.GetSiteRequest(id=site_id)).site


def make_app(caller: Any, site_id: int, **kw: Any) -> app_pb2.App:
    """An app `echo hi` (no parameters) on the site."""
    stub = caller.stub(app_service_pb2_grpc.AppServiceStub)
    app = app_pb2.App(site_id=site_id, name=f"app-{secrets.token_hex(3)}", command_template="echo hi", **kw)
    return stub.CreateApp(app_service_pb2.CreateAppRequest(app=app)).app


def make_jobs(caller: Any, app: app_pb2.App, n: int, **kw: Any) -> list[job_pb2.Job]:
    specs = [job_pb2.Job(app_id=app.id, workdir=f"w/{secrets.token_hex(4)}", **kw) for _ in range(n)]
    return list(jobs_stub(caller).BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=specs)).jobs)


def get_job(caller: Any, job_id: int) -> job_pb2.Job:
    return jobs_stub(caller).GetJob(job_service_pb2.GetJobRequest(id=job_id)).job


def make_batch_job(caller: Any, site_id: int, **kw: Any) -> batch_job_pb2.BatchJob:
    """A batch job of 2 nodes for 30 minutes unless `kw` says otherwise."""
    stub = caller.stub(batch_job_service_pb2_grpc.BatchJobServiceStub)
    bj = batch_job_pb2.BatchJob(site_id=site_id, num_nodes=kw.pop("num_nodes", 2), wall_time_min=30, **kw)
    return stub.CreateBatchJob(batch_job_service_pb2.CreateBatchJobRequest(batch_job=bj)).batch_job


class World:
    """A site with an app (no hooks, no transfers: new jobs are PREPROCESSED at once)."""

    def __init__(self, caller: Any, **retry: Any) -> None:
        self.caller = caller
        self.site = make_site(caller)
        self.apps = caller.stub(app_service_pb2_grpc.AppServiceStub)
        self.app = self.make_app("run", **retry)
        self.jobs = jobs_stub(caller)
        self.n = 0

    def make_app(self, name: str, **retry: Any) -> app_pb2.App:
        app = app_pb2.App(site_id=self.site.id, name=name, command_template="/bin/true",
                          retry_policy=app_pb2.RetryPolicy(**retry))
        return self.apps.CreateApp(app_service_pb2.CreateAppRequest(app=app)).app

    def create(self, count: int = 1, *, app: app_pb2.App | None = None, tags: dict[str, str] | None = None,
               priority: int = 0, **resources: int) -> list[job_pb2.Job]:
        specs = []
        for _ in range(count):
            self.n += 1
            specs.append(job_pb2.Job(app_id=(app or self.app).id, workdir=f"w/{self.n}", tags=tags or {},
                                     priority=priority, resources=job_pb2.JobResources(**resources)))
        return list(self.jobs.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=specs)).jobs)

    def get(self, job_id: int) -> job_pb2.Job:
        return self.jobs.GetJob(job_service_pb2.GetJobRequest(id=job_id)).job

    def kill(self, job_id: int) -> None:
        self.jobs.UpdateJob(job_service_pb2.UpdateJobRequest(
            job=job_pb2.Job(id=job_id, state=job_pb2.JOB_STATE_KILLED), update_mask={"paths": ["state"]}))


def error_info(err: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo a refused call carries as its first status detail."""
    status = rpc_status.from_call(err)
    assert status is not None and status.details, err
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    return info


def error_reason(err: grpc.RpcError) -> str:
    return error_info(err).reason
