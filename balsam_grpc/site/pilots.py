"""The driver of the elastic queue and the queue maintainer: applies the pure plans of
`balsam_grpc.site.elastic` through BatchJobService.

Evaluations run one at a time: when the server pushes a new backlog (at once, no loop
period decides latency) and every `check_seconds` (for wait timeouts). Pilots are
created with CreateBatchJob (PENDING_SUBMISSION); the server then offers "submit:<id>"
work back on the stream, so every pilot is recorded before it reaches the scheduler.

One pilot per intended pilot: each CreateBatchJob gets a request_id that is journaled with
the request before it is sent and kept until an answer is seen. A lost answer
(UNAVAILABLE, DEADLINE_EXCEEDED) is retried with the same request, so the server answers
with the pilot it already made; requests still unanswered when the retries (or the daemon)
end are sent again, unchanged, before the next evaluation plans anything.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import grpc
import structlog
from google.protobuf import field_mask_pb2

from balsam_grpc.core.aio import wait_event
from balsam_grpc.site.elastic import (
    Backlog,
    Pilot,
    Plan,
    Window,
    plan_elastic,
    plan_maintainer,
)
from balsam_grpc.site.journal import Journal, PilotRequest
from balsam_grpc.site.settings import SiteSettings
from balsam_grpc.v1 import (
    batch_job_pb2,
    batch_job_service_pb2,
    batch_job_service_pb2_grpc,
    common_pb2,
    site_service_pb2,
)

log = structlog.get_logger(__name__)

BJ = batch_job_pb2
_ACTIVE = [BJ.BATCH_JOB_STATE_PENDING_SUBMISSION, BJ.BATCH_JOB_STATE_QUEUED, BJ.BATCH_JOB_STATE_RUNNING]
_MODES = {"serial": common_pb2.JOB_MODE_SERIAL, "mpi": common_pb2.JOB_MODE_MPI}
# Codes after which the server may or may not have created the pilot: same request again.
RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
CREATE_RETRY_DELAYS_S: tuple[float, ...] = (0.5, 1, 2, 4, 8)
# Codes that say the server did not and will not create this pilot: the request is dropped
# (the next plan asks again if the pilot is still wanted). Any other code leaves it
# journaled, to be sent again as is.
REFUSAL_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNIMPLEMENTED})


def backlog_from_pb(msg: site_service_pb2.SiteBacklog) -> Backlog:
    return Backlog(runnable_jobs=msg.runnable_jobs, runnable_node_footprint=msg.runnable_node_footprint,
                   max_job_nodes=msg.max_job_nodes, max_wall_time_min=msg.max_wall_time_min,
                   pending_jobs=msg.pending_jobs, running_jobs=msg.running_jobs,
                   active_sessions=msg.active_sessions)


def state_name(state: int) -> str:
    return BJ.BatchJobState.Name(state).removeprefix("BATCH_JOB_STATE_").lower()


class PilotDriver:
    def __init__(self, *, settings: SiteSettings, channel: grpc.aio.Channel, token: str | Callable[[], str],
                 journal: Journal,
                 windows: Callable[[], list[Any]], still_queued: Callable[[int], Awaitable[bool]]) -> None:
        self.settings = settings
        self.stub = batch_job_service_pb2_grpc.BatchJobServiceStub(channel)
        self.token = token if callable(token) else (lambda: token)  # asked per call: renewals apply
        self.journal = journal
        self.windows = windows
        self.still_queued = still_queued
        self.backlog: Backlog | None = None
        self._wake = asyncio.Event()
        self.evaluations = 0
        self.retry_delays_s = CREATE_RETRY_DELAYS_S

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token()}"),)

    @property
    def enabled(self) -> bool:
        return self.settings.elastic_queue.enabled or self.settings.queue_maintainer.enabled

    def on_backlog(self, msg: site_service_pb2.SiteBacklog) -> None:
        self.backlog = backlog_from_pb(msg)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        period = self.settings.elastic_queue.check_seconds
        while True:
            await wait_event(self._wake, period)
            self._wake.clear()
            try:
                await self.evaluate()
            except grpc.aio.AioRpcError as exc:
                log.warning("pilot evaluation failed", code=exc.code().name, details=exc.details())
            except Exception:
                log.exception("pilot evaluation failed")

    async def list_pilots(self) -> list[batch_job_pb2.BatchJob]:
        out: list[batch_job_pb2.BatchJob] = []
        token = ""
        while True:
            resp = await self.stub.ListBatchJobs(batch_job_service_pb2.ListBatchJobsRequest(
                filter=batch_job_service_pb2.BatchJobFilter(site_ids=[self.settings.site_id]), page_token=token,
                page_size=500), metadata=self.metadata, timeout=30)
            out.extend(resp.batch_jobs)
            token = resp.next_page_token
            if not token:
                return out

    async def evaluate(self) -> None:
        if not self.enabled or (self.settings.elastic_queue.enabled and self.backlog is None
                                and not self.settings.queue_maintainer.enabled):
            return
        self.evaluations += 1
        # Requests whose answer was never seen first: the plan must count those pilots.
        for request in self.journal.pilot_requests():
            await self.create(request)
        jobs = [bj for bj in await self.list_pilots() if bj.state in _ACTIVE]
        now = datetime.now(UTC)

        def pilot(bj: batch_job_pb2.BatchJob, origin: str) -> Pilot:
            return Pilot(id=bj.id, state=state_name(bj.state), num_nodes=bj.num_nodes,
                         wall_time_min=bj.wall_time_min, create_time=bj.create_time.ToDatetime(UTC),
                         elastic=self.journal.pilot_origin(bj.id) == origin)

        if self.settings.elastic_queue.enabled and self.backlog is not None:
            # Pilots restricted by tags or partitions may not serve the backlog: not supply.
            usable = [pilot(bj, "elastic") for bj in jobs if not bj.filter_tags and not bj.partitions]
            windows = [Window(getattr(w, "queue", ""), int(w.num_nodes), int(w.wall_time_min)) for w in self.windows()]
            plan = plan_elastic(self.backlog, usable, self.settings.elastic_queue, now=now, windows=windows)
            await self.apply(plan, "elastic")
        if self.settings.queue_maintainer.enabled:
            mine = [pilot(bj, "maintainer") for bj in jobs if self.journal.pilot_origin(bj.id) == "maintainer"]
            await self.apply(plan_maintainer(mine, self.settings.queue_maintainer), "maintainer")

    async def apply(self, plan: Plan, origin: str) -> None:
        for bid in plan.withdraw:
            if not await self.still_queued(bid):
                log.info("pilot not withdrawn: the scheduler no longer shows it queued", batch_job_id=bid)
                continue
            log.info("withdrawing pilot", batch_job_id=bid, reason=plan.withdraw_reason, origin=origin)
            try:
                await self.stub.UpdateBatchJob(batch_job_service_pb2.UpdateBatchJobRequest(
                    batch_job=BJ.BatchJob(id=bid, state=BJ.BATCH_JOB_STATE_PENDING_DELETION),
                    update_mask=field_mask_pb2.FieldMask(paths=["state"]), request_id=str(uuid.uuid4())),
                    metadata=self.metadata, timeout=30)
            except grpc.aio.AioRpcError as exc:  # it may have started meanwhile: fine
                log.info("pilot not withdrawn", batch_job_id=bid, code=exc.code().name, details=exc.details())
        for req in plan.create:
            request = PilotRequest(
                request_id=f"pilot-{self.settings.site_id}-{origin}-{uuid.uuid4().hex}", origin=origin,
                batch_job={"site_id": self.settings.site_id, "num_nodes": req.num_nodes,
                           "wall_time_min": req.wall_time_min, "queue": req.queue, "project": req.project,
                           "job_mode": _MODES[req.job_mode]},
                reason=req.reason)
            # Journaled before it is sent: a daemon killed before the answer resends it as is.
            self.journal.record_pilot_request(request)
            await self.create(request)

    async def create(self, request: PilotRequest) -> int | None:
        """Send one pilot request until it is answered (the pilot id) or refused (None). A
        request still unanswered after the retries stays journaled and the error is raised:
        the next evaluation sends it again before planning."""
        msg = batch_job_service_pb2.CreateBatchJobRequest(batch_job=BJ.BatchJob(**request.batch_job),
                                                          request_id=request.request_id)
        for attempt, delay in enumerate((*self.retry_delays_s, None)):
            try:
                resp = await self.stub.CreateBatchJob(msg, metadata=self.metadata, timeout=30)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in REFUSAL_CODES:
                    log.warning("pilot request refused", request_id=request.request_id, code=exc.code().name,
                                details=exc.details())
                    self.journal.drop_pilot_request(request.request_id)
                    return None
                if exc.code() not in RETRY_CODES or delay is None:
                    raise  # kept in the journal: sent again at the next evaluation
                log.info("pilot request unanswered; sending it again", request_id=request.request_id,
                         code=exc.code().name, attempt=attempt + 1, in_seconds=delay)
                await asyncio.sleep(delay)
                continue
            bid = resp.batch_job.id
            self.journal.pilot_created(request.request_id, bid, request.origin)
            log.info("pilot requested", batch_job_id=bid, origin=request.origin,
                     nodes=request.batch_job.get("num_nodes"), wall_time_min=request.batch_job.get("wall_time_min"),
                     reason=request.reason, request_id=request.request_id)
            return bid
        return None  # not reached: the last attempt returns or raises
