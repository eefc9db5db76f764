"""The site's settings file (`<site dir>/settings.yml`): schema, defaults, validation.

Pure: `parse_settings(dict)` validates a mapping and returns frozen dataclasses; every
error names the offending key ("elastic_queue.max_nodes must be ...") so a user can fix
the file without reading code. `SETTINGS_TEMPLATE` is the commented file written by
`balsamctl site init`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from balsam_grpc.core.errors import InvalidArgument
from balsam_grpc.site.transfers.config import TransferSettings, check_transfer_settings, parse_locations

JOB_MODES = ("serial", "mpi")


class SettingsError(InvalidArgument):
    """settings.yml is missing, unreadable or invalid; `key` names the offending entry."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message, field=key or None)
        self.key = key


@dataclass(frozen=True)
class QueueLimits:
    """Limits of one scheduler queue the site may submit to."""

    max_nodes: int = 0          # 0 = no limit
    max_wall_time_min: int = 0  # 0 = no limit
    max_queued: int = 0         # batch jobs of this site queued at once; 0 = no limit


@dataclass(frozen=True)
class SchedulerSettings:
    name: str = "local"
    options: dict[str, Any] = field(default_factory=dict)
    # How often the scheduler (squeue, qstat, ...) is asked for states. This polls the
    # local batch scheduler, never our server.
    poll_seconds: float = 5.0


@dataclass(frozen=True)
class LauncherSettings:
    mode: str = "serial"
    # Idle launchers exit after this many seconds without work (scale to zero).
    idle_timeout_s: int = 60
    # Prefix that starts the launcher across the allocation; {num_nodes} and {num_ranks}
    # are filled in. Empty = the platform's default.
    mpi_prefix: str = ""
    # Extra command-line arguments for the launcher.
    extra_args: list[str] = field(default_factory=list)
    # Shell lines run in the batch script before the launcher (module loads, conda
    # activate). Empty = the platform's preamble.
    preamble: str = ""
    # The launcher's own node preset (--platform: cpus/gpus per node, MPI flavor). Empty =
    # cpus/gpus per node and MPI flavor from the site's platform preset.
    platform: str = ""


@dataclass(frozen=True)
class ElasticQueueSettings:
    enabled: bool = False
    queue: str = ""
    project: str = ""
    job_mode: str = "serial"
    min_nodes: int = 1
    max_nodes: int = 1
    min_wall_time_min: int = 10
    max_wall_time_min: int = 60
    # Added to the longest runnable job's wall time when sizing a pilot.
    wall_time_margin_min: int = 5
    max_queued: int = 1
    # The most nodes the site's pilots hold at once, queued and running together (its
    # share of the machine); 0 = no cap. Without a cap, pilots keep being added while the
    # backlog outgrows the running ones (max_queued only bounds the waiting ones).
    max_total_nodes: int = 0
    # Withdraw pilots queued longer than this (0 = never).
    wait_timeout_min: int = 0
    use_backfill: bool = False
    # How often the backlog is re-evaluated when nothing is pushed (withdrawals).
    check_seconds: float = 10.0


@dataclass(frozen=True)
class QueueMaintainerSettings:
    enabled: bool = False
    queue: str = ""
    project: str = ""
    job_mode: str = "serial"
    num_queued: int = 1
    nodes: int = 1
    wall_time_min: int = 30


@dataclass(frozen=True)
class ProcessingSettings:
    workers: int = 2
    # A hook running longer than this is killed and the job fails with that reason.
    hook_timeout_s: int = 600


@dataclass(frozen=True)
class CleanupSettings:
    enabled: bool = True


@dataclass(frozen=True)
class SiteSettings:
    site_id: int
    name: str
    server: str = ""
    platform: str = "local"
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    allowed_projects: list[str] = field(default_factory=list)
    allowed_queues: dict[str, QueueLimits] = field(default_factory=dict)
    batch_script_template: str = ""
    launcher: LauncherSettings = field(default_factory=LauncherSettings)
    elastic_queue: ElasticQueueSettings = field(default_factory=ElasticQueueSettings)
    queue_maintainer: QueueMaintainerSettings = field(default_factory=QueueMaintainerSettings)
    processing: ProcessingSettings = field(default_factory=ProcessingSettings)
    cleanup: CleanupSettings = field(default_factory=CleanupSettings)
    max_in_flight: int = 32
    # Data staging (balsam_grpc/site/transfers): location alias -> globus://<collection>,
    # file:///path or rsync://user@host/path, and the transfer service's settings.
    transfer_locations: dict[str, str] = field(default_factory=dict)
    transfers: TransferSettings = field(default_factory=TransferSettings)


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotated type `tp`; nested dataclasses recurse."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if value is None:
            return []
        if not isinstance(value, list):
            raise SettingsError(f"{key} must be a list, got {value!r}", key)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise SettingsError(f"{key} must be a mapping, got {value!r}", key)
        return {str(k): (v if val_tp is Any else _convert(v, val_tp, f"{key}.{k}")) for k, v in value.items()}
    if isinstance(origin, type) and issubclass(origin, types.UnionType):  # pragma: no cover
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise SettingsError(f"{key} must be true or false, got {value!r}", key)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"{key} must be {_type_name(int)}, got {value!r}", key)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SettingsError(f"{key} must be {_type_name(float)}, got {value!r}", key)
        if not math.isfinite(value):  # YAML's .nan/.inf: no period or timeout can be one
            raise SettingsError(f"{key} must be a finite number, got {value!r}", key)
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise SettingsError(f"{key} must be {_type_name(str)}, got {value!r}", key)
        return str(value)
    return value


def _build(cls: Any, data: Any, prefix: str) -> Any:
    where = prefix or "the top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SettingsError(f"{where} must be a mapping of keys to values, got {data!r}", prefix)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            full = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(fields)}"
            raise SettingsError(f"unknown key {full}{hint}", full)
    values = {}
    for name, f in fields.items():
        full = f"{prefix}.{name}" if prefix else name
        if name in data:
            values[name] = _convert(data[name], hints[name], full)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SettingsError(f"{full} is required", full)
    return cls(**values)


def _positive(value: int, key: str, *, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise SettingsError(f"{key} must be {'>= 0' if zero_ok else '>= 1'}, got {value}", key)


def _check(s: SiteSettings) -> None:
    """Rules across fields, each naming the key to change."""
    _positive(s.site_id, "site_id")
    if not s.name:
        raise SettingsError("name must not be empty", "name")
    if s.scheduler.poll_seconds <= 0:
        raise SettingsError(f"scheduler.poll_seconds must be > 0, got {s.scheduler.poll_seconds}",
                            "scheduler.poll_seconds")
    _positive(s.max_in_flight, "max_in_flight")
    if s.launcher.mode not in JOB_MODES:
        raise SettingsError(f"launcher.mode must be one of {', '.join(JOB_MODES)}, got {s.launcher.mode!r}",
                            "launcher.mode")
    _positive(s.launcher.idle_timeout_s, "launcher.idle_timeout_s", zero_ok=True)
    for q, limits in s.allowed_queues.items():
        for name in ("max_nodes", "max_wall_time_min", "max_queued"):
            _positive(getattr(limits, name), f"allowed_queues.{q}.{name}", zero_ok=True)
    for section in ("elastic_queue", "queue_maintainer"):
        sub = getattr(s, section)
        if sub.job_mode not in JOB_MODES:
            raise SettingsError(f"{section}.job_mode must be one of {', '.join(JOB_MODES)}, got {sub.job_mode!r}",
                                f"{section}.job_mode")
        if sub.enabled and s.allowed_queues and sub.queue not in s.allowed_queues:
            raise SettingsError(f"{section}.queue {sub.queue!r} is not in allowed_queues "
                                f"({', '.join(s.allowed_queues)})", f"{section}.queue")
        if sub.enabled and s.allowed_projects and sub.project not in s.allowed_projects:
            raise SettingsError(f"{section}.project {sub.project!r} is not in allowed_projects "
                                f"({', '.join(s.allowed_projects)})", f"{section}.project")
    eq = s.elastic_queue
    for name in ("min_nodes", "max_nodes", "min_wall_time_min", "max_wall_time_min", "max_queued"):
        _positive(getattr(eq, name), f"elastic_queue.{name}")
    _positive(eq.wall_time_margin_min, "elastic_queue.wall_time_margin_min", zero_ok=True)
    _positive(eq.wait_timeout_min, "elastic_queue.wait_timeout_min", zero_ok=True)
    _positive(eq.max_total_nodes, "elastic_queue.max_total_nodes", zero_ok=True)
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
    if eq.check_seconds <= 0:
        raise SettingsError(f"elastic_queue.check_seconds must be > 0, got {eq.check_seconds}",
                            "elastic_queue.check_seconds")
    qm = s.queue_maintainer
    for name in ("num_queued", "nodes", "wall_time_min"):
        _positive(getattr(qm, name), f"queue_maintainer.{name}")
    _positive(s.processing.workers, "processing.workers")
    _positive(s.processing.hook_timeout_s, "processing.hook_timeout_s")
    try:
        parse_locations(s.transfer_locations)
        check_transfer_settings(s.transfers)
    except InvalidArgument as exc:
        raise SettingsError(exc.message, exc.field or "transfers") from exc


def parse_settings(data: Any) -> SiteSettings:
    """Validate a parsed settings.yml mapping; raises SettingsError naming the key."""
    settings = _build(SiteSettings, data, "")
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
server: "{server}"
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
    return SETTINGS_TEMPLATE.format(
        site_id=site_id, name=name, server=server, platform=platform, scheduler=scheduler,
        projects="[" + ", ".join(projects) + "]", queues=queue_lines.rstrip("\n") if queues else "  {}",
        elastic="true" if elastic else "false", queue=first_queue or '""',
        project=projects[0] if projects else "", max_nodes=max_nodes, max_total_nodes=max_total_nodes)
