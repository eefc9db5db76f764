"""globus://<collection-id> locations: globus-sdk's TransferClient, one TransferData per
task.

Exactly once: the submission id is asked of Globus (get_submission_id) and journaled by
the service BEFORE submit_transfer; a submission repeated after a crash carries the
same id and Globus answers with the task it already made ("Duplicate"), never a second
task. Errors are sorted into "retry later" (network, 5xx, 429: TransferUnavailable) and
"fix something" (TransferFailed), whose message names the fix, e.g. the
`balsamctl site globus-login --scope ...` that grants a missing consent.
"""

from __future__ import annotations

import asyncio
import shlex
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import globus_sdk
import structlog
from globus_sdk.transport import RetryConfig

from balsam_grpc.site.transfers.backends.base import TransferFailed, TransferUnavailable
from balsam_grpc.site.transfers.config import GlobusSettings, Location, map_path
from balsam_grpc.site.transfers.model import IN, Status, Task

log = structlog.get_logger(__name__)

TOKEN_FILE = "globus-tokens.json"
APP_NAME = "balsam-grpc site"


def login_command(site_dir: Path | None, scopes: list[str] | None = None) -> str:
    cmd = ["balsamctl", "site", "globus-login"]
    if site_dir is not None:
        cmd.append(str(site_dir))
    for scope in scopes or []:
        cmd += ["--scope", scope]
    return shlex.join(cmd)


def classify(exc: Exception, *, what: str, site_dir: Path | None) -> Exception:
    """A globus-sdk error as TransferUnavailable (retry) or TransferFailed (with the fix)."""
    if isinstance(exc, globus_sdk.NetworkError):
        return TransferUnavailable(f"Globus unreachable while trying to {what}: {exc}")
    if isinstance(exc, globus_sdk.GlobusAPIError):
        status = exc.http_status
        if exc.info.consent_required:
            scopes = list(exc.info.consent_required.required_scopes)
            return TransferFailed(f"Globus needs your consent to {what} (ConsentRequired); run "
                                  f"`{login_command(site_dir, scopes)}` and retry the transfer")
        if status == 401 or (status == 403 and exc.code in ("AuthenticationFailed", "ConsentRequired")):
            return TransferFailed(f"Globus refused the site's credentials while trying to {what} ({exc.code}: "
                                  f"{exc.message}); run `{login_command(site_dir)}` and retry the transfer")
        if status == 429 or status >= 500:
            return TransferUnavailable(f"Globus answered {status} while trying to {what}: {exc.message}")
        return TransferFailed(f"Globus refused to {what}: {status} {exc.code}: {exc.message}")
    name = type(exc).__name__
    if name in ("MissingTokenError", "TokenValidationError", "UnmetScopeRequirementsError"):
        return TransferFailed(f"the site has no valid Globus login to {what} ({exc}); run "
                              f"`{login_command(site_dir)}`")
    return TransferFailed(f"could not {what}: {name}: {exc}")


def _seconds_between(start: str | None, end: str | None) -> float:
    try:
        if start and end:
            return max(0.0, (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds())
    except ValueError:
        pass
    return 0.0


class GlobusBackend:
    can_adopt = True

    def __init__(self, location: Location, settings: GlobusSettings, *,
                 client_factory: Callable[[], globus_sdk.TransferClient], site_dir: Path | None = None) -> None:
        self.location = location
        self.settings = settings
        self.client_factory = client_factory
        self.site_dir = site_dir
        self._client: globus_sdk.TransferClient | None = None

    @property
    def client(self) -> globus_sdk.TransferClient:
        if self._client is None:
            self._client = self.client_factory()
        return self._client

    async def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        def run() -> Any:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - sorted into retry / fix below
                raise classify(exc, what=what, site_dir=self.site_dir) from exc
        return await asyncio.to_thread(run)

    def transfer_data(self, task: Task) -> globus_sdk.TransferData:
        """The task's TransferData (pure given the settings): the site's own collection on
        the job side, the location's collection on the other, one entry per item."""
        if not self.settings.local_collection:
            raise TransferFailed("transfers.globus.local_collection is not set in settings.yml: the id of the Globus "
                                 "collection that serves this site's filesystem")
        local, remote = self.settings.local_collection, self.location.host
        source, destination = (remote, local) if task.direction == IN else (local, remote)
        options: dict[str, Any] = {"verify_checksum": self.settings.verify_checksum, "preserve_timestamp": True}
        if self.settings.sync_level:
            options["sync_level"] = self.settings.sync_level
        data = globus_sdk.TransferData(source, destination, label=f"balsam {task.direction.lower()} {task.key[:8]}",
                                       submission_id=task.submission_id, **options)
        for item in task.items:
            site_path = map_path(str(item.local), self.settings.path_map)
            remote_path = self.location.resolve(item.remote)
            src, dst = (remote_path, site_path) if item.direction == IN else (site_path, remote_path)
            data.add_item(src, dst, recursive=item.recursive)
        return data

    async def prepare(self, task: Task) -> None:
        if not task.submission_id:
            response = await self._call("get a submission id", self.client.get_submission_id)
            task.submission_id = str(response["value"])

    async def submit(self, task: Task) -> str:
        if not task.submission_id:
            raise TransferFailed("internal: a Globus task must have a journaled submission id before it is submitted")
        data = self.transfer_data(task)
        response = await self._call(f"submit a transfer to collection {self.location.host}",
                                    lambda: self.client.submit_transfer(data))
        log.info("globus task submitted", task=task.key, code=response.get("code"), task_id=response["task_id"],
                 submission_id=task.submission_id, items=len(task.items))
        return str(response["task_id"])

    async def poll(self, task: Task) -> Status:
        doc = await self._call(f"read task {task.task_id}", lambda: self.client.get_task(task.task_id))
        status = doc.get("status")
        figures = {"bytes": int(doc.get("bytes_transferred") or 0), "files": int(doc.get("files_transferred") or 0)}
        if status == "SUCCEEDED":
            return Status(done=True, ok=True, **figures)
        if status == "FAILED":
            fatal = doc.get("fatal_error") or {}
            reason = fatal.get("description") or fatal.get("code") or doc.get("nice_status") or "no reason given"
            return Status(done=True, ok=False, error=f"Globus task {task.task_id} failed: {reason}", **figures)
        # ACTIVE or INACTIVE (paused, credentials expired): still running as far as Globus
        # is concerned; the service's deadline ends it if it never moves again.
        detail = f"{status}: {doc.get('nice_status') or ''}".strip(": ")
        return Status(done=False, detail=detail, **figures)

    async def cancel(self, task: Task) -> None:
        if task.task_id:
            await self._call(f"cancel task {task.task_id}", lambda: self.client.cancel_task(task.task_id))

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------- login

def transfer_scopes(settings: GlobusSettings, collections: list[str]) -> list[Any]:
    """The transfer scope with a data_access dependency per collection that needs one."""
    from globus_sdk.scopes import GCSCollectionScopes, TransferScopes

    scope = TransferScopes.all
    for collection in collections:
        scope = scope.with_dependency(GCSCollectionScopes(collection).data_access.with_optional(True))
    return [scope]


def make_app(site_dir: Path, settings: GlobusSettings, *, interactive: bool,
             extra_scopes: list[str] | None = None) -> globus_sdk.GlobusApp:
    """A UserApp (native login) or ClientApp (client credentials, secret from the
    environment), with its tokens in the site's state folder. Non-interactive apps (the
    daemon) never start a login flow: a missing token is an error naming the command."""
    import os

    from globus_sdk.token_storage import JSONTokenStorage

    if not settings.client_id:
        raise TransferFailed("transfers.globus.client_id is not set in settings.yml: register an app at "
                             "app.globus.org (native app for user login, or a confidential client) and put its "
                             "client id there")
    storage = JSONTokenStorage(site_dir / "state" / TOKEN_FILE)
    config = globus_sdk.GlobusAppConfig(token_storage=storage, request_refresh_tokens=True,
                                        token_validation_error_handler=None if not interactive else
                                        globus_sdk.GlobusAppConfig().token_validation_error_handler)
    scopes: dict[str, Any] = {"transfer.api.globus.org": transfer_scopes(settings,
                                                                        settings.data_access_collections)}
    secret = os.environ.get(settings.client_secret_env, "") if settings.client_secret_env else ""
    if secret:
        app: globus_sdk.GlobusApp = globus_sdk.ClientApp(APP_NAME, client_id=settings.client_id, client_secret=secret,
                                                         scope_requirements=scopes, config=config)
    else:
        app = globus_sdk.UserApp(APP_NAME, client_id=settings.client_id, scope_requirements=scopes, config=config)
    if extra_scopes:
        app.add_scope_requirements({"transfer.api.globus.org": list(extra_scopes)})
    return app


def site_transfer_client(site_dir: Path, settings: GlobusSettings) -> globus_sdk.TransferClient:
    """The daemon's TransferClient: tokens from the site's storage, no interactive login,
    no retries inside the SDK (the transfer service retries with its own backoff)."""
    app = make_app(site_dir, settings, interactive=False)
    return globus_sdk.TransferClient(app=app, retry_config=RetryConfig(max_retries=0))
