"""BatchJobService: pilot batch jobs requested by users (or a site's elastic queue) and
submitted by the site daemon."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection

from balsam_grpc.core.errors import InvalidArgument
from balsam_grpc.server.convert import EnumCodec, from_timestamp, to_timestamp, utcnow
from balsam_grpc.server.principal import Principal
from balsam_grpc.server.rpc import unary
from balsam_grpc.server.services.common import Page, check_map, mask_paths, mutate, only_site, require_id
from balsam_grpc.server.state import ServerSettings, ServerState
from balsam_grpc.server.store import batch_jobs as store
from balsam_grpc.server.store import sites as site_store
from balsam_grpc.v1 import batch_job_pb2, batch_job_service_pb2, batch_job_service_pb2_grpc, common_pb2

STATE = EnumCodec(batch_job_pb2.BatchJobState, "BATCH_JOB_STATE_")
JOB_MODE = EnumCodec(common_pb2.JobMode, "JOB_MODE_")

OUTPUT_ONLY = ("id", "scheduler_id", "status_info", "start_time", "end_time", "create_time", "update_time")
IMMUTABLE = ("site_id",)
MUTABLE = ("state", *store.EDITABLE_BEFORE_SUBMISSION)


def batch_job_to_pb(row: dict[str, Any]) -> batch_job_pb2.BatchJob:
    """The one place a batch_jobs row becomes a BatchJob message."""
    return batch_job_pb2.BatchJob(
        id=row["id"], site_id=row["site_id"], scheduler_id=row["scheduler_id"], project=row["project"],
        queue=row["queue"], num_nodes=row["num_nodes"], wall_time_min=row["wall_time_min"],
        job_mode=JOB_MODE.number(row["job_mode"]),
        partitions=[batch_job_pb2.Partition(job_mode=JOB_MODE.number(p.get("job_mode")),
                                            num_nodes=int(p.get("num_nodes", 0)),
                                            filter_tags=p.get("filter_tags") or {})
                    for p in row["partitions"] or []],
        filter_tags=row["filter_tags"] or {}, optional_params=row["optional_params"] or {},
        state=STATE.number(row["state"]), status_info=row["status_info"],
        start_time=to_timestamp(row["start_time"]), end_time=to_timestamp(row["end_time"]),
        create_time=to_timestamp(row["create_time"]), update_time=to_timestamp(row["update_time"]),
    )


def _job_mode(value: int, field: str) -> str:
    return "SERIAL" if value == 0 else JOB_MODE.name(value, field)


def _values(bj: batch_job_pb2.BatchJob, fields: Iterable[str], settings: ServerSettings) -> dict[str, Any]:
    """Validate the named fields on their own (site rules are checked by `_check_against_site`)."""
    out: dict[str, Any] = {}
    for f in fields:
        if f == "num_nodes":
            if bj.num_nodes < 1:
                raise InvalidArgument(f"batch_job.num_nodes must be >= 1, got {bj.num_nodes}",
                                      field="batch_job.num_nodes")
            out["num_nodes"] = bj.num_nodes
        elif f == "wall_time_min":
            if bj.wall_time_min < 1:
                raise InvalidArgument(f"batch_job.wall_time_min must be >= 1 minute, got {bj.wall_time_min}",
                                      field="batch_job.wall_time_min")
            out["wall_time_min"] = bj.wall_time_min
        elif f in ("queue", "project"):
            value = getattr(bj, f)
            if len(value) > 200:
                raise InvalidArgument(f"batch_job.{f} is longer than 200 characters", field=f"batch_job.{f}")
            out[f] = value
        elif f == "job_mode":
            out["job_mode"] = _job_mode(bj.job_mode, "batch_job.job_mode")
        elif f == "filter_tags":
            out["filter_tags"] = check_map(dict(bj.filter_tags), "batch_job.filter_tags", settings, tag_keys=True)
        elif f == "optional_params":
            out["optional_params"] = check_map(dict(bj.optional_params), "batch_job.optional_params", settings)
        elif f == "partitions":
            parts = []
            for i, p in enumerate(bj.partitions):
                if p.num_nodes < 1:
                    raise InvalidArgument(f"batch_job.partitions[{i}].num_nodes must be >= 1, got {p.num_nodes}",
                                          field=f"batch_job.partitions[{i}].num_nodes")
                parts.append({"job_mode": _job_mode(p.job_mode, f"batch_job.partitions[{i}].job_mode"),
                              "num_nodes": p.num_nodes,
                              "filter_tags": check_map(dict(p.filter_tags), f"batch_job.partitions[{i}].filter_tags",
                                                       settings, tag_keys=True)})
            out["partitions"] = parts
    return out


def _check_against_site(site: dict[str, Any], merged: dict[str, Any]) -> None:
    """Queue, project and optional parameters must be allowed by the site; partitions
    must fit in the allocation."""
    for f, allowed in (("queue", site["allowed_queues"] or []), ("project", site["allowed_projects"] or [])):
        if allowed and merged.get(f, "") not in allowed:
            raise InvalidArgument(f"batch_job.{f} {merged.get(f, '')!r} is not allowed at site {site['id']}; "
                                  f"use one of {', '.join(allowed)}", field=f"batch_job.{f}")
    known = site["optional_batch_job_params"] or {}
    unknown = sorted(set(merged.get("optional_params") or {}) - set(known))
    if unknown:
        hint = f"the site accepts {', '.join(sorted(known))}" if known else "the site accepts none"
        raise InvalidArgument(f"batch_job.optional_params: {', '.join(unknown)} not accepted by site "
                              f"{site['id']}; {hint}", field="batch_job.optional_params")
    parts = merged.get("partitions") or []
    total = sum(p["num_nodes"] for p in parts)
    if total > merged["num_nodes"]:
        raise InvalidArgument(f"batch_job.partitions use {total} nodes but the batch job has only "
                              f"{merged['num_nodes']}", field="batch_job.partitions")


class BatchJobServicer(batch_job_service_pb2_grpc.BatchJobServiceServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state

    @unary()
    async def GetBatchJob(self, request: batch_job_service_pb2.GetBatchJobRequest, context: Any,
                          principal: Principal) -> batch_job_service_pb2.GetBatchJobResponse:
        require_id(request.id)
        row = await self.state.db.read(store.require_batch_job, principal.user_id, request.id)
        principal.check_site(row["site_id"])
        return batch_job_service_pb2.GetBatchJobResponse(batch_job=batch_job_to_pb(row))

    @unary()
    async def ListBatchJobs(self, request: batch_job_service_pb2.ListBatchJobsRequest, context: Any,
                            principal: Principal) -> batch_job_service_pb2.ListBatchJobsResponse:
        page = Page("ListBatchJobs", principal, request)
        f = request.filter
        q = store.BatchJobQuery(
            owner_id=principal.user_id, ids=list(f.ids), site_ids=list(f.site_ids),
            states=STATE.names(f.states, "filter.states"), queue=f.queue, scheduler_id=f.scheduler_id,
            create_start=from_timestamp(f.create_time.start, f.create_time.HasField("start"),
                                        field="filter.create_time.start"),
            create_end=from_timestamp(f.create_time.end, f.create_time.HasField("end"),
                                      field="filter.create_time.end"),
            only_site_id=only_site(principal))
        after = page.after_id()
        rows = await self.state.db.read(lambda conn: store.list_batch_jobs(conn, q, after_id=after,
                                                                           limit=page.limit))
        found, token = page.finish(rows, batch_job_to_pb)
        return batch_job_service_pb2.ListBatchJobsResponse(batch_jobs=found, next_page_token=token)

    @unary()
    async def CreateBatchJob(self, request: batch_job_service_pb2.CreateBatchJobRequest, context: Any,
                             principal: Principal) -> batch_job_service_pb2.CreateBatchJobResponse:
        bj = request.batch_job
        site_id = require_id(bj.site_id, "batch_job.site_id")
        values = _values(bj, store.EDITABLE_BEFORE_SUBMISSION, self.state.settings)

        def build(conn: Connection) -> batch_job_service_pb2.CreateBatchJobResponse:
            site = site_store.require_site(conn, principal.user_id, site_id, field="batch_job.site_id",
                                           reference=True)
            principal.check_site(site_id)
            _check_against_site(site, values)
            row = store.create_batch_job(conn, principal.user_id, site_id, values, utcnow())
            return batch_job_service_pb2.CreateBatchJobResponse(batch_job=batch_job_to_pb(row))

        return await mutate(self.state, principal, "BatchJobService.CreateBatchJob", request,
                            batch_job_service_pb2.CreateBatchJobResponse, build)

    @unary()
    async def UpdateBatchJob(self, request: batch_job_service_pb2.UpdateBatchJobRequest, context: Any,
                             principal: Principal) -> batch_job_service_pb2.UpdateBatchJobResponse:
        bj = request.batch_job
        bj_id = require_id(bj.id, "batch_job.id")
        paths = mask_paths(request.update_mask, resource="batch_job", mutable=MUTABLE, output_only=OUTPUT_ONLY,
                           immutable=IMMUTABLE, example="'state' with state PENDING_DELETION to cancel")
        new_state = STATE.name(bj.state, "batch_job.state") if "state" in paths else None
        values = _values(bj, [p for p in paths if p != "state"], self.state.settings)

        def build(conn: Connection) -> batch_job_service_pb2.UpdateBatchJobResponse:
            row = store.require_batch_job(conn, principal.user_id, bj_id, field="batch_job.id", for_update=True)
            principal.check_site(row["site_id"])
            if values:
                site = site_store.require_site(conn, principal.user_id, row["site_id"])
                merged = {k: row[k] for k in store.EDITABLE_BEFORE_SUBMISSION} | values
                if row["state"] == store.PENDING_SUBMISSION:
                    _check_against_site(site, merged)
            out = store.update_batch_job(conn, row, values, new_state, utcnow())
            return batch_job_service_pb2.UpdateBatchJobResponse(batch_job=batch_job_to_pb(out))

        return await mutate(self.state, principal, "BatchJobService.UpdateBatchJob", request,
                            batch_job_service_pb2.UpdateBatchJobResponse, build)

    @unary()
    async def DeleteBatchJob(self, request: batch_job_service_pb2.DeleteBatchJobRequest, context: Any,
                             principal: Principal) -> batch_job_service_pb2.DeleteBatchJobResponse:
        require_id(request.id)

        def work(conn: Connection) -> None:
            row = store.require_batch_job(conn, principal.user_id, request.id, for_update=True)
            principal.check_site(row["site_id"])
            store.delete_batch_job(conn, principal.user_id, request.id)

        await self.state.db.write(work)
        return batch_job_service_pb2.DeleteBatchJobResponse(id=request.id)
