"""TransferService: read transfer items and retry failed ones."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from balsam_grpc.core.errors import InvalidArgument
from balsam_grpc.server.convert import EnumCodec, to_timestamp, utcnow
from balsam_grpc.server.principal import Principal
from balsam_grpc.server.rpc import unary
from balsam_grpc.server.services.common import Page, mask_paths, mutate, only_site, require_id
from balsam_grpc.server.state import ServerState
from balsam_grpc.server.store import transfers as store
from balsam_grpc.v1 import common_pb2, transfer_item_pb2, transfer_item_service_pb2, transfer_item_service_pb2_grpc

STATE = EnumCodec(transfer_item_pb2.TransferState, "TRANSFER_STATE_")
DIRECTION = EnumCodec(common_pb2.TransferDirection, "TRANSFER_DIRECTION_")

MUTABLE = ("state", "error", "task_id", "metrics")
OUTPUT_ONLY = ("id", "job_id", "site_id", "create_time", "update_time", "job_workdir")
IMMUTABLE = ("direction", "slot", "location_alias", "remote_path", "local_path", "recursive")
MAX_ERROR_CHARS = 16_384


def transfer_to_pb(row: dict[str, Any]) -> transfer_item_pb2.TransferItem:
    """The one place a transfer_items row becomes a TransferItem message."""
    return transfer_item_pb2.TransferItem(
        id=row["id"], job_id=row["job_id"], site_id=row["site_id"], direction=DIRECTION.number(row["direction"]),
        slot=row["slot"], location_alias=row["location_alias"], remote_path=row["remote_path"],
        local_path=row["local_path"], recursive=bool(row["recursive"]), state=STATE.number(row["state"]),
        task_id=row["task_id"], error=row["error"],
        metrics=transfer_item_pb2.TransferMetrics(bytes=row["bytes"], files=row["files"],
                                                  duration_seconds=row["duration_seconds"]),
        create_time=to_timestamp(row["create_time"]), update_time=to_timestamp(row["update_time"]),
        job_workdir=row.get("job_workdir") or "",
    )


def _values(item: transfer_item_pb2.TransferItem, paths: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "error" in paths:
        if len(item.error) > MAX_ERROR_CHARS:
            raise InvalidArgument(f"transfer_item.error is longer than {MAX_ERROR_CHARS} characters",
                                  field="transfer_item.error")
        out["error"] = item.error
    if "task_id" in paths:
        if len(item.task_id) > 128:
            raise InvalidArgument("transfer_item.task_id is longer than 128 characters", field="transfer_item.task_id")
        out["task_id"] = item.task_id
    if "metrics" in paths:
        m = item.metrics
        for name in ("bytes", "files", "duration_seconds"):
            if getattr(m, name) < 0:
                raise InvalidArgument(f"transfer_item.metrics.{name} must be >= 0",
                                      field=f"transfer_item.metrics.{name}")
        out.update(bytes=m.bytes, files=m.files, duration_seconds=m.duration_seconds)
    return out


class TransferServicer(transfer_item_service_pb2_grpc.TransferServiceServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state

    @unary()
    async def GetTransferItem(self, request: transfer_item_service_pb2.GetTransferItemRequest, context: Any,
                              principal: Principal) -> transfer_item_service_pb2.GetTransferItemResponse:
        require_id(request.id)
        row = await self.state.db.read(store.require_item, principal.user_id, request.id)
        principal.check_site(row["site_id"])
        return transfer_item_service_pb2.GetTransferItemResponse(transfer_item=transfer_to_pb(row))

    @unary()
    async def ListTransferItems(self, request: transfer_item_service_pb2.ListTransferItemsRequest, context: Any,
                                principal: Principal) -> transfer_item_service_pb2.ListTransferItemsResponse:
        page = Page("ListTransferItems", principal, request)
        f = request.filter
        q = store.TransferQuery(
            owner_id=principal.user_id, ids=list(f.ids), job_ids=list(f.job_ids), site_ids=list(f.site_ids),
            states=STATE.names(f.states, "filter.states"),
            direction=DIRECTION.name(f.direction, "filter.direction") if f.direction else "",
            task_id=f.task_id, only_site_id=only_site(principal))
        after = page.after_id()
        rows = await self.state.db.read(lambda conn: store.list_items(conn, q, after_id=after, limit=page.limit))
        found, token = page.finish(rows, transfer_to_pb)
        return transfer_item_service_pb2.ListTransferItemsResponse(transfer_items=found, next_page_token=token)

    @unary()
    async def UpdateTransferItem(self, request: transfer_item_service_pb2.UpdateTransferItemRequest, context: Any,
                                 principal: Principal) -> transfer_item_service_pb2.UpdateTransferItemResponse:
        item = request.transfer_item
        item_id = require_id(item.id, "transfer_item.id")
        paths = mask_paths(request.update_mask, resource="transfer_item", mutable=MUTABLE, output_only=OUTPUT_ONLY,
                           immutable=IMMUTABLE, example="'state' with state PENDING to retry a failed transfer")
        new_state = STATE.name(item.state, "transfer_item.state") if "state" in paths else None
        values = _values(item, paths)

        def build(conn: Connection) -> transfer_item_service_pb2.UpdateTransferItemResponse:
            row = store.require_item(conn, principal.user_id, item_id, field="transfer_item.id", for_update=True)
            principal.check_site(row["site_id"])
            out = store.update_item(conn, row, values, new_state, utcnow())
            return transfer_item_service_pb2.UpdateTransferItemResponse(transfer_item=transfer_to_pb(out))

        return await mutate(self.state, principal, "TransferService.UpdateTransferItem", request,
                            transfer_item_service_pb2.UpdateTransferItemResponse, build)
