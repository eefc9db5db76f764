"""Which servicer implements each service.

Servicers are registered through `wire.register` rather than the generated
add_*Servicer_to_server functions, so a request that does not parse is answered
INVALID_ARGUMENT instead of grpc's UNKNOWN."""

from __future__ import annotations

from typing import Any

from balsam_grpc.server.state import ServerState


def servicers(state: ServerState) -> dict[str, Any]:
    """The servicer of each service, by its short name in core.services.SERVICES."""
    from balsam_grpc.server.services.apps import AppServicer
    from balsam_grpc.server.services.auth import AuthServicer
    from balsam_grpc.server.services.batch_jobs import BatchJobServicer
    from balsam_grpc.server.services.events import EventServicer
    from balsam_grpc.server.services.jobs import JobServicer
    from balsam_grpc.server.services.sessions import SessionServicer
    from balsam_grpc.server.services.sites import SiteServicer
    from balsam_grpc.server.services.transfers import TransferServicer

    return {
        "JobService": JobServicer(state),
        "EventService": EventServicer(state),
        "SiteService": SiteServicer(state),
        "AppService": AppServicer(state),
        "BatchJobService": BatchJobServicer(state),
        "TransferService": TransferServicer(state),
        "SessionService": SessionServicer(state),
        "AuthService": AuthServicer(state),
    }
