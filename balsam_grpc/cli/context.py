"""The CLI's connection (an SDK `Client` from the profile) and the lookups every command
shares: job filters as the server's JobFilter, paging, and id -> name maps for tables."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

from balsam_grpc.cli.errors import fail, usage
from balsam_grpc.cli.filters import JobSelection
from balsam_grpc.core.settings import profile_path
from balsam_grpc.sdk.client import Client
from balsam_grpc.sdk.filters import JOB_FILTER, MatchesNothing
from balsam_grpc.v1 import (
    app_pb2,
    app_service_pb2,
    job_pb2,
    job_service_pb2,
    site_pb2,
    site_service_pb2,
)

PAGE_SIZE = 1000


@functools.cache
def client() -> Client:
    """One client per CLI run, from BALSAM_SERVER/BALSAM_TOKEN or the profile file."""
    c = Client()
    if not c.token:
        fail(f"no token: run `balsamctl login`, or start a server on this machine (it writes {profile_path()})")
    return c


def paged(service: str, method: str, request: Any, items_field: str, *, limit: int | None = None,
          page_size: int = PAGE_SIZE) -> Iterator[Any]:
    """Every item of a List call, page after page, stopping at `limit`."""
    c = client()
    seen = 0
    while True:
        request.page_size = min(page_size, limit - seen) if limit else page_size
        response = c.call(service, method, request)
        for item in getattr(response, items_field):
            yield item
            seen += 1
            if limit and seen >= limit:
                return
        if not response.next_page_token:
            return
        request.page_token = response.next_page_token


# ------------------------------------------------------------------- sites and apps

@functools.cache
def sites() -> dict[int, site_pb2.Site]:
    request = site_service_pb2.ListSitesRequest()
    return {s.id: s for s in paged("SiteService", "ListSites", request, "sites")}


@functools.cache
def apps() -> dict[int, app_pb2.App]:
    request = app_service_pb2.ListAppsRequest()
    return {a.id: a for a in paged("AppService", "ListApps", request, "apps")}


def site_name(site_id: int) -> str:
    site = sites().get(site_id)
    return site.name if site else str(site_id or "")


def app_name(app_id: int) -> str:
    app = apps().get(app_id)
    return app.name if app else str(app_id or "")


def resolve_site(ref: int | str) -> site_pb2.Site:
    """A site by id or name; a usage error (exit 2, as for any bad option value) when the
    caller has none such."""
    by_id = sites()
    if isinstance(ref, int) and ref in by_id:
        return by_id[ref]
    found = [s for s in by_id.values() if s.name == ref or str(s.id) == str(ref)]
    if not found:
        known = ", ".join(sorted(s.name for s in by_id.values())) or "none yet (balsamctl site init)"
        usage(f"no site {ref!r}; your sites: {known}")
    return found[0]


def resolve_app(ref: int | str, site: int | str | None = None) -> app_pb2.App:
    """An app by id, or by name (with a site when the name exists at several); a usage
    error when there is none such."""
    site_id = resolve_site(site).id if site is not None else None
    candidates = [a for a in apps().values()
                  if (a.id == ref if isinstance(ref, int) else a.name == ref)
                  and (site_id is None or a.site_id == site_id)]
    if not candidates:
        where = f" at site {site_name(site_id)!r}" if site_id else ""
        usage(f"no app {ref!r}{where} (see `balsamctl app ls`)")
    if len(candidates) > 1:
        at = ", ".join(site_name(a.site_id) for a in candidates)
        usage(f"app {ref!r} exists at several sites ({at}): choose one with --site")
    return candidates[0]


def check_apps(refs: list[int | str]) -> None:
    """A job filter's --app values (names at any site, or ids): a usage error for one
    that is no app of the caller, as an unknown --site is. (A name alone goes to the
    server as a filter of app names, which matched nothing: an empty table, exit 0.)"""
    known = apps()
    names = {a.name for a in known.values()}
    for ref in refs:
        if ref not in (known if isinstance(ref, int) else names):
            usage(f"no app {ref!r} (see `balsamctl app ls`)")


def _resolve_names(resource: str, names: list[str]) -> list[int]:
    if resource == "site":
        return [resolve_site(n).id for n in names]
    check_apps(list(names))
    return [a.id for a in apps().values() if a.name in set(names)]


# ------------------------------------------------------------------------- jobs

def job_filter(selection: JobSelection) -> job_pb2.JobFilter | None:
    """The server's JobFilter for a selection (site names resolved, app names checked);
    None when the conditions can match nothing."""
    check_apps(selection.apps)
    criteria = [(False, JOB_FILTER.normalize(selection.filter_kwargs()))]
    if selection.exclude_kwargs():
        criteria.append((True, JOB_FILTER.normalize(selection.exclude_kwargs(), exclude=True)))
    try:
        return JOB_FILTER.build(criteria, resolve=_resolve_names)  # type: ignore[return-value]
    except MatchesNothing:
        return None


def iter_jobs(selection: JobSelection, *, order_by: str = "id",
              view: int = job_service_pb2.JOB_VIEW_FULL) -> Iterator[job_pb2.Job]:
    flt = job_filter(selection)
    if flt is None:
        return iter(())
    request = job_service_pb2.ListJobsRequest(filter=flt, order_by=order_by, view=view)
    return paged("JobService", "ListJobs", request, "jobs", limit=selection.limit)


def bulk_filter(selection: JobSelection) -> job_pb2.JobFilter | None:
    """The filter a bulk change applies: with --limit, the ids of the first jobs
    selected (the filter message has no limit)."""
    if selection.limit is None:
        return job_filter(selection)
    ids = [j.id for j in iter_jobs(selection, view=job_service_pb2.JOB_VIEW_BASIC)]
    return job_pb2.JobFilter(ids=ids) if ids else None


def get_job(job_id: int) -> job_pb2.Job:
    return client().call("JobService", "GetJob", job_service_pb2.GetJobRequest(id=job_id)).job
