"""Apps as code: `ApplicationDefinition` subclasses live in a site's apps folder.

The server stores only the declaration (`App` message, built by `app_message`); the site
daemon runs the hooks and the launcher runs commands and Python-function apps, both by
loading the classes with `load_app_classes`. Everything here is pure except the loader.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from balsam_grpc.core.command_template import check_template, render_argv, render_script
from balsam_grpc.core.errors import InvalidArgument
from balsam_grpc.core.structs import struct_to_dict
from balsam_grpc.v1 import app_pb2, common_pb2, job_pb2

HOOKS = ("preprocess", "postprocess", "handle_error", "handle_timeout")
# Package under which site app modules are imported, so two sites' "apps.py" never collide
# with each other or with real packages.
SITE_APPS_PACKAGE = "balsam_site_apps"

_TYPES = {
    "string": app_pb2.PARAMETER_TYPE_STRING,
    "str": app_pb2.PARAMETER_TYPE_STRING,
    "int": app_pb2.PARAMETER_TYPE_INT,
    "float": app_pb2.PARAMETER_TYPE_FLOAT,
    "bool": app_pb2.PARAMETER_TYPE_BOOL,
    "path": app_pb2.PARAMETER_TYPE_PATH,
}
_DIRECTIONS = {"in": common_pb2.TRANSFER_DIRECTION_IN, "out": common_pb2.TRANSFER_DIRECTION_OUT}
_ACTIONS = {"restart": app_pb2.RETRY_ACTION_RESTART, "fail": app_pb2.RETRY_ACTION_FAIL}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def coerce_parameter(param: app_pb2.AppParameter, value: str) -> Any:
    """The Python value of a string parameter, by its declared type."""
    kind = param.type
    try:
        if kind == app_pb2.PARAMETER_TYPE_INT:
            return int(value)
        if kind == app_pb2.PARAMETER_TYPE_FLOAT:
            return float(value)
    except ValueError:
        type_name = app_pb2.ParameterType.Name(kind).removeprefix("PARAMETER_TYPE_").lower()
        raise InvalidArgument(f"parameters.{param.name}: {value!r} is not a valid {type_name}",
                              field=f"parameters.{param.name}") from None
    if kind == app_pb2.PARAMETER_TYPE_BOOL:
        lowered = value.strip().lower()
        if lowered not in _TRUE | _FALSE:
            raise InvalidArgument(f"parameters.{param.name}: {value!r} is not a boolean (true/false)",
                                  field=f"parameters.{param.name}")
        return lowered in _TRUE
    return value


def resolve_parameters(app: app_pb2.App, parameters: Mapping[str, str]) -> dict[str, Any]:
    """Declared parameters with defaults applied and values typed; unknown or missing
    required ones are refused, naming the parameter."""
    if not parameters and not app.parameters:  # most apps the launcher runs: nothing to check
        return {}
    declared = {p.name: p for p in app.parameters}
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise InvalidArgument(
            f"parameters.{unknown[0]}: app {app.name!r} has no parameter {unknown[0]!r} "
            f"(it takes: {', '.join(sorted(declared)) or 'none'})", field=f"parameters.{unknown[0]}")
    resolved: dict[str, Any] = {}
    for name, param in declared.items():
        if name in parameters:
            resolved[name] = coerce_parameter(param, parameters[name])
        elif param.required:
            raise InvalidArgument(f"parameters.{name}: app {app.name!r} requires parameter {name!r}"
                                  + (f" ({param.help})" if param.help else ""), field=f"parameters.{name}")
        else:
            resolved[name] = coerce_parameter(param, param.default_value)
    return resolved


def command_argv(app: app_pb2.App, parameters: Mapping[str, str]) -> list[str]:
    """The argument vector that runs a command app for a job (see core.command_template):
    the program itself, or for an app declared `shell` bash with the script and the
    values as its positional parameters. No value is ever pasted into text a shell parses."""
    values = resolve_parameters(app, parameters)
    if app.shell:
        script, args = render_script(app.command_template, values)
        return ["/bin/bash", "-c", script, app.name or "balsam-app", *args]
    return render_argv(app.command_template, values)


class JobHandle:
    """What a hook or a Python-function app sees as `self.job`.

    `data`, `tags` and `parameters` may be changed in place or replaced; assigning `state`
    chooses the job's next state. `changes()` tells what the code changed.
    """

    def __init__(self, job: job_pb2.Job, workdir: Path) -> None:
        self._job = job
        self.id = job.id
        self.name = job.name
        self.app_id = job.app_id
        self.workdir = Path(workdir)
        self.state_message = job.state_message
        self.return_code: int | None = job.return_code if job.HasField("return_code") else None
        self.error_tail = job.error_tail
        self.run_count = job.run_count
        self.resources = job.resources
        self.parameters: dict[str, str] = dict(job.parameters)
        self.tags: dict[str, str] = dict(job.tags)
        self.data: dict[str, Any] = struct_to_dict(job.data) if job.HasField("data") else {}
        self._initial = {"parameters": copy.deepcopy(self.parameters), "tags": copy.deepcopy(self.tags),
                         "data": copy.deepcopy(self.data)}
        self._state = job_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")
        self._next_state: str | None = None

    @property
    def state(self) -> str:
        return self._next_state or self._state

    @state.setter
    def state(self, value: str) -> None:
        name = str(value).upper().removeprefix("JOB_STATE_")
        if "JOB_STATE_" + name not in job_pb2.JobState.keys():
            valid = ", ".join(k.removeprefix("JOB_STATE_") for k in job_pb2.JobState.keys()[1:])
            raise ValueError(f"unknown job state {value!r}; valid states: {valid}")
        self._next_state = name

    def changes(self) -> tuple[str | None, dict[str, Any]]:
        """(next state chosen by the code or None, changed fields among parameters/tags/data)."""
        changed = {f: getattr(self, f) for f, before in self._initial.items() if getattr(self, f) != before}
        return self._next_state, changed

    def __repr__(self) -> str:
        return f"JobHandle(id={self.id}, state={self.state}, workdir={str(self.workdir)!r})"


class ApplicationDefinition:
    """Base class of apps. Subclass it in a site's apps folder; see the module docstring.

    Class attributes declare the app; `run` (if defined) makes it a Python-function app;
    the hook methods, when overridden, run at the site at their step of the job.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    command_template: ClassVar[str] = ""
    # True: command_template is a bash script and values reach it as "$1", "$2", ...
    shell: ClassVar[bool] = False
    parameters: ClassVar[dict[str, dict[str, Any]]] = {}
    transfers: ClassVar[dict[str, dict[str, Any]]] = {}
    environment_variables: ClassVar[dict[str, str]] = {}
    preamble: ClassVar[str | list[str]] = ""
    cleanup_files: ClassVar[list[str]] = []
    retry_policy: ClassVar[dict[str, Any]] = {}

    def __init__(self, job: JobHandle) -> None:
        self.job = job

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Build the declaration once now, so a mistake fails where the class is defined.
        cls.app_message(0)

    # Hooks: overridden ones are declared in App.hooks and run by the site daemon.
    def preprocess(self) -> None:
        """Runs before the job is eligible to run (STAGED_IN -> PREPROCESSED)."""

    def postprocess(self) -> None:
        """Runs after a successful run (RUN_DONE -> POSTPROCESSED)."""

    def handle_error(self) -> None:
        """Runs after a failed run (RUN_ERROR); may set self.job.state."""

    def handle_timeout(self) -> None:
        """Runs after a timed-out run (RUN_TIMEOUT); may set self.job.state."""

    @classmethod
    def app_name(cls) -> str:
        return cls.__dict__.get("name") or cls.__name__

    @classmethod
    def class_path(cls) -> str:
        return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__qualname__}"

    @classmethod
    def is_python_app(cls) -> bool:
        return callable(getattr(cls, "run", None))

    @classmethod
    def app_message(cls, site_id: int) -> app_pb2.App:
        """The declaration the server stores (raises InvalidArgument on a bad declaration)."""
        where = f"app {cls.__qualname__}"
        if cls.is_python_app() == bool(cls.command_template):
            raise InvalidArgument(f"{where}: define exactly one of command_template or run()",
                                  field="command_template")
        if not isinstance(cls.shell, bool):
            raise InvalidArgument(f"{where}: shell must be True or False, not {cls.shell!r}", field="shell")
        app = app_pb2.App(
            site_id=site_id, name=cls.app_name(),
            description=(cls.description or (cls.__doc__ or "")).strip(),
            command_template=cls.command_template,
            shell=cls.shell,
            environment={str(k): str(v) for k, v in cls.environment_variables.items()},
            preamble=cls.preamble if isinstance(cls.preamble, str) else "\n".join(cls.preamble),
            cleanup_globs=list(cls.cleanup_files),
            kind=app_pb2.APP_KIND_PYTHON if cls.is_python_app() else app_pb2.APP_KIND_SHELL,
            class_path=cls.class_path(),
            hooks=app_pb2.AppHooks(**{h: getattr(cls, h) is not getattr(ApplicationDefinition, h) for h in HOOKS}),
        )
        for pname, spec in cls.parameters.items():
            app.parameters.append(_parameter(where, pname, spec))
        for sname, spec in cls.transfers.items():
            app.transfers.append(_transfer_slot(where, sname, spec))
        app.retry_policy.CopyFrom(_retry_policy(where, cls.retry_policy))
        if app.command_template:
            try:
                check_template(app.command_template, [p.name for p in app.parameters], shell=app.shell,
                               field="command_template")
            except InvalidArgument as exc:
                raise InvalidArgument(f"{where}: {exc.message}", field=exc.field) from None
        return app


def _spec(where: str, kind: str, name: str, spec: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(spec, Mapping):
        raise InvalidArgument(f"{where}: {kind} {name!r} must be a dict, not {type(spec).__name__}")
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise InvalidArgument(f"{where}: {kind} {name!r} has unknown key {unknown[0]!r} "
                              f"(allowed: {', '.join(sorted(allowed))})")
    return dict(spec)


def _parameter(where: str, name: str, spec: Any) -> app_pb2.AppParameter:
    s = _spec(where, "parameter", name, spec, {"required", "default", "help", "type"})
    type_name = str(s.get("type", "string")).lower()
    if type_name not in _TYPES:
        raise InvalidArgument(f"{where}: parameter {name!r} has unknown type {type_name!r} "
                              f"(one of {', '.join(sorted(_TYPES))})")
    param = app_pb2.AppParameter(name=name, required=bool(s.get("required", False)), help=str(s.get("help", "")),
                                 type=_TYPES[type_name])
    if "default" in s:
        if param.required:
            raise InvalidArgument(f"{where}: parameter {name!r} is required and has a default; a default makes "
                                  "it optional: drop one of them")
        default = s["default"]
        param.default_value = str(default).lower() if isinstance(default, bool) else str(default)
        coerce_parameter(param, param.default_value)
    return param


def _transfer_slot(where: str, name: str, spec: Any) -> app_pb2.TransferSlot:
    s = _spec(where, "transfer slot", name, spec, {"direction", "local_path", "required", "recursive", "description"})
    direction = str(s.get("direction", "")).lower()
    if direction not in _DIRECTIONS:
        raise InvalidArgument(f"{where}: transfer slot {name!r} needs direction 'in' or 'out'")
    if not s.get("local_path"):
        raise InvalidArgument(f"{where}: transfer slot {name!r} needs a local_path (relative to the workdir)")
    return app_pb2.TransferSlot(name=name, direction=_DIRECTIONS[direction], local_path=str(s["local_path"]),
                                required=bool(s.get("required", False)), recursive=bool(s.get("recursive", False)),
                                description=str(s.get("description", "")))


def _retry_policy(where: str, spec: Any) -> app_pb2.RetryPolicy:
    s = _spec(where, "retry_policy", "", spec, {"max_retries", "quick_failure_seconds", "on_error", "on_timeout"})
    policy = app_pb2.RetryPolicy(max_retries=int(s.get("max_retries", 0)),
                                 quick_failure_seconds=int(s.get("quick_failure_seconds", 0)))
    for key in ("on_error", "on_timeout"):
        if key in s:
            action = str(s[key]).lower()
            if action not in _ACTIONS:
                raise InvalidArgument(f"{where}: retry_policy {key} must be 'restart' or 'fail', not {s[key]!r}")
            setattr(policy, key, _ACTIONS[action])
    return policy


def load_app_classes(folder: Path) -> dict[str, type[ApplicationDefinition]]:
    """Import every `*.py` of a site's apps folder; the app classes by class_path.

    Modules are (re)imported under `balsam_site_apps.<stem>`, so a changed file is picked
    up by a new call. An error names the file.
    """
    folder = Path(folder)
    found: dict[str, type[ApplicationDefinition]] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("*.py")):
        if path.name.startswith("_"):
            continue
        module_name = f"{SITE_APPS_PACKAGE}.{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise InvalidArgument(f"{path}: cannot be imported as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickle look classes up here
        try:
            spec.loader.exec_module(module)
        except InvalidArgument as exc:
            sys.modules.pop(module_name, None)
            raise InvalidArgument(f"{path}: {exc.message}", field=exc.field) from exc
        except (Exception, SystemExit) as exc:  # SystemExit: a script's sys.exit() must not end the importer
            sys.modules.pop(module_name, None)
            raise InvalidArgument(f"{path}: importing the apps file failed: {type(exc).__name__}: {exc}") from exc
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, ApplicationDefinition)
                    and obj is not ApplicationDefinition and obj.__module__ == module_name):
                found[obj.class_path()] = obj
    return found
