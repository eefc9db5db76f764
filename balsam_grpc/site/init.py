"""Creating a site: the record on the server, a site-scoped token, and the directory.

Run as `python -m balsam_grpc.site init PATH [--platform NAME] [--name NAME]` (what
`balsamctl site init` starts: the CLI never imports the site package).
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from balsam_grpc.core.errors import AlreadyExists, InvalidArgument
from balsam_grpc.core.settings import Profile
from balsam_grpc.sdk.client import Client
from balsam_grpc.site.layout import SiteLayout
from balsam_grpc.site.settings import QueueLimits, load_settings, render_settings_template
from balsam_grpc.v1 import auth_service_pb2, site_pb2, site_service_pb2

log = structlog.get_logger("balsam.site.init")

EXAMPLE_APP = '''\
"""Example app: copy this file to write your own. Apps are registered with the server
when the site daemon starts (or with `balsamctl app sync`)."""

from balsam_grpc.core.appdef import ApplicationDefinition


class Hello(ApplicationDefinition):
    """Says hello."""

    command_template = "echo Hello, {{ name }}!"
    parameters = {"name": {"default": "world", "help": "who to greet"}}
    cleanup_files = ["*.tmp"]

    # Hooks run at the site, in the job's workdir (output in balsam-hooks.log). Uncomment
    # to use one; an exception fails the job with its traceback.
    #
    # def postprocess(self):
    #     self.job.data = {**self.job.data, "greeted": self.job.parameters.get("name", "world")}
'''

DEFAULT_LOCAL = {"scheduler": "local", "scheduler_options": {}, "queues": {}, "default_queue": "",
                 "default_project": "", "max_total_nodes": 1}


def platform_preset(name: str) -> dict[str, Any]:
    from balsam_grpc.site.platforms import load_platform

    try:
        return dict(load_platform(name))
    except InvalidArgument:
        if name == "local":
            return dict(DEFAULT_LOCAL)
        raise


class _Undo:
    """What init made so far, undone in reverse order when a later step fails: a retry
    then starts from nothing (no half-made directory, no site left on the server)."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Callable[[], object]]] = []

    def add(self, what: str, undo: Callable[[], object]) -> None:
        self.steps.append((what, undo))

    def run(self) -> None:
        for what, undo in reversed(self.steps):
            try:
                undo()
            except Exception as exc:  # keep undoing the rest; say what is left behind
                log.warning("could not undo a step of site init", step=what, error=str(exc))


def _make_directory(layout: SiteLayout, undo: _Undo) -> None:
    """Create the site directory (or reuse an empty-of-settings one) and check that files
    can be written there, before anything is created on the server."""
    root = layout.root
    missing = root
    while not missing.parent.exists():
        missing = missing.parent
    try:
        if not root.exists():
            root.mkdir(parents=True)
            undo.add(f"created {missing}", lambda: shutil.rmtree(missing))
        elif not root.is_dir():
            raise InvalidArgument(f"{root} exists and is not a directory", field="path")
        for d in layout.dirs():
            if not d.exists():
                d.mkdir(parents=True)
                undo.add(f"created {d}", lambda d=d: shutil.rmtree(d))
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise InvalidArgument(f"cannot use {root} as a site directory: {exc.strerror or exc}"
                              + (f" ({exc.filename})" if exc.filename else ""), field="path") from None


def init_site(path: Path, *, platform: str = "local", name: str = "", elastic: bool = True,
              profile: Profile | None = None) -> SiteLayout:
    """Create the site: its directory first (checked writable), then the site and its
    token on the server, then settings.yml. A failure at any step undoes the earlier ones."""
    layout = SiteLayout.at(path)
    if layout.settings_file.exists():
        raise AlreadyExists(f"{layout.settings_file} already exists: this is a site directory already")
    preset = platform_preset(platform)
    profile = profile or Profile.load()
    if not name:
        name = layout.root.name
        if name.isascii() and name.isdigit():  # the server refuses it, with advice for --name
            raise InvalidArgument(f"the site would be named {name!r} after its directory, but a name of digits "
                                  f"only reads as an id; give it a name with --name (for example --name site-{name})",
                                  field="name")
    queues = {q: QueueLimits(max_nodes=int(v.get("max_nodes", 0)), max_wall_time_min=int(v.get("max_wall_time_min", 0)),
                             max_queued=int(v.get("max_queued", 0)))
              for q, v in (preset.get("queues") or {}).items()}
    default_queue = preset.get("default_queue") or ""
    if default_queue and default_queue in queues:  # the default queue first: the template uses it
        queues = {default_queue: queues[default_queue], **queues}
    project = preset.get("default_project") or ""
    undo = _Undo()
    try:
        _make_directory(layout, undo)
        with Client(profile.server, profile.token, profile=profile) as client:
            site = client.call("SiteService", "CreateSite", site_service_pb2.CreateSiteRequest(
                site=site_pb2.Site(name=name, hostname=socket.gethostname(), path=str(layout.root),
                                   scheduler=preset["scheduler"], allowed_queues=list(queues),
                                   allowed_projects=[project] if project else []))).site
            undo.add(f"site {site.id} on the server", lambda: _delete_site(profile, site.id))
            token = client.call("AuthService", "CreateToken", auth_service_pb2.CreateTokenRequest(
                scope=auth_service_pb2.TOKEN_SCOPE_SITE, site_id=site.id,
                description=f"site daemon of {name} at {socket.gethostname()}:{layout.root}")).token
        _write_files(layout, token, site.id, name, profile.server, platform, preset, queues, project, elastic)
    except BaseException:
        undo.run()
        raise
    return layout


def _delete_site(profile: Profile, site_id: int) -> None:
    with Client(profile.server, profile.token, profile=profile) as client:
        client.call("SiteService", "DeleteSite", site_service_pb2.DeleteSiteRequest(id=site_id))


def _write_files(layout: SiteLayout, token: str, site_id: int, name: str, server: str, platform: str,
                 preset: dict[str, Any], queues: dict[str, QueueLimits], project: str, elastic: bool) -> None:
    try:
        layout.write_token(token)
        text = render_settings_template(
            site_id=site_id, name=name, server=server, platform=platform, scheduler=preset["scheduler"],
            queues=queues, projects=[project] if project else [], elastic=elastic, max_nodes=1,
            max_total_nodes=int(preset.get("max_total_nodes") or 0))
        options = preset.get("scheduler_options") or {}
        if options:
            import yaml

            flow = yaml.safe_dump(options, default_flow_style=True).strip()
            text = text.replace("  options: {}\n", f"  options: {flow}\n", 1)
        layout.settings_file.write_text(text)
        example = layout.apps_dir / "example.py"
        if not example.exists():
            example.write_text(EXAMPLE_APP)
    except OSError as exc:
        raise InvalidArgument(f"cannot write the site's files in {layout.root}: {exc.strerror or exc}",
                              field="path") from None
    load_settings(layout.settings_file)  # what we wrote must load
