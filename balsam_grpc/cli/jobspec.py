"""Jobs to create, from flags or JSON lines, checked before anything is sent (pure apart
from the app lookup passed in).

A line is a Job in the protobuf JSON mapping (camelCase or snake_case names) plus two
shorthands: "app" and "site", each a name or an id. Scalars in "parameters" and "tags"
may be numbers or booleans; they are sent as text, as the server stores them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import json_format

from balsam_grpc.cli.errors import CliError
from balsam_grpc.core.appdef import resolve_parameters
from balsam_grpc.core.errors import BalsamError
from balsam_grpc.core.validation import clean_workdir, parse_tag
from balsam_grpc.sdk.convert import scalar_text
from balsam_grpc.v1 import app_pb2, job_pb2

_STRING_MAPS = ("parameters", "tags", "transfers")
_ALIASES = {"app_name": "appName", "app_id": "appId", "site_id": "siteId"}


class JobSpecError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class JobSpec:
    job: job_pb2.Job
    app: int | str
    site: int | str | None
    where: str  # "jobs.jsonl:17", or "" for a job given by flags

    def prefix(self) -> str:
        return f"{self.where}: " if self.where else ""


def _ref(value: Any) -> int | str | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise TypeError(value)
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    if isinstance(value, int) or (isinstance(value, str) and value.isascii() and value.isdigit()):
        return int(value)
    if isinstance(value, str):
        return value
    raise TypeError(value)


def spec_from_dict(obj: Mapping[str, Any], defaults: Mapping[str, Any], *, line_no: int,
                   source: str = "") -> JobSpec:
    where = f"{source}:{line_no}" if source else ""
    prefix = f"{where}: " if where else ""
    if not isinstance(obj, Mapping):
        raise JobSpecError(f"{prefix}expected a JSON object, got {type(obj).__name__}")
    data = {_ALIASES.get(k, k): v for k, v in obj.items()}
    try:
        app = _ref(data.pop("app", None)) or _ref(data.pop("appId", None)) or _ref(data.pop("appName", None)) \
            or _ref(defaults.get("app"))
        site = _ref(data.pop("site", None)) or _ref(data.pop("siteId", None)) or _ref(defaults.get("site"))
    except TypeError as err:
        raise JobSpecError(f"{prefix}\"app\" and \"site\" must be names or ids, got {err.args[0]!r}") from None
    if app is None:
        raise JobSpecError(f"{prefix}no app: give \"app\" in the line or --app")
    for key in _STRING_MAPS:
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, Mapping):
            raise JobSpecError(f"{prefix}{key} must be a JSON object of key: value")
        data[key] = {str(k): scalar_text(v) for k, v in value.items()}
    tags = {**dict(defaults.get("tags") or {}), **data.get("tags", {})}
    for key, value in tags.items():
        try:
            parse_tag(f"{key}={value}")
        except BalsamError as err:
            raise JobSpecError(f"{prefix}{err.message}") from None
    data["tags"] = tags
    job = job_pb2.Job()
    try:
        json_format.ParseDict(data, job)
    except json_format.ParseError as err:
        raise JobSpecError(f"{prefix}{' '.join(str(err).split())}") from None
    return JobSpec(job=job, app=app, site=site, where=where)


def read_job_lines(lines: Iterable[str], defaults: Mapping[str, Any], *, source: str) -> list[JobSpec]:
    """One spec per non-blank line ('#' starts a comment line)."""
    specs = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise JobSpecError(f"{source}:{number}: not JSON: {err.msg} (column {err.colno})") from None
        specs.append(spec_from_dict(obj, defaults, line_no=number, source=source))
    if not specs:
        raise JobSpecError(f"{source}: no jobs in the file")
    return specs


def validate_specs(specs: Sequence[JobSpec],
                   resolve_app: Callable[[int | str, int | str | None], app_pb2.App]) -> None:
    """Bind each spec to its app and check it as the server would: the workdir, the
    app's parameters (required, typed, no unknown ones) and workdirs unique per site."""
    apps: dict[tuple[Any, Any], app_pb2.App] = {}
    seen: dict[tuple[int, str], str] = {}
    for spec in specs:
        key = (spec.app, spec.site)
        if key not in apps:
            try:
                apps[key] = resolve_app(spec.app, spec.site)
            except CliError as err:
                raise JobSpecError(f"{spec.prefix()}{err.message}") from None
        app = apps[key]
        job = spec.job
        job.app_id = app.id
        job.ClearField("app_name")
        job.site_id = app.site_id
        try:
            job.workdir = clean_workdir(job.workdir)
            resolve_parameters(app, dict(job.parameters))
        except BalsamError as err:
            raise JobSpecError(f"{spec.prefix()}{err.message} ({err.reason})") from None
        first = seen.setdefault((app.site_id, job.workdir), spec.where or "flags")
        if first != (spec.where or "flags"):
            raise JobSpecError(f"{spec.prefix()}workdir {job.workdir!r} is also used by {first} (workdirs are "
                               "unique per site) (ALREADY_EXISTS)")

