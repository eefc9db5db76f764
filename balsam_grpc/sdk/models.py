"""Thin Python objects over the protobuf messages, with Balsam-style managers.

    job = Job(workdir="run/1", app=app, tags={"exp": "a"}, parameters={"n": 3})
    job.save()                       # CreateJob (with a request_id)
    job.state = "KILLED"; job.save() # UpdateJob with update_mask ["state"]
    job.refresh_from_db(); job.delete()
    Job.objects.filter(state="RUNNING").count()   # default client from the profile
    client.jobs.filter(...)                       # an explicit client

Attributes read and write the message's fields: enums as short names ("RUNNING"),
maps/Struct as dicts, timestamps as aware datetimes. Job resource fields (num_nodes,
...) are also attributes of the job. The message itself is `obj.message`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import ModuleType
from typing import Any, ClassVar

import grpc
from google.protobuf import field_mask_pb2, json_format
from google.protobuf.message import Message

from balsam_grpc.core import pyvalues
from balsam_grpc.core.appdef import resolve_parameters
from balsam_grpc.core.errors import ERRORS_BY_CODE, BalsamError, FailedPrecondition, InvalidArgument
from balsam_grpc.core.states import FINAL_STATES
from balsam_grpc.sdk import filters, futures
from balsam_grpc.sdk.convert import get_field, scalar_text, set_field
from balsam_grpc.sdk.query import Query
from balsam_grpc.sdk.service import Connection, default_connection
from balsam_grpc.v1 import (
    app_pb2,
    app_service_pb2,
    batch_job_pb2,
    batch_job_service_pb2,
    event_pb2,
    event_service_pb2,
    job_pb2,
    job_service_pb2,
    site_pb2,
    site_service_pb2,
    transfer_item_pb2,
    transfer_item_service_pb2,
)

# Models reach their client only through what sdk.service.Connection offers.
Client = Connection

# Jobs per BatchCreateJobs of bulk_create: the server's default max_jobs_per_call, for
# which its streamed create is made (the database takes in one chunk of jobs while the
# server converts the next). Against chunks of 1,000, a 10,000-job bulk_create on
# PostgreSQL cost the server 14.5 us per job instead of 22.5, the database 21.5 instead of
# 24.5 and the client 4.9 instead of 5.6 (medians of 4 alternated pairs on the loaded
# 2-core machine), +26 % jobs/s. A server that takes fewer per call refuses a chunk
# before creating any of it; bulk_create then sends it in halves (create_jobs).
BULK_CHUNK = 10_000
# What a create of too many jobs (the server's max_jobs_per_call) or bytes (its limit per
# message) in one call is refused with, whole: the server's reasons, and gRPC's own
# RESOURCE_EXHAUSTED with no reason (a message over the channel's size limits). Chunks
# ten times larger than before may cross those where jobs carry much data.
TOO_LARGE = frozenset({"TOO_LARGE", "REQUEST_TOO_LARGE", "RESOURCE_EXHAUSTED"})


def create_jobs(client: Connection, jobs: Sequence[job_pb2.Job], *, chunk_size: int = BULK_CHUNK,
                view: int = job_service_pb2.JOB_VIEW_BASIC, timeout: float | None = None,
                ) -> Iterator[Sequence[job_pb2.Job]]:
    """Create `jobs` in BatchCreateJobs calls of `chunk_size`, in order, yielding each
    call's created jobs (bulk_create and `balsamctl job create` both create through this).
    A call the server refuses as too many jobs or bytes is sent again in halves; any other
    refusal is raised. Each call is atomic and they go in order, so when one fails the
    jobs yielded so far are exactly those created and the failed call began at
    jobs[number yielded]; a too-large refusal raised that names no job's field was of that
    one job alone. `timeout` None: the client's default deadline."""
    options = {} if timeout is None else {"timeout": timeout}
    # Calls to make, the next one last.
    pending = [jobs[i:i + chunk_size] for i in range(0, len(jobs), chunk_size)][::-1]
    while pending:
        chunk = pending.pop()
        request = job_service_pb2.BatchCreateJobsRequest(jobs=chunk, view=view)
        try:
            response = client.call("JobService", "BatchCreateJobs", request, **options)
        except BalsamError as exc:
            # A refusal that names one job's field (too many tags, data over its limit)
            # would come back for that job in any half: the chunk stays refused whole.
            if exc.reason not in TOO_LARGE or len(chunk) < 2 or (exc.field or "").startswith("jobs["):
                raise
            half = len(chunk) // 2
            pending += [chunk[half:], chunk[:half]]
            continue
        yield response.jobs


@dataclass(frozen=True)
class Resource:
    """How a model maps onto its service."""

    name: str                 # "job" (also used in messages)
    service: str              # "JobService"
    field: str                # singular response field: "job", "batch_job", "transfer_item"
    plural: str               # list response field: "jobs"
    module: ModuleType        # the *_service_pb2 module
    filter: filters.FilterSpec
    list: str
    get: str | None = None
    create: str | None = None
    update: str | None = None
    delete: str | None = None
    updatable: frozenset[str] = frozenset()
    max_page: int = 10_000

    def request(self, rpc: str) -> type[Message]:
        return getattr(self.module, f"{rpc}Request")


class Manager:
    """Entry point of queries for one model, bound to a client (or the default one)."""

    def __init__(self, model: type[Model], client: Client | None = None) -> None:
        self.model = model
        self.bound_client = client

    @property
    def client(self) -> Client:
        if self.bound_client is not None:
            return self.bound_client
        return default_connection()  # type: ignore[no-any-return]

    def all(self) -> Query:
        return Query(self)

    def filter(self, **kwargs: Any) -> Query:
        return Query(self).filter(**kwargs)

    def exclude(self, **kwargs: Any) -> Query:
        return Query(self).exclude(**kwargs)

    def order_by(self, *keys: str) -> Query:
        return Query(self).order_by(*keys)

    def get(self, **kwargs: Any) -> Any:
        return Query(self).get(**kwargs)

    def count(self) -> int:
        return Query(self).count()

    def first(self) -> Any:
        return Query(self).first()

    def __iter__(self) -> Iterator[Any]:
        return iter(Query(self))

    def create(self, **fields: Any) -> Any:
        """Create one object on the server and return it."""
        obj = self.model(_client=self.bound_client, **fields)
        obj.save()
        return obj

    def bulk_create(self, objects: Iterable[Any], *, chunk_size: int = BULK_CHUNK) -> list[Any]:
        """Create many objects; jobs go `chunk_size` per BatchCreateJobs call (each chunk
        atomic, each with its own request_id so a retried chunk is not duplicated; a
        chunk the server refuses as too large for one call goes in halves: create_jobs).
        The objects get their ids and states; the same objects are returned."""
        objs = list(objects)
        res = self.model.resource
        for obj in objs:
            if not isinstance(obj, self.model):
                raise TypeError(f"bulk_create takes {self.model.__name__} objects, got {type(obj).__name__}")
        if res.name != "job":
            for obj in objs:
                obj.save()
            return objs
        done = 0
        for created in create_jobs(self.client, [o.message for o in objs], chunk_size=chunk_size):
            for obj, job in zip(objs[done:done + len(created)], created, strict=True):
                msg = obj.message
                msg.id, msg.state, msg.workdir = job.id, job.state, job.workdir
                msg.app_id, msg.site_id = job.app_id, job.site_id
                obj._bind(self.bound_client)
                obj._dirty.clear()
            done += len(created)
        return objs

    def __repr__(self) -> str:
        return f"<{self.model.__name__} manager>"


class _ManagerDescriptor:
    """`Model.objects`: a manager on the default client, made when first used."""

    def __get__(self, obj: Any, owner: type[Model]) -> Manager:
        return owner.manager_class(owner)


class Model:
    """Base of the SDK models: attribute access to a protobuf message, plus save,
    refresh_from_db and delete through the resource's service."""

    resource: ClassVar[Resource]
    message_type: ClassVar[type[Message]]
    manager_class: ClassVar[type[Manager]] = Manager
    objects: ClassVar[Any] = _ManagerDescriptor()
    _repr_fields: ClassVar[tuple[str, ...]] = ("name",)

    _msg: Message
    _client: Client | None
    _dirty: set[str]

    def __init__(self, _message: Message | None = None, *, _client: Client | None = None, **fields: Any) -> None:
        object.__setattr__(self, "_msg", _message if _message is not None else self.message_type())
        object.__setattr__(self, "_client", _client)
        object.__setattr__(self, "_dirty", set())
        for name, value in fields.items():
            setattr(self, name, value)

    @classmethod
    def from_message(cls, message: Message, client: Client | None = None) -> Any:
        return cls(message, _client=client)

    def _bind(self, client: Client | None) -> None:
        if client is not None:
            object.__setattr__(self, "_client", client)

    # -- attributes -------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in cls.message_type.DESCRIPTOR.fields]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if name in self.message_type.DESCRIPTOR.fields_by_name:
            return get_field(self._msg, name)
        raise AttributeError(f"{type(self).__name__} has no field {name!r}; fields: {', '.join(self.field_names())}")

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(getattr(type(self), name, None), property):
            object.__setattr__(self, name, value)
        elif name in self.message_type.DESCRIPTOR.fields_by_name:
            set_field(self._msg, name, value)
            self._dirty.add(name)
        else:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}; fields: {', '.join(self.field_names())}")

    @property
    def message(self) -> Any:
        """The underlying protobuf message (live: changes to it are not tracked for save)."""
        return self._msg

    @property
    def client(self) -> Client:
        if self._client is not None:
            return self._client
        return default_connection()  # type: ignore[no-any-return]

    def to_dict(self) -> dict[str, Any]:
        """The protobuf JSON mapping with the proto field names."""
        return json_format.MessageToDict(self._msg, preserving_proto_field_name=True)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        if not self._msg.id or not other._msg.id:  # type: ignore[attr-defined]
            return self is other
        return self._msg.id == other._msg.id  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._msg.id)) if self._msg.id else id(self)  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        shown = [f"id={self._msg.id}"]  # type: ignore[attr-defined]
        for name in self._repr_fields:
            value = getattr(self, name)
            if value not in ("", None, 0):
                shown.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(shown)})"

    # -- persistence -------------------------------------------------------------------

    def update_mask(self) -> list[str]:
        """Fields changed since the last load or save (checked against what is mutable)."""
        fixed = sorted(self._dirty - self.resource.updatable)
        if fixed:
            raise ValueError(f"{self.resource.name} field(s) {', '.join(fixed)} cannot be changed after creation; "
                             f"changeable: {', '.join(sorted(self.resource.updatable))}")
        return sorted(self._dirty)

    def _replace(self, message: Message) -> None:
        object.__setattr__(self, "_msg", message)
        self._dirty.clear()

    def save(self) -> Any:
        """Create the object (no id yet) or send the changed fields (update mask)."""
        res = self.resource
        if not self._msg.id:  # type: ignore[attr-defined]
            return self._answered(res.create, "cannot be created by clients", **{res.field: self._msg})
        mask = self.update_mask()
        if not mask:
            return self
        return self._answered(res.update, "cannot be changed by clients", **{res.field: self._msg},
                              update_mask=field_mask_pb2.FieldMask(paths=mask))

    def refresh_from_db(self) -> Any:
        """Reload every field from the server (local unsaved changes are dropped)."""
        return self._answered(self.resource.get, "cannot be read one by one", id=self._require_id())

    def _answered(self, rpc: str | None, refusal: str, **request: Any) -> Any:
        """Call `rpc` of the resource's service and become the object it answers with."""
        res = self.resource
        if rpc is None:
            raise TypeError(f"{res.name}s {refusal}")
        response = self.client.call(res.service, rpc, res.request(rpc)(**request))
        self._replace(getattr(response, res.field))
        return self

    def delete(self) -> None:
        res = self.resource
        if res.delete is None:
            raise TypeError(f"{res.name}s cannot be deleted")
        self.client.call(res.service, res.delete, res.request(res.delete)(id=self._require_id()))
        self._msg.id = 0  # type: ignore[attr-defined]

    def _require_id(self) -> int:
        if not self._msg.id:  # type: ignore[attr-defined]
            raise ValueError(f"this {self.resource.name} has not been saved yet")
        return self._msg.id  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------- sites

class Site(Model):
    resource = Resource(
        name="site", service="SiteService", field="site", plural="sites", module=site_service_pb2,
        filter=filters.SITE_FILTER, list="ListSites", get="GetSite", create="CreateSite", update="UpdateSite",
        delete="DeleteSite",
        updatable=frozenset({"name", "hostname", "path", "scheduler", "allowed_queues", "allowed_projects",
                             "optional_batch_job_params", "transfer_locations", "elastic_queue"}))
    message_type = site_pb2.Site
    _repr_fields = ("name", "hostname")


# -------------------------------------------------------------------------------- apps

_JOB_OPTIONS = frozenset({"name", "tags", "data", "parent_ids", "transfers", "resources", "priority",
                          "on_parent_failure", "parameters"})
_RESOURCE_FIELDS = frozenset(job_pb2.JobResources.DESCRIPTOR.fields_by_name)


def split_job_options(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """submit() keywords: job fields (and resource shortcuts) vs app parameters."""
    options: dict[str, Any] = {}
    params: dict[str, str] = {}
    for key, value in kwargs.items():
        if key == "parameters":
            params.update({k: scalar_text(v) for k, v in (value or {}).items()})
        elif key in _JOB_OPTIONS or key in _RESOURCE_FIELDS:
            options[key] = value
        else:
            params[key] = scalar_text(value)
    return options, params


def split_submit(app: app_pb2.App, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """submit() keywords for `app`: (job fields, app parameters). A Python-function app
    also takes keyword arguments of any picklable type: every keyword that is not a
    declared scalar parameter travels pickled in the job's data (core.pyvalues), size
    limited, refused here with the reason when it cannot be pickled or is too large."""
    if app.kind != app_pb2.APP_KIND_PYTHON:
        return split_job_options(kwargs)
    declared = {p.name for p in app.parameters}
    for name in declared & set(kwargs):
        if not isinstance(kwargs[name], (str, int, float, bool)):
            raise InvalidArgument(f"parameters.{name}: {name!r} is a declared parameter of {app.name} (text or a "
                                  f"number), got {type(kwargs[name]).__name__}; leave it out of `parameters` to pass "
                                  "any Python object", field=f"parameters.{name}")
    plain = {k: v for k, v in kwargs.items() if k in _JOB_OPTIONS or k in _RESOURCE_FIELDS or k == "parameters"
             or k in declared}
    pickled = {k: v for k, v in kwargs.items() if k not in plain}
    options, params = split_job_options(plain)
    if pickled:
        data = dict(options.get("data") or {})
        try:
            data[pyvalues.ARGS_KEY] = pyvalues.encode(pickled, f"the arguments ({', '.join(pickled)}) of {app.name}")
        except ValueError as exc:
            raise InvalidArgument(str(exc), field="data") from None
        options["data"] = data
    return options, params


class App(Model):
    resource = Resource(
        name="app", service="AppService", field="app", plural="apps", module=app_service_pb2,
        filter=filters.APP_FILTER, list="ListApps", get="GetApp", create="CreateApp", update="UpdateApp",
        delete="DeleteApp",
        updatable=frozenset({"name", "description", "command_template", "shell", "parameters", "transfers",
                             "environment", "preamble", "cleanup_globs", "retry_policy", "hooks", "kind",
                             "class_path"}))
    message_type = app_pb2.App
    _repr_fields = ("name", "site_id")

    def submit(self, workdir: str, **kwargs: Any) -> Job:
        """Create a job of this app. Job fields (name, tags, data, parent_ids, transfers,
        priority, resources or num_nodes/ranks_per_node/..., on_parent_failure) are
        keywords; every other keyword (or `parameters={...}`) is an app parameter. The
        parameters are checked against the app's declaration before anything is sent."""
        options, params = split_submit(self._msg, kwargs)  # type: ignore[arg-type]
        resolve_parameters(self._msg, params)  # type: ignore[arg-type]
        job = Job(_client=self._client, workdir=workdir, app_id=self._require_id(), parameters=params, **options)
        return job.save()


# -------------------------------------------------------------------------------- jobs

class JobManager(Manager):
    def wait(self, jobs: Iterable[Job], timeout: float | None = None, return_when: str = "ALL_COMPLETED"
             ) -> tuple[set[Job], set[Job]]:
        """(done, not_done) like concurrent.futures.wait; driven by WatchEvents."""
        return futures.wait(list(jobs), timeout=timeout, return_when=return_when, client=self.bound_client)

    def as_completed(self, jobs: Iterable[Job], timeout: float | None = None) -> Iterator[Job]:
        """Jobs as they reach a final state; TimeoutError when `timeout` passes first."""
        return futures.as_completed(list(jobs), timeout=timeout, client=self.bound_client)

    def group_by(self, *dimensions: str) -> dict[Any, int]:
        return Query(self).group_by(*dimensions)


class Job(Model):
    resource = Resource(
        name="job", service="JobService", field="job", plural="jobs", module=job_service_pb2,
        filter=filters.JOB_FILTER, list="ListJobs", get="GetJob", create="CreateJob", update="UpdateJob",
        delete="DeleteJob",
        updatable=frozenset({"name", "tags", "parameters", "data", "priority", "resources", "on_parent_failure",
                             "state", "state_message", "return_code", "error_tail"}))
    message_type = job_pb2.Job
    manager_class = JobManager
    _repr_fields = ("state", "workdir")

    def __init__(self, _message: Message | None = None, *, _client: Client | None = None, **fields: Any) -> None:
        app = fields.pop("app", None)
        site = fields.pop("site", None)
        super().__init__(_message, _client=_client, **fields)
        if site is not None:
            self._msg.site_id = getattr(site, "id", site)  # type: ignore[attr-defined]
        if app is not None:
            self._set_app(app)

    def _set_app(self, app: Any) -> None:
        msg = self._msg
        if isinstance(app, App):
            msg.app_id, msg.site_id = app.id, app.site_id  # type: ignore[attr-defined]
        elif isinstance(app, str):
            msg.app_name = app  # type: ignore[attr-defined]
        elif isinstance(app, int) and not isinstance(app, bool):
            msg.app_id = app  # type: ignore[attr-defined]
        else:
            raise TypeError(f"app must be an App, an app id or an app name, not {type(app).__name__}")
        self._dirty.add("app_id")

    # Resource fields read and write job.resources.<name> (Balsam jobs have them flat).
    def __getattr__(self, name: str) -> Any:
        if name in _RESOURCE_FIELDS:
            return get_field(self._msg.resources, name)  # type: ignore[attr-defined]
        return super().__getattr__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _RESOURCE_FIELDS and name not in self.message_type.DESCRIPTOR.fields_by_name:
            set_field(self._msg.resources, name, value)  # type: ignore[attr-defined]
            self._dirty.add("resources")
        else:
            super().__setattr__(name, value)

    @property
    def app(self) -> App:
        """The job's app (fetched)."""
        return App.from_message(self.client.call("AppService", "GetApp", app_service_pb2.GetAppRequest(
            id=self._msg.app_id)).app, self._client)  # type: ignore[attr-defined]

    @app.setter
    def app(self, value: Any) -> None:
        self._set_app(value)

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES

    def kill(self, message: str = "killed by user") -> Job:
        """Move the job to KILLED (FailedPrecondition if it is already final)."""
        self.state = "KILLED"
        self.state_message = message
        return self.save()

    def retry(self, *, reset_run_count: bool = False) -> Job:
        """Run a FAILED, KILLED, RUN_ERROR or RUN_TIMEOUT job again from where it must
        restart (RetryJobs); FailedPrecondition when it is not retryable. Returns self,
        refreshed."""
        res = self.resource
        response = self.client.call(res.service, "RetryJobs", res.request("RetryJobs")(
            filter=job_pb2.JobFilter(ids=[self._require_id()]), reset_run_count=reset_run_count))
        if response.failed_count:
            (outcome,) = [o for o in response.outcomes if o.code]
            code = next(c for c in grpc.StatusCode if c.value[0] == outcome.code)
            raise ERRORS_BY_CODE.get(code, FailedPrecondition)(outcome.message, reason=outcome.reason)
        self.refresh_from_db()
        return self

    def history(self) -> list[Event]:
        """The job's events, oldest first."""
        return list(Manager(Event, self._client).filter(job=self._require_id()))

    # Futures, driven by the client's shared WatchEvents stream.
    def done(self) -> bool:
        """Whether the job has reached a final state (JOB_FINISHED, FAILED, KILLED)."""
        done, _ = futures.wait([self], timeout=0, client=self._client)
        return bool(done)

    def result(self, timeout: float | None = None) -> Any:
        """Block until the job is final. JOB_FINISHED: a Python-function app's return
        value as it was (any picklable type), else data["result"] if set, else the data
        dict. FAILED/KILLED: the exception a Python-function app raised, re-raised here
        with the launcher's traceback as its cause; otherwise JobFailed with the state
        message and error tail. TimeoutError if `timeout` seconds pass first."""
        return futures.job_result(self, timeout)


# ------------------------------------------------------------------ batch jobs, transfers

class BatchJob(Model):
    resource = Resource(
        name="batch job", service="BatchJobService", field="batch_job", plural="batch_jobs",
        module=batch_job_service_pb2, filter=filters.BATCH_JOB_FILTER, list="ListBatchJobs", get="GetBatchJob",
        create="CreateBatchJob", update="UpdateBatchJob", delete="DeleteBatchJob",
        updatable=frozenset({"state", "num_nodes", "wall_time_min", "queue", "project", "filter_tags",
                             "optional_params", "partitions"}))
    message_type = batch_job_pb2.BatchJob
    _repr_fields = ("state", "num_nodes", "scheduler_id")

    def __init__(self, _message: Message | None = None, *, _client: Client | None = None, **fields: Any) -> None:
        site = fields.pop("site", None)
        wall = fields.get("wall_time_min")
        if isinstance(wall, timedelta):
            fields["wall_time_min"] = int(wall.total_seconds() // 60)
        super().__init__(_message, _client=_client, **fields)
        if site is not None:
            self._msg.site_id = getattr(site, "id", site)  # type: ignore[attr-defined]


class TransferItem(Model):
    resource = Resource(
        name="transfer item", service="TransferService", field="transfer_item", plural="transfer_items",
        module=transfer_item_service_pb2, filter=filters.TRANSFER_ITEM_FILTER, list="ListTransferItems",
        get="GetTransferItem", update="UpdateTransferItem",
        updatable=frozenset({"state", "error", "task_id", "metrics"}))
    message_type = transfer_item_pb2.TransferItem
    _repr_fields = ("job_id", "state", "slot")


# ------------------------------------------------------------------------------ events

class Event(Model):
    """One recorded state change (read-only). `kind` is JOB_STATE, TRANSFER_STATE or
    BATCH_JOB_STATE; `from_state` / `to_state` are the short state names."""

    resource = Resource(
        name="event", service="EventService", field="event", plural="events", module=event_service_pb2,
        filter=filters.EVENT_FILTER, list="ListEvents")
    message_type = event_pb2.Event
    _repr_fields = ("job_id", "kind", "from_state", "to_state")

    @property
    def kind(self) -> str:
        which = self._msg.WhichOneof("change")
        return which.upper() if which else ""

    def _change(self) -> Message | None:
        which = self._msg.WhichOneof("change")
        return getattr(self._msg, which) if which else None

    @property
    def from_state(self) -> str:
        change = self._change()
        return get_field(change, "from_state") if change is not None else ""

    @property
    def to_state(self) -> str:
        change = self._change()
        return get_field(change, "to_state") if change is not None else ""

    @property
    def subject_id(self) -> int:
        """The job, transfer item or batch job the event is about."""
        change = self._change()
        if isinstance(change, event_pb2.TransferStateChange):
            return change.transfer_item_id
        if isinstance(change, event_pb2.BatchJobStateChange):
            return change.batch_job_id
        return self._msg.job_id  # type: ignore[attr-defined]

    @property
    def cursor(self) -> str:
        """Resume point of a watch right after this event."""
        return str(self._msg.id)  # type: ignore[attr-defined]
