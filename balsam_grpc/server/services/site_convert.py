"""The one place a sites row becomes a Site message."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from balsam_grpc.server.convert import to_timestamp
from balsam_grpc.v1 import site_pb2


def message_dict(msg: Message) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)


def site_to_pb(row: dict[str, Any], owner: str) -> site_pb2.Site:
    site = site_pb2.Site(
        id=row["id"], name=row["name"], hostname=row["hostname"], path=row["path"], owner=owner,
        scheduler=row["scheduler"], allowed_queues=row["allowed_queues"] or [],
        allowed_projects=row["allowed_projects"] or [],
        optional_batch_job_params=row["optional_batch_job_params"] or {},
        transfer_locations=[site_pb2.TransferLocation(alias=t.get("alias", ""), url=t.get("url", ""))
                            for t in row["transfer_locations"] or []],
        liveness=site_pb2.SiteLiveness(connected=bool(row["connected"]),
                                       last_seen_time=to_timestamp(row["last_seen_time"]),
                                       daemon_version=row["daemon_version"] or "",
                                       daemon_hostname=row["daemon_hostname"] or ""),
        create_time=to_timestamp(row["create_time"]), update_time=to_timestamp(row["update_time"]),
    )
    if row["elastic_queue"]:
        json_format.ParseDict(row["elastic_queue"], site.elastic_queue, ignore_unknown_fields=True)
    if row["scheduler_snapshot"]:
        json_format.ParseDict(row["scheduler_snapshot"], site.scheduler_snapshot, ignore_unknown_fields=True)
    return site
