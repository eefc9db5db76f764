"""balsam-grpc Python SDK: what experiment control software imports.

    from balsam_grpc.sdk import Client, Job, App, Site

    client = Client()                              # profile / BALSAM_SERVER + BALSAM_TOKEN
    app = client.apps.get(name="eigen", site_id=site.id)
    job = app.submit("runs/1", input="a.h5", tags={"exp": "xpcs"}, num_nodes=1)
    print(job.result(timeout=600))                 # driven by WatchEvents, no polling
    client.jobs.filter(tags={"exp": "xpcs"}, state=["FAILED", "KILLED"]).update(state="RESTART_READY")
    for event in client.watch(tags={"exp": "xpcs"}):
        print(event.job_id, event.from_state, "->", event.to_state)

`Model.objects` (Job.objects, ...) uses a default Client made from the profile on first
use; `set_default_client()` replaces it.
"""

from __future__ import annotations

from balsam_grpc.sdk.apps import ApplicationDefinition, SyncResult, resolve_site_id, submit, sync_apps
from balsam_grpc.sdk.client import Client, default_client, set_default_client
from balsam_grpc.sdk.errors import (
    Aborted,
    AlreadyExists,
    BalsamError,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    JobFailed,
    MultipleObjectsReturned,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from balsam_grpc.sdk.filters import parse_tags
from balsam_grpc.sdk.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION, as_completed, wait
from balsam_grpc.sdk.models import App, BatchJob, Event, Job, Manager, Site, TransferItem
from balsam_grpc.sdk.query import BulkResult, Outcome, Query
from balsam_grpc.sdk.watch import EventStream


def watch(*, since_cursor: str | None = None, replay: bool = False, **filters: object) -> EventStream:
    """Events matching `filters` as they happen, through the default client (see Client.watch)."""
    return default_client().watch(since_cursor=since_cursor, replay=replay, **filters)


__all__ = [
    "ALL_COMPLETED", "FIRST_COMPLETED", "FIRST_EXCEPTION", "Aborted", "AlreadyExists", "App",
    "ApplicationDefinition", "BalsamError", "BatchJob", "BulkResult", "Client", "DeadlineExceeded", "Event",
    "EventStream", "FailedPrecondition", "InvalidArgument", "Job", "JobFailed", "Manager", "MultipleObjectsReturned",
    "NotFound", "Outcome", "PermissionDenied", "Query", "ResourceExhausted", "Site", "SyncResult", "TransferItem",
    "Unauthenticated", "Unavailable", "as_completed", "default_client", "parse_tags", "resolve_site_id",
    "set_default_client",
    "submit", "sync_apps", "wait", "watch",
]
