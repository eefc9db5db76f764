"""`Client`: the SDK's entry point, a `ServiceClient` (sdk.service: channel, calls,
deadlines, retries, the missing-server check) with the resources on top: managers of
every model (`client.jobs`, ...), event watches and job futures.

The SDK's modules form layers, each importing only those below it (no circles):
errors, convert, filters -> service -> query -> watch -> futures -> models -> apps,
client. Below the client they see it only as a `service.Connection`; the default
client of `Model.objects` is reached through `service.default_connection()`, which this
module provides.
"""

from __future__ import annotations

import threading
from typing import Any

from balsam_grpc.sdk import models, service
from balsam_grpc.sdk.filters import EVENT_FILTER
from balsam_grpc.sdk.futures import JobWatcher
from balsam_grpc.sdk.models import Event, Manager
from balsam_grpc.sdk.service import (  # noqa: F401 - re-exported for callers of sdk.client
    BACKOFF_INITIAL,
    BACKOFF_MAX,
    CONNECT_TIMEOUT,
    DEFAULT_TIMEOUT,
    HEALTH_CHECK,
    MUTATION_ATTEMPTS,
    ServiceClient,
    new_request_id,
    server_busy_delay,
)
from balsam_grpc.sdk.watch import EventStream


class Client(ServiceClient):
    """A connection to a balsam-grpc server.

    >>> client = Client()                                  # profile / environment
    >>> client = Client("host:50051", token="...", tls_ca="ca.pem", timeout=10)
    >>> client.jobs.filter(state="RUNNING").count()
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._watcher: JobWatcher | None = None

    # -- resources ------------------------------------------------------------------

    def _manager(self, model_name: str) -> Manager:
        model = getattr(models, model_name)
        return model.manager_class(model, self)

    @property
    def jobs(self) -> Manager:
        return self._manager("Job")

    @property
    def sites(self) -> Manager:
        return self._manager("Site")

    @property
    def apps(self) -> Manager:
        return self._manager("App")

    @property
    def batch_jobs(self) -> Manager:
        return self._manager("BatchJob")

    @property
    def transfer_items(self) -> Manager:
        return self._manager("TransferItem")

    @property
    def events(self) -> Manager:
        return self._manager("Event")

    def resolve_names(self, resource: str, names: list[str]) -> list[int]:
        """Ids of the caller's sites/apps with these names (for filters by name)."""
        model = {"site": models.Site, "app": models.App}[resource]
        return [obj.id for obj in models.Manager(model, self).filter(name=names)]

    # -- events -----------------------------------------------------------------------

    def watch(self, *, since_cursor: str | None = None, replay: bool = False, **filters: Any) -> EventStream:
        """Events matching `filters` (Event.objects keywords) as they happen, forever:
        reconnects with backoff and resumes after the last event delivered, so none is
        missed or repeated. `since_cursor` resumes an earlier watch (its `.cursor`);
        `replay=True` starts with the whole matching history."""
        criteria = [(False, EVENT_FILTER.normalize(filters))]
        filter_msg = EVENT_FILTER.build(criteria, resolve=self.resolve_names)
        return EventStream(self, filter_msg, cursor=since_cursor, replay=replay,
                           wrap=lambda msg: Event.from_message(msg, self))

    @property
    def watcher(self) -> JobWatcher:
        """The one stream that drives every job future of this client."""
        with self._lock:
            if self._closed:
                raise RuntimeError("client is closed")
            if self._watcher is None:
                self._watcher = JobWatcher(self)
            return self._watcher

    # -- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._closed = True
            watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.close()
        super().close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_default: Client | None = None
_default_lock = threading.Lock()


def default_client() -> Client:
    """The client `Model.objects` uses: made from the profile/environment on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Client()
        return _default


def set_default_client(client: Client | None) -> None:
    """Make `client` the one `Model.objects` uses (None: make a new one on next use)."""
    global _default
    with _default_lock:
        _default = client


service.provide_default(default_client)

__all__ = ["Client", "default_client", "set_default_client"]
