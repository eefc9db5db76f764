"""AppService: app declarations of the caller's sites."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection

from balsam_grpc.core.command_template import check_template
from balsam_grpc.core.errors import InvalidArgument
from balsam_grpc.server.convert import EnumCodec, to_timestamp, utcnow
from balsam_grpc.server.principal import Principal
from balsam_grpc.server.rpc import unary
from balsam_grpc.server.services.common import (
    Page,
    check_map,
    check_name,
    check_strings,
    mask_paths,
    mutate,
    only_site,
    require_id,
    too_large,
)
from balsam_grpc.server.state import ServerSettings, ServerState
from balsam_grpc.server.store import apps as store
from balsam_grpc.server.store import sites as site_store
from balsam_grpc.v1 import app_pb2, app_service_pb2, app_service_pb2_grpc, common_pb2

PARAMETER_TYPE = EnumCodec(app_pb2.ParameterType, "PARAMETER_TYPE_")
DIRECTION = EnumCodec(common_pb2.TransferDirection, "TRANSFER_DIRECTION_")
RETRY_ACTION = EnumCodec(app_pb2.RetryAction, "RETRY_ACTION_")
APP_KIND = EnumCodec(app_pb2.AppKind, "APP_KIND_")

OUTPUT_ONLY = ("id", "create_time", "update_time")
IMMUTABLE = ("site_id",)
HOOKS = ("preprocess", "postprocess", "handle_error", "handle_timeout")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BOOL_WORDS = {"true", "false", "1", "0", "yes", "no"}


def app_to_pb(row: dict[str, Any]) -> app_pb2.App:
    """The one place an apps row becomes an App message."""
    retry = row["retry_policy"] or {}
    hooks = row["hooks"] or {}
    return app_pb2.App(
        id=row["id"], site_id=row["site_id"], name=row["name"], description=row["description"],
        command_template=row["command_template"], shell=bool(row["shell"]),
        parameters=[app_pb2.AppParameter(name=p["name"], required=bool(p.get("required")),
                                         default_value=p.get("default_value", ""), help=p.get("help", ""),
                                         type=PARAMETER_TYPE.number(p.get("type")))
                    for p in row["parameters"] or []],
        transfers=[app_pb2.TransferSlot(name=t["name"], direction=DIRECTION.number(t.get("direction")),
                                        local_path=t.get("local_path", ""), required=bool(t.get("required")),
                                        recursive=bool(t.get("recursive")), description=t.get("description", ""))
                   for t in row["transfers"] or []],
        environment=row["environment"] or {}, preamble=row["preamble"], cleanup_globs=row["cleanup_globs"] or [],
        retry_policy=app_pb2.RetryPolicy(max_retries=int(retry.get("max_retries", 0)),
                                         quick_failure_seconds=int(retry.get("quick_failure_seconds", 0)),
                                         on_error=RETRY_ACTION.number(retry.get("on_error")),
                                         on_timeout=RETRY_ACTION.number(retry.get("on_timeout"))),
        hooks=app_pb2.AppHooks(**{h: bool(hooks.get(h)) for h in HOOKS}),
        kind=APP_KIND.number(row["kind"]), class_path=row["class_path"],
        create_time=to_timestamp(row["create_time"]), update_time=to_timestamp(row["update_time"]),
    )


def _check_default(p: app_pb2.AppParameter, type_name: str, field: str) -> None:
    value = p.default_value
    if not value:
        return
    try:
        if type_name == "INT":
            int(value)
        elif type_name == "FLOAT":
            float(value)
        elif type_name == "BOOL" and value.lower() not in _BOOL_WORDS:
            raise ValueError
    except ValueError:
        raise InvalidArgument(f"{field}: default_value {value!r} of parameter {p.name!r} is not a valid "
                              f"{type_name}", field=field) from None


def _named(entries: Iterable[Any], field: str, what: str, settings: ServerSettings) -> list[Any]:
    """The entries of a declared list (parameters, transfer slots): at most
    max_map_entries, each named by an identifier no other entry has."""
    entries = list(entries)
    if len(entries) > settings.max_map_entries:
        raise too_large(f"{field} has {len(entries)} entries; at most {settings.max_map_entries}", field)
    seen: set[str] = set()
    for i, e in enumerate(entries):
        if not e.name.isidentifier() or not e.name.isascii():
            raise InvalidArgument(f"{field}[{i}].name {e.name!r} must be an identifier (letters, digits and "
                                  "'_', not starting with a digit)", field=f"{field}[{i}].name")
        if e.name in seen:
            raise InvalidArgument(f"{field}[{i}].name: {what} {e.name!r} is declared twice",
                                  field=f"{field}[{i}].name")
        seen.add(e.name)
    return entries


def _parameters(params: Iterable[app_pb2.AppParameter], settings: ServerSettings) -> list[dict[str, Any]]:
    field = "app.parameters"
    out = []
    for i, p in enumerate(_named(params, field, "parameter", settings)):
        if p.required and p.default_value:
            raise InvalidArgument(f"{field}[{i}]: parameter {p.name!r} is required and has a default "
                                  f"({p.default_value!r}); a default makes it optional: drop one of them",
                                  field=f"{field}[{i}].default_value")
        type_name = "STRING" if p.type == 0 else PARAMETER_TYPE.name(p.type, f"{field}[{i}].type")
        _check_default(p, type_name, f"{field}[{i}].default_value")
        out.append({"name": p.name, "required": p.required, "default_value": p.default_value, "help": p.help,
                    "type": type_name})
    return out


def _transfers(slots: Iterable[app_pb2.TransferSlot], settings: ServerSettings) -> list[dict[str, Any]]:
    field = "app.transfers"
    out = []
    for i, t in enumerate(_named(slots, field, "slot", settings)):
        if t.direction == 0:
            raise InvalidArgument(f"{field}[{i}].direction is required (IN or OUT) for slot {t.name!r}",
                                  field=f"{field}[{i}].direction")
        direction = DIRECTION.name(t.direction, f"{field}[{i}].direction")
        parts = t.local_path.split("/")
        if not t.local_path or t.local_path.startswith("/") or ".." in parts:
            raise InvalidArgument(f"{field}[{i}].local_path {t.local_path!r} must be a path inside the job's "
                                  "workdir (relative, no '..')", field=f"{field}[{i}].local_path")
        out.append({"name": t.name, "direction": direction, "local_path": t.local_path, "required": t.required,
                    "recursive": t.recursive, "description": t.description})
    return out


def _retry_policy(r: app_pb2.RetryPolicy) -> dict[str, Any]:
    field = "app.retry_policy"
    if r.max_retries < 0:
        raise InvalidArgument(f"{field}.max_retries must be >= 0, got {r.max_retries}", field=f"{field}.max_retries")
    if r.quick_failure_seconds < 0:
        raise InvalidArgument(f"{field}.quick_failure_seconds must be >= 0, got {r.quick_failure_seconds}",
                              field=f"{field}.quick_failure_seconds")
    return {"max_retries": r.max_retries, "quick_failure_seconds": r.quick_failure_seconds,
            "on_error": RETRY_ACTION.name(r.on_error, f"{field}.on_error") if r.on_error else "",
            "on_timeout": RETRY_ACTION.name(r.on_timeout, f"{field}.on_timeout") if r.on_timeout else ""}


def _app_values(app: app_pb2.App, fields: Iterable[str], settings: ServerSettings) -> dict[str, Any]:
    """Validate the named fields of an App message and return them as column values."""
    out: dict[str, Any] = {}
    for f in fields:
        if f == "name":
            out["name"] = check_name(app.name, "app.name")
        elif f in ("description", "command_template", "preamble"):
            out[f] = getattr(app, f)
        elif f == "shell":
            out["shell"] = app.shell
        elif f == "parameters":
            out["parameters"] = _parameters(app.parameters, settings)
        elif f == "transfers":
            out["transfers"] = _transfers(app.transfers, settings)
        elif f == "environment":
            env = check_map(dict(app.environment), "app.environment", settings)
            for key in env:
                if not _ENV_NAME.match(key):
                    raise InvalidArgument(f"app.environment: {key!r} is not a valid variable name",
                                          field="app.environment")
            out["environment"] = env
        elif f == "cleanup_globs":
            out["cleanup_globs"] = check_strings(app.cleanup_globs, "app.cleanup_globs", settings)
        elif f == "retry_policy":
            out["retry_policy"] = _retry_policy(app.retry_policy)
        elif f == "hooks":
            out["hooks"] = {h: getattr(app.hooks, h) for h in HOOKS}
        elif f == "kind":
            out["kind"] = "SHELL" if app.kind == 0 else APP_KIND.name(app.kind, "app.kind")
        elif f == "class_path":
            if len(app.class_path) > 1000:
                raise InvalidArgument("app.class_path is longer than 1000 characters", field="app.class_path")
            out["class_path"] = app.class_path
    return out


def _check_template(template: str, parameters: Iterable[dict[str, Any]], shell: bool) -> None:
    """A template that could place a value where a shell re-parses it, or names an undeclared
    parameter, is refused now rather than failing (or injecting) in every job."""
    if template:
        check_template(template, [p["name"] for p in parameters], shell=shell, field="app.command_template")


class AppServicer(app_service_pb2_grpc.AppServiceServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state

    @unary(job_token=True)
    async def GetApp(self, request: app_service_pb2.GetAppRequest, context: Any,
                     principal: Principal) -> app_service_pb2.GetAppResponse:
        require_id(request.id)
        row = await self.state.db.read(store.require_app, principal.user_id, request.id)
        principal.check_site(row["site_id"])
        return app_service_pb2.GetAppResponse(app=app_to_pb(row))

    @unary(job_token=True)
    async def ListApps(self, request: app_service_pb2.ListAppsRequest, context: Any,
                       principal: Principal) -> app_service_pb2.ListAppsResponse:
        page = Page("ListApps", principal, request)
        f = request.filter
        q = store.AppQuery(owner_id=principal.user_id, ids=list(f.ids), site_ids=list(f.site_ids),
                           names=list(f.names), only_site_id=only_site(principal))
        after = page.after_id()
        rows = await self.state.db.read(lambda conn: store.list_apps(conn, q, after_id=after, limit=page.limit))
        found, token = page.finish(rows, app_to_pb)
        return app_service_pb2.ListAppsResponse(apps=found, next_page_token=token)

    @unary()
    async def CreateApp(self, request: app_service_pb2.CreateAppRequest, context: Any,
                        principal: Principal) -> app_service_pb2.CreateAppResponse:
        app = request.app
        site_id = require_id(app.site_id, "app.site_id")
        values = _app_values(app, store.MUTABLE, self.state.settings)
        _check_template(values["command_template"], values["parameters"], values["shell"])

        def build(conn: Connection) -> app_service_pb2.CreateAppResponse:
            site_store.require_site(conn, principal.user_id, site_id, field="app.site_id", reference=True)
            principal.check_site(site_id)
            row = store.create_app(conn, principal.user_id, site_id, values, utcnow())
            return app_service_pb2.CreateAppResponse(app=app_to_pb(row))

        return await mutate(self.state, principal, "AppService.CreateApp", request,
                            app_service_pb2.CreateAppResponse, build)

    @unary()
    async def UpdateApp(self, request: app_service_pb2.UpdateAppRequest, context: Any,
                        principal: Principal) -> app_service_pb2.UpdateAppResponse:
        app = request.app
        app_id = require_id(app.id, "app.id")
        # An empty mask replaces every mutable field (app sync from the site).
        paths = mask_paths(request.update_mask, resource="app", mutable=store.MUTABLE, output_only=OUTPUT_ONLY,
                           immutable=IMMUTABLE) or list(store.MUTABLE)
        values = _app_values(app, paths, self.state.settings)

        def build(conn: Connection) -> app_service_pb2.UpdateAppResponse:
            row = store.require_app(conn, principal.user_id, app_id, field="app.id", for_update=True)
            principal.check_site(row["site_id"])
            if app.site_id and app.site_id != row["site_id"]:
                raise InvalidArgument(f"app.site_id cannot be changed (app {app_id} belongs to site "
                                      f"{row['site_id']}); register the app at the other site instead",
                                      field="app.site_id")
            _check_template(values.get("command_template", row["command_template"]),
                            values.get("parameters", row["parameters"] or []), values.get("shell", row["shell"]))
            row = store.update_app(conn, principal.user_id, row, values, utcnow())
            return app_service_pb2.UpdateAppResponse(app=app_to_pb(row))

        return await mutate(self.state, principal, "AppService.UpdateApp", request,
                            app_service_pb2.UpdateAppResponse, build)

    @unary()
    async def DeleteApp(self, request: app_service_pb2.DeleteAppRequest, context: Any,
                        principal: Principal) -> app_service_pb2.DeleteAppResponse:
        require_id(request.id)

        def work(conn: Connection) -> None:
            row = store.require_app(conn, principal.user_id, request.id)
            principal.check_site(row["site_id"])
            store.delete_app(conn, principal.user_id, request.id, force=request.force)

        await self.state.db.write(work)
        return app_service_pb2.DeleteAppResponse(id=request.id)
