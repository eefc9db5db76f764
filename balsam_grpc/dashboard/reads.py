"""The API reads behind each page, for one user (their `Client`). Every call goes through
the SDK, so the server scopes all of it to that user: another user's job id is NOT_FOUND
here exactly as in `balsamctl`."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from balsam_grpc.core.structs import struct_to_dict
from balsam_grpc.dashboard.views import (
    BATCH_JOB_STYLE,
    FAILURE_STATES,
    TRANSFER_STYLE,
    BadQuery,
    JobQuery,
    badge,
    charts,
    iso,
)
from balsam_grpc.sdk.analytics import allocation, state_change
from balsam_grpc.sdk.client import Client
from balsam_grpc.sdk.convert import enum_name
from balsam_grpc.sdk.errors import FailedPrecondition
from balsam_grpc.sdk.filters import JOB_FILTER, MatchesNothing
from balsam_grpc.v1 import (
    app_service_pb2,
    batch_job_pb2,
    batch_job_service_pb2,
    common_pb2,
    event_service_pb2,
    job_pb2,
    job_service_pb2,
    site_service_pb2,
    transfer_item_pb2,
    transfer_item_service_pb2,
)

JOB_STATE = job_pb2.JobState.DESCRIPTOR
HISTORY_LIMIT = 2000          # events shown on a job's page
RELATIVES_LIMIT = 200         # parents / children listed on a job's page
FAILURES_SHOWN = 10
ANALYTICS_EVENT_CAP = 200_000  # events read for the charts; beyond it the page says it is truncated
FOOTPRINT_LOOKUP_CAP = 5_000   # jobs whose node footprint is looked up for utilisation
ACTIVE_PILOT_STATES = (batch_job_pb2.BATCH_JOB_STATE_PENDING_SUBMISSION, batch_job_pb2.BATCH_JOB_STATE_QUEUED,
                       batch_job_pb2.BATCH_JOB_STATE_RUNNING)
LIST_PAGE = 100
# RetryJobs is newer than this package's first contract: offered when the stubs have it.
RETRY_AVAILABLE = hasattr(job_service_pb2, "RetryJobsRequest")
RETRYABLE_STATES = ("FAILED", "KILLED", "RUN_ERROR", "RUN_TIMEOUT")
_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="dashboard-read")


def together(*calls: Callable[[], Any]) -> list[Any]:
    """Run blocking reads at once (gRPC calls release the GIL); their results in order."""
    futures = [_pool.submit(call) for call in calls]
    return [f.result() for f in futures]


def state_of(number: int) -> str:
    return enum_name(JOB_STATE, number)


def ts(stamp: Any) -> str:
    return iso(stamp.ToDatetime(tzinfo=UTC)) if stamp.seconds or stamp.nanos else ""


def _struct(msg: Any, name: str) -> dict[str, Any]:
    return struct_to_dict(getattr(msg, name)) if msg.HasField(name) else {}


@dataclass
class JobsPage:
    rows: list[dict[str, Any]]
    next_token: str = ""
    matches_nothing: bool = False


@dataclass
class Names:
    sites: dict[int, Any] = field(default_factory=dict)
    apps: dict[int, Any] = field(default_factory=dict)

    def site(self, site_id: int) -> str:
        site = self.sites.get(site_id)
        return site.name if site else (str(site_id) if site_id else "")

    def app(self, app_id: int) -> str:
        app = self.apps.get(app_id)
        return app.name if app else (str(app_id) if app_id else "")


class Reader:
    """Reads for one user. Methods are blocking (sync gRPC); pages call them off the loop."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def call(self, service: str, method: str, request: Any) -> Any:
        return self.client.call(service, method, request)

    def _paged(self, service: str, method: str, request: Any, items: str, limit: int) -> list[Any]:
        out: list[Any] = []
        while len(out) < limit:
            request.page_size = min(limit - len(out), 10_000)
            response = self.call(service, method, request)
            out.extend(getattr(response, items))
            if not response.next_page_token:
                break
            request.page_token = response.next_page_token
        return out[:limit]

    # ------------------------------------------------------------------ names, cursor

    def names(self) -> Names:
        sites, apps = together(
            lambda: self._paged("SiteService", "ListSites", site_service_pb2.ListSitesRequest(), "sites", 100_000),
            lambda: self._paged("AppService", "ListApps", app_service_pb2.ListAppsRequest(), "apps", 100_000))
        return Names({s.id: s for s in sites}, {a.id: a for a in apps})

    def cursor_now(self) -> str:
        """A watch cursor taken before the page's reads: resuming after it delivers every
        change the page's snapshot might have missed (at worst one twice: rows take the
        newest state, so replaying a change is harmless)."""
        newest = self.call("EventService", "ListEvents",
                           event_service_pb2.ListEventsRequest(page_size=1, descending=True)).events
        return str(newest[0].id) if newest else "0"

    # ------------------------------------------------------------------------ overview

    def overview(self, window_seconds: int) -> dict[str, Any]:
        # Independent reads, sent together: the page waits for the slowest, not the sum
        # (with a million jobs the grouped count alone is a few hundred ms).
        failures_request = event_service_pb2.ListEventsRequest(
            filter=event_service_pb2.EventFilter(kinds=[event_service_pb2.EVENT_KIND_JOB_STATE],
                                                 to_states=[JOB_STATE.values_by_name[f"JOB_STATE_{s}"].number
                                                            for s in FAILURE_STATES]),
            page_size=FAILURES_SHOWN, descending=True)
        names, stats, counts, pilots, failure_events = together(
            self.names,
            lambda: self.call("SiteService", "ListSiteStatistics",
                              site_service_pb2.ListSiteStatisticsRequest(window_seconds=window_seconds)),
            lambda: self.call("JobService", "CountJobs", job_service_pb2.CountJobsRequest(
                group_by=[job_service_pb2.JOB_GROUP_BY_STATE, job_service_pb2.JOB_GROUP_BY_SITE])),
            lambda: self._paged("BatchJobService", "ListBatchJobs", batch_job_service_pb2.ListBatchJobsRequest(
                filter=batch_job_service_pb2.BatchJobFilter(states=ACTIVE_PILOT_STATES)), "batch_jobs", 10_000),
            lambda: self.call("EventService", "ListEvents", failures_request).events)
        by_state: dict[str, int] = defaultdict(int)
        by_site: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for group in counts.groups:
            state = state_of(group.state)
            by_state[state] += group.count
            by_site[group.site_id][state] += group.count
        pilots_by_site: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for pilot in pilots:
            kind = "running" if pilot.state == batch_job_pb2.BATCH_JOB_STATE_RUNNING else "queued"
            pilots_by_site[pilot.site_id][kind] += 1
            pilots_by_site[pilot.site_id][f"{kind}_nodes"] += pilot.num_nodes
        sites = []
        for s in stats.sites:
            site = names.sites.get(s.site_id)
            cap = s.node_capacity or (site.elastic_queue.max_total_nodes if site else 0)
            sites.append({
                "id": s.site_id, "name": s.site_name, "connected": s.connected, "last_seen": ts(s.last_seen_time),
                "host": site.liveness.daemon_hostname or site.hostname if site else "",
                "pilots_running": pilots_by_site[s.site_id]["running"],
                "pilots_queued": pilots_by_site[s.site_id]["queued"],
                "held_nodes": s.held_nodes, "node_cap": cap,
                "backlog_jobs": s.backlog_jobs, "backlog_nodes": round(s.backlog_node_footprint, 2),
                "runnable_jobs": s.runnable_jobs, "running_jobs": s.running_jobs,
                "running_nodes": round(s.running_node_footprint, 2),
                "finished": s.finished_in_window, "failed": s.failed_in_window,
                "throughput": round(s.throughput_per_minute, 2),
                "queue_wait_p50": round(s.queue_wait_p50_seconds, 1),
                "queue_wait_mean": round(s.queue_wait_mean_seconds, 1),
                "counts": dict(by_site.get(s.site_id, {})),
            })
        return {
            "sites": sites, "total": counts.total, "by_state": dict(by_state),
            "computed_at": ts(stats.time), "window_seconds": stats.window_seconds,
            "failures": [event_row(e, names) for e in failure_events],
        }

    def analytics(self, window_seconds: int, now: datetime | None = None) -> dict[str, Any]:
        end = now or datetime.now(UTC)
        start = end - timedelta(seconds=window_seconds)
        flt = event_service_pb2.EventFilter(kinds=[event_service_pb2.EVENT_KIND_JOB_STATE],
                                            time=common_pb2.TimeRange())
        flt.time.start.FromDatetime(start)
        events = self._paged("EventService", "ListEvents", event_service_pb2.ListEventsRequest(filter=flt),
                             "events", ANALYTICS_EVENT_CAP + 1)
        truncated = len(events) > ANALYTICS_EVENT_CAP
        changes = [c for c in (state_change(e) for e in events[:ANALYTICS_EVENT_CAP]) if c is not None]
        names = self.names()
        pilots = self._paged("BatchJobService", "ListBatchJobs", batch_job_service_pb2.ListBatchJobsRequest(),
                             "batch_jobs", 100_000)
        allocations = [a for a in (allocation(b) for b in pilots) if a is not None]
        ran = sorted({c.job_id for c in changes if "RUNNING" in c.entered})
        footprint: dict[int, float] = {}
        for i in range(0, min(len(ran), FOOTPRINT_LOOKUP_CAP), 500):
            request = job_service_pb2.ListJobsRequest(filter=job_pb2.JobFilter(ids=ran[i:i + 500]))
            for job in self._paged("JobService", "ListJobs", request, "jobs", 500):
                footprint[job.id] = max(job.resources.num_nodes, 1) / max(job.resources.node_packing_count, 1)
        # The SDK's analytics work in naive UTC (Timestamp.ToDatetime()). The charts span
        # the window's activity, not the whole window: a minute-old run is not a sliver.
        end_naive = end.replace(tzinfo=None)
        first = min((c.time for c in changes), default=end_naive - timedelta(seconds=60))
        chart_start = max(start.replace(tzinfo=None), first - timedelta(seconds=5))
        bin_seconds = max(5.0, (end_naive - chart_start).total_seconds() / 60)
        out = charts(changes, allocations, footprint, chart_start, end_naive, bin_seconds,
                     {i: s.name for i, s in names.sites.items()})
        out["truncated"] = truncated
        out["footprint_assumed"] = len(ran) > FOOTPRINT_LOOKUP_CAP
        return out

    # ---------------------------------------------------------------------------- jobs

    def job_filter(self, query: JobQuery, ids: list[int] | None = None) -> job_pb2.JobFilter:
        """The server's JobFilter for the page's selection (MatchesNothing when no job can
        match, e.g. a site name the user has not got)."""
        kwargs = query.sdk_filter()
        if ids is not None:
            kwargs["id"] = ids
        try:
            criteria = [(False, JOB_FILTER.normalize(kwargs))]
        except (TypeError, ValueError) as err:
            raise BadQuery(str(err)) from None
        return JOB_FILTER.build(criteria, resolve=self.client.resolve_names)  # type: ignore[return-value]

    def jobs_page(self, query: JobQuery) -> tuple[JobsPage, Names]:
        """One page of the selection, and the names its rows and the filter form show."""
        def page() -> Any:
            try:
                flt = self.job_filter(query)
            except MatchesNothing:
                return None
            return self.call("JobService", "ListJobs", job_service_pb2.ListJobsRequest(
                filter=flt, page_size=query.page_size, page_token=query.page_token, order_by=query.order,
                view=job_service_pb2.JOB_VIEW_FULL))

        response, names = together(page, self.names)
        if response is None:
            return JobsPage([], matches_nothing=True), names
        return JobsPage([job_row(j, names) for j in response.jobs], response.next_page_token), names

    def job_rows(self, query: JobQuery, ids: list[int], names: Names) -> list[dict[str, Any]]:
        """Rows of these jobs that match the page's selection (live: newly created jobs)."""
        try:
            flt = self.job_filter(query, ids)
        except MatchesNothing:
            return []
        response = self.call("JobService", "ListJobs", job_service_pb2.ListJobsRequest(
            filter=flt, page_size=len(ids), order_by=query.order, view=job_service_pb2.JOB_VIEW_FULL))
        return [job_row(j, names) for j in response.jobs]

    def count(self, query: JobQuery) -> int:
        try:
            flt = self.job_filter(query)
        except MatchesNothing:
            return 0
        return int(self.call("JobService", "CountJobs", job_service_pb2.CountJobsRequest(filter=flt)).total)

    def job(self, job_id: int) -> dict[str, Any]:
        """Everything the job's page shows; NotFound (raised by the SDK) for a job that is
        not the caller's."""
        job = self.call("JobService", "GetJob", job_service_pb2.GetJobRequest(id=job_id)).job
        history, transfers, parents, children, names = together(
            lambda: self._paged("EventService", "ListEvents", event_service_pb2.ListEventsRequest(
                filter=event_service_pb2.EventFilter(job_ids=[job_id],
                                                     kinds=[event_service_pb2.EVENT_KIND_JOB_STATE])),
                "events", HISTORY_LIMIT),
            lambda: self._paged("TransferService", "ListTransferItems",
                                transfer_item_service_pb2.ListTransferItemsRequest(
                                    filter=transfer_item_service_pb2.TransferItemFilter(job_ids=[job_id])),
                                "transfer_items", 1000),
            lambda: self._paged("JobService", "ListJobs", job_service_pb2.ListJobsRequest(
                filter=job_pb2.JobFilter(ids=list(job.parent_ids)[:RELATIVES_LIMIT]),
                view=job_service_pb2.JOB_VIEW_BASIC), "jobs", RELATIVES_LIMIT) if job.parent_ids else [],
            lambda: self._paged("JobService", "ListJobs", job_service_pb2.ListJobsRequest(
                filter=job_pb2.JobFilter(parent_ids=[job_id]), view=job_service_pb2.JOB_VIEW_BASIC),
                "jobs", RELATIVES_LIMIT),
            self.names)
        res = job.resources
        return {
            "row": job_row(job, names),
            "name": job.name, "priority": job.priority, "run_count": job.run_count,
            "state_message": job.state_message, "error_tail": job.error_tail,
            "return_code": job.return_code if job.HasField("return_code") else None,
            "parameters": dict(sorted(job.parameters.items())), "tags": dict(sorted(job.tags.items())),
            "data": _struct(job, "data"), "transfers": dict(sorted(job.transfers.items())),
            "resources": {"nodes": res.num_nodes, "ranks per node": res.ranks_per_node,
                          "threads per rank": res.threads_per_rank, "threads per core": res.threads_per_core,
                          "GPUs per rank": res.gpus_per_rank, "node packing": res.node_packing_count,
                          "wall time (min)": res.wall_time_min or "unknown",
                          **{f"launch {k}": v for k, v in sorted(res.launch_params.items())}},
            "batch_job_id": job.batch_job_id,
            "lease": ({"session": job.lease.session_id, "generation": job.lease.generation,
                       "expires": ts(job.lease.expire_time)} if job.HasField("lease") and job.lease.session_id
                      else None),
            "history": [event_row(e, names) for e in history],
            "history_truncated": len(history) >= HISTORY_LIMIT,
            "transfer_items": [transfer_row(t, names) for t in transfers],
            "parents": [job_row(j, names) for j in parents],
            "missing_parents": max(0, len(job.parent_ids) - len(parents)),
            "children": [job_row(j, names) for j in children],
            "final": state_of(job.state) in ("JOB_FINISHED", "FAILED", "KILLED"),
            "retryable": RETRY_AVAILABLE and state_of(job.state) in RETRYABLE_STATES,
        }

    def retry(self, job_id: int, reset_run_count: bool) -> None:
        """RetryJobs on one job; its refusal (not retryable, ...) raised as the SDK's error."""
        response = self.call("JobService", "RetryJobs", job_service_pb2.RetryJobsRequest(  # type: ignore[attr-defined]
            filter=job_pb2.JobFilter(ids=[job_id]), reset_run_count=reset_run_count))
        refused = [o for o in response.outcomes if o.code]
        if refused:
            raise FailedPrecondition(refused[0].message, reason=refused[0].reason or "NOT_RETRYABLE")

    def kill(self, job_id: int, message: str) -> Any:
        request = job_service_pb2.UpdateJobRequest(job=job_pb2.Job(
            id=job_id, state=job_pb2.JOB_STATE_KILLED, state_message=message))
        request.update_mask.paths.extend(["state", "state_message"])
        return self.call("JobService", "UpdateJob", request).job

    # ------------------------------------------------------------------ pilots, transfers

    def batch_jobs(self, site_ids: list[int], states: list[int], token: str) -> tuple[list[dict[str, Any]], str]:
        names = self.names()
        response = self.call("BatchJobService", "ListBatchJobs", batch_job_service_pb2.ListBatchJobsRequest(
            filter=batch_job_service_pb2.BatchJobFilter(site_ids=site_ids, states=states),
            page_size=LIST_PAGE, page_token=token))
        return [batch_job_row(b, names) for b in response.batch_jobs], response.next_page_token

    def transfers(self, site_ids: list[int], states: list[int], token: str) -> tuple[list[dict[str, Any]], str]:
        names = self.names()
        response = self.call("TransferService", "ListTransferItems", transfer_item_service_pb2.ListTransferItemsRequest(
            filter=transfer_item_service_pb2.TransferItemFilter(site_ids=site_ids, states=states),
            page_size=LIST_PAGE, page_token=token))
        return [transfer_row(t, names) for t in response.transfer_items], response.next_page_token


# ---------------------------------------------------------------------- row shapes

def job_row(job: Any, names: Names) -> dict[str, Any]:
    state = state_of(job.state)
    return {"id": job.id, "name": job.name, "workdir": job.workdir, "badge": badge(state),
            "app": names.app(job.app_id), "site": names.site(job.site_id), "site_id": job.site_id,
            "tags": ", ".join(f"{k}={v}" for k, v in sorted(job.tags.items())),
            "nodes": job.resources.num_nodes or 1, "created": ts(job.create_time), "changed": ts(job.state_time),
            "state_message": job.state_message}


def event_row(event: Any, names: Names) -> dict[str, Any]:
    which = event.WhichOneof("change")
    change = getattr(event, which) if which else None
    if which == "job_state":
        from_state, to_state = state_of(change.from_state), state_of(change.to_state)
    elif which == "transfer_state":
        enum = transfer_item_pb2.TransferState.DESCRIPTOR
        from_state, to_state = enum_name(enum, change.from_state), enum_name(enum, change.to_state)
    elif which == "batch_job_state":
        enum = batch_job_pb2.BatchJobState.DESCRIPTOR
        from_state, to_state = enum_name(enum, change.from_state), enum_name(enum, change.to_state)
    else:
        from_state = to_state = ""
    data = _struct(event, "data")
    return {"id": event.id, "job_id": event.job_id, "site": names.site(event.site_id), "time": ts(event.time),
            "from": from_state, "to": to_state, "to_badge": badge(to_state), "message": event.message,
            "data": data, "kind": which or ""}


def batch_job_row(b: Any, names: Names) -> dict[str, Any]:
    state = enum_name(batch_job_pb2.BatchJobState.DESCRIPTOR, b.state)
    return {"id": b.id, "site": names.site(b.site_id), "scheduler_id": b.scheduler_id or "",
            "badge": badge(state, BATCH_JOB_STYLE), "nodes": b.num_nodes, "wall_time_min": b.wall_time_min,
            "queue": b.queue, "project": b.project,
            "job_mode": enum_name(common_pb2.JobMode.DESCRIPTOR, b.job_mode) if b.job_mode else "",
            "status_info": b.status_info, "created": ts(b.create_time), "started": ts(b.start_time),
            "ended": ts(b.end_time)}


def transfer_row(t: Any, names: Names) -> dict[str, Any]:
    state = enum_name(transfer_item_pb2.TransferState.DESCRIPTOR, t.state)
    metrics = t.metrics
    rate = metrics.bytes / metrics.duration_seconds if metrics.duration_seconds > 0 else None
    return {"id": t.id, "job_id": t.job_id, "site": names.site(t.site_id), "slot": t.slot,
            "direction": enum_name(common_pb2.TransferDirection.DESCRIPTOR, t.direction).lower(),
            "location": t.location_alias, "remote_path": t.remote_path, "local_path": t.local_path,
            "badge": badge(state, TRANSFER_STYLE), "task_id": t.task_id, "error": t.error,
            "bytes": metrics.bytes, "files": metrics.files, "rate": rate, "updated": ts(t.update_time)}
