"""JobService: request validation and row <-> message conversion around store.jobs."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from balsam_grpc.core.errors import FailedPrecondition, InvalidArgument
from balsam_grpc.core.states import JobState
from balsam_grpc.core.validation import check_string_map, clean_workdir
from balsam_grpc.server import paging
from balsam_grpc.server.convert import EnumCodec, dict_to_struct, from_timestamp, to_timestamp, utcnow
from balsam_grpc.server.idempotency import idempotent
from balsam_grpc.server.rpc import Principal, unary
from balsam_grpc.server.state import ServerState
from balsam_grpc.server.store import jobs as store
from balsam_grpc.server.store.tables import apps
from balsam_grpc.v1 import common_pb2, job_pb2, job_service_pb2, job_service_pb2_grpc

STATES = EnumCodec(job_pb2.JobState, "JOB_STATE_")
PARENT_POLICY = EnumCodec(job_pb2.ParentFailurePolicy, "PARENT_FAILURE_POLICY_")
GROUP_BY = EnumCodec(job_service_pb2.JobGroupBy, "JOB_GROUP_BY_")

RESOURCE_LIMITS = {  # field: (default, minimum, maximum)
    "num_nodes": (1, 1, 100_000), "ranks_per_node": (1, 1, 4096), "threads_per_rank": (1, 1, 4096),
    "threads_per_core": (1, 1, 16), "gpus_per_rank": (0, 0, 64), "node_packing_count": (1, 1, 1024),
    "wall_time_min": (0, 0, 525_600),
}
MAX_PARAMETERS = 256
MAX_DATA_BYTES = 256 * 1024
MAX_PARENTS = 10_000
UPDATABLE = {"name", "tags", "parameters", "data", "priority", "resources", "on_parent_failure", "state",
             "state_message", "return_code", "error_tail"}
BASIC_COLUMNS = (store.jobs.c.id, store.jobs.c.state, store.jobs.c.workdir, store.jobs.c.app_id,
                 store.jobs.c.site_id)


# ---------------------------------------------------------------------------- conversion

def job_to_message(row: dict[str, Any], view: int = job_service_pb2.JOB_VIEW_FULL) -> job_pb2.Job:
    msg = job_pb2.Job(id=row["id"], state=STATES.number(row["state"]), workdir=row["workdir"],
                      app_id=row["app_id"], site_id=row["site_id"])
    if view == job_service_pb2.JOB_VIEW_BASIC:
        return msg
    msg.name = row["name"]
    msg.tags.update(row["tags"] or {})
    msg.parameters.update(row["parameters"] or {})
    dict_to_struct(row["data"], msg.data)
    msg.parent_ids.extend(row["parent_ids"] or [])
    msg.transfers.update(row["transfers"] or {})
    r = msg.resources
    for name in RESOURCE_LIMITS:
        setattr(r, name, row[name])
    r.launch_params.update(row["launch_params"] or {})
    msg.priority = row["priority"]
    msg.state_message = row["state_message"]
    if row["return_code"] is not None:
        msg.return_code = row["return_code"]
    msg.error_tail = row["error_tail"]
    msg.batch_job_id = row["batch_job_id"] or 0
    if row["session_id"]:
        msg.lease.session_id = row["session_id"]
        msg.lease.generation = row["lease_generation"]
        if row["lease_expire_time"] is not None:
            msg.lease.expire_time.CopyFrom(to_timestamp(row["lease_expire_time"]))
    msg.on_parent_failure = PARENT_POLICY.number(row["on_parent_failure"])
    msg.run_count = row["run_count"]
    msg.create_time.CopyFrom(to_timestamp(row["create_time"]))
    msg.update_time.CopyFrom(to_timestamp(row["update_time"]))
    msg.state_time.CopyFrom(to_timestamp(row["state_time"]))
    return msg


def _resources(res: job_pb2.JobResources, field: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (default, low, high) in RESOURCE_LIMITS.items():
        value = getattr(res, name) or default
        if not low <= value <= high:
            raise InvalidArgument(f"{field}.{name} must be between {low} and {high}, got {value}",
                                  field=f"{field}.{name}")
        out[name] = value
    if out["node_packing_count"] > 1 and out["num_nodes"] > 1:
        raise InvalidArgument(f"{field}.node_packing_count > 1 only applies to single-node jobs "
                              f"(num_nodes is {out['num_nodes']})", field=f"{field}.node_packing_count")
    out["launch_params"] = dict(res.launch_params)
    return out


def _data(struct: Any, field: str) -> dict[str, Any]:
    if struct.ByteSize() > MAX_DATA_BYTES:
        raise InvalidArgument(f"{field} is larger than {MAX_DATA_BYTES // 1024} KiB", field=field, reason="TOO_LARGE")
    return json_format.MessageToDict(struct)


def job_spec(job: job_pb2.Job, field: str, state: ServerState) -> dict[str, Any]:
    """Validate a Job message from a create request into store columns."""
    s = state.settings
    if not job.app_id and not (job.app_name and job.site_id):
        raise InvalidArgument(f"{field}: give app_id, or app_name together with site_id", field=f"{field}.app_id")
    check_string_map(dict(job.tags), f"{field}.tags", max_entries=s.max_map_entries, max_value_bytes=s.max_map_value_bytes)
    check_string_map(dict(job.parameters), f"{field}.parameters", max_entries=MAX_PARAMETERS,
                     max_value_bytes=s.max_map_value_bytes, keys=None)
    check_string_map(dict(job.transfers), f"{field}.transfers", max_entries=s.max_map_entries,
                     max_value_bytes=s.max_map_value_bytes, keys=None)
    if len(job.parent_ids) > MAX_PARENTS:
        raise InvalidArgument(f"{field}.parent_ids has more than {MAX_PARENTS} entries", field=f"{field}.parent_ids",
                              reason="TOO_LARGE")
    if len(job.name) > 255:
        raise InvalidArgument(f"{field}.name is longer than 255 characters", field=f"{field}.name")
    spec = {
        "name": job.name, "app_id": job.app_id, "app_name": job.app_name, "site_id": job.site_id,
        "workdir": clean_workdir(job.workdir, f"{field}.workdir"), "tags": dict(job.tags),
        "parameters": dict(job.parameters), "data": _data(job.data, f"{field}.data"),
        "parent_ids": sorted(set(job.parent_ids)), "transfers": dict(job.transfers),
        "priority": job.priority,
        "on_parent_failure": PARENT_POLICY.to_name.get(job.on_parent_failure, "FAIL") if job.on_parent_failure else "FAIL",
        **_resources(job.resources, f"{field}.resources"),
    }
    if job.on_parent_failure and job.on_parent_failure not in PARENT_POLICY.to_name:
        PARENT_POLICY.name(job.on_parent_failure, f"{field}.on_parent_failure")
    return spec


def job_query(f: job_pb2.JobFilter, principal: Principal) -> store.JobQuery:
    check_string_map(dict(f.tags), "filter.tags", max_entries=64, max_value_bytes=4096)
    return store.JobQuery(
        owner_id=principal.user_id, site_scope=principal.site_id if principal.is_site else None,
        ids=list(f.ids), states=STATES.names(f.states, "filter.states"),
        exclude_states=STATES.names(f.exclude_states, "filter.exclude_states"), tags=dict(f.tags),
        exclude_tags=dict(f.exclude_tags), app_ids=list(f.app_ids), app_names=list(f.app_names),
        site_ids=list(f.site_ids), parent_ids=list(f.parent_ids), workdir_contains=f.workdir_contains,
        create_start=from_timestamp(f.create_time.start), create_end=from_timestamp(f.create_time.end),
        update_start=from_timestamp(f.update_time.start), update_end=from_timestamp(f.update_time.end),
        batch_job_ids=list(f.batch_job_ids), session_id=f.session_id)


def _check_mask(paths: list[str]) -> None:
    if not paths:
        raise InvalidArgument("update_mask is empty; name the fields to change (for example 'state' or 'tags')",
                              field="update_mask")
    for path in paths:
        if path.split(".")[0] not in UPDATABLE:
            raise InvalidArgument(f"update_mask: {path!r} cannot be changed; updatable fields are "
                                  f"{', '.join(sorted(UPDATABLE))}", field="update_mask")


def patch_values(patch: job_pb2.Job, paths: list[str], state: ServerState) -> tuple[dict[str, Any], JobState | None]:
    """Column values and target state for the masked fields of `patch`."""
    values: dict[str, Any] = {}
    target = None
    s = state.settings
    for path in paths:
        top = path.split(".")[0]
        if top == "state":
            target = JobState(STATES.name(patch.state, "job.state"))
        elif top == "tags":
            check_string_map(dict(patch.tags), "job.tags", max_entries=s.max_map_entries,
                             max_value_bytes=s.max_map_value_bytes)
            values["tags"] = dict(patch.tags)
        elif top == "parameters":
            check_string_map(dict(patch.parameters), "job.parameters", max_entries=MAX_PARAMETERS,
                             max_value_bytes=s.max_map_value_bytes, keys=None)
            values["parameters"] = dict(patch.parameters)
        elif top == "data":
            values["data"] = _data(patch.data, "job.data")
        elif top == "resources":
            values.update(_resources(patch.resources, "job.resources"))
        elif top == "on_parent_failure":
            values["on_parent_failure"] = PARENT_POLICY.name(patch.on_parent_failure, "job.on_parent_failure")
        elif top == "return_code":
            values["return_code"] = patch.return_code if patch.HasField("return_code") else None
        elif top == "name" and len(patch.name) > 255:
            raise InvalidArgument("job.name is longer than 255 characters", field="job.name")
        else:
            values[top] = getattr(patch, top)
    return values, target


def outcome(job_id: int, refusal: str | None) -> common_pb2.ItemOutcome:
    if refusal is None:
        return common_pb2.ItemOutcome(id=job_id, code=0)
    reason = "ILLEGAL_TRANSITION" if refusal.startswith("cannot move") else "FAILED_PRECONDITION"
    return common_pb2.ItemOutcome(id=job_id, code=9, reason=reason, message=refusal)  # 9 = FAILED_PRECONDITION


# ---------------------------------------------------------------------------- servicer

class JobServicer(job_service_pb2_grpc.JobServiceServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.db = state.db

    @unary()
    async def GetJob(self, request, context, principal):  # noqa: N802
        row = await self.db.read(store.get_job, principal.user_id, request.id, _scope(principal))
        return job_service_pb2.GetJobResponse(job=job_to_message(row))

    @unary()
    async def ListJobs(self, request, context, principal):  # noqa: N802
        q = job_query(request.filter, principal)
        order = store.parse_order(request.order_by)
        size = paging.page_size(request.page_size)
        fp = paging.fingerprint("ListJobs", principal.user_id, request.filter.SerializeToString(deterministic=True).hex(),
                                order)
        after = paging.decode(request.page_token, fp)
        view = request.view or job_service_pb2.JOB_VIEW_FULL
        columns = None
        if view == job_service_pb2.JOB_VIEW_BASIC:
            columns = tuple({c.name: c for c in (*BASIC_COLUMNS, *(store.ORDER_COLUMNS[n] for n, _ in order))}.values())
        rows = await self.db.read(store.list_jobs, q, order, after, size + 1, columns)
        more = len(rows) > size
        rows = rows[:size]
        response = job_service_pb2.ListJobsResponse(jobs=[job_to_message(r, view) for r in rows])
        if more:
            response.next_page_token = paging.encode(fp, store.page_keys(rows[-1], order))
        return response

    @unary()
    async def CountJobs(self, request, context, principal):  # noqa: N802
        q = job_query(request.filter, principal)
        group_by = [{"STATE": "state", "SITE": "site", "APP": "app"}[g]
                    for g in GROUP_BY.names(request.group_by, "group_by")]
        total, groups = await self.db.read(store.count_jobs, q, group_by)
        response = job_service_pb2.CountJobsResponse(total=total)
        for g in groups:
            response.groups.add(state=STATES.number(g.get("state")), site_id=g.get("site") or 0,
                                app_id=g.get("app") or 0, count=g["count"])
        return response

    async def _create(self, principal: Principal, jobs: list[job_pb2.Job], request: Any, method: str,
                      response_type: Any, view: int) -> Any:
        if len(jobs) > self.state.settings.max_jobs_per_call:
            raise InvalidArgument(f"{len(jobs)} jobs in one call; at most {self.state.settings.max_jobs_per_call} "
                                  "are allowed (split the request)", field="jobs", reason="TOO_LARGE")
        if not jobs:
            raise InvalidArgument("no jobs given", field="jobs")
        specs = [job_spec(j, f"jobs[{i}]", self.state) for i, j in enumerate(jobs)]
        if principal.is_site:
            for spec in specs:
                if spec["site_id"]:
                    principal.check_site(spec["site_id"])

        def work(conn: Any) -> Any:
            def build() -> Any:
                rows = store.create_jobs(conn, principal.user_id, _scope(principal), specs, utcnow())
                converted = [job_to_message(r, view) for r in rows]
                if method == "CreateJob":
                    return response_type(job=converted[0])
                return response_type(jobs=converted)

            return idempotent(conn, principal.user_id, method, request, response_type, build)

        return await self.db.write(work)

    @unary()
    async def CreateJob(self, request, context, principal):  # noqa: N802
        return await self._create(principal, [request.job], request, "CreateJob",
                                  job_service_pb2.CreateJobResponse, job_service_pb2.JOB_VIEW_FULL)

    @unary()
    async def BatchCreateJobs(self, request, context, principal):  # noqa: N802
        view = request.view or job_service_pb2.JOB_VIEW_BASIC
        return await self._create(principal, list(request.jobs), request, "BatchCreateJobs",
                                  job_service_pb2.BatchCreateJobsResponse, view)

    @unary()
    async def UpdateJob(self, request, context, principal):  # noqa: N802
        paths = list(request.update_mask.paths)
        _check_mask(paths)
        values, target = patch_values(request.job, paths, self.state)
        data = json_format.MessageToDict(request.event_data) or None
        message = request.job.state_message if "state_message" in paths else ""
        q = store.JobQuery(owner_id=principal.user_id, site_scope=_scope(principal), ids=[request.job.id])

        def work(conn: Any) -> Any:
            def build() -> Any:
                rows = store.select_for_change(conn, q, with_tags=False)
                row = store.require_one(rows, request.job.id)
                if "parameters" in values:
                    _recheck_parameters(conn, row, values["parameters"])
                _, refused = store.update_jobs(conn, rows, values, None, target, utcnow(), message=message, data=data)
                if refused:
                    raise store.refuse(refused[row["id"]])
                fresh = store.get_job(conn, principal.user_id, row["id"])
                return job_service_pb2.UpdateJobResponse(job=job_to_message(fresh))

            return idempotent(conn, principal.user_id, "UpdateJob", request, job_service_pb2.UpdateJobResponse, build)

        return await self.db.write(work)

    @unary()
    async def BatchUpdateJobs(self, request, context, principal):  # noqa: N802
        paths = list(request.update_mask.paths)
        _check_mask(paths)
        if "parameters" in [p.split(".")[0] for p in paths]:
            raise InvalidArgument("parameters cannot be changed in bulk (they are checked per app); "
                                  "use UpdateJob", field="update_mask")
        values, target = patch_values(request.patch, paths, self.state)
        tags_merge = values.pop("tags", None)
        data = json_format.MessageToDict(request.event_data) or None
        message = request.patch.state_message if "state_message" in paths else ""
        q = job_query(request.filter, principal)

        def work(conn: Any) -> Any:
            def build() -> Any:
                rows = store.select_for_change(conn, q, with_tags=tags_merge is not None)
                ids, refused = store.update_jobs(conn, rows, values, tags_merge, target, utcnow(), message=message,
                                                 data=data, validate_only=request.validate_only)
                return _bulk_response(job_service_pb2.BatchUpdateJobsResponse, "updated_count", rows, refused)

            return idempotent(conn, principal.user_id, "BatchUpdateJobs", request,
                              job_service_pb2.BatchUpdateJobsResponse, build)

        return await self.db.write(work)

    @unary()
    async def DeleteJob(self, request, context, principal):  # noqa: N802
        q = store.JobQuery(owner_id=principal.user_id, site_scope=_scope(principal), ids=[request.id])

        def work(conn: Any) -> Any:
            def build() -> Any:
                rows = store.select_for_change(conn, q, with_tags=False)
                store.require_one(rows, request.id)
                _, refused = store.delete_jobs(conn, rows, validate_only=False)
                if refused:
                    raise FailedPrecondition(refused[request.id])
                return job_service_pb2.DeleteJobResponse(id=request.id)

            return idempotent(conn, principal.user_id, "DeleteJob", request, job_service_pb2.DeleteJobResponse, build)

        return await self.db.write(work)

    @unary()
    async def BatchDeleteJobs(self, request, context, principal):  # noqa: N802
        q = job_query(request.filter, principal)
        if q.is_empty():
            raise InvalidArgument("refusing to delete with an empty filter; select jobs by state, tag, app, site "
                                  "or ids (every state: list all states explicitly)", field="filter")

        def work(conn: Any) -> Any:
            def build() -> Any:
                rows = store.select_for_change(conn, q, with_tags=False)
                _, refused = store.delete_jobs(conn, rows, validate_only=request.validate_only)
                return _bulk_response(job_service_pb2.BatchDeleteJobsResponse, "deleted_count", rows, refused)

            return idempotent(conn, principal.user_id, "BatchDeleteJobs", request,
                              job_service_pb2.BatchDeleteJobsResponse, build)

        return await self.db.write(work)


def _bulk_response(response_type: Any, count_field: str, rows: list[dict[str, Any]], refused: dict[int, str]) -> Any:
    response = response_type(outcomes=[outcome(r["id"], refused.get(r["id"])) for r in rows])
    setattr(response, count_field, len(rows) - len(refused))
    response.failed_count = len(refused)
    return response


def _recheck_parameters(conn: Any, row: dict[str, Any], params: dict[str, str]) -> None:
    from sqlalchemy import select

    app = conn.execute(select(apps).where(apps.c.id == row["app_id"])).one()._mapping
    store._check_parameters(0, {"parameters": params}, dict(app))


def _scope(principal: Principal) -> int | None:
    return principal.site_id if principal.is_site else None
