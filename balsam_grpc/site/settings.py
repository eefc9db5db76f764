"""The site's settings file (`<site dir>/settings.yml`): schema, defaults, validation.

Pure: `parse_settings(dict)` validates a mapping and returns frozen pydantic models;
every error names the offending key and what it allows ("elastic_queue.max_nodes must be
>= 1, got 0"), so a user can fix the file without reading code. `SETTINGS_TEMPLATE` is
the commented file written by `balsamctl site init`.

Types, ranges and unknown keys are checked by pydantic (site/schema.py: strict types,
no extra keys); `_check` keeps the rules that relate one key to another.
"""

from __future__ import annotations

import difflib
import json
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from balsam_grpc.core.errors import InvalidArgument
from balsam_grpc.site.schema import Section, Text
from balsam_grpc.site.transfers.config import TransferSettings, check_transfer_settings, parse_locations

JOB_MODES = ("serial", "mpi")
JobMode = Literal["serial", "mpi"]


class SettingsError(InvalidArgument):
    """settings.yml is missing, unreadable or invalid; `key` names the offending entry."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message, field=key or None)
        self.key = key


class QueueLimits(Section):
    """Limits of one scheduler queue the site may submit to."""

    max_nodes: int = Field(0, ge=0)          # 0 = no limit
    max_wall_time_min: int = Field(0, ge=0)  # 0 = no limit
    max_queued: int = Field(0, ge=0)         # batch jobs of this site queued at once; 0 = no limit


class SchedulerSettings(Section):
    name: Text = "local"
    options: dict[str, Any] = Field(default_factory=dict)
    # How often the scheduler (squeue, qstat, ...) is asked for states. This polls the
    # local batch scheduler, never our server.
    poll_seconds: float = Field(5.0, gt=0)


class LauncherSettings(Section):
    mode: JobMode = "serial"
    # Idle launchers exit after this many seconds without work (scale to zero).
    idle_timeout_s: int = Field(60, ge=0)
    # Prefix that starts the launcher across the allocation; {num_nodes} and {num_ranks}
    # are filled in. Empty = the platform's default.
    mpi_prefix: Text = ""
    # Extra command-line arguments for the launcher.
    extra_args: list[Text] = Field(default_factory=list)
    # Shell lines run in the batch script before the launcher (module loads, conda
    # activate). Empty = the platform's preamble.
    preamble: Text = ""
    # The launcher's own node preset (--platform: cpus/gpus per node, MPI flavor). Empty =
    # cpus/gpus per node and MPI flavor from the site's platform preset.
    platform: Text = ""


class ElasticQueueSettings(Section):
    enabled: bool = False
    queue: Text = ""
    project: Text = ""
    job_mode: JobMode = "serial"
    min_nodes: int = Field(1, ge=1)
    max_nodes: int = Field(1, ge=1)
    min_wall_time_min: int = Field(10, ge=1)
    max_wall_time_min: int = Field(60, ge=1)
    # Added to the longest runnable job's wall time when sizing a pilot.
    wall_time_margin_min: int = Field(5, ge=0)
    max_queued: int = Field(1, ge=1)
    # The most nodes the site's pilots hold at once, queued and running together (its
    # share of the machine); 0 = no cap. Without a cap, pilots keep being added while the
    # backlog outgrows the running ones (max_queued only bounds the waiting ones).
    max_total_nodes: int = Field(0, ge=0)
    # Withdraw pilots queued longer than this (0 = never).
    wait_timeout_min: int = Field(0, ge=0)
    use_backfill: bool = False
    # How often the backlog is re-evaluated when nothing is pushed (withdrawals).
    check_seconds: float = Field(10.0, gt=0)


class QueueMaintainerSettings(Section):
    enabled: bool = False
    queue: Text = ""
    project: Text = ""
    job_mode: JobMode = "serial"
    num_queued: int = Field(1, ge=1)
    nodes: int = Field(1, ge=1)
    wall_time_min: int = Field(30, ge=1)


class ProcessingSettings(Section):
    workers: int = Field(2, ge=1)
    # A hook running longer than this is killed and the job fails with that reason.
    hook_timeout_s: int = Field(600, ge=1)


class CleanupSettings(Section):
    enabled: bool = True


class SiteSettings(Section):
    site_id: int = Field(ge=1)
    name: Text = Field(min_length=1)
    server: Text = ""
    platform: Text = "local"
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    allowed_projects: list[Text] = Field(default_factory=list)
    allowed_queues: dict[str, QueueLimits] = Field(default_factory=dict)
    batch_script_template: Text = ""
    launcher: LauncherSettings = Field(default_factory=LauncherSettings)
    elastic_queue: ElasticQueueSettings = Field(default_factory=ElasticQueueSettings)
    queue_maintainer: QueueMaintainerSettings = Field(default_factory=QueueMaintainerSettings)
    processing: ProcessingSettings = Field(default_factory=ProcessingSettings)
    cleanup: CleanupSettings = Field(default_factory=CleanupSettings)
    max_in_flight: int = Field(32, ge=1)
    # Data staging (balsam_grpc/site/transfers): location alias -> globus://<collection>,
    # file:///path or rsync://user@host/path, and the transfer service's settings.
    transfer_locations: dict[str, Text] = Field(default_factory=dict)
    transfers: TransferSettings = Field(default_factory=TransferSettings)


# -- pydantic's errors in the file's own terms ----------------------------------------------

_WANTS = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "bool_type": "true or false", "bool_parsing": "true or false",
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "string_type": "text", "list_type": "a list", "dict_type": "a mapping",
    "model_type": "a mapping of keys to values", "model_attributes_type": "a mapping of keys to values",
}


def _section_at(root: type[BaseModel], path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The settings section (model class) at `path` of the file, if there is one."""
    tp: Any = root
    for part in path:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            info = tp.model_fields.get(str(part))
            if info is None:
                return None
            tp = info.annotation
        elif typing.get_origin(tp) in (dict, list):
            tp = typing.get_args(tp)[-1]  # `part` is a key or an index
        else:
            return None
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _describe(err: Any, root: type[BaseModel]) -> tuple[str, str]:
    """(key, message) for one pydantic error: the dotted key and what it allows."""
    loc = tuple(err["loc"])
    dict_key = "[key]" in loc
    loc = tuple(p for p in loc if p != "[key]")
    key = ".".join(str(p) for p in loc)
    where = key or "the top level"
    kind, got, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if dict_key:
        return key, f"{where}: keys must be text, got {got!r}"
    if kind == "extra_forbidden":
        section = _section_at(root, loc[:-1])
        known = list(section.model_fields) if section else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else (f"; known keys: {', '.join(known)}" if known else "")
        return key, f"unknown key {key}{hint}"
    if kind == "missing":
        return key, f"{key} is required"
    if kind in _WANTS:
        return key, f"{where} must be {_WANTS[kind]}, got {got!r}"
    if kind == "greater_than_equal":
        return key, f"{key} must be >= {ctx['ge']}, got {got!r}"
    if kind == "greater_than":
        return key, f"{key} must be > {ctx['gt']}, got {got!r}"
    if kind == "literal_error":
        allowed = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return key, f"{key} must be one of {', '.join(allowed)}, got {got!r}"
    if kind == "string_too_short":
        return key, f"{key} must not be empty"
    return key, f"{where}: {err['msg']}, got {got!r}"


def _settings_error(exc: ValidationError) -> SettingsError:
    """Every problem pydantic found, in one message; `key` is the first one's."""
    found = [_describe(e, SiteSettings) for e in exc.errors(include_url=False)]
    return SettingsError("; ".join(message for _, message in found), found[0][0])


def _check(s: SiteSettings) -> None:
    """Rules that relate keys to each other, each naming the key to change (pydantic
    has checked each key alone)."""
    for section in ("elastic_queue", "queue_maintainer"):
        sub = getattr(s, section)
        if sub.enabled and s.allowed_queues and sub.queue not in s.allowed_queues:
            raise SettingsError(f"{section}.queue {sub.queue!r} is not in allowed_queues "
                                f"({', '.join(s.allowed_queues)})", f"{section}.queue")
        if sub.enabled and s.allowed_projects and sub.project not in s.allowed_projects:
            raise SettingsError(f"{section}.project {sub.project!r} is not in allowed_projects "
                                f"({', '.join(s.allowed_projects)})", f"{section}.project")
    eq = s.elastic_queue
    if 0 < eq.max_total_nodes < eq.min_nodes:
        raise SettingsError(f"elastic_queue.max_total_nodes ({eq.max_total_nodes}) is smaller than min_nodes "
                            f"({eq.min_nodes}): no pilot could ever start; raise it or set 0 (no cap)",
                            "elastic_queue.max_total_nodes")
    if eq.min_nodes > eq.max_nodes:
        raise SettingsError(f"elastic_queue.min_nodes ({eq.min_nodes}) is larger than max_nodes ({eq.max_nodes})",
                            "elastic_queue.min_nodes")
    if eq.min_wall_time_min > eq.max_wall_time_min:
        raise SettingsError(f"elastic_queue.min_wall_time_min ({eq.min_wall_time_min}) is larger than "
                            f"max_wall_time_min ({eq.max_wall_time_min})", "elastic_queue.min_wall_time_min")
    try:
        parse_locations(s.transfer_locations)
        check_transfer_settings(s.transfers)
    except InvalidArgument as exc:
        raise SettingsError(exc.message, exc.field or "transfers") from exc


def parse_settings(data: Any) -> SiteSettings:
    """Validate a parsed settings.yml mapping; raises SettingsError naming the key."""
    try:
        settings = SiteSettings.model_validate({} if data is None else data)
    except ValidationError as exc:
        raise _settings_error(exc) from None
    _check(settings)
    return settings


def load_settings(path: Path) -> SiteSettings:
    if not path.exists():
        raise SettingsError(f"{path} does not exist; create the site with `balsamctl site init`")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path} is not valid YAML: {exc}") from exc
    try:
        return parse_settings(data)
    except SettingsError as exc:
        raise SettingsError(f"{path}: {exc.message}", exc.key) from exc


SETTINGS_TEMPLATE = """\
# Settings of a balsam-grpc site. Read by the site daemon at start:
#   balsamctl site stop && balsamctl site start   after editing.
# Unknown keys are errors (so a typo never goes unnoticed).

# The site's id on the server (written by `balsamctl site init`).
site_id: {site_id}
name: {name}
# host:port of the server; empty = BALSAM_SERVER or the profile.
server: {server}
# Preset for defaults: local, polaris, aurora, perlmutter, frontier, slurm, pbs.
platform: {platform}

scheduler:
  # local, slurm, pbs, cobalt, lsf
  name: {scheduler}
  # Adapter options (see the platform preset).
  options: {{}}
  poll_seconds: 5             # how often squeue/qstat is read (the scheduler, not the server)

# Projects (accounts) batch jobs may charge; empty = any.
allowed_projects: {projects}
# Queues batch jobs may use, with limits (0 = no limit).
allowed_queues:
{queues}
# Batch script template, relative to this folder; empty = the platform's template.
batch_script_template: ""

launcher:
  mode: serial                # default launcher mode: serial or mpi
  idle_timeout_s: 60          # idle launchers exit after this long (lets the queue scale to zero)
  mpi_prefix: ""              # how the launcher is started in the allocation; empty = platform default
  extra_args: []
  preamble: ""                # shell lines before the launcher in the batch script (module load ...)
  platform: ""                # launcher node preset (--platform); empty = nodes as the site's platform says

# Elastic queue: sizes pilot batch jobs from the runnable backlog the server pushes.
elastic_queue:
  enabled: {elastic}
  queue: {queue}
  project: "{project}"
  job_mode: serial
  min_nodes: 1
  max_nodes: {max_nodes}
  min_wall_time_min: 10
  max_wall_time_min: 60
  wall_time_margin_min: 5     # added to the longest job's wall time
  max_queued: 1               # pilots queued at once
  # Most nodes held by this site's pilots at once, queued + running; 0 = no cap.
  max_total_nodes: {max_total_nodes}
  wait_timeout_min: 0         # withdraw pilots queued longer than this; 0 = never
  use_backfill: false         # fit pilots into the scheduler's backfill windows

# Queue maintainer: keeps a fixed number of pilots queued (an alternative to the elastic queue).
queue_maintainer:
  enabled: false
  queue: {queue}
  project: "{project}"
  job_mode: serial
  num_queued: 1
  nodes: 1
  wall_time_min: 30

processing:
  workers: 2                  # hooks run at once (each in its own process)
  hook_timeout_s: 600

cleanup:
  enabled: true               # delete the apps' cleanup globs after JOB_FINISHED
"""


def render_settings_template(*, site_id: int, name: str, server: str, platform: str, scheduler: str,
                             queues: dict[str, QueueLimits], projects: list[str], elastic: bool,
                             max_nodes: int, max_total_nodes: int = 0) -> str:
    queue_lines = "".join(
        f"  {q}: {{max_nodes: {lim.max_nodes}, max_wall_time_min: {lim.max_wall_time_min}, "
        f"max_queued: {lim.max_queued}}}\n" for q, lim in queues.items()) or "  {}\n"
    first_queue = next(iter(queues), "")
    # The name and address as YAML double-quoted scalars (JSON's string form, ASCII with
    # escapes): a site name such as "a: b", "x # y", "*ref", "yes" or one with U+0085 is
    # legal on the server and must read back as itself.
    return SETTINGS_TEMPLATE.format(
        site_id=site_id, name=json.dumps(name), server=json.dumps(server), platform=platform, scheduler=scheduler,
        projects="[" + ", ".join(projects) + "]", queues=queue_lines.rstrip("\n") if queues else "  {}",
        elastic="true" if elastic else "false", queue=first_queue or '""',
        project=projects[0] if projects else "", max_nodes=max_nodes, max_total_nodes=max_total_nodes)
