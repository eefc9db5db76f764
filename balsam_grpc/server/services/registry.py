"""Which servicer implements each service. The two work streams (SiteService.Connect,
SessionService.Connect) answer UNIMPLEMENTED until the site and launcher issues land."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from balsam_grpc.server.state import ServerState
from balsam_grpc.v1 import (
    app_service_pb2_grpc,
    auth_service_pb2_grpc,
    batch_job_service_pb2_grpc,
    event_service_pb2_grpc,
    job_service_pb2_grpc,
    session_service_pb2_grpc,
    site_service_pb2_grpc,
    transfer_item_service_pb2_grpc,
)


def servicers(state: ServerState) -> list[tuple[Callable[[Any, Any], None], Any]]:
    from balsam_grpc.server.services.apps import AppServicer
    from balsam_grpc.server.services.auth import AuthServicer
    from balsam_grpc.server.services.batch_jobs import BatchJobServicer
    from balsam_grpc.server.services.events import EventServicer
    from balsam_grpc.server.services.jobs import JobServicer
    from balsam_grpc.server.services.sessions import SessionServicer
    from balsam_grpc.server.services.sites import SiteServicer
    from balsam_grpc.server.services.transfers import TransferServicer

    return [
        (job_service_pb2_grpc.add_JobServiceServicer_to_server, JobServicer(state)),
        (event_service_pb2_grpc.add_EventServiceServicer_to_server, EventServicer(state)),
        (site_service_pb2_grpc.add_SiteServiceServicer_to_server, SiteServicer(state)),
        (app_service_pb2_grpc.add_AppServiceServicer_to_server, AppServicer(state)),
        (batch_job_service_pb2_grpc.add_BatchJobServiceServicer_to_server, BatchJobServicer(state)),
        (transfer_item_service_pb2_grpc.add_TransferServiceServicer_to_server, TransferServicer(state)),
        (session_service_pb2_grpc.add_SessionServiceServicer_to_server, SessionServicer(state)),
        (auth_service_pb2_grpc.add_AuthServiceServicer_to_server, AuthServicer(state)),
    ]
