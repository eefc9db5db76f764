"""Apps as code from the client side: submitting jobs of an ApplicationDefinition and
registering a site's apps folder with the server.

`ApplicationDefinition` is core.appdef's class (the same one the site and launcher load).
Core must not depend on the network client, so the SDK gives it its `submit`
classmethod here, when `balsam_grpc.sdk` is imported (unless core defines one itself).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from balsam_grpc.core.appdef import ApplicationDefinition, load_app_classes, resolve_parameters
from balsam_grpc.sdk.errors import NotFound
from balsam_grpc.sdk.models import App, Job, Manager, Site, split_submit
from balsam_grpc.v1 import app_pb2, app_service_pb2

if TYPE_CHECKING:
    from balsam_grpc.sdk.client import Client

__all__ = ["ApplicationDefinition", "SyncResult", "resolve_site_id", "submit", "sync_apps"]

_OUTPUT_ONLY = ("id", "create_time", "update_time")


def resolve_site_id(client: Client, site: Any = None, app_def: type[ApplicationDefinition] | None = None) -> int:
    """The site a job goes to: `site` (Site, id or name), else the class's `site`
    attribute, else BALSAM_SITE_ID, else the caller's only site."""
    site = site if site is not None else getattr(app_def, "site", None)
    if site is None and os.environ.get("BALSAM_SITE_ID"):
        site = int(os.environ["BALSAM_SITE_ID"])
    if isinstance(site, Site):
        return site.id
    if isinstance(site, int) and not isinstance(site, bool):
        return site
    sites = Manager(Site, client)
    if isinstance(site, str):
        return sites.get(name=site).id
    if site is not None:
        raise TypeError(f"site must be a Site, a site id or a site name, not {type(site).__name__}")
    found = list(sites.all()[:2])
    if len(found) != 1:
        raise ValueError(f"give site=... (you have {len(found) if len(found) < 2 else 'several'} sites)")
    return found[0].id


def submit(app_def: type[ApplicationDefinition], workdir: str, *, site: Any = None, client: Client | None = None,
           **kwargs: Any) -> Job:
    """Create a job of an ApplicationDefinition's app at a site. Keywords as for
    App.submit: job fields, resource shortcuts, and the app parameters (checked against
    the class's declaration before anything is sent)."""
    from balsam_grpc.sdk.client import default_client

    client = client or default_client()
    declaration = app_def.app_message(0)
    options, params = split_submit(declaration, kwargs)
    resolve_parameters(declaration, params)
    site_id = resolve_site_id(client, site, app_def)
    job = Job(_client=client, workdir=workdir, app_name=app_def.app_name(), site_id=site_id, parameters=params,
              **options)
    return job.save()


def _submit_classmethod(cls: type[ApplicationDefinition], workdir: str, **kwargs: Any) -> Job:
    return submit(cls, workdir, **kwargs)


if not hasattr(ApplicationDefinition, "submit"):
    ApplicationDefinition.submit = classmethod(_submit_classmethod)  # type: ignore[attr-defined]


@dataclass
class SyncResult:
    """What `sync_apps` did, by app name."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return bool(self.created or self.updated or self.removed)


def _declaration(app: app_pb2.App) -> app_pb2.App:
    copy = app_pb2.App()
    copy.CopyFrom(app)
    for name in _OUTPUT_ONLY:
        copy.ClearField(name)
    return copy


def sync_apps(client: Client, site_id: int, folder: str | Path, *, remove_missing: bool = False,
              dry_run: bool = False) -> SyncResult:
    """Register the ApplicationDefinition classes of a site's apps folder: create the
    new ones, replace the declaration of changed ones (by name), leave the rest. Apps
    registered at the site but absent from the folder are deleted only with
    `remove_missing` (the server refuses while they have jobs)."""
    classes = load_app_classes(Path(folder))
    wanted = {}
    for cls in classes.values():
        msg = cls.app_message(site_id)
        if msg.name in wanted:
            raise ValueError(f"two apps in {folder} are named {msg.name!r}")
        wanted[msg.name] = msg
    existing = {app.name: app for app in Manager(App, client).filter(site_id=site_id)}
    result = SyncResult()
    for name, msg in sorted(wanted.items()):
        current = existing.get(name)
        if current is None:
            if not dry_run:
                client.call("AppService", "CreateApp", app_service_pb2.CreateAppRequest(app=msg))
            result.created.append(name)
        elif _declaration(current.message) != msg:
            if not dry_run:
                msg.id = current.id
                # An empty mask replaces every mutable field of the declaration.
                client.call("AppService", "UpdateApp", app_service_pb2.UpdateAppRequest(app=msg))
            result.updated.append(name)
        else:
            result.unchanged.append(name)
    if remove_missing:
        for name, app in sorted(existing.items()):
            if name not in wanted:
                if not dry_run:
                    try:
                        app.delete()
                    except NotFound:
                        pass
                result.removed.append(name)
    return result
