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

import typer
import yaml

from balsam_grpc.cli.errors import require_extra
from balsam_grpc.cli.output import visible
from balsam_grpc.core.errors import Unavailable
from balsam_grpc.core.pidlock import SITE_LOCK_FILE, lock_holder
from balsam_grpc.core.settings import Profile
from balsam_grpc.sdk.client import Client
from balsam_grpc.v1 import (
    auth_service_pb2,
    batch_job_pb2,
    batch_job_service_pb2,
    job_pb2,
    job_service_pb2,
    site_service_pb2,
)

site_app = typer.Typer(help="Create, run and inspect site daemons.", no_args_is_help=True)
# What the daemon logs when the apps folder fails to import (site/daemon.py).
APPS_NOT_SYNCED = "apps folder not synced"



def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {visible(message)}", err=True, fg=typer.colors.RED)
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


def _client(settings: dict[str, Any] | None = None) -> Client:
    """An SDK client from the profile; a site directory's settings name its server."""
    profile = Profile.load()
    if settings and settings.get("server") and not os.environ.get("BALSAM_SERVER"):
        profile.server = str(settings["server"])
    if not profile.token:
        _fail("no token: start a server on this machine (it writes the profile) or set BALSAM_TOKEN")
    return Client(profile=profile, timeout=10)


def _get_site(site_id: int, settings: dict[str, Any]) -> Any:
    with _client(settings) as client:
        return client.call("SiteService", "GetSite", site_service_pb2.GetSiteRequest(id=site_id)).site


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
    require_extra("site", "psutil")
    site_dir = _site_dir(path)
    settings = _settings(site_dir)
    holder = _lock_holder(site_dir)
    if holder:
        _fail(f"a site daemon already runs for {site_dir} (pid {holder})")
    (site_dir / "logs").mkdir(exist_ok=True)
    log_path = site_dir / "logs" / "site.log"
    # The log is appended to across runs: show only what this run writes.
    start_offset = log_path.stat().st_size if log_path.exists() else 0
    with open(log_path, "ab") as log, open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen([sys.executable, "-m", "balsam_grpc.site", "--site-dir", str(site_dir)],
                                stdin=devnull, stdout=log, stderr=log, cwd=site_dir, start_new_session=True)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            tail = _this_run(log_path, start_offset)[-15:]
            _fail(f"the site daemon exited with code {code}; this run wrote to {log_path}:\n" + "\n".join(tail))
        try:
            site = _get_site(settings["site_id"], settings)
            if site.liveness.connected:
                for line in _this_run(log_path, start_offset):
                    if APPS_NOT_SYNCED in line:
                        typer.secho(f"warning: the apps folder did not load, so no app was registered: "
                                    f"{line.strip()}", err=True, fg=typer.colors.YELLOW)
                typer.echo(f"site {site.name!r} (id {site.id}) daemon running, pid {proc.pid}, connected; "
                           f"log {log_path}")
                return
        except Unavailable:
            pass
        time.sleep(0.3)
    _fail(f"the site daemon (pid {proc.pid}) did not connect within {wait:g} s; see {log_path}")


def _this_run(log_path: Path, offset: int) -> list[str]:
    with open(log_path, "rb") as fh:
        fh.seek(offset)
        return fh.read().decode(errors="replace").splitlines()


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


def _all_sites(client: Client) -> list[Any]:
    token, rows = "", []
    while True:
        resp = client.call("SiteService", "ListSites", site_service_pb2.ListSitesRequest(page_token=token))
        rows.extend(resp.sites)
        token = resp.next_page_token
        if not token:
            return rows


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
    with _client(settings) as client:
        site = client.call("SiteService", "GetSite", site_service_pb2.GetSiteRequest(id=settings["site_id"])).site
        live = site.liveness
        seen = live.last_seen_time.ToDatetime().isoformat(timespec="seconds") if live.HasField("last_seen_time") else "never"
        typer.echo(f"site:       {visible(site.name)} (id {site.id}), scheduler {site.scheduler}")
        typer.echo(f"stream:     {'connected' if live.connected else 'not connected'} (last seen {seen} UTC, "
                   f"host {live.daemon_hostname or '-'}, version {live.daemon_version or '-'})")
        counts = client.call("JobService", "CountJobs", job_service_pb2.CountJobsRequest(
            filter=job_pb2.JobFilter(site_ids=[site.id]), group_by=[job_service_pb2.JOB_GROUP_BY_STATE]))
        by_state = ", ".join(f"{_state(job_pb2.JobState, g.state, 'JOB_STATE_')} {g.count}"
                             for g in counts.groups if g.count)
        typer.echo(f"jobs:       {counts.total} ({by_state or 'none'})")
        bjs = client.call("BatchJobService", "ListBatchJobs", batch_job_service_pb2.ListBatchJobsRequest(
            filter=batch_job_service_pb2.BatchJobFilter(site_ids=[site.id], states=_ACTIVE_BJ))).batch_jobs
        typer.echo(f"batch jobs: {len(bjs)} active")
        for bj in bjs:
            typer.echo(f"  {bj.id:>6}  {_state(batch_job_pb2.BatchJobState, bj.state, 'BATCH_JOB_STATE_'):<18} "
                       f"{bj.num_nodes:>4} nodes {bj.wall_time_min:>5} min  queue {bj.queue or '-'}  "
                       f"scheduler id {bj.scheduler_id or '-'}")
        snap = site.scheduler_snapshot
        for w in snap.backfill_windows:
            typer.echo(f"backfill:   {w.num_nodes} nodes for {w.wall_time_min} min in {w.queue or 'any queue'}")


@site_app.command("ls")
def ls() -> None:
    """Your sites on the server, with daemon liveness.

    Example: balsamctl site ls
    """
    with _client() as client:
        rows = _all_sites(client)
    typer.echo(f"{'ID':>5}  {'NAME':<20} {'SCHEDULER':<10} {'DAEMON':<14} {'HOST':<20} PATH")
    for s in rows:
        live = "connected" if s.liveness.connected else "disconnected"
        typer.echo(f"{s.id:>5}  {visible(s.name):<20} {s.scheduler:<10} {live:<14} {visible(s.hostname):<20} "
                   f"{visible(s.path)}")


@site_app.command("rm")
def rm(site: str = typer.Argument(..., help="site directory, or a site's name or id"),
       yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation"),
       delete_dir: bool = typer.Option(False, "--delete-dir",
                                       help="also delete the site directory (settings, apps, job workdirs)")) -> None:
    """Delete a site from the server with its apps, jobs and batch jobs, and revoke its
    tokens. Refused while its daemon runs or its jobs run. The directory stays unless
    --delete-dir.

    Example: balsamctl site rm ~/sites/laptop --yes
    """
    from balsam_grpc.cli.output import confirm

    site_dir: Path | None = None
    settings: dict[str, Any] = {}
    candidate = Path(site).expanduser()
    if (candidate / "settings.yml").exists():
        site_dir = _site_dir(candidate)
        settings = _settings(site_dir)
        pid = _lock_holder(site_dir)
        if pid:
            _fail(f"the site daemon of {site_dir} runs (pid {pid}): stop it first with `balsamctl site stop {site_dir}`")
    elif delete_dir:
        _fail("--delete-dir needs the site directory, not a name")
    with _client(settings) as client:
        sites = _all_sites(client)
        wanted = settings.get("site_id") or site
        found = [s for s in sites if str(s.id) == str(wanted) or (not settings and s.name == site)]
        if not found:
            known = ", ".join(sorted(s.name for s in sites)) or "none"
            _fail(f"no site {site!r} on {client.server}; your sites: {known}")
        (record,) = found[:1]
        jobs = client.call("JobService", "CountJobs", job_service_pb2.CountJobsRequest(
            filter=job_pb2.JobFilter(site_ids=[record.id]))).total
        where = f" and the directory {site_dir}" if delete_dir else ""
        confirm(f"Delete site {record.name!r} (id {record.id}) with its {jobs} jobs from {client.server}{where}?",
                assume_yes=yes, what=f"delete site {record.name!r}")
        tokens = client.call("AuthService", "ListTokens", auth_service_pb2.ListTokensRequest()).tokens
        revoked = sum(1 for t in tokens if t.site_id == record.id)
        # The server revokes the site's tokens in the same transaction.
        client.call("SiteService", "DeleteSite", site_service_pb2.DeleteSiteRequest(id=record.id))
    typer.echo(f"deleted site {record.name!r} (id {record.id}) with {jobs} jobs; revoked {revoked} site token(s)")
    if site_dir is not None and delete_dir:
        import shutil

        shutil.rmtree(site_dir)
        typer.echo(f"deleted {site_dir}")
    elif site_dir is not None:
        (site_dir / "settings.yml").rename(site_dir / "settings.yml.deleted")
        typer.echo(f"kept {site_dir} (settings.yml renamed settings.yml.deleted: `site init` can use it again)")


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
