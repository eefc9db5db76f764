"""`balsamctl site init|start|stop|status|ls`.

Layering: the CLI never imports balsam_grpc.site. `init` and the daemon itself run as
`python -m balsam_grpc.site ...` processes; status and ls ask the server over gRPC and
read the site directory's lock file (a few lines duplicated from site/layout.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import typer
import yaml

from balsam_grpc.core.channel import auth_metadata, make_channel
from balsam_grpc.core.pidlock import SITE_LOCK_FILE, lock_holder
from balsam_grpc.core.settings import Profile
from balsam_grpc.v1 import (
    batch_job_pb2,
    batch_job_service_pb2,
    batch_job_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    site_service_pb2,
    site_service_pb2_grpc,
)

site_app = typer.Typer(help="Create, run and inspect site daemons.", no_args_is_help=True)



def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def _lock_holder(site_dir: Path) -> int | None:
    return lock_holder(site_dir / SITE_LOCK_FILE)


def _settings(site_dir: Path) -> dict[str, Any]:
    path = site_dir / "settings.yml"
    if not path.exists():
        _fail(f"{site_dir} is not a site directory (no settings.yml); create one with `balsamctl site init`")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        _fail(f"{path} is not valid YAML: {exc}")
    if not isinstance(data, dict) or not isinstance(data.get("site_id"), int):
        _fail(f"{path} has no site_id")
    return data


def _client(settings: dict[str, Any] | None = None) -> tuple[grpc.Channel, tuple[tuple[str, str], ...]]:
    profile = Profile.load()
    if settings and settings.get("server") and not os.environ.get("BALSAM_SERVER"):
        profile.server = str(settings["server"])
    if not profile.token:
        _fail("no token: start a server on this machine (it writes the profile) or set BALSAM_TOKEN")
    return make_channel(profile), auth_metadata(profile.token)


def _get_site(site_id: int, settings: dict[str, Any]) -> Any:
    channel, md = _client(settings)
    try:
        return site_service_pb2_grpc.SiteServiceStub(channel).GetSite(
            site_service_pb2.GetSiteRequest(id=site_id), metadata=md, timeout=10).site
    finally:
        channel.close()


def _site_dir(path: Path) -> Path:
    return path.expanduser().resolve()


@site_app.command("init")
def init(path: Path = typer.Argument(..., help="new site directory"),
         platform: str = typer.Option("local", help="preset: local, polaris, aurora, perlmutter, frontier, slurm, pbs"),
         name: str = typer.Option("", help="site name (default: the directory name)"),
         elastic: bool = typer.Option(True, help="turn the elastic queue on in settings.yml")) -> None:
    """Create a site on the server and its directory (settings.yml, apps/, data/, logs/).

    Example: balsamctl site init ~/sites/polaris --platform polaris
    """
    argv = [sys.executable, "-m", "balsam_grpc.site", "init", str(path), "--platform", platform]
    if name:
        argv += ["--name", name]
    if not elastic:
        argv.append("--no-elastic")
    raise typer.Exit(subprocess.call(argv))


@site_app.command("start")
def start(path: Path = typer.Argument(Path("."), help="site directory"),
          wait: float = typer.Option(30.0, help="seconds to wait for the daemon to connect")) -> None:
    """Start the site daemon in the background (logs in SITE_DIR/logs/site.log).

    Example: balsamctl site start ~/sites/polaris
    """
    site_dir = _site_dir(path)
    settings = _settings(site_dir)
    holder = _lock_holder(site_dir)
    if holder:
        _fail(f"a site daemon already runs for {site_dir} (pid {holder})")
    (site_dir / "logs").mkdir(exist_ok=True)
    log_path = site_dir / "logs" / "site.log"
    with open(log_path, "ab") as log, open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen([sys.executable, "-m", "balsam_grpc.site", "--site-dir", str(site_dir)],
                                stdin=devnull, stdout=log, stderr=log, cwd=site_dir, start_new_session=True)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            _fail(f"the site daemon exited with code {code}; {log_path} ends with:\n" + "\n".join(tail))
        try:
            site = _get_site(settings["site_id"], settings)
            if site.liveness.connected:
                typer.echo(f"site {site.name!r} (id {site.id}) daemon running, pid {proc.pid}, connected; "
                           f"log {log_path}")
                return
        except grpc.RpcError:
            pass
        time.sleep(0.3)
    _fail(f"the site daemon (pid {proc.pid}) did not connect within {wait:g} s; see {log_path}")


@site_app.command("stop")
def stop(path: Path = typer.Argument(Path("."), help="site directory"),
         timeout: float = typer.Option(30.0, help="seconds to wait before giving up"),
         force: bool = typer.Option(False, help="kill -9 when it did not stop in time")) -> None:
    """Stop the site daemon (SIGTERM: it finishes running hooks, then exits).

    Example: balsamctl site stop ~/sites/polaris
    """
    site_dir = _site_dir(path)
    pid = _lock_holder(site_dir)
    if not pid or pid < 0:
        typer.echo(f"no site daemon runs for {site_dir}")
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _lock_holder(site_dir) is None:
            typer.echo(f"site daemon (pid {pid}) stopped")
            return
        time.sleep(0.2)
    if force:
        os.kill(pid, signal.SIGKILL)
        typer.echo(f"site daemon (pid {pid}) killed")
        return
    _fail(f"site daemon (pid {pid}) still running after {timeout:g} s (use --force)")


_ACTIVE_BJ = [batch_job_pb2.BATCH_JOB_STATE_PENDING_SUBMISSION, batch_job_pb2.BATCH_JOB_STATE_QUEUED,
              batch_job_pb2.BATCH_JOB_STATE_RUNNING, batch_job_pb2.BATCH_JOB_STATE_PENDING_DELETION]


def _state(enum: Any, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix).lower()


@site_app.command("status")
def status(path: Path = typer.Argument(Path("."), help="site directory")) -> None:
    """Daemon process, stream liveness, job backlog and batch jobs of one site.

    Example: balsamctl site status ~/sites/polaris
    """
    site_dir = _site_dir(path)
    settings = _settings(site_dir)
    pid = _lock_holder(site_dir)
    typer.echo(f"site dir:   {site_dir}")
    typer.echo(f"daemon:     {'running, pid ' + str(pid) if pid else 'not running'}")
    channel, md = _client(settings)
    try:
        site = site_service_pb2_grpc.SiteServiceStub(channel).GetSite(
            site_service_pb2.GetSiteRequest(id=settings["site_id"]), metadata=md, timeout=10).site
        live = site.liveness
        seen = live.last_seen_time.ToDatetime().isoformat(timespec="seconds") if live.HasField("last_seen_time") else "never"
        typer.echo(f"site:       {site.name} (id {site.id}), scheduler {site.scheduler}")
        typer.echo(f"stream:     {'connected' if live.connected else 'not connected'} (last seen {seen} UTC, "
                   f"host {live.daemon_hostname or '-'}, version {live.daemon_version or '-'})")
        counts = job_service_pb2_grpc.JobServiceStub(channel).CountJobs(job_service_pb2.CountJobsRequest(
            filter=job_pb2.JobFilter(site_ids=[site.id]), group_by=[job_service_pb2.JOB_GROUP_BY_STATE]),
            metadata=md, timeout=10)
        by_state = ", ".join(f"{_state(job_pb2.JobState, g.state, 'JOB_STATE_')} {g.count}"
                             for g in counts.groups if g.count)
        typer.echo(f"jobs:       {counts.total} ({by_state or 'none'})")
        bjs = batch_job_service_pb2_grpc.BatchJobServiceStub(channel).ListBatchJobs(
            batch_job_service_pb2.ListBatchJobsRequest(filter=batch_job_service_pb2.BatchJobFilter(
                site_ids=[site.id], states=_ACTIVE_BJ)), metadata=md, timeout=10).batch_jobs
        typer.echo(f"batch jobs: {len(bjs)} active")
        for bj in bjs:
            typer.echo(f"  {bj.id:>6}  {_state(batch_job_pb2.BatchJobState, bj.state, 'BATCH_JOB_STATE_'):<18} "
                       f"{bj.num_nodes:>4} nodes {bj.wall_time_min:>5} min  queue {bj.queue or '-'}  "
                       f"scheduler id {bj.scheduler_id or '-'}")
        snap = site.scheduler_snapshot
        for w in snap.backfill_windows:
            typer.echo(f"backfill:   {w.num_nodes} nodes for {w.wall_time_min} min in {w.queue or 'any queue'}")
    except grpc.RpcError as exc:
        _fail(f"server {exc.code().name}: {exc.details()}")
    finally:
        channel.close()


@site_app.command("ls")
def ls() -> None:
    """Your sites on the server, with daemon liveness.

    Example: balsamctl site ls
    """
    channel, md = _client()
    try:
        stub = site_service_pb2_grpc.SiteServiceStub(channel)
        token = ""
        rows = []
        while True:
            resp = stub.ListSites(site_service_pb2.ListSitesRequest(page_token=token), metadata=md, timeout=10)
            rows.extend(resp.sites)
            token = resp.next_page_token
            if not token:
                break
    except grpc.RpcError as exc:
        _fail(f"server {exc.code().name}: {exc.details()}")
    finally:
        channel.close()
    typer.echo(f"{'ID':>5}  {'NAME':<20} {'SCHEDULER':<10} {'DAEMON':<14} {'HOST':<20} PATH")
    for s in rows:
        live = "connected" if s.liveness.connected else "disconnected"
        typer.echo(f"{s.id:>5}  {s.name:<20} {s.scheduler:<10} {live:<14} {s.hostname:<20} {s.path}")


@site_app.command("globus-login")
def globus_login(path: Path = typer.Argument(Path("."), help="site directory"),
                 scope: list[str] = typer.Option(None, "--scope", help="scope a ConsentRequired error asked for"),
                 collection: list[str] = typer.Option(None, "--collection",
                                                      help="collection id that needs data_access consent"),
                 check: bool = typer.Option(False, "--check", help="only tell whether a login is needed")) -> None:
    """Log the site in to Globus for its globus:// transfer locations (tokens in the site's
    state folder, read by the daemon). Needs transfers.globus.client_id in settings.yml.

    Example: balsamctl site globus-login ~/sites/polaris --scope 'urn:globus:auth:scope:...'
    """
    site_dir = _site_dir(path)
    _settings(site_dir)
    argv = [sys.executable, "-m", "balsam_grpc.site.transfers.globus_login", "--site-dir", str(site_dir)]
    for s in scope or []:
        argv += ["--scope", s]
    for c in collection or []:
        argv += ["--collection", c]
    if check:
        argv.append("--check")
    # A process of its own (the CLI never imports the site package); it talks to the user.
    raise typer.Exit(subprocess.run(argv).returncode)
