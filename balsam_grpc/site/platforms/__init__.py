"""Platform presets: data files `<name>.yml` in this folder (local, polaris, aurora,
perlmutter, frontier, slurm, pbs) giving a site its defaults.

    load_platform("polaris") -> dict       # validated; errors name the file and key
    list_platforms() -> list[str]

Keys (all required unless marked optional):
  name                 the file's stem
  description          one line for `balsamctl site init --help`
  scheduler            local | slurm | pbs | cobalt | lsf
  scheduler_options    optional mapping passed to get_scheduler(scheduler, **options)
  batch_script         optional inline template; default: the scheduler's templates/<scheduler>.sh.
                       The loaded dict always holds the template text here.
  mpi_launch           how multi-node jobs start inside an allocation: mpich | pals | srun | jsrun | aprun
  launcher_mpi_prefix  optional: how the batch script starts one launcher per node
                       ({num_nodes} filled in); "" = run the launcher directly
  preamble             optional shell lines run before the launcher (module loads)
  cpus_per_node, gpus_per_node   per node; cpus_per_node 0 = detect on the host / in the allocation
  default_queue, default_project   placeholders the user replaces in settings.yml
  queues               mapping queue -> {max_nodes, max_wall_time_min, max_queued (optional)};
                       0 = no limit. Values are the public limits at the time of writing:
                       check the facility's documentation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from balsam_grpc.core.errors import InvalidArgument

from ..schedulers import SCHEDULER_NAMES, TemplateError, read_template, template_names

PLATFORMS_DIR = Path(__file__).parent
MPI_LAUNCH_METHODS = ("mpich", "pals", "srun", "jsrun", "aprun")
QUEUE_KEYS = {"max_nodes", "max_wall_time_min", "max_queued"}
# Names a batch script template may use: what the site daemon provides plus derived values.
TEMPLATE_NAMES = {"launcher_command", "num_nodes", "wall_time_min", "wall_time_hms", "queue", "project",
                  "job_name", "workdir", "env_exports", "preamble", "sched_directives", "select_suffix",
                  "partitions", "env", "batch_job_id", "site_dir", "site_name", "output", "optional_params"}

_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "name": str, "description": str, "scheduler": str, "mpi_launch": str, "cpus_per_node": int,
    "gpus_per_node": int, "default_queue": str, "default_project": str, "queues": dict,
}
_OPTIONAL: dict[str, type | tuple[type, ...]] = {
    "scheduler_options": dict, "batch_script": str, "launcher_mpi_prefix": str, "preamble": str,
    # The elastic queue's max_total_nodes a new site starts with (0 or absent: no cap).
    "max_total_nodes": int,
}


class PlatformError(InvalidArgument):
    default_reason = "BAD_PLATFORM"

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(f"{source}: {key}: {problem}" if key else f"{source}: {problem}", field=key or None)
        self.source = source
        self.key = key


def list_platforms() -> list[str]:
    return sorted(p.stem for p in PLATFORMS_DIR.glob("*.yml"))


def _type_name(t: type | tuple[type, ...]) -> str:
    return " or ".join(x.__name__ for x in t) if isinstance(t, tuple) else {"dict": "mapping", "str": "string",
                                                                          "int": "integer"}.get(t.__name__, t.__name__)


def validate_platform(data: Any, source: str, *, expected_name: str | None = None) -> dict:
    """Pure: the preset with defaults filled in, or PlatformError naming source and key."""
    if not isinstance(data, dict):
        raise PlatformError(source, "", "must be a mapping of keys to values")
    unknown = sorted(set(data) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise PlatformError(source, unknown[0], f"unknown key (known: {', '.join(sorted({*_REQUIRED, *_OPTIONAL}))})")
    for key, typ in {**_REQUIRED, **_OPTIONAL}.items():
        if key not in data:
            if key in _REQUIRED:
                raise PlatformError(source, key, "missing")
            continue
        value = data[key]
        if not isinstance(value, typ) or isinstance(value, bool):
            raise PlatformError(source, key, f"must be a {_type_name(typ)}, got {value!r}")
    out = dict(data)
    if expected_name is not None and out["name"] != expected_name:
        raise PlatformError(source, "name", f"is {out['name']!r} but the file is {expected_name}.yml")
    if out["scheduler"] not in SCHEDULER_NAMES:
        raise PlatformError(source, "scheduler", f"{out['scheduler']!r} is not one of {', '.join(SCHEDULER_NAMES)}")
    if out["mpi_launch"] not in MPI_LAUNCH_METHODS:
        raise PlatformError(source, "mpi_launch", f"{out['mpi_launch']!r} is not one of {', '.join(MPI_LAUNCH_METHODS)}")
    for key in ("cpus_per_node", "gpus_per_node", "max_total_nodes"):
        if out.get(key, 0) < 0:
            raise PlatformError(source, key, f"must be >= 0, got {out[key]}")
    queues: dict[str, dict] = {}
    for q, limits in out["queues"].items():
        where = f"queues.{q}"
        if not isinstance(q, str) or not q:
            raise PlatformError(source, where, "queue names must be non-empty strings")
        if not isinstance(limits, dict):
            raise PlatformError(source, where, "must be a mapping with max_nodes and max_wall_time_min")
        bad = sorted(set(limits) - QUEUE_KEYS)
        if bad:
            raise PlatformError(source, f"{where}.{bad[0]}", f"unknown key (known: {', '.join(sorted(QUEUE_KEYS))})")
        for k in ("max_nodes", "max_wall_time_min"):
            if k not in limits:
                raise PlatformError(source, f"{where}.{k}", "missing")
        for k, v in limits.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise PlatformError(source, f"{where}.{k}", f"must be an integer >= 0 (0 = no limit), got {v!r}")
        queues[q] = {"max_queued": 0, **limits}
    out["queues"] = queues
    if queues and out["default_queue"] not in queues:
        raise PlatformError(source, "default_queue", f"{out['default_queue']!r} is not in queues ({', '.join(queues)})")
    out.setdefault("scheduler_options", {})
    out.setdefault("launcher_mpi_prefix", "")
    out.setdefault("preamble", "")
    if "batch_script" not in out:
        out["batch_script"] = read_template(f"{out['scheduler']}.sh")
    try:
        used = template_names(out["batch_script"])
    except TemplateError as exc:
        raise PlatformError(source, "batch_script", str(exc)) from exc
    unknown_names = sorted(used - TEMPLATE_NAMES)
    if unknown_names:
        raise PlatformError(source, "batch_script",
                            f"uses {{{{ {unknown_names[0]} }}}}, which the site does not provide "
                            f"(available: {', '.join(sorted(TEMPLATE_NAMES))})")
    if "launcher_command" not in used:
        raise PlatformError(source, "batch_script", "never uses {{ launcher_command }}: the pilot would run nothing")
    return out


def load_platform(name_or_path: str | Path) -> dict:
    """A preset by name (this folder) or a path to a .yml of the same shape."""
    path = Path(name_or_path)
    if path.suffix not in (".yml", ".yaml"):
        path = PLATFORMS_DIR / f"{name_or_path}.yml"
        if not path.is_file():
            raise PlatformError(str(name_or_path), "", f"no such platform preset; known: {', '.join(list_platforms())}")
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PlatformError(str(path), "", f"cannot read: {exc}") from exc
    except yaml.YAMLError as exc:
        raise PlatformError(str(path), "", f"not valid YAML: {exc}") from exc
    return validate_platform(data, str(path), expected_name=path.stem)


__all__ = ["MPI_LAUNCH_METHODS", "PlatformError", "list_platforms", "load_platform", "validate_platform"]
