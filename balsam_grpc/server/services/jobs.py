"""JobService: request validation and row <-> message conversion around store.jobs."""

from __future__ import annotations

import asyncio
import functools
import itertools
import operator
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import structlog
from sqlalchemy.exc import IntegrityError

from balsam_grpc.core.errors import BalsamError, InvalidArgument, NotFound
from balsam_grpc.core.states import RUNNABLE_STATES, JobState, Role
from balsam_grpc.core.validation import MAX_WORKDIR, check_bulk_copy, check_string_map, clean_workdir
from balsam_grpc.server import paging
from balsam_grpc.server.convert import (
    EnumCodec,
    dict_to_struct,
    from_timestamp,
    shared_timestamp,
    struct_to_dict,
    utcnow,
)
from balsam_grpc.server.idempotency import (
    id_tag,
    one_item_id_tag,
    record_answer,
    replay,
    request_hash,
    request_id_of,
    stored_answer,
)
from balsam_grpc.server.principal import Principal
from balsam_grpc.server.rpc import unary
from balsam_grpc.server.services.common import mutate
from balsam_grpc.server.state import ServerState
from balsam_grpc.server.store import apps as app_store
from balsam_grpc.server.store import job_counts
from balsam_grpc.server.store import jobs as store
from balsam_grpc.server.store.bulk import COPY_MIN_ROWS
from balsam_grpc.server.store.codec import loads as json_loads
from balsam_grpc.server.store.tables import apps
from balsam_grpc.server.store.transitions import Refusal
from balsam_grpc.server.wire import REQUEST_LIMITS
from balsam_grpc.v1 import common_pb2, job_pb2, job_service_pb2, job_service_pb2_grpc

log = structlog.get_logger("balsam.jobs")
STATES = EnumCodec(job_pb2.JobState, "JOB_STATE_")
PARENT_POLICY = EnumCodec(job_pb2.ParentFailurePolicy, "PARENT_FAILURE_POLICY_")
GROUP_BY = EnumCodec(job_service_pb2.JobGroupBy, "JOB_GROUP_BY_")

RESOURCE_LIMITS = {  # field: (default, minimum, maximum)
    "num_nodes": (1, 1, 100_000), "ranks_per_node": (1, 1, 4096), "threads_per_rank": (1, 1, 4096),
    "threads_per_core": (1, 1, 16), "gpus_per_rank": (0, 0, 64), "node_packing_count": (1, 1, 1024),
    "wall_time_min": (0, 0, 525_600),
}
MAX_PARAMETERS = 256
MAX_DATA_BYTES = 256 * 1024
MAX_PARENTS = 10_000
# Jobs a large PostgreSQL create converts while the database takes in the chunk before.
STREAM_CHUNK = 1000
UPDATABLE = {"name", "tags", "parameters", "data", "priority", "resources", "on_parent_failure", "state",
             "state_message", "return_code", "error_tail"}


def stream_chunks(total: int, full: int) -> list[tuple[int, int]]:
    """(start, stop) of each chunk of a streamed create of `total` jobs: `full`-sized in
    the middle, smaller at both ends (full/8, full/4, full/2 and back). Nothing overlaps
    the first chunk's conversion (the database waits for it) nor the database's work on
    the last one (the server waits for it): small ends keep those short."""
    ramp = []
    size = max(1, full // 8)
    while size < full:
        ramp.append(size)
        size *= 2
    middle = total - 2 * sum(ramp)
    if middle > 0:
        pieces = -(-middle // full)
        sizes = [*ramp, *(middle // pieces + (i < middle % pieces) for i in range(pieces)), *reversed(ramp)]
    else:  # a short create: growing chunks until all are taken
        sizes, left = [], total
        for size in itertools.chain(ramp, itertools.repeat(full)):
            if left <= 0:
                break
            sizes.append(min(size, left))
            left -= sizes[-1]
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


# ---------------------------------------------------------------------------- conversion

def job_to_message(row: dict[str, Any], view: int = job_service_pb2.JOB_VIEW_FULL) -> job_pb2.Job:
    msg = job_pb2.Job()
    fill_job(msg, row, view)
    return msg


def jobs_to_messages(rows: list[dict[str, Any]], view: int, out: Any) -> None:
    """Append one Job per row to the repeated field `out`, built in place (building
    separate messages and copying them into the response costs as much again)."""
    add = out.add
    fields = _BASIC_FIELDS if view == job_service_pb2.JOB_VIEW_BASIC else _FULL_FIELDS
    for row in rows:
        _fill(add(), fields(row), view)


def _basic_messages(columns: store.JobColumns, out: Any) -> None:
    """jobs_to_messages of a basic view for written JobColumns: no row per job."""
    fixed = columns.fixed
    state, app_id, site_id = _STATE_NUMBERS.get(fixed["state"], 0), fixed["app_id"], fixed["site_id"]
    add = out.add
    for job_id, workdir in zip(columns.ids, columns.workdirs, strict=True):
        msg = add()
        msg.id = job_id
        msg.state = state
        msg.workdir = workdir
        msg.app_id = app_id
        msg.site_id = site_id


def tuples_to_messages(keys: tuple[str, ...], rows: list[tuple[Any, ...]], view: int, out: Any) -> None:
    """jobs_to_messages for plain row tuples whose columns are named by `keys`: no
    per-row dict (a third of the cost of listing a page of jobs)."""
    names = _BASIC_NAMES if view == job_service_pb2.JOB_VIEW_BASIC else _FULL_NAMES
    add = out.add
    if keys == names:  # ListJobs selects the view's columns in this order: the rows as they are
        for row in rows:
            _fill(add(), row, view)
        return
    fields = operator.itemgetter(*(keys.index(name) for name in names))
    for row in rows:
        _fill(add(), fields(row), view)


def fill_job(msg: job_pb2.Job, row: dict[str, Any], view: int = job_service_pb2.JOB_VIEW_FULL) -> None:
    """Write `row` into the empty message `msg`."""
    _fill(msg, (_BASIC_FIELDS if view == job_service_pb2.JOB_VIEW_BASIC else _FULL_FIELDS)(row), view)


# The columns a Job message shows, in the order _fill unpacks them. The last ones are
# usually shared by many jobs (created or changed together) and come from a template:
# the tags too when they come as their JSON text (store.jobs' statements give them so).
_BASIC_NAMES = ("id", "state", "workdir", "app_id", "site_id")
_SHARED_NAMES = ("tags", "app_id", "site_id", "state", "on_parent_failure", "create_time", "update_time", "state_time",
                 *RESOURCE_LIMITS)
_FULL_NAMES = ("id", "workdir", "name", "parameters", "data", "parent_ids", "transfers",
               "launch_params", "priority", "state_message", "return_code", "error_tail", "batch_job_id",
               "session_id", "lease_generation", "lease_expire_time", "run_count", *_SHARED_NAMES)
_SHARED_FROM = len(_FULL_NAMES) - len(_SHARED_NAMES)
_BASIC_FIELDS = operator.itemgetter(*_BASIC_NAMES)
BASIC_COLUMNS = tuple(store.jobs.c[name] for name in _BASIC_NAMES)
FULL_COLUMNS = tuple(store.jobs.c[name] for name in _FULL_NAMES)
_FULL_FIELDS = operator.itemgetter(*_FULL_NAMES)
# Tags text longer than this is written item by item, not kept in a template's key.
_TAGS_IN_TEMPLATE = 512


def _fill(msg: job_pb2.Job, fields: tuple[Any, ...], view: int) -> None:
    """Set the fields of an empty Job message. Default values are skipped (proto3
    does not send them), so a typical job costs a few microseconds."""
    if view == job_service_pb2.JOB_VIEW_BASIC:
        msg.id, state, msg.workdir, msg.app_id, msg.site_id = fields
        msg.state = _STATE_NUMBERS.get(state, 0)
        return
    shared = fields[_SHARED_FROM:]
    tags = shared[0]
    if tags is None or (type(tags) is str and len(tags) <= _TAGS_IN_TEMPLATE):
        _fill_shared(msg, shared)  # first: it copies over every field
        tags = None
    else:  # a dict (a row read through SQLAlchemy) or a long text: written item by item below
        _fill_shared(msg, (None, *shared[1:]))
    # All of them at once (the shared ones unused here): no second slice of the row.
    (msg.id, msg.workdir, name, parameters, data, parent_ids, transfers,
     launch_params, priority, state_message, return_code, error_tail, batch_job_id, session_id,
     lease_generation, lease_expire_time, run_count, *_) = fields
    if name:
        msg.name = name
    # Maps are filled item by item: faster than Mapping.update on a protobuf map.
    if tags:
        target = msg.tags
        for k, v in (json_loads(tags) if type(tags) is str else tags).items():
            target[k] = v
    if parameters:
        target = msg.parameters
        for k, v in parameters.items():
            target[k] = v
    if data:
        dict_to_struct(data, msg.data)
    if parent_ids:
        msg.parent_ids.extend(parent_ids)
    if transfers:
        target = msg.transfers
        for k, v in transfers.items():
            target[k] = v
    if launch_params:
        target = msg.resources.launch_params
        for k, v in launch_params.items():
            target[k] = v
    if priority:
        msg.priority = priority
    if state_message:
        msg.state_message = state_message
    if return_code is not None:
        msg.return_code = return_code
    if error_tail:
        msg.error_tail = error_tail
    if batch_job_id:
        msg.batch_job_id = batch_job_id
    if session_id:
        msg.lease.session_id = session_id
        msg.lease.generation = lease_generation
        if lease_expire_time is not None:
            msg.lease.expire_time.CopyFrom(shared_timestamp(lease_expire_time))
    if run_count:
        msg.run_count = run_count


_TEMPLATES: dict[tuple[Any, ...], job_pb2.Job] = {}
_BASES: dict[tuple[Any, ...], job_pb2.Job] = {}
_SEEN_ONCE: set[tuple[Any, ...]] = set()


def _fill_shared(msg: job_pb2.Job, shared: tuple[Any, ...]) -> None:
    """Write the _SHARED_NAMES fields into the empty message `msg`: one CopyFrom from the
    template of their combination (jobs created or moved together share all of them)
    instead of a dozen field writes and a map's items. The tags are their JSON text (or
    None): a key, decoded only to build a template or a job seen once.

    A combination gets its template when seen the second time. One seen once (a single
    create, a job changed on its own: its times are its own) is written from the base of
    its state, policy and resources and its three times: a template of its own would cost
    more to build than it saves, and push out the templates that are shared."""
    template = _TEMPLATES.get(shared)
    if template is not None:
        msg.CopyFrom(template)
        return
    tags, app_id, site_id, state, policy, create_time, update_time, state_time, *shape = shared
    key = (app_id, site_id, state, policy, *shape)
    base = _BASES.get(key)
    if base is None:
        if len(_BASES) >= 4096:
            _BASES.clear()
        base = _BASES[key] = job_pb2.Job(
            app_id=app_id, site_id=site_id, state=_STATE_NUMBERS.get(state, 0),
            on_parent_failure=_POLICY_NUMBERS.get(policy, 0),
            resources=job_pb2.JobResources(**dict(zip(_RESOURCE_NAMES, shape, strict=True))))
    if shared in _SEEN_ONCE:  # the second time: its template (templates are only copied from)
        _SEEN_ONCE.discard(shared)
        if len(_TEMPLATES) >= 4096:
            _TEMPLATES.clear()
        template = _TEMPLATES[shared] = job_pb2.Job()
        _write_shared(template, base, create_time, update_time, state_time, tags)
        msg.CopyFrom(template)
        return
    if len(_SEEN_ONCE) >= 8192:
        _SEEN_ONCE.clear()
    _SEEN_ONCE.add(shared)
    _write_shared(msg, base, create_time, update_time, state_time, tags)


def _write_shared(msg: job_pb2.Job, base: job_pb2.Job, create_time: Any, update_time: Any, state_time: Any,
                  tags: str | None) -> None:
    msg.CopyFrom(base)
    if tags:
        target = msg.tags
        for k, v in json_loads(tags).items():
            target[k] = v
    created = msg.create_time
    _set_time(created, create_time)
    # A new job's three times are one value: converted once.
    if update_time is create_time:
        msg.update_time.CopyFrom(created)
    else:
        _set_time(msg.update_time, update_time)
    if state_time is create_time:
        msg.state_time.CopyFrom(created)
    else:
        _set_time(msg.state_time, state_time)


def _set_time(ts: Any, value: Any) -> None:
    if type(value) is int:  # microseconds since the epoch (PostgreSQL's rows here): no cached copy
        seconds, micros = divmod(value, 1_000_000)
        ts.seconds = seconds
        ts.nanos = micros * 1000
    else:
        ts.CopyFrom(shared_timestamp(value))


_STATE_NUMBERS = STATES.to_number
_POLICY_NUMBERS = PARENT_POLICY.to_number
_RESOURCE_NAMES = tuple(RESOURCE_LIMITS)


_DEFAULT_RESOURCES = {name: default for name, (default, _, _) in RESOURCE_LIMITS.items()}


def _resources(res: job_pb2.JobResources, field: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, (default, low, high) in RESOURCE_LIMITS.items():
        value = getattr(res, name) or default
        if not low <= value <= high:
            raise InvalidArgument(f"{field}.{name} must be between {low} and {high}, got {value}",
                                  field=f"{field}.{name}")
        out[name] = value
    if out["node_packing_count"] > 1 and out["num_nodes"] > 1:
        raise InvalidArgument(f"{field}.node_packing_count > 1 only applies to single-node jobs "
                              f"(num_nodes is {out['num_nodes']})", field=f"{field}.node_packing_count")
    out["launch_params"] = _map(res.launch_params)
    return out


def _data(struct: Any, field: str) -> dict[str, Any]:
    if struct.ByteSize() > MAX_DATA_BYTES:
        raise InvalidArgument(f"{field} is larger than {MAX_DATA_BYTES // 1024} KiB", field=field, reason="TOO_LARGE")
    return struct_to_dict(struct, field)


def _map(m: Any) -> dict[str, str]:
    """A protobuf map as a dict (iterating keys beats dict(m), which goes through the
    abstract Mapping views)."""
    return {k: m[k] for k in m} if len(m) else {}


# Tag keys that already passed check_string_map's pattern (bounded; cleared when full).
_KNOWN_TAG_KEYS: set[str] = set()


def _surely_valid(values: dict[str, str], max_entries: int, max_value_bytes: int,
                  known_keys: set[str] | None = None) -> bool:
    """A cheap sufficient test for check_string_map (which runs, and raises with the
    message a person can act on, whenever this says False): few enough entries, values
    short enough even at 4 UTF-8 bytes a character, keys already seen valid."""
    if len(values) > max_entries:
        return False
    short = max_value_bytes // 4
    for key, value in values.items():
        if len(value) > short or (known_keys is not None and key not in known_keys):
            return False
    return True


def _remember_tag_keys(tags: dict[str, str]) -> None:
    if len(_KNOWN_TAG_KEYS) > 10_000:
        _KNOWN_TAG_KEYS.clear()
    _KNOWN_TAG_KEYS.update(tags)


def _plain_workdir(workdir: str) -> bool:
    """A cheap sufficient test that clean_workdir would return `workdir` unchanged (it
    runs, and says what is wrong, whenever this says False): no dot at all (so no "." or
    ".." part), no doubled or trailing slash, not absolute or home-relative, within the
    length limit, not blank, and printable (str.isprintable: no control character of
    check_printable's, which are all unprintable, and no NUL)."""
    return (0 < len(workdir) <= MAX_WORKDIR and "." not in workdir and "//" not in workdir and workdir[0] not in "/~"
            and workdir[-1] != "/" and workdir.isprintable() and not workdir.isspace())


def job_spec(job: job_pb2.Job, field: str, state: ServerState) -> dict[str, Any]:
    """Validate a Job message from a create request into store columns."""
    s = state.settings
    app_id, app_name, site_id = job.app_id, job.app_name, job.site_id
    if not app_id and not (app_name and site_id):
        raise InvalidArgument(f"{field}: give app_id, or app_name together with site_id", field=f"{field}.app_id")
    # _map's body inlined: a call per map was a tenth of this function, run once per job.
    m = job.tags
    tags = {k: m[k] for k in m} if len(m) else {}
    m = job.parameters
    parameters = {k: m[k] for k in m} if len(m) else {}
    m = job.transfers
    transfers = {k: m[k] for k in m} if len(m) else {}
    if tags and not _surely_valid(tags, s.max_map_entries, s.max_map_value_bytes, _KNOWN_TAG_KEYS):
        check_string_map(tags, f"{field}.tags", max_entries=s.max_map_entries, max_value_bytes=s.max_map_value_bytes)
        _remember_tag_keys(tags)
    if parameters and not _surely_valid(parameters, MAX_PARAMETERS, s.max_map_value_bytes):
        check_string_map(parameters, f"{field}.parameters", max_entries=MAX_PARAMETERS,
                         max_value_bytes=s.max_map_value_bytes, keys=None)
    if transfers and not _surely_valid(transfers, s.max_map_entries, s.max_map_value_bytes):
        check_string_map(transfers, f"{field}.transfers", max_entries=s.max_map_entries,
                         max_value_bytes=s.max_map_value_bytes, keys=None)
    parent_ids = job.parent_ids  # each access of a repeated field makes a new wrapper
    if len(parent_ids) > MAX_PARENTS:
        raise InvalidArgument(f"{field}.parent_ids has more than {MAX_PARENTS} entries", field=f"{field}.parent_ids",
                              reason="TOO_LARGE")
    name = job.name
    if len(name) > 255:
        raise InvalidArgument(f"{field}.name is longer than 255 characters", field=f"{field}.name")
    workdir = job.workdir
    policy = job.on_parent_failure
    spec = {
        "name": name, "app_id": app_id, "app_name": app_name, "site_id": site_id,
        "workdir": workdir if _plain_workdir(workdir) else clean_workdir(workdir, f"{field}.workdir"), "tags": tags,
        "parameters": parameters, "data": _data(job.data, f"{field}.data") if job.HasField("data") else {},
        "parent_ids": sorted(set(parent_ids)) if len(parent_ids) else [], "transfers": transfers,
        "priority": job.priority,
        "on_parent_failure": PARENT_POLICY.to_name.get(policy, "FAIL") if policy else "FAIL",
    }
    if job.HasField("resources"):
        spec.update(_resources(job.resources, f"{field}.resources"))
    else:
        spec.update(_DEFAULT_RESOURCES, launch_params={})
    if policy and policy not in PARENT_POLICY.to_name:
        PARENT_POLICY.name(policy, f"{field}.on_parent_failure")
    return spec


_ROW_RESOURCES = {**_DEFAULT_RESOURCES, "launch_params": {}}  # shared by the jobs that give none: never changed
_NAMES, _WORKDIRS, _PRIORITIES, _POLICIES, _SITE_IDS, _TAGS, _PARAMETERS = map(operator.attrgetter, (
    "name", "workdir", "priority", "on_parent_failure", "site_id", "tags", "parameters"))
_HAS_RESOURCES, _HAS_DATA = operator.methodcaller("HasField", "resources"), operator.methodcaller("HasField", "data")
_VALUES = operator.methodcaller("values")


def _plain_workdirs(workdirs: list[str]) -> bool:
    """_plain_workdir of every one of `workdirs` (not empty), tested on them joined by
    NUL (which none may hold: counted) in a few C-level scans instead of a Python call
    each: a part starting with "/" or "~" or ending with "/" is one next to a NUL, and a
    dot or a doubled slash anywhere is one inside a workdir. Printable: each on its own
    (the NUL that joins them is not)."""
    lengths = list(map(len, workdirs))
    if min(lengths) == 0 or max(lengths) > MAX_WORKDIR:
        return False
    joined = "\x00".join(workdirs)
    return (joined.count("\x00") == len(workdirs) - 1 and "." not in joined and "//" not in joined
            and joined[0] not in "/~" and "\x00/" not in joined and "\x00~" not in joined
            and joined[-1] != "/" and "/\x00" not in joined and all(map(str.isprintable, workdirs))
            and not any(map(str.isspace, workdirs)))


def _maps(maps: Iterable[Any]) -> list[dict[str, str]]:
    """_map of each protobuf map."""
    return [{k: m[k] for k in m} if len(m) else {} for m in maps]


def _all_surely_valid(column: list[dict[str, str]], max_entries: int, max_value_bytes: int,
                      known_keys: set[str] | None = None) -> bool:
    """_surely_valid of every non-empty dict of `column`, a column at a time."""
    given = list(filter(None, column))
    if not given:
        return True
    if max(map(len, given)) > max_entries:
        return False
    if max(map(len, itertools.chain.from_iterable(map(_VALUES, given)))) > max_value_bytes // 4:
        return False
    return known_keys is None or known_keys.issuperset(itertools.chain.from_iterable(given))


def plain_columns(jobs: list[job_pb2.Job], state: ServerState, site_scope: int | None,
                  resources_seen: dict[bytes, dict[str, Any]],
                  general: Callable[[], list[dict[str, Any]]]) -> store.JobColumns | None:
    """`jobs` (of one app, by id, with no parents or transfers: the caller checked) as
    columns, read without a dict per job: each value passes job_spec's checks by their
    cheap sufficient tests. None when one of them does not, or gives data (then job_spec
    checks them, and says what is wrong). `general` makes their specs (job_spec's) for
    the store, which takes them instead when it must. `resources_seen` holds the
    resource columns of each distinct JobResources met (by its bytes) in this call.
    Read and tested a field at a time over all the jobs (C-level loops where they can be:
    a Python loop per job cost a third more)."""
    if not jobs or any(map(_HAS_DATA, jobs)):
        return None
    s = state.settings
    names = list(map(_NAMES, jobs))
    workdirs = list(map(_WORKDIRS, jobs))
    if max(map(len, names)) > 255 or not _plain_workdirs(workdirs):
        return None
    if site_scope is not None and not {0, site_scope}.issuperset(map(_SITE_IDS, jobs)):
        return None
    numbers = list(map(_POLICIES, jobs))
    policies = {0: "FAIL"}
    for number in set(numbers) - {0}:
        policy = PARENT_POLICY.to_name.get(number)
        if policy is None:
            return None
        policies[number] = policy
    tags_column = _maps(map(_TAGS, jobs))
    parameters_column = _maps(map(_PARAMETERS, jobs))
    if not (_all_surely_valid(tags_column, s.max_map_entries, s.max_map_value_bytes, _KNOWN_TAG_KEYS)
            and _all_surely_valid(parameters_column, MAX_PARAMETERS, s.max_map_value_bytes)):
        return None
    if any(map(_HAS_RESOURCES, jobs)):
        resources = []
        for job in jobs:
            if job.HasField("resources"):
                key = job.resources.SerializeToString()
                res = resources_seen.get(key)
                if res is None:
                    try:
                        res = resources_seen[key] = _resources(job.resources, "resources")
                    except BalsamError:
                        return None
            else:
                res = _ROW_RESOURCES
            resources.append(res)
    else:
        resources = [_ROW_RESOURCES] * len(jobs)
    return store.JobColumns(workdirs, names, tags_column, parameters_column, list(map(_PRIORITIES, jobs)),
                            list(map(policies.__getitem__, numbers)), resources, general)


def _runnable_by_site(rows: list[dict[str, Any]], by_site: dict[int, list[int]]) -> dict[int, list[int]]:
    """Add the ids of the runnable jobs among `rows` to `by_site` (site -> ids)."""
    for r in rows:
        if r["state"] in RUNNABLE_STATES and r["site_id"]:
            by_site.setdefault(r["site_id"], []).append(r["id"])
    return by_site


def _references(jobs: list[job_pb2.Job]) -> tuple[set[int], set[tuple[int, str]], set[int], bool] | None:
    """What a streamed create reads up front (store.create_jobs_streamed): the jobs' app
    ids, (site id, app name) pairs, parent ids and whether any gives transfers; None when
    a job has too many parents (the one-piece create refuses it before any read)."""
    app_ids: set[int] = set()
    app_names: set[tuple[int, str]] = set()
    parents: set[int] = set()
    transfers = False
    for job in jobs:
        app_id = job.app_id
        if app_id:
            app_ids.add(app_id)
        else:
            app_names.add((job.site_id, job.app_name))
        parent_ids = job.parent_ids
        if len(parent_ids):
            if len(parent_ids) > MAX_PARENTS:
                return None
            parents.update(parent_ids)
        if not transfers and len(job.transfers):
            transfers = True
    return app_ids, app_names, parents, transfers


def job_query(f: job_pb2.JobFilter, principal: Principal) -> store.JobQuery:
    check_string_map(dict(f.tags), "filter.tags", max_entries=64, max_value_bytes=4096)
    # Same rules for excluded tags: an unchecked key broke SQLite's JSON path ('"' in a key)
    # and 10,000 of them its expression depth, both answered INTERNAL.
    check_string_map(dict(f.exclude_tags), "filter.exclude_tags", max_entries=64, max_value_bytes=4096)
    return store.JobQuery(
        owner_id=principal.user_id, site_scope=principal.site_id if principal.is_site else None,
        ids=list(f.ids), states=STATES.names(f.states, "filter.states"),
        exclude_states=STATES.names(f.exclude_states, "filter.exclude_states"), tags=dict(f.tags),
        exclude_tags=dict(f.exclude_tags), app_ids=list(f.app_ids), app_names=list(f.app_names),
        site_ids=list(f.site_ids), parent_ids=list(f.parent_ids), workdir_contains=f.workdir_contains,
        create_start=from_timestamp(f.create_time.start, field="filter.create_time.start"),
        create_end=from_timestamp(f.create_time.end, field="filter.create_time.end"),
        update_start=from_timestamp(f.update_time.start, field="filter.update_time.start"),
        update_end=from_timestamp(f.update_time.end, field="filter.update_time.end"),
        batch_job_ids=list(f.batch_job_ids), session_id=f.session_id)


def _check_mask(paths: list[str]) -> None:
    if not paths:
        raise InvalidArgument("update_mask is empty; name the fields to change (for example 'state' or 'tags')",
                              field="update_mask")
    for path in paths:
        if path.split(".")[0] not in UPDATABLE:
            raise InvalidArgument(f"update_mask: {path!r} cannot be changed; updatable fields are "
                                  f"{', '.join(sorted(UPDATABLE))}", field="update_mask")


def patch_values(patch: job_pb2.Job, paths: list[str], state: ServerState) -> tuple[dict[str, Any], JobState | None]:
    """Column values and target state for the masked fields of `patch`."""
    values: dict[str, Any] = {}
    target = None
    s = state.settings
    for path in paths:
        top = path.split(".")[0]
        if top == "state":
            target = JobState(STATES.name(patch.state, "job.state"))
        elif top == "tags":
            check_string_map(dict(patch.tags), "job.tags", max_entries=s.max_map_entries,
                             max_value_bytes=s.max_map_value_bytes)
            values["tags"] = dict(patch.tags)
        elif top == "parameters":
            check_string_map(dict(patch.parameters), "job.parameters", max_entries=MAX_PARAMETERS,
                             max_value_bytes=s.max_map_value_bytes, keys=None)
            values["parameters"] = dict(patch.parameters)
        elif top == "data":
            values["data"] = _data(patch.data, "job.data")
        elif top == "resources":
            values.update(_resources(patch.resources, "job.resources"))
        elif top == "on_parent_failure":
            values["on_parent_failure"] = PARENT_POLICY.name(patch.on_parent_failure, "job.on_parent_failure")
        elif top == "return_code":
            values["return_code"] = patch.return_code if patch.HasField("return_code") else None
        elif top == "name" and len(patch.name) > 255:
            raise InvalidArgument("job.name is longer than 255 characters", field="job.name")
        else:
            values[top] = getattr(patch, top)
    return values, target


def outcome(job_id: int, refusal: Refusal | None) -> common_pb2.ItemOutcome:
    if refusal is None:
        return common_pb2.ItemOutcome(id=job_id, code=0)
    return common_pb2.ItemOutcome(id=job_id, code=refusal.code, reason=refusal.reason, message=refusal.message)


def acting_role(principal: Principal) -> Role:
    """The role a JobService caller acts as (core/states RULES): a site token is the site."""
    return Role.SITE if principal.is_site else Role.USER


# ---------------------------------------------------------------------------- servicer

class JobServicer(job_service_pb2_grpc.JobServiceServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.db = state.db
        # Jobs created since the planner statistics were last refreshed, and how many make
        # it worth asking the database whether to refresh them.
        self._unanalyzed = 0
        self._stats_due = store.ANALYZE_MIN_ROWS
        self._stats_task: asyncio.Task[None] | None = None
        # Owners whose job_counts rows are being compacted (store/job_counts.py).
        self._compacting: dict[int, asyncio.Task[None]] = {}
        # App rows single creates validate against (checked by the create's own statement).
        self._apps = app_store.AppCache()

    async def _wake_sessions(self, owner_id: int, rows: list[dict[str, Any]]) -> None:
        """After a commit: the launcher sessions here of the sites that got runnable jobs
        lease now (Fanout.runnable), not after the events' notification and read."""
        if self.state.fanout.by_site:  # else no session here to wake: the rows are not looked at
            await self._wake_sites(owner_id, _runnable_by_site(rows, {}))

    async def _wake_sites(self, owner_id: int, by_site: dict[int, list[int]]) -> None:
        told = False
        for site_id, ids in by_site.items():
            told |= self.state.fanout.runnable(owner_id, site_id, ids)
        if told:
            # One turn of the event loop: the sessions woken begin their acquisition (and
            # take its RUNNING time) now, not after the rest of this call and gRPC's send
            # of its answer (about 0.4 ms of submit-to-RUNNING on the 2-core machine).
            await asyncio.sleep(0)

    def _created(self, count: int) -> None:
        """After a commit: refresh planner statistics in the background once enough jobs
        were created (store.refresh_planner_stats decides; the caller never waits)."""
        self._unanalyzed += count
        if self._unanalyzed >= self._stats_due and self._stats_task is None:
            self._stats_task = asyncio.get_running_loop().create_task(self._refresh_stats())

    async def _refresh_stats(self) -> None:
        inserted = self._unanalyzed
        try:
            if await self.db.write(store.refresh_planner_stats, inserted):
                self._unanalyzed -= inserted
                self._stats_due = store.ANALYZE_MIN_ROWS
            else:
                # Too small a share of the table yet: ask again after as many more, not
                # after every create (that was one more transaction per create).
                self._stats_due = inserted + store.ANALYZE_MIN_ROWS
        except Exception:  # noqa: BLE001 - statistics are an optimisation; never fail a caller
            log.warning("refreshing planner statistics failed", exc_info=True)
        finally:
            self._stats_task = None

    @unary(job_token=True)
    async def GetJob(self, request, context, principal):  # noqa: N802
        q = store.JobQuery(owner_id=principal.user_id, site_scope=_scope(principal), ids=[request.id])
        rows = await self._select(q, _BY_ID, None, 1, _FULL_NAMES)
        if not rows:
            raise NotFound(f"job {request.id} not found")
        response = job_service_pb2.GetJobResponse()
        _fill(response.job, rows[0], job_service_pb2.JOB_VIEW_FULL)
        return response

    @unary(job_token=True)
    async def ListJobs(self, request, context, principal):  # noqa: N802
        q = job_query(request.filter, principal)
        order = store.parse_order(request.order_by)
        size = paging.page_size(request.page_size)
        fp = paging.fingerprint("ListJobs", principal.user_id, request.filter.SerializeToString(deterministic=True).hex(),
                                order)
        after = paging.decode(request.page_token, fp)
        view = request.view or job_service_pb2.JOB_VIEW_FULL
        shown = BASIC_COLUMNS if view == job_service_pb2.JOB_VIEW_BASIC else FULL_COLUMNS
        # Only the columns the view shows, plus the sort keys for the next page token.
        columns = tuple({c.name: c for c in (*shown, *(store.ORDER_COLUMNS[n] for n, _ in order))}.values())
        keys = tuple(c.name for c in columns)
        rows = await self._select(q, order, after, size + 1, keys)
        more = len(rows) > size
        rows = rows[:size]
        response = job_service_pb2.ListJobsResponse()
        tuples_to_messages(keys, rows, view, response.jobs)
        # Answered as bytes (wire.register passes them on): serialized once, not sized
        # (ByteSize serializes) and then serialized again.
        data = response.SerializeToString()
        if len(data) > paging.MAX_RESPONSE_BYTES:  # cut by bytes too; the next page starts after
            kept = paging.fitting(response.jobs)
            del response.jobs[kept:]
            rows, more = rows[:kept], True
            data = response.SerializeToString()
        if more:
            # next_page_token (field 2) after the jobs (field 1): the bytes the whole
            # message serializes to.
            data += job_service_pb2.ListJobsResponse(next_page_token=paging.encode(
                fp, store.page_keys_of_tuple(keys, rows[-1], order))).SerializeToString()
        return data

    async def _select(self, q: store.JobQuery, order: list[tuple[str, bool]], after: list[Any] | None, limit: int,
                      names: tuple[str, ...]) -> list[Any]:
        """The jobs `q` selects, as row tuples of the columns `names`, in one statement
        built once per shape of query: on PostgreSQL on the event loop (no hop to a
        database thread), on SQLite on a database thread; neither through SQLAlchemy."""
        if self.db.is_postgres:
            return await self.db.statement_now(*store.select_statement(q, order, after, limit, names))
        rows = await self.db.sqlite_statement(*store.sqlite_select_statement(q, order, after, limit, names))
        return store.sqlite_rows(names, rows)

    @unary(job_token=True)
    async def CountJobs(self, request, context, principal):  # noqa: N802
        q = job_query(request.filter, principal)
        # A repeated dimension groups the same as once (twice selected the column twice: INTERNAL).
        group_by = list(dict.fromkeys({"STATE": "state", "SITE": "site", "APP": "app"}[g]
                                      for g in GROUP_BY.names(request.group_by, "group_by")))
        if job_counts.answers(q, group_by):
            # From the counts the triggers keep: as fast at a million jobs as at ten.
            if self.db.is_postgres:  # on the event loop: no hop to a database thread
                rows = await self.db.statement_now(*job_counts.count_statement(q, group_by, "postgresql"))
            else:
                rows = await self.db.sqlite_statement(*job_counts.count_statement(q, group_by, "sqlite"))
            total, groups, untidy = job_counts.count_outcome(rows, group_by)
            if untidy:
                self._compact_counts(principal.user_id)
        else:
            total, groups = await self.db.read_now(store.count_jobs, q, group_by)
        response = job_service_pb2.CountJobsResponse(total=total)
        for g in groups:
            response.groups.add(state=STATES.number(g.get("state")), site_id=g.get("site") or 0,
                                app_id=g.get("app") or 0, count=g["count"])
        return response

    def _compact_counts(self, owner_id: int) -> None:
        """Fold the owner's job_counts rows in the background (the caller never waits)."""
        if owner_id in self._compacting:
            return

        async def run() -> None:
            try:
                await self.db.write(job_counts.compact, owner_id)
            except Exception:  # noqa: BLE001 - an optimisation; the next read asks again
                log.warning("compacting job counts failed", owner_id=owner_id, exc_info=True)
            finally:
                self._compacting.pop(owner_id, None)

        self._compacting[owner_id] = asyncio.get_running_loop().create_task(run())

    def _streams(self, count: int) -> bool:
        """Whether a BatchCreateJobs of `count` jobs may take _create_streamed (which
        checks the field limits a chunk at a time)."""
        return self.db.is_postgres and COPY_MIN_ROWS <= count <= self.state.settings.max_jobs_per_call

    async def _create(self, principal: Principal, jobs: list[job_pb2.Job], request: Any, method: str,
                      response_type: Any, view: int) -> Any:
        if len(jobs) > self.state.settings.max_jobs_per_call:
            raise InvalidArgument(f"{len(jobs)} jobs in one call; at most {self.state.settings.max_jobs_per_call} "
                                  "are allowed (split the request)", field="jobs", reason="TOO_LARGE")
        if not jobs:
            raise InvalidArgument("no jobs given", field="jobs")
        if method == "BatchCreateJobs" and self._streams(len(jobs)):
            references = _references(jobs)
            if references is not None:
                return await self._create_streamed(principal, jobs, request, response_type, view, references)
            REQUEST_LIMITS.check(request)  # BatchCreateJobs left them to the streamed create
        specs = [job_spec(j, f"jobs[{i}]", self.state) for i, j in enumerate(jobs)]
        if principal.is_site:
            for spec in specs:
                if spec["site_id"]:
                    principal.check_site(spec["site_id"])

        made: list[dict[str, Any]] = []

        def build(conn: Any) -> Any:
            rows = store.create_jobs(conn, principal.user_id, _scope(principal), specs, utcnow())
            made[:] = rows
            response = response_type()
            if method == "CreateJob":
                fill_job(response.job, rows[0], view)
            else:
                jobs_to_messages(rows, view, response.jobs)
            return response

        response = await mutate(self.state, principal, method, request, response_type, build)
        self._created(len(specs))
        await self._wake_sessions(principal.user_id, made)
        return response

    async def _create_streamed(self, principal: Principal, jobs: list[job_pb2.Job], request: Any, response_type: Any,
                               view: int, references: tuple[set[int], set[tuple[int, str]], set[int], bool]) -> Any:
        """A large batch on PostgreSQL: each chunk of jobs is validated and converted while
        the database takes in the chunk before (store.create_jobs_streamed); an invalid job
        fails the whole call as before, with nothing written."""
        state = self.state
        app_ids, app_names, parent_ids, transfers = references
        # The usual create (one app by id, no parents, no transfers): chunks read as
        # columns (plain_columns), each taken the general way when it must be.
        plain = len(app_ids) == 1 and not app_names and not parent_ids and not transfers
        site_scope = _scope(principal)
        resources_seen: dict[bytes, dict[str, Any]] = {}

        def specs_of(start: int, stop: int) -> list[dict[str, Any]]:
            specs = [job_spec(j, f"jobs[{i}]", state) for i, j in enumerate(jobs[start:stop], start)]
            if principal.is_site:
                for spec in specs:
                    if spec["site_id"]:
                        principal.check_site(spec["site_id"])
            return specs

        def chunks() -> Iterator[list[dict[str, Any]] | store.JobColumns]:
            for start, stop in stream_chunks(len(jobs), STREAM_CHUNK):
                # The field limits wire.register checks before other methods run: here a
                # chunk at a time, before anything reads its jobs, and while the database
                # takes in the chunk before (the whole request up front, in C, was ~5 ms
                # of 10,000 jobs in which PostgreSQL had nothing to do). A refusal fails
                # the transaction: nothing is written.
                REQUEST_LIMITS.check_items(jobs[start:stop], "jobs", start)
                general = functools.partial(specs_of, start, stop)
                columns = plain_columns(jobs[start:stop], state, site_scope, resources_seen, general) \
                    if plain else None
                yield general() if columns is None else columns

        runnable: dict[int, list[int]] = {}  # site -> ids (the rows themselves are freed chunk by chunk)

        def build(conn: Any) -> Any:
            response = response_type()
            runnable.clear()

            def written(rows: list[dict[str, Any]] | store.JobColumns) -> None:
                if isinstance(rows, store.JobColumns):
                    fixed = rows.fixed
                    if fixed["state"] in RUNNABLE_STATES and fixed["site_id"]:
                        runnable.setdefault(fixed["site_id"], []).extend(rows.ids)
                    if view == job_service_pb2.JOB_VIEW_BASIC:
                        _basic_messages(rows, response.jobs)
                        return
                    rows = rows.rows()
                jobs_to_messages(rows, view, response.jobs)
                _runnable_by_site(rows, runnable)

            store.create_jobs_streamed(conn, principal.user_id, _scope(principal), len(jobs), references, chunks(),
                                       written)
            return response

        response = await mutate(self.state, principal, "BatchCreateJobs", request, response_type, build)
        self._created(len(jobs))
        await self._wake_sites(principal.user_id, runnable)
        return response

    @unary(job_token=True)
    async def CreateJob(self, request, context, principal):  # noqa: N802
        try:
            if self.db.is_postgres:
                response = await self._create_at_once(principal, request, request.job)
            else:
                response = await self._create_one(principal, request, request.job)
            if response is None:
                response = await self._create(principal, [request.job], request, "CreateJob",
                                              job_service_pb2.CreateJobResponse, job_service_pb2.JOB_VIEW_FULL)
            return response
        except BalsamError as exc:
            raise exc.with_field_prefix("jobs[0]", "job") from None

    def _plain_job(self, principal: Principal, request: Any, job: job_pb2.Job) -> tuple[str, dict[str, Any]] | None:
        """(request_id, spec) of a single job the one-transaction creates can take (no
        parents, no transfers), the caller allowed at its site; None otherwise."""
        if len(job.parent_ids) or len(job.transfers):
            return None
        request_id = request_id_of(request)
        spec = job_spec(job, "jobs[0]", self.state)
        if principal.is_site and spec["site_id"]:
            principal.check_site(spec["site_id"])
        return request_id, spec

    async def _create_one(self, principal: Principal, request: Any, job: job_pb2.Job,
                          method: str = "CreateJob") -> Any:
        """CreateJob, or BatchCreateJobs of one job, on SQLite: a job with no parents and no
        transfers, in one write transaction whose statements all run on the driver's
        cursor (the request_id's answer looked up, store.create_one, the answer
        recorded). None when the general path (_create) must run: the app is not found or
        the job is refused (the general path says why)."""
        plain = self._plain_job(principal, request, job)
        if plain is None:
            return None
        request_id, spec = plain
        body = request_hash(request) if request_id else ""
        owner_id, scope = principal.user_id, _scope(principal)

        def work(conn: Any) -> Any:
            if request_id:
                stored = stored_answer(conn, owner_id, method, request_id)
                if stored is not None:
                    return stored
            row = store.create_one(conn, owner_id, scope, spec, utcnow())
            if row is None:
                return None
            response: Any
            if method == "CreateJob":
                response = job_service_pb2.CreateJobResponse()
                fill_job(response.job, row, job_service_pb2.JOB_VIEW_FULL)
            else:
                response = job_service_pb2.BatchCreateJobsResponse()
                jobs_to_messages([row], request.view or job_service_pb2.JOB_VIEW_BASIC, response.jobs)
            if request_id:
                record_answer(conn, owner_id, method, request_id, body, response.SerializeToString())
            return row, response

        got = await self.db.write(work)
        if got is None:
            return None
        if isinstance(got[0], str):  # (request hash, answer) of the first request with this request_id
            response_type = job_service_pb2.CreateJobResponse if method == "CreateJob" \
                else job_service_pb2.BatchCreateJobsResponse
            return replay(method, request_id, body, *got, response_type)
        row, response = got
        self._created(1)
        await self._wake_sessions(owner_id, [row])
        return response

    async def _create_at_once(self, principal: Principal, request: Any, job: job_pb2.Job,
                              method: str = "CreateJob") -> Any:
        """CreateJob, or BatchCreateJobs of one job, in one statement and one round trip
        (store.at_once_statement): PostgreSQL, a job with no parents and no transfers,
        validated here against the cached app row. None when the general path (_create)
        must run: the app is not cached and not found, the cached row turned out stale,
        or the job is refused (the general path checks against the app as it is now and
        says why)."""
        plain = self._plain_job(principal, request, job)
        if plain is None:
            return None
        request_id, spec = plain
        key = app_store.AppCache.key(principal.user_id, spec["app_id"], spec["site_id"], spec["app_name"])
        cached = self._apps.get(key, time.monotonic())
        if cached is None:
            app = await self.db.read_now(app_store.read_versioned, principal.user_id, spec["app_id"],
                                         spec["site_id"], spec["app_name"])
            if app is None:
                return None
            derived = self._apps.put(key, app, time.monotonic())
        else:
            app, derived = cached
        try:
            row, event_data = store.new_job_row(principal.user_id, _scope(principal), spec, app, utcnow(), derived)
        except BalsamError:
            return None
        row["id"] = 0  # not drawn yet: the answer is built, and stored, without it
        response: Any
        if method == "CreateJob":
            response = job_service_pb2.CreateJobResponse()
            made = response.job
            fill_job(made, row, job_service_pb2.JOB_VIEW_FULL)
        else:
            response = job_service_pb2.BatchCreateJobsResponse()
            jobs_to_messages([row], request.view or job_service_pb2.JOB_VIEW_BASIC, response.jobs)
            made = response.jobs[0]
        once = body = None
        if request_id:
            body = request_hash(request)
            if method == "CreateJob":
                once = store.Once(method, request_id, body, response.SerializeToString(), _CREATE_ID_TAG)
            else:
                once = store.Once(method, request_id, body, *one_item_id_tag(response, "jobs"))
        statement = store.at_once_statement(self.db.engine.dialect, row, event_data, app["_version"], once)
        if statement is None:
            return None
        try:
            got = store.at_once_outcome(await self.db.statement_now(*statement), row, once)
        except IntegrityError:  # the app deleted meanwhile (foreign key), the request_id taken meanwhile
            got = None
        if got is None:
            self._apps.forget(app["id"])
            return None
        if isinstance(got, tuple):
            return replay(method, request_id, body, *got, type(response))
        made.id = got
        row["id"] = got
        self._created(1)
        await self._wake_sessions(principal.user_id, [row])
        return response

    @unary(job_token=True)
    async def BatchCreateJobs(self, request, context, principal):  # noqa: N802
        # The field limits, which wire.register leaves to this method (checks_field_limits):
        # here, before anything reads the jobs, unless the streamed create takes them
        # (it checks them a chunk at a time, and _create when it declines them).
        if not self._streams(len(request.jobs)):
            REQUEST_LIMITS.check(request)
        view = request.view or job_service_pb2.JOB_VIEW_BASIC
        if len(request.jobs) == 1:
            # One job (a client submitting jobs one at a time): as CreateJob. PostgreSQL:
            # one statement in autocommit instead of a transaction (BEGIN, the inserts, the
            # request_id record, COMMIT: about half of submit-to-RUNNING with an idle
            # launcher).
            if self.db.is_postgres:
                response = await self._create_at_once(principal, request, request.jobs[0], "BatchCreateJobs")
            else:
                response = await self._create_one(principal, request, request.jobs[0], "BatchCreateJobs")
            if response is not None:
                return response
        return await self._create(principal, list(request.jobs), request, "BatchCreateJobs",
                                  job_service_pb2.BatchCreateJobsResponse, view)

    BatchCreateJobs.checks_field_limits = True  # type: ignore[attr-defined]  # read by wire.register

    @unary(job_token=True)
    async def UpdateJob(self, request, context, principal):  # noqa: N802
        principal.check_own_job(request.job.id)
        paths = list(request.update_mask.paths)
        _check_mask(paths)
        values, target = patch_values(request.job, paths, self.state)
        data = struct_to_dict(request.event_data, "event_data") or None
        message = request.job.state_message if "state_message" in paths else ""
        q = store.JobQuery(owner_id=principal.user_id, site_scope=_scope(principal), ids=[request.job.id])
        one_statement = target is None and "parameters" not in values  # no rule to check

        def patched(conn: Any) -> Any:
            fresh = store.patch_job(conn, q, values, utcnow())
            return job_service_pb2.UpdateJobResponse(job=job_to_message(
                store.require_one([fresh] if fresh else [], request.job.id)))

        if one_statement and not request_id_of(request):
            # Nothing to replay: one statement (it changes no state, so it appends no
            # event), not through SQLAlchemy. PostgreSQL: in autocommit, without the BEGIN
            # and COMMIT round trips, on the event loop (store.patch_statement): no hop to
            # a database thread. SQLite: in a transaction of its own on a database thread.
            if self.db.is_postgres:
                rows = await self.db.statement_now(*store.patch_statement(q, values, utcnow(), _FULL_NAMES))
            else:
                rows = store.sqlite_rows(_FULL_NAMES, await self.db.sqlite_statement(
                    *store.sqlite_patch_statement(q, values, utcnow(), _FULL_NAMES), write=True))
            if not rows:
                store.require_one([], request.job.id)
            response = job_service_pb2.UpdateJobResponse()
            _fill(response.job, rows[0], job_service_pb2.JOB_VIEW_FULL)
            return response

        def build(conn: Any) -> Any:
            if one_statement:
                return patched(conn)
            rows = store.select_for_change(conn, q, with_tags=False)
            row = store.require_one(rows, request.job.id)
            if "parameters" in values:
                _recheck_parameters(conn, row, values["parameters"])
            _, refused = store.update_jobs(conn, rows, values, None, target, utcnow(), role=acting_role(principal),
                                           message=message, data=data)
            if refused:
                raise refused[row["id"]].error()
            fresh = store.get_job(conn, principal.user_id, row["id"])
            return job_service_pb2.UpdateJobResponse(job=job_to_message(fresh))

        return await mutate(self.state, principal, "UpdateJob", request, job_service_pb2.UpdateJobResponse, build)

    @unary()
    async def BatchUpdateJobs(self, request, context, principal):  # noqa: N802
        paths = list(request.update_mask.paths)
        _check_mask(paths)
        if "parameters" in [p.split(".")[0] for p in paths]:
            raise InvalidArgument("parameters cannot be changed in bulk (they are checked per app); "
                                  "use UpdateJob", field="update_mask")
        values, target = patch_values(request.patch, paths, self.state)
        tags_merge = values.pop("tags", None)
        data = struct_to_dict(request.event_data, "event_data") or None
        message = request.patch.state_message if "state_message" in paths else ""
        copied = (request.event_data.ByteSize() + len(message.encode())
                  + (request.patch.data.ByteSize() if "data" in values else 0)
                  + sum(len(k) + len(v) for k, v in (tags_merge or {}).items()))
        q = _require_selection(job_query(request.filter, principal), "BatchUpdateJobs", "update")

        def build(conn: Any) -> Any:
            rows = store.select_for_change(conn, q, with_tags=tags_merge is not None)
            check_bulk_copy(len(rows), copied)
            ids, refused = store.update_jobs(conn, rows, values, tags_merge, target, utcnow(),
                                             role=acting_role(principal), message=message, data=data,
                                             validate_only=request.validate_only)
            return _bulk_response(job_service_pb2.BatchUpdateJobsResponse, "updated_count", rows, refused)

        return await mutate(self.state, principal, "BatchUpdateJobs", request,
                            job_service_pb2.BatchUpdateJobsResponse, build)

    @unary()
    async def DeleteJob(self, request, context, principal):  # noqa: N802
        q = store.JobQuery(owner_id=principal.user_id, site_scope=_scope(principal), ids=[request.id])

        def build(conn: Any) -> Any:
            rows = store.select_for_change(conn, q, with_tags=False)
            store.require_one(rows, request.id)
            _, refused = store.delete_jobs(conn, rows, validate_only=False, cascade=request.cascade, now=utcnow())
            if refused:
                raise refused[request.id].error()
            return job_service_pb2.DeleteJobResponse(id=request.id)

        return await mutate(self.state, principal, "DeleteJob", request, job_service_pb2.DeleteJobResponse, build)

    @unary()
    async def BatchDeleteJobs(self, request, context, principal):  # noqa: N802
        q = _require_selection(job_query(request.filter, principal), "BatchDeleteJobs", "delete")

        def build(conn: Any) -> Any:
            rows = store.select_for_change(conn, q, with_tags=False)
            _, refused = store.delete_jobs(conn, rows, validate_only=request.validate_only, cascade=request.cascade,
                                           now=utcnow())
            return _bulk_response(job_service_pb2.BatchDeleteJobsResponse, "deleted_count", rows, refused)

        return await mutate(self.state, principal, "BatchDeleteJobs", request,
                            job_service_pb2.BatchDeleteJobsResponse, build)


    @unary()
    async def RetryJobs(self, request, context, principal):  # noqa: N802
        q = _require_selection(job_query(request.filter, principal), "RetryJobs", "retry")

        def build(conn: Any) -> Any:
            rows = store.select_for_change(conn, q, with_tags=False)
            _, refused = store.retry_jobs(conn, rows, utcnow(), reset_run_count=request.reset_run_count,
                                          validate_only=request.validate_only)
            return _bulk_response(job_service_pb2.RetryJobsResponse, "retried_count", rows, refused)

        return await mutate(self.state, principal, "RetryJobs", request, job_service_pb2.RetryJobsResponse, build)


def _require_selection(q: store.JobQuery, rpc: str, verb: str) -> store.JobQuery:
    """An empty filter would change every job of the caller: a forgotten filter must not, so
    all jobs are chosen explicitly."""
    if q.is_empty():
        raise InvalidArgument(f"{rpc} refuses an empty filter, which would {verb} every job this token "
                              f"reaches; select jobs by ids, state, tag, app or site (to {verb} all of them, "
                              "list every state in filter.states)", field="filter")
    return q


def _bulk_response(response_type: Any, count_field: str, rows: list[dict[str, Any]],
                   refused: dict[int, Refusal]) -> Any:
    response = response_type(outcomes=[outcome(r["id"], refused.get(r["id"])) for r in rows])
    setattr(response, count_field, len(rows) - len(refused))
    response.failed_count = len(refused)
    return response


def _recheck_parameters(conn: Any, row: dict[str, Any], params: dict[str, str]) -> None:
    from sqlalchemy import select

    app = conn.execute(select(apps).where(apps.c.id == row["app_id"])).one()._mapping
    store._check_parameters(0, {"parameters": params}, dict(app))


_BY_ID = [("id", False)]
_CREATE_ID_TAG = id_tag(job_service_pb2.CreateJobResponse, "job")


def _scope(principal: Principal) -> int | None:
    return principal.site_id if principal.is_site else None
