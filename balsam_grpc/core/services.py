"""The eight balsam.v1 services in one table: each one's descriptor (for registration,
health and reflection on the server) and its generated client stub (for the SDK)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from google.protobuf.descriptor import ServiceDescriptor

from balsam_grpc.v1 import (
    app_service_pb2,
    app_service_pb2_grpc,
    auth_service_pb2,
    auth_service_pb2_grpc,
    batch_job_service_pb2,
    batch_job_service_pb2_grpc,
    event_service_pb2,
    event_service_pb2_grpc,
    job_service_pb2,
    job_service_pb2_grpc,
    session_service_pb2,
    session_service_pb2_grpc,
    site_service_pb2,
    site_service_pb2_grpc,
    transfer_item_service_pb2,
    transfer_item_service_pb2_grpc,
)


@dataclass(frozen=True)
class Service:
    name: str  # short name, e.g. "JobService"
    descriptor: ServiceDescriptor
    stub: Callable[[Any], Any]  # generated stub class: stub(channel)

    @property
    def full_name(self) -> str:
        return self.descriptor.full_name


def _service(pb2: ModuleType, pb2_grpc: ModuleType, name: str) -> Service:
    return Service(name, pb2.DESCRIPTOR.services_by_name[name], getattr(pb2_grpc, f"{name}Stub"))


SERVICES: dict[str, Service] = {s.name: s for s in (
    _service(site_service_pb2, site_service_pb2_grpc, "SiteService"),
    _service(app_service_pb2, app_service_pb2_grpc, "AppService"),
    _service(job_service_pb2, job_service_pb2_grpc, "JobService"),
    _service(batch_job_service_pb2, batch_job_service_pb2_grpc, "BatchJobService"),
    _service(transfer_item_service_pb2, transfer_item_service_pb2_grpc, "TransferService"),
    _service(session_service_pb2, session_service_pb2_grpc, "SessionService"),
    _service(event_service_pb2, event_service_pb2_grpc, "EventService"),
    _service(auth_service_pb2, auth_service_pb2_grpc, "AuthService"),
)}
