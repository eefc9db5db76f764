"""Creating a site: the record on the server, a site-scoped token, and the directory.

Run as `python -m balsam_grpc.site init PATH [--platform NAME] [--name NAME]` (what
`balsamctl site init` starts: the CLI never imports the site package).
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path
from typing import Any

from balsam_grpc.core.channel import auth_metadata, make_channel
from balsam_grpc.core.errors import AlreadyExists, InvalidArgument
from balsam_grpc.core.settings import Profile
from balsam_grpc.site.layout import SiteLayout
from balsam_grpc.site.settings import QueueLimits, load_settings, render_settings_template
from balsam_grpc.v1 import (
    auth_service_pb2,
    auth_service_pb2_grpc,
    site_pb2,
    site_service_pb2,
    site_service_pb2_grpc,
)

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
                 "default_project": ""}


def platform_preset(name: str) -> dict[str, Any]:
    from balsam_grpc.site.platforms import load_platform

    try:
        return dict(load_platform(name))
    except InvalidArgument:
        if name == "local":
            return dict(DEFAULT_LOCAL)
        raise


def init_site(path: Path, *, platform: str = "local", name: str = "", elastic: bool = True,
              profile: Profile | None = None) -> SiteLayout:
    layout = SiteLayout.at(path)
    if layout.settings_file.exists():
        raise AlreadyExists(f"{layout.settings_file} already exists: this is a site directory already")
    preset = platform_preset(platform)
    profile = profile or Profile.load()
    name = name or layout.root.name
    queues = {q: QueueLimits(int(v.get("max_nodes", 0)), int(v.get("max_wall_time_min", 0)),
                             int(v.get("max_queued", 0)))
              for q, v in (preset.get("queues") or {}).items()}
    default_queue = preset.get("default_queue") or ""
    if default_queue and default_queue in queues:  # the default queue first: the template uses it
        queues = {default_queue: queues[default_queue], **queues}
    project = preset.get("default_project") or ""
    channel = make_channel(profile)
    try:
        metadata = auth_metadata(profile.token)
        sites = site_service_pb2_grpc.SiteServiceStub(channel)
        site = sites.CreateSite(site_service_pb2.CreateSiteRequest(
            site=site_pb2.Site(name=name, hostname=socket.gethostname(), path=str(layout.root),
                               scheduler=preset["scheduler"], allowed_queues=list(queues),
                               allowed_projects=[project] if project else []),
            request_id=str(uuid.uuid4())), metadata=metadata, timeout=30).site
        token = auth_service_pb2_grpc.AuthServiceStub(channel).CreateToken(auth_service_pb2.CreateTokenRequest(
            scope=auth_service_pb2.TOKEN_SCOPE_SITE, site_id=site.id,
            description=f"site daemon of {name} at {socket.gethostname()}:{layout.root}"),
            metadata=metadata, timeout=30).token
    finally:
        channel.close()
    layout.root.mkdir(parents=True, exist_ok=True)
    layout.make_dirs()
    layout.write_token(token)
    text = render_settings_template(
        site_id=site.id, name=name, server=profile.server, platform=platform, scheduler=preset["scheduler"],
        queues=queues, projects=[project] if project else [], elastic=elastic, max_nodes=1)
    options = preset.get("scheduler_options") or {}
    if options:
        import yaml

        flow = yaml.safe_dump(options, default_flow_style=True).strip()
        text = text.replace("  options: {}\n", f"  options: {flow}\n", 1)
    layout.settings_file.write_text(text)
    load_settings(layout.settings_file)  # what we wrote must load
    example = layout.apps_dir / "example.py"
    if not example.exists():
        example.write_text(EXAMPLE_APP)
    return layout
