"""SessionService: read launcher sessions, close them, and the launcher's stream
(Connect, in services/session_stream.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import grpc

from balsam_grpc.core.errors import InvalidArgument
from balsam_grpc.server.convert import aware, utcnow
from balsam_grpc.server.principal import Principal
from balsam_grpc.server.rpc import stream, unary
from balsam_grpc.server.services.session_convert import STATE, session_to_pb
from balsam_grpc.server.services.session_stream import SessionStream
from balsam_grpc.server.services.common import Page, only_site
from balsam_grpc.server.state import ServerState
from balsam_grpc.server.store import sessions as store
from balsam_grpc.v1 import session_service_pb2, session_service_pb2_grpc

MAX_SESSION_ID = 32


def _session_id(value: str, field: str = "id") -> str:
    if not value:
        raise InvalidArgument(f"{field} is required", field=field)
    if len(value) > MAX_SESSION_ID:
        raise InvalidArgument(f"{field} is longer than {MAX_SESSION_ID} characters", field=field)
    return value


def _page_key(row: dict[str, Any]) -> list[Any]:
    return [aware(row["create_time"]).isoformat(), row["id"]]  # type: ignore[union-attr]


def _after(page: Page) -> tuple[datetime, str] | None:
    if page.last is None:
        return None
    try:
        created, sid = page.last
        return datetime.fromisoformat(created), str(sid)
    except (TypeError, ValueError):
        raise InvalidArgument("page_token is corrupt; pass the next_page_token of the previous response unchanged",
                              reason="INVALID_PAGE_TOKEN", field="page_token") from None


class SessionServicer(session_service_pb2_grpc.SessionServiceServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state

    @unary()
    async def GetSession(self, request: session_service_pb2.GetSessionRequest, context: Any,
                         principal: Principal) -> session_service_pb2.GetSessionResponse:
        row = await self.state.db.read(store.require_session, principal.user_id, _session_id(request.id))
        principal.check_site(row["site_id"])
        return session_service_pb2.GetSessionResponse(session=session_to_pb(row))

    @unary()
    async def ListSessions(self, request: session_service_pb2.ListSessionsRequest, context: Any,
                           principal: Principal) -> session_service_pb2.ListSessionsResponse:
        page = Page("ListSessions", principal, request)
        f = request.filter
        q = store.SessionQuery(owner_id=principal.user_id, ids=list(f.ids), site_ids=list(f.site_ids),
                               batch_job_ids=list(f.batch_job_ids), states=STATE.names(f.states, "filter.states"),
                               only_site_id=only_site(principal))
        after = _after(page)
        rows = await self.state.db.read(lambda conn: store.list_sessions(conn, q, after=after, limit=page.limit))
        found, token = page.finish(rows, session_to_pb, _page_key)
        return session_service_pb2.ListSessionsResponse(sessions=found, next_page_token=token)

    @unary()
    async def DeleteSession(self, request: session_service_pb2.DeleteSessionRequest, context: Any,
                            principal: Principal) -> session_service_pb2.DeleteSessionResponse:
        session_id = _session_id(request.id)

        def work(conn: Any) -> None:
            row = store.require_session(conn, principal.user_id, session_id)
            principal.check_site(row["site_id"])
            store.close_session(conn, principal.user_id, session_id, utcnow())

        await self.state.db.write(work)
        self.state.sessions.closed(session_id)
        return session_service_pb2.DeleteSessionResponse(id=session_id)

    @stream
    async def Connect(self, request_iterator: Any, context: grpc.aio.ServicerContext,
                      principal: Principal) -> AsyncIterator[session_service_pb2.SessionServiceConnectResponse]:
        async for response in SessionStream(self.state, principal).run(request_iterator):
            yield response
