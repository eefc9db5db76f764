"""Lazy, chainable queries over one resource (Balsam/Django style), paged with the
server's keyset page tokens.

    Job.objects.filter(state="RUNNING", tags={"exp": "xpcs"}).exclude(tags={"skip": "1"})
       .order_by("-priority")[:100]

Nothing is sent until the query is iterated, counted, sliced into a list, updated or
deleted. Each call returns a new query; a query can be iterated many times (each time
asks the server again).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message

from balsam_grpc.sdk.errors import BalsamError, MultipleObjectsReturned, NotFound
from balsam_grpc.sdk.filters import MatchesNothing
from balsam_grpc.sdk.service import Connection
from balsam_grpc.v1 import job_pb2

DEFAULT_PAGE = 500
RESOURCE_SHORTCUTS = frozenset(job_pb2.JobResources.DESCRIPTOR.fields_by_name)


@dataclass(frozen=True)
class Outcome:
    """What happened to one object of a bulk change."""

    id: int
    code: str = "OK"          # gRPC status code name
    reason: str = ""          # machine-readable reason (ErrorReason name) on failure
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.code == "OK"


@dataclass
class BulkResult:
    """Per-object outcomes of `.update()` / `.delete()` / `.retry()` on a query."""

    outcomes: list[Outcome] = field(default_factory=list)
    succeeded: int = 0
    failed: int = 0
    dry_run: bool = False

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    @property
    def ok(self) -> bool:
        return self.failed == 0

    @classmethod
    def from_outcomes(cls, outcomes: Any, succeeded: int, failed: int, dry_run: bool = False) -> BulkResult:
        out = [Outcome(o.id, grpc.StatusCode.OK.name if o.code == 0 else _code_name(o.code), o.reason, o.message)
               for o in outcomes]
        return cls(out, succeeded, failed, dry_run)


class Source(Protocol):
    """What a query is built from (sdk.models.Manager): a model class (its `resource`,
    `from_message`, and a constructor taking field keywords) and a client."""

    model: Any
    bound_client: Connection | None

    @property
    def client(self) -> Connection: ...


def _code_name(number: int) -> str:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code.name
    return str(number)


class Query:
    """A selection of one resource. Build with `Model.objects` / `client.jobs`."""

    def __init__(self, manager: Source, criteria: tuple[tuple[bool, tuple[tuple[str, Any], ...]], ...] = (),
                 order: tuple[str, ...] = (), start: int = 0, stop: int | None = None,
                 page_size: int | None = None) -> None:
        self._manager = manager
        self._criteria = criteria
        self._order = order
        self._start = start
        self._stop = stop
        self._page_size = page_size

    # -- building -------------------------------------------------------------------

    @property
    def model(self) -> Any:
        return self._manager.model

    @property
    def client(self) -> Connection:
        return self._manager.client

    def _clone(self, **changes: Any) -> Query:
        args = dict(manager=self._manager, criteria=self._criteria, order=self._order, start=self._start,
                    stop=self._stop, page_size=self._page_size)
        args.update(changes)
        return type(self)(**args)

    def _check_unsliced(self, what: str) -> None:
        if self._start or self._stop is not None:
            raise TypeError(f"cannot {what} a sliced query; filter first, then slice")

    def filter(self, **kwargs: Any) -> Query:
        """Objects matching all the keyword conditions (and those of earlier calls)."""
        self._check_unsliced("filter")
        normalized = self.model.resource.filter.normalize(kwargs)
        return self._clone(criteria=(*self._criteria, (False, normalized)))

    def exclude(self, **kwargs: Any) -> Query:
        """Leave out objects matching these conditions (jobs: state, tags)."""
        self._check_unsliced("exclude from")
        normalized = self.model.resource.filter.normalize(kwargs, exclude=True)
        return self._clone(criteria=(*self._criteria, (True, normalized)))

    def order_by(self, *keys: str) -> Query:
        """Sort keys, "-" for descending (jobs: id, create_time, update_time, state_time,
        priority, workdir; events: id or -id)."""
        self._check_unsliced("order")
        return self._clone(order=self.model.resource.filter.check_order(tuple(keys)))

    def page_size(self, size: int) -> Query:
        """Objects fetched per round trip while iterating."""
        if size < 1:
            raise ValueError("page size must be at least 1")
        return self._clone(page_size=size)

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            if key.step not in (None, 1):
                raise ValueError("query slices do not take a step")
            start, stop = key.start or 0, key.stop
            if start < 0 or (stop is not None and stop < 0):
                raise ValueError("query slices cannot be negative (order_by('-...') instead)")
            new_start = self._start + start
            new_stop = self._start + stop if stop is not None else None
            if self._stop is not None:
                new_stop = self._stop if new_stop is None else min(new_stop, self._stop)
            if new_stop is not None:
                new_stop = max(new_stop, new_start)
            return self._clone(start=new_start, stop=new_stop)
        if not isinstance(key, int):
            raise TypeError(f"query indices must be int or slice, not {type(key).__name__}")
        if key < 0:
            raise ValueError("query indices cannot be negative")
        found = list(self[key:key + 1])
        if not found:
            raise IndexError(key)
        return found[0]

    # -- running ----------------------------------------------------------------------

    def filter_message(self) -> Message:
        """The Filter message this query sends (MatchesNothing if it is contradictory)."""
        return self.model.resource.filter.build(list(self._criteria), resolve=self.client.resolve_names)

    def _list_request(self, filter_msg: Message, size: int, token: str) -> Message:
        res = self.model.resource
        request = res.request(res.list)(filter=filter_msg, page_size=size, page_token=token)
        if self._order:
            if res.name == "job":
                request.order_by = ",".join(self._order)
            elif res.name == "event":
                request.descending = self._order[0] == "-id"
        return request

    def iter_messages(self, *, view: int = 0) -> Iterator[Message]:
        """The raw messages, fetched page by page as the iteration goes."""
        try:
            filter_msg = self.filter_message()
        except MatchesNothing:
            return
        res = self.model.resource
        skip = self._start
        limit = None if self._stop is None else self._stop - self._start
        if limit == 0:
            return
        size = self._page_size or (min(res.max_page, self._stop) if self._stop is not None else DEFAULT_PAGE)
        token = ""
        while True:
            request = self._list_request(filter_msg, size, token)
            if view:
                request.view = view
            response = self.client.call(res.service, res.list, request)
            for msg in getattr(response, res.plural):
                if skip:
                    skip -= 1
                    continue
                yield msg
                if limit is not None:
                    limit -= 1
                    if limit == 0:
                        return
            token = response.next_page_token
            if not token:
                return

    def __iter__(self) -> Iterator[Any]:
        client = self._manager.bound_client
        for msg in self.iter_messages():
            yield self.model.from_message(msg, client)

    def __repr__(self) -> str:
        return f"<{self.model.__name__} query criteria={self._criteria} order={self._order}>"

    def ids(self) -> list[int]:
        """Ids of the selected objects (jobs: fetched with the BASIC view)."""
        view = 1 if self.model.resource.name == "job" else 0
        return [m.id for m in self.iter_messages(view=view)]

    def count(self) -> int:
        """How many objects match (jobs: counted by the server)."""
        res = self.model.resource
        if res.name != "job":
            return sum(1 for _ in self.iter_messages())
        try:
            filter_msg = self.filter_message()
        except MatchesNothing:
            return 0
        total = self.client.call(res.service, "CountJobs", res.request("CountJobs")(filter=filter_msg)).total
        total = max(total - self._start, 0)
        return total if self._stop is None else min(total, self._stop - self._start)

    def exists(self) -> bool:
        return self.first() is not None

    def first(self) -> Any:
        """The first object (in the query's order) or None."""
        found = list(self[:1])
        return found[0] if found else None

    def get(self, **kwargs: Any) -> Any:
        """Exactly one object; NotFound or MultipleObjectsReturned otherwise."""
        res = self.model.resource
        if set(kwargs) == {"id"} and isinstance(kwargs["id"], int) and not self._criteria and res.get:
            request = res.request(res.get)(id=kwargs["id"])
            response = self.client.call(res.service, res.get, request)
            return self.model.from_message(getattr(response, res.field), self._manager.bound_client)
        query = self.filter(**kwargs) if kwargs else self
        found = list(query[:2])
        if not found:
            raise NotFound(f"no {res.name} matches {kwargs or 'the query'}", reason="NOT_FOUND")
        if len(found) > 1:
            raise MultipleObjectsReturned(f"more than one {res.name} matches {kwargs or 'the query'}")
        return found[0]

    def group_by(self, *dimensions: str) -> dict[Any, int]:
        """Jobs only: counts per state / site / app. One dimension gives {value: count},
        several give {(v1, v2): count}. States by name, sites and apps by id."""
        from balsam_grpc.sdk.convert import enum_name, enum_number
        from balsam_grpc.v1 import job_pb2, job_service_pb2

        res = self.model.resource
        if res.name != "job":
            raise TypeError(f"{res.name}s cannot be grouped; only jobs have a server-side count")
        if not dimensions:
            raise ValueError("group_by needs at least one of: state, site, app")
        groups = [enum_number(job_service_pb2.JobGroupBy.DESCRIPTOR, d, "group_by dimension") for d in dimensions]
        try:
            filter_msg = self.filter_message()
        except MatchesNothing:
            return {}
        self._check_unsliced("group")
        response = self.client.call(res.service, "CountJobs",
                                    res.request("CountJobs")(filter=filter_msg, group_by=groups))
        out: dict[Any, int] = {}
        for g in response.groups:
            key = tuple(enum_name(job_pb2.JobState.DESCRIPTOR, g.state) if d == job_service_pb2.JOB_GROUP_BY_STATE
                        else g.site_id if d == job_service_pb2.JOB_GROUP_BY_SITE else g.app_id for d in groups)
            out[key[0] if len(key) == 1 else key] = g.count
        return out

    # -- bulk changes -------------------------------------------------------------------

    def _selection_for_bulk(self) -> Message:
        """The filter of a bulk call; a sliced query is pinned to the ids it selects."""
        if self._start or self._stop is not None:
            ids = self.ids()
            if not ids:
                raise MatchesNothing
            return self.model.resource.filter.message(ids=ids)
        return self.filter_message()

    def update(self, *, dry_run: bool = False, event_data: dict[str, Any] | None = None,
               **fields: Any) -> BulkResult:
        """Change the given fields of every selected object; per-object outcomes.

        Jobs go in one BatchUpdateJobs call (tags are merged into each job's tags; a
        state is validated per job; the server refuses an empty filter: select
        explicitly). Other resources are updated one by one.
        """
        if not fields:
            raise ValueError("update() needs at least one field to change")
        res = self.model.resource
        shortcuts = sorted(set(fields) & RESOURCE_SHORTCUTS) if res.name == "job" else []
        if shortcuts:
            # The server replaces a job's resources as a whole: a bulk patch of one of them
            # would reset the others to their defaults on every job.
            raise ValueError(f"bulk updates replace all of a job's resources; instead of {', '.join(shortcuts)} "
                             "pass resources={...} with every resource field")
        patch = self.model(**fields)  # checks names and values before anything is sent
        mask = patch.update_mask()
        if res.name != "job":
            return self._update_each(fields, dry_run)
        try:
            selection = self._selection_for_bulk()
        except MatchesNothing:
            return BulkResult(dry_run=dry_run)
        request = res.request("BatchUpdateJobs")(filter=selection, patch=patch.message,
                                                 update_mask=field_mask_pb2.FieldMask(paths=mask),
                                                 validate_only=dry_run)
        if event_data:
            request.event_data.update(event_data)
        response = self.client.call(res.service, "BatchUpdateJobs", request)
        return BulkResult.from_outcomes(response.outcomes, response.updated_count, response.failed_count, dry_run)

    def _update_each(self, fields: dict[str, Any], dry_run: bool) -> BulkResult:
        def change(obj: Any) -> None:
            for name, value in fields.items():
                setattr(obj, name, value)
            if not dry_run:
                obj.save()

        return self._each(change, dry_run)

    def _each(self, act: Callable[[Any], None], dry_run: bool) -> BulkResult:
        """`act` on every selected object, one call each; a refusal is that object's outcome."""
        result = BulkResult(dry_run=dry_run)
        for obj in list(self):
            try:
                act(obj)
            except BalsamError as exc:
                result.outcomes.append(Outcome(obj.id, exc.code.name, exc.reason, exc.message))
                result.failed += 1
                continue
            result.outcomes.append(Outcome(obj.id))
            result.succeeded += 1
        return result

    def retry(self, *, reset_run_count: bool = False, dry_run: bool = False) -> BulkResult:
        """Retry every selected job (RetryJobs): FAILED, KILLED, RUN_ERROR and RUN_TIMEOUT
        jobs go back to where they must restart, and children their failure had failed
        wait on them again; other jobs are refused per item. `reset_run_count` starts the
        app's max_retries afresh."""
        res = self.model.resource
        if res.name != "job":
            raise TypeError(f"{res.name}s cannot be retried; only jobs can")
        try:
            selection = self._selection_for_bulk()
        except MatchesNothing:
            return BulkResult(dry_run=dry_run)
        response = self.client.call(res.service, "RetryJobs", res.request("RetryJobs")(
            filter=selection, validate_only=dry_run, reset_run_count=reset_run_count))
        return BulkResult.from_outcomes(response.outcomes, response.retried_count, response.failed_count, dry_run)

    def delete(self, *, dry_run: bool = False) -> BulkResult:
        """Delete every selected object; per-object outcomes. Jobs go in one
        BatchDeleteJobs call (the server refuses an empty filter: select explicitly)."""
        res = self.model.resource
        if res.delete is None:
            raise TypeError(f"{res.name}s cannot be deleted")
        if res.name != "job":
            return self._each(lambda obj: None if dry_run else obj.delete(), dry_run)
        try:
            selection = self._selection_for_bulk()
        except MatchesNothing:
            return BulkResult(dry_run=dry_run)
        response = self.client.call(res.service, "BatchDeleteJobs",
                                    res.request("BatchDeleteJobs")(filter=selection, validate_only=dry_run))
        return BulkResult.from_outcomes(response.outcomes, response.deleted_count, response.failed_count, dry_run)
