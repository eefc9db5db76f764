"""The site daemon: one stream to the server, the scheduler, hooks, cleanup, pilots.

    python -m balsam_grpc.site --site-dir DIR

Acts when work is pushed (no loop period decides latency); the only periodic things are
the look at the local batch scheduler (squeue/qstat every scheduler.poll_seconds) and
the elastic queue's wait-timeout check.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import grpc
import structlog
from google.protobuf import field_mask_pb2

from balsam_grpc.core.aio import wait_event
from balsam_grpc.core.backoff import Backoff
from balsam_grpc.core.channel import channel_credentials, channel_options, channel_target
from balsam_grpc.core.errors import BalsamError
from balsam_grpc.core.settings import Profile
from balsam_grpc.core.validation import FIELD_LIMITS, clip_utf8
from balsam_grpc.site.batch import BJ, BatchJobs, update
from balsam_grpc.site.cleaner import clean_workdir, job_workdir
from balsam_grpc.site.hook_process import HookPool
from balsam_grpc.site.hooks import failed_result
from balsam_grpc.site.journal import Journal
from balsam_grpc.site.layout import SiteLayout, SiteLock
from balsam_grpc.site.pilots import PilotDriver
from balsam_grpc.site.script import DEFAULT_SERIAL_PREFIX, launcher_block, node_args, script_context
from balsam_grpc.site.settings import ElasticQueueSettings, SiteSettings, load_settings
from balsam_grpc.site.stream import SiteStream
from balsam_grpc.site.token_source import TokenSource
from balsam_grpc.site.transfers.journal import TransferJournal
from balsam_grpc.site.transfers.service import TransferService, transfer_failure
from balsam_grpc.v1 import batch_job_pb2, site_pb2, site_service_pb2, site_service_pb2_grpc

_CLEANUP_ERROR_LIMIT = FIELD_LIMITS["balsam.v1.CleanupResult.error"]
log = structlog.get_logger(__name__)

CAPABILITIES = ["batch_jobs", "hooks", "cleanup", "transfers"]


def _platform(name: str) -> Any:
    try:
        from balsam_grpc.site.platforms import load_platform
    except ImportError:
        return None
    try:
        return load_platform(name)
    except Exception as exc:
        log.warning("platform preset not loaded", platform=name, error=str(exc))
        return None


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def connect_target(settings: SiteSettings, layout: SiteLayout) -> tuple[str, str, Profile]:
    """(server address, token, profile): settings.yml's server wins over the profile; the
    site's own site-scoped token wins over the user's token."""
    profile = Profile.load()
    server = os.environ.get("BALSAM_SERVER") or settings.server or profile.server
    token = os.environ.get("BALSAM_TOKEN") or layout.read_token() or profile.token
    return server, token, profile


def aio_channel(target: str, profile: Profile) -> grpc.aio.Channel:
    opts = channel_options()
    target = channel_target(target)
    if profile.tls_ca or profile.tls_cert or profile.tls_key:
        return grpc.aio.secure_channel(target, channel_credentials(profile.tls_ca, profile.tls_cert, profile.tls_key),
                                       options=opts)
    return grpc.aio.insecure_channel(target, options=opts)


def elastic_queue_message(eq: ElasticQueueSettings) -> site_pb2.ElasticQueueSettings:
    """The elastic-queue settings the daemon publishes on its Site, so the server can tell
    routers how many nodes the site may hold."""
    return site_pb2.ElasticQueueSettings(
        enabled=eq.enabled, min_nodes=eq.min_nodes, max_nodes=eq.max_nodes, min_wall_time_min=eq.min_wall_time_min,
        max_wall_time_min=eq.max_wall_time_min, max_queued=eq.max_queued, max_queue_wait_min=eq.wait_timeout_min,
        use_backfill=eq.use_backfill, queue=eq.queue, project=eq.project, job_mode=eq.job_mode,
        max_total_nodes=eq.max_total_nodes)


class SiteDaemon:
    def __init__(self, site_dir: Path) -> None:
        self.layout = SiteLayout.at(site_dir)
        self.settings = load_settings(self.layout.settings_file)
        self.layout.make_dirs()
        self.server, token, self.profile = connect_target(self.settings, self.layout)
        # The site's own token file is watched: a renewed token applies without a restart.
        from_file = not os.environ.get("BALSAM_TOKEN") and bool(self.layout.read_token())
        self.token_source = TokenSource(token, self.layout.token_file if from_file else None)
        self.journal = Journal(self.layout.state_dir / "journal.json")
        self.platform = _platform(self.settings.platform)
        from balsam_grpc.site.schedulers import get_scheduler

        options = {**(_get(self.platform, "scheduler_options") or {}), **self.settings.scheduler.options}
        if self.settings.scheduler.name == "local":
            options.setdefault("state_dir", str(self.layout.state_dir / "local-scheduler"))
        self.scheduler = get_scheduler(self.settings.scheduler.name, **options)
        self.template = self._template_text()
        self.hooks = HookPool(self.layout.apps_dir, self.settings.processing.workers,
                              self.settings.processing.hook_timeout_s, self.layout.state_dir / "hooks")
        self.channel: grpc.aio.Channel | None = None
        self.stream: SiteStream | None = None
        self.batch: BatchJobs | None = None
        self.pilots: PilotDriver | None = None
        self.transfers: TransferService | None = None
        # Created on the daemon's event loop in run().
        self._stop: asyncio.Event | None = None
        self._poll_now: asyncio.Event | None = None

    @property
    def token(self) -> str:
        return self.token_source()

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self.token_source.metadata

    # ----- batch script ---------------------------------------------------------------
    def _template_text(self) -> str:
        if self.settings.batch_script_template:
            path = (self.layout.root / self.settings.batch_script_template)
            return path.read_text()
        text = _get(self.platform, "batch_script")
        if isinstance(text, str) and text:
            return text
        return self.scheduler.default_template_text()

    def _serial_prefix(self) -> str:
        if self.settings.launcher.mpi_prefix:
            return self.settings.launcher.mpi_prefix
        preset = _get(self.platform, "launcher_mpi_prefix")
        if preset is not None:
            return preset  # "" = the platform runs the launcher directly
        return DEFAULT_SERIAL_PREFIX.get(self.settings.scheduler.name, "mpiexec -n {num_ranks}")

    def render_script(self, bj: batch_job_pb2.BatchJob) -> str:
        launcher = launcher_block(
            bj, default_mode=self.settings.launcher.mode, site_dir=self.layout.root, site_id=self.settings.site_id,
            python=sys.executable, serial_prefix=self._serial_prefix(),
            mpiexec=str(Path(sys.executable).with_name("mpiexec")), idle_timeout_s=self.settings.launcher.idle_timeout_s,
            extra_args=self.settings.launcher.extra_args,
            node_args=node_args(self.platform, self.settings.launcher.platform))
        env = {"BALSAM_SERVER": self.server, "BALSAM_SITE_ID": str(self.settings.site_id)}
        if self.token:
            env["BALSAM_TOKEN"] = self.token
        preamble = self.settings.launcher.preamble or _get(self.platform, "preamble") or ""
        if isinstance(preamble, list):
            preamble = "\n".join(preamble)
        directives = ""
        render_directives = getattr(self.scheduler, "render_directives", None)
        if render_directives is not None and bj.optional_params:
            directives = render_directives(dict(bj.optional_params))
        context = script_context(bj, site_name=self.settings.name, site_dir=self.layout.root, launcher=launcher,
                                 env=env, preamble=preamble, sched_directives=directives)
        return self.scheduler.render_script(self.template, context)

    # ----- work -------------------------------------------------------------------------
    async def handle(self, item: site_service_pb2.WorkItem) -> site_service_pb2.WorkResult | None:
        kind = item.WhichOneof("kind")
        assert self.batch is not None
        if kind == "submit_batch_job":
            return await self.batch.submit(item.submit_batch_job.batch_job)
        if kind == "cancel_batch_job":
            return await self.batch.cancel(item.cancel_batch_job.batch_job)
        if kind == "run_hook":
            run = item.run_hook
            workdir = job_workdir(self.layout.data_dir, run.job.workdir)
            result = await self.hooks.run(run, workdir)
            log.info("hook done", job_id=run.job.id, hook=site_service_pb2.HookKind.Name(run.hook),
                     next_state=result.next_state)
            return site_service_pb2.WorkResult(hook=result)
        if kind == "start_transfers":
            assert self.transfers is not None
            return await self.transfers.accept(list(item.start_transfers.items))
        if kind == "cleanup":
            c = item.cleanup
            if not self.settings.cleanup.enabled:
                return site_service_pb2.WorkResult(cleanup=site_service_pb2.CleanupResult(
                    job_id=c.job_id, error="cleanup is disabled in settings.yml"))
            workdir = job_workdir(self.layout.data_dir, c.workdir)
            removed, errors = await asyncio.to_thread(clean_workdir, workdir, list(c.globs))
            return site_service_pb2.WorkResult(cleanup=site_service_pb2.CleanupResult(
                job_id=c.job_id, removed_files=removed, error=clip_utf8("; ".join(errors), _CLEANUP_ERROR_LIMIT)))
        raise BalsamError(f"work kind {kind!r} is not handled by this daemon")

    def failure(self, item: site_service_pb2.WorkItem, exc: BaseException) -> site_service_pb2.WorkResult | None:
        """The result reported when handling a work item raised (never a crash)."""
        kind = item.WhichOneof("kind")
        message = f"{type(exc).__name__}: {exc}"
        if kind == "submit_batch_job":
            return update(item.submit_batch_job.batch_job.id, BJ.BATCH_JOB_STATE_SUBMIT_FAILED,
                          status_info=f"site daemon could not submit: {message}")
        if kind == "run_hook":
            return site_service_pb2.WorkResult(hook=failed_result(item.run_hook.job.id, item.run_hook.hook,
                                                                  f"site daemon could not run the hook: {message}"))
        if kind == "cleanup":
            return site_service_pb2.WorkResult(cleanup=site_service_pb2.CleanupResult(
                job_id=item.cleanup.job_id, error=clip_utf8(message, _CLEANUP_ERROR_LIMIT)))
        if kind == "start_transfers":
            return transfer_failure(item.start_transfers, f"site daemon could not take the transfer: {message}")
        # A failed cancel is retried when the work is offered again after a reconnect;
        # the scheduler poll also reports the job's end whenever it comes.
        return None

    # ----- lifecycle --------------------------------------------------------------------
    async def on_connected(self, welcome: site_service_pb2.SiteWelcome) -> None:
        assert self.pilots is not None and self.batch is not None
        server_jobs = await self.pilots.list_pilots()
        self.batch.reconcile(server_jobs)
        self._poll_now.set()
        self.pilots.wake()

    async def prepare(self) -> None:
        """Site record and apps on the server match this directory."""
        assert self.channel is not None
        stub = site_service_pb2_grpc.SiteServiceStub(self.channel)
        site = site_pb2.Site(id=self.settings.site_id, hostname=socket.gethostname(), path=str(self.layout.root),
                             scheduler=self.settings.scheduler.name, allowed_queues=list(self.settings.allowed_queues),
                             allowed_projects=list(self.settings.allowed_projects),
                             elastic_queue=elastic_queue_message(self.settings.elastic_queue),
                             # Published so the server refuses jobs naming a location this site lacks.
                             transfer_locations=[site_pb2.TransferLocation(alias=alias, url=url) for alias, url
                                                 in sorted(self.settings.transfer_locations.items())])
        await stub.UpdateSite(site_service_pb2.UpdateSiteRequest(
            site=site, update_mask=field_mask_pb2.FieldMask(
                paths=["hostname", "path", "scheduler", "allowed_queues", "allowed_projects", "elastic_queue",
                       "transfer_locations"])),
            metadata=self.metadata, timeout=30)
        try:
            await asyncio.to_thread(self.sync_apps)
        except (BalsamError, ValueError) as exc:  # a broken apps file must not stop the daemon
            log.error("apps folder not synced", error=str(exc))

    def sync_apps(self) -> None:
        """Register the apps folder with the SDK's sync_apps (blocking: run in a thread)."""
        from balsam_grpc.sdk.apps import sync_apps
        from balsam_grpc.sdk.client import Client

        with Client(self.server, self.token, profile=self.profile) as client:
            result = sync_apps(client, self.settings.site_id, self.layout.apps_dir)
        log.info("apps synced", created=result.created, updated=result.updated, unchanged=len(result.unchanged))

    async def _poll_loop(self) -> None:
        assert self.batch is not None and self._poll_now is not None
        while True:
            await wait_event(self._poll_now, self.settings.scheduler.poll_seconds)
            self._poll_now.clear()
            try:
                if await self.batch.poll() and self.pilots is not None:
                    self.pilots.wake()  # a pilot started or ended: the supply changed
            except Exception:
                log.exception("scheduler poll failed")

    async def _prepare_until_done(self) -> None:
        delays = Backoff(initial=1.0, maximum=30.0)
        while True:
            try:
                await self.prepare()
                return
            except grpc.aio.AioRpcError as exc:
                log.warning("server not reachable for site setup", code=exc.code().name, details=exc.details())
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                                  grpc.StatusCode.NOT_FOUND):
                    raise
            await asyncio.sleep(delays.next_delay())

    async def run(self) -> None:
        self._stop = asyncio.Event()
        self._poll_now = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        self.channel = aio_channel(self.server, self.profile)
        self.stream = SiteStream(self.channel, site_id=self.settings.site_id, token=self.token_source,
                                 capabilities=CAPABILITIES, max_in_flight=self.settings.max_in_flight,
                                 handler=self.handle, on_error=self.failure, on_connected=self.on_connected)
        self.batch = BatchJobs(settings=self.settings, scheduler=self.scheduler, journal=self.journal,
                               qsubmit_dir=self.layout.qsubmit_dir, render=self.render_script,
                               send_update=self.stream.send_update, send_snapshot=self.stream.send_snapshot)
        self.pilots = PilotDriver(settings=self.settings, channel=self.channel, token=self.token_source,
                                  journal=self.journal, windows=lambda: self.batch.windows,  # type: ignore[union-attr]
                                  still_queued=self.batch.still_queued)
        self.stream.on_backlog = self.pilots.on_backlog
        self.transfers = TransferService(
            settings=self.settings.transfers, locations=self.settings.transfer_locations,
            data_dir=self.layout.data_dir, site_dir=self.layout.root, report=self.stream.report,
            journal=TransferJournal(self.layout.state_dir / "transfers.sqlite"))
        log.info("site daemon starting", site_id=self.settings.site_id, site_dir=str(self.layout.root),
                 server=self.server, scheduler=self.settings.scheduler.name, pid=os.getpid())
        await self._prepare_until_done()
        tasks = [asyncio.create_task(self.stream.run(), name="stream"),
                 asyncio.create_task(self._poll_loop(), name="scheduler poll"),
                 asyncio.create_task(self.pilots.run(), name="pilots"),
                 asyncio.create_task(self.transfers.run(), name="transfers")]
        stopper = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stopper and t.exception() is not None:
                log.error("daemon task died", task=t.get_name(), error=repr(t.exception()))
        log.info("site daemon stopping")
        await self.stream.stop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.channel.close()
        log.info("site daemon stopped")


def run_daemon(site_dir: Path) -> None:
    layout = SiteLayout.at(site_dir)
    with SiteLock(layout.lock_file):
        daemon = SiteDaemon(layout.root)
        asyncio.run(daemon.run())
