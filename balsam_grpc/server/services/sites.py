"""SiteService: sites of the caller.

Scoping rule for site-scoped tokens, applied by every resource servicer:
- objects of other users do not exist: NOT_FOUND, by id and in lists;
- an object of the same user at another site, addressed by id: PERMISSION_DENIED
  (the lookup is scoped to the owner first, so this reveals nothing about other users);
- lists are silently restricted to the token's site.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import grpc
from sqlalchemy import Connection

from balsam_grpc.core.errors import InvalidArgument
from balsam_grpc.server.convert import to_timestamp, utcnow
from balsam_grpc.server.principal import Principal
from balsam_grpc.server.rpc import stream, unary
from balsam_grpc.server.services.common import (
    Page,
    check_map,
    check_name,
    check_strings,
    mask_paths,
    mutate,
    only_site,
    require_id,
    too_large,
)
from balsam_grpc.server.services.site_convert import message_dict, site_to_pb
from balsam_grpc.server.services.site_stream import SiteHub
from balsam_grpc.server.state import ServerSettings, ServerState
from balsam_grpc.server.store import site_stats
from balsam_grpc.server.store import sites as store
from balsam_grpc.v1 import site_pb2, site_service_pb2, site_service_pb2_grpc

# Window of ListSiteStatistics: a minute by default (what a router reacts to), a day at most.
DEFAULT_STATS_WINDOW_S = 60.0
MAX_STATS_WINDOW_S = 86400.0
OUTPUT_ONLY = ("id", "owner", "scheduler_snapshot", "liveness", "create_time", "update_time")
_ALIAS = re.compile(r"^[A-Za-z0-9_.\-]+$")




def _site_values(site: site_pb2.Site, fields: Iterable[str], settings: ServerSettings) -> dict[str, Any]:
    """Validate the named fields of a Site message and return them as column values."""
    out: dict[str, Any] = {}
    for f in fields:
        if f == "name":
            out["name"] = check_name(site.name, "site.name")
        elif f == "hostname":
            if len(site.hostname) > 255:
                raise InvalidArgument("site.hostname is longer than 255 characters", field="site.hostname")
            out["hostname"] = site.hostname
        elif f == "path":
            if site.path and not site.path.startswith("/"):
                raise InvalidArgument(f"site.path must be absolute, got {site.path!r}", field="site.path")
            out["path"] = site.path
        elif f == "scheduler":
            if site.scheduler not in store.SCHEDULERS:
                raise InvalidArgument(f"site.scheduler {site.scheduler!r} is not supported; use one of "
                                      f"{', '.join(store.SCHEDULERS)}", field="site.scheduler")
            out["scheduler"] = site.scheduler
        elif f == "allowed_queues":
            out["allowed_queues"] = check_strings(site.allowed_queues, "site.allowed_queues", settings)
        elif f == "allowed_projects":
            out["allowed_projects"] = check_strings(site.allowed_projects, "site.allowed_projects", settings)
        elif f == "optional_batch_job_params":
            out["optional_batch_job_params"] = check_map(dict(site.optional_batch_job_params),
                                                         "site.optional_batch_job_params", settings)
        elif f == "transfer_locations":
            out["transfer_locations"] = _transfer_locations(site.transfer_locations, settings)
        elif f == "elastic_queue":
            out["elastic_queue"] = _elastic_queue(site.elastic_queue)
    return out


def _transfer_locations(locations: Sequence[site_pb2.TransferLocation], settings: ServerSettings
                        ) -> list[dict[str, str]]:
    field = "site.transfer_locations"
    if len(locations) > settings.max_map_entries:
        raise too_large(f"{field} has {len(locations)} entries; at most {settings.max_map_entries}", field)
    seen: set[str] = set()
    out = []
    for i, loc in enumerate(locations):
        if not _ALIAS.match(loc.alias):
            raise InvalidArgument(f"{field}[{i}].alias {loc.alias!r} must be non-empty letters, digits, '_', "
                                  "'.' or '-'", field=f"{field}[{i}].alias")
        if loc.alias in seen:
            raise InvalidArgument(f"{field}[{i}].alias {loc.alias!r} appears twice", field=f"{field}[{i}].alias")
        seen.add(loc.alias)
        if "://" not in loc.url:
            raise InvalidArgument(f"{field}[{i}].url {loc.url!r} must be a URL such as globus://<collection-id> "
                                  "or file:///path", field=f"{field}[{i}].url")
        out.append({"alias": loc.alias, "url": loc.url})
    return out


def _elastic_queue(eq: site_pb2.ElasticQueueSettings) -> dict[str, Any]:
    field = "site.elastic_queue"
    for name in ("min_nodes", "max_nodes", "min_wall_time_min", "max_wall_time_min", "max_queued",
                 "max_queue_wait_min", "max_total_nodes"):
        if getattr(eq, name) < 0:
            raise InvalidArgument(f"{field}.{name} must be >= 0", field=f"{field}.{name}")
    if eq.max_nodes and eq.min_nodes > eq.max_nodes:
        raise InvalidArgument(f"{field}.min_nodes ({eq.min_nodes}) exceeds max_nodes ({eq.max_nodes})",
                              field=f"{field}.min_nodes")
    if eq.max_wall_time_min and eq.min_wall_time_min > eq.max_wall_time_min:
        raise InvalidArgument(f"{field}.min_wall_time_min exceeds max_wall_time_min",
                              field=f"{field}.min_wall_time_min")
    if eq.job_mode.lower() not in ("", "serial", "mpi"):
        raise InvalidArgument(f"{field}.job_mode {eq.job_mode!r} must be serial or mpi", field=f"{field}.job_mode")
    return message_dict(eq)


class SiteServicer(site_service_pb2_grpc.SiteServiceServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.hub = SiteHub(state)

    @unary(job_token=True)
    async def GetSite(self, request: site_service_pb2.GetSiteRequest, context: Any,
                      principal: Principal) -> site_service_pb2.GetSiteResponse:
        require_id(request.id)
        row = await self.state.db.read(store.require_site, principal.user_id, request.id)
        principal.check_site(row["id"])
        return site_service_pb2.GetSiteResponse(site=site_to_pb(row, principal.username))

    @unary(job_token=True)
    async def ListSites(self, request: site_service_pb2.ListSitesRequest, context: Any,
                        principal: Principal) -> site_service_pb2.ListSitesResponse:
        page = Page("ListSites", principal, request)
        f = request.filter
        q = store.SiteQuery(owner_id=principal.user_id, ids=list(f.ids), names=list(f.names),
                            connected=f.connected if f.HasField("connected") else None,
                            only_site_id=only_site(principal))
        rows = await self.state.db.read(lambda conn: store.list_sites(conn, q, after_id=page.after_id(),
                                                                      limit=page.limit))
        found, token = page.finish(rows, lambda r: site_to_pb(r, principal.username))
        return site_service_pb2.ListSitesResponse(sites=found, next_page_token=token)

    @unary()
    async def CreateSite(self, request: site_service_pb2.CreateSiteRequest, context: Any,
                         principal: Principal) -> site_service_pb2.CreateSiteResponse:
        principal.require_user_scope("create sites")
        site = site_pb2.Site()
        site.CopyFrom(request.site)
        if not site.scheduler:
            site.scheduler = "local"
        values = _site_values(site, store.MUTABLE, self.state.settings)

        def build(conn: Connection) -> site_service_pb2.CreateSiteResponse:
            row = store.create_site(conn, principal.user_id, values, utcnow())
            return site_service_pb2.CreateSiteResponse(site=site_to_pb(row, principal.username))

        return await mutate(self.state, principal, "SiteService.CreateSite", request,
                            site_service_pb2.CreateSiteResponse, build)

    @unary()
    async def UpdateSite(self, request: site_service_pb2.UpdateSiteRequest, context: Any,
                         principal: Principal) -> site_service_pb2.UpdateSiteResponse:
        site_id = require_id(request.site.id, "site.id")
        paths = mask_paths(request.update_mask, resource="site", mutable=store.MUTABLE, output_only=OUTPUT_ONLY,
                           example="'hostname'")
        values = _site_values(request.site, paths, self.state.settings)

        def build(conn: Connection) -> site_service_pb2.UpdateSiteResponse:
            store.require_site(conn, principal.user_id, site_id, field="site.id", for_update=True)
            principal.check_site(site_id)
            row = store.update_site(conn, principal.user_id, site_id, values, utcnow())
            return site_service_pb2.UpdateSiteResponse(site=site_to_pb(row, principal.username))

        return await mutate(self.state, principal, "SiteService.UpdateSite", request,
                            site_service_pb2.UpdateSiteResponse, build)

    @unary()
    async def DeleteSite(self, request: site_service_pb2.DeleteSiteRequest, context: Any,
                         principal: Principal) -> site_service_pb2.DeleteSiteResponse:
        require_id(request.id)

        def work(conn: Connection) -> None:
            store.require_site(conn, principal.user_id, request.id)
            principal.require_user_scope("delete sites")
            store.delete_site(conn, principal.user_id, request.id)

        await self.state.db.write(work)
        return site_service_pb2.DeleteSiteResponse(id=request.id)

    @unary()
    async def ListSiteStatistics(self, request: site_service_pb2.ListSiteStatisticsRequest, context: Any,
                                 principal: Principal) -> site_service_pb2.ListSiteStatisticsResponse:
        """Live figures per site for routing: store/site_stats.py."""
        window = request.window_seconds or DEFAULT_STATS_WINDOW_S
        if not 0 < window <= MAX_STATS_WINDOW_S:
            raise InvalidArgument(f"window_seconds must be in (0, {MAX_STATS_WINDOW_S:g}], got {window:g}",
                                  field="window_seconds")
        f = request.filter
        q = store.SiteQuery(owner_id=principal.user_id, ids=list(f.ids), names=list(f.names),
                            connected=f.connected if f.HasField("connected") else None,
                            only_site_id=only_site(principal))
        now = utcnow()
        figures = await self.state.db.read(
            lambda conn: site_stats.site_statistics(conn, q, now=now, window_seconds=window))
        return site_service_pb2.ListSiteStatisticsResponse(
            sites=[site_service_pb2.SiteStatistics(**site_stats.as_fields(fig),
                                                   last_seen_time=to_timestamp(fig.last_seen_time))
                   for fig in figures],
            time=to_timestamp(now), window_seconds=window)

    @stream
    async def Connect(self, request_iterator: Any, context: grpc.aio.ServicerContext,
                      principal: Principal) -> AsyncIterator[site_service_pb2.SiteServiceConnectResponse]:
        """The site daemon's work stream: services/site_stream.py."""
        async for msg in self.hub.serve(request_iterator, context, principal):
            yield msg

