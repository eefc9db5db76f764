"""`balsamctl app ...`: list, sync from a site's apps folder, remove."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from balsam_grpc.cli import context as ctx
from balsam_grpc.cli import output as out
from balsam_grpc.cli.errors import describe, fail, usage
from balsam_grpc.cli.filters import parse_refs
from balsam_grpc.cli.output import Column, Format, NoHeaderOpt, OutputOpt
from balsam_grpc.core.errors import BalsamError, InvalidArgument
from balsam_grpc.sdk.apps import sync_apps
from balsam_grpc.v1 import app_pb2, app_service_pb2

app_app = typer.Typer(help="Apps registered at your sites.", no_args_is_help=True,
                   rich_markup_mode="markdown")

PARAM_TYPES = {app_pb2.PARAMETER_TYPE_INT: "int", app_pb2.PARAMETER_TYPE_FLOAT: "float",
               app_pb2.PARAMETER_TYPE_BOOL: "bool", app_pb2.PARAMETER_TYPE_PATH: "path"}


def _params(app: app_pb2.App) -> str:
    """name:type, with '*' marking required ones ("n:int*, label")."""
    return ", ".join(f"{p.name}{':' + PARAM_TYPES[p.type] if p.type in PARAM_TYPES else ''}"
                     f"{'*' if p.required else ''}" for p in app.parameters)


APP_COLUMNS = [
    Column("ID", lambda a: a.id, no_wrap=True, justify="right"),
    Column("SITE", lambda a: ctx.site_name(a.site_id)),
    Column("NAME", lambda a: a.name),
    Column("KIND", lambda a: out.enum_name(app_pb2.AppKind, a.kind, "APP_KIND_"), no_wrap=True),
    Column("PARAMETERS", lambda a: _params(a), ratio=2),
    Column("DESCRIPTION", lambda a: a.description.splitlines()[0] if a.description else "", ratio=2),
    Column("COMMAND", lambda a: a.command_template, wide_only=True, ratio=2),
    Column("CLASS", lambda a: a.class_path, wide_only=True),
    Column("UPDATED", lambda a: a.update_time, wide_only=True, no_wrap=True),
]


@app_app.command("ls")
def ls(
    site: Annotated[list[str] | None, typer.Option("--site", help="only apps at this site (name or id)")] = None,
    name: Annotated[list[str] | None, typer.Option("--name", help="only apps with this name")] = None,
    output: OutputOpt = Format.table,
    no_header: NoHeaderOpt = False,
) -> None:
    """List apps (parameters marked * are required).

    Example: balsamctl app ls --site laptop -o wide
    """
    site_ids = {ctx.resolve_site(s).id for s in parse_refs(site)}
    apps = [a for a in ctx.apps().values()
            if (not site_ids or a.site_id in site_ids) and (not name or a.name in name)]
    out.render(apps, APP_COLUMNS, output, no_header=no_header)


@app_app.command("sync")
def sync(
    site: Annotated[str, typer.Option("--site", help="site name or id")],
    folder: Annotated[Path | None, typer.Option("--folder", help="apps folder (default: <site path>/apps, "
                                                                  "when it exists on this machine)")] = None,
    remove_missing: Annotated[bool, typer.Option("--remove-missing", help="also remove apps of the site that "
                                                                          "are not in the folder")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask before removing apps")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="report what would change")] = False,
) -> None:
    """Register the ApplicationDefinition classes of a site's apps folder: new apps are
    created, changed ones replaced, the rest left alone. Apps only on the server are
    listed, and removed only with --remove-missing (after a confirmation).

    Examples:

      balsamctl app sync --site laptop

      balsamctl app sync --site laptop --folder ./apps --remove-missing --dry-run
    """
    target = ctx.resolve_site(site)
    folder = folder or Path(target.path) / "apps"
    if folder.exists() and not folder.is_dir():
        usage(f"apps folder {folder} is a file, not a folder (give --folder the folder of apps files)")
    if not folder.is_dir():
        usage(f"apps folder {folder} does not exist here (give --folder)")
    client = ctx.client()
    try:
        plan = sync_apps(client, target.id, folder, remove_missing=remove_missing, dry_run=True)
    except ValueError as err:
        usage(str(err))
    except BalsamError as err:
        if err.code != InvalidArgument.code:
            raise
        usage(describe(err))  # a bad declaration in the folder: nothing was sent
    if plan.removed and not dry_run:
        what = f"remove {len(plan.removed)} app(s) not in {folder}: {', '.join(plan.removed)}"
        out.confirm(f"{what[0].upper()}{what[1:]}?", assume_yes=yes, what=what)
    result = plan if dry_run else sync_apps(client, target.id, folder, remove_missing=remove_missing)
    verb = "would be " if dry_run else ""
    for label, names in (("created", result.created), ("updated", result.updated), ("removed", result.removed)):
        if names:
            out.write(f"{verb}{label}: {', '.join(names)}")
    if result.unchanged:
        out.write(f"unchanged: {', '.join(result.unchanged)}")
    only_on_server = sorted({a.name for a in ctx.apps().values() if a.site_id == target.id}
                            - set(result.created + result.updated + result.unchanged + result.removed))
    if only_on_server and not remove_missing:
        out.write(f"only on the server (not in {folder}): {', '.join(only_on_server)}")
    if not (result.created or result.updated or result.unchanged or result.removed):
        out.write(f"no apps found in {folder}")


@app_app.command("rm")
def rm(
    apps: Annotated[list[str], typer.Argument(help="app names or ids")],
    site: Annotated[str | None, typer.Option("--site", help="site of the apps (when a name exists at "
                                                              "several sites)")] = None,
    force: Annotated[bool, typer.Option("--force", help="also delete the apps' jobs that are not "
                                                        "running")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show what would be removed")] = False,
) -> None:
    """Remove apps. Refused while an app has jobs, unless --force (running jobs are
    never deleted).

    Example: balsamctl app rm hello --site laptop --yes
    """
    targets = [ctx.resolve_app(ref, site) for ref in parse_refs(apps)]
    listing = ", ".join(f"{a.name} ({a.id}) at {ctx.site_name(a.site_id)}" for a in targets)
    what = f"remove {len(targets)} app(s): {listing}" + (" and their jobs" if force else "")
    if dry_run:
        out.write(f"dry run: would {what}")
        return
    out.confirm(f"{what[0].upper()}{what[1:]}?", assume_yes=yes, what=what)
    failed = _each(targets, lambda a: ctx.client().call(
        "AppService", "DeleteApp", app_service_pb2.DeleteAppRequest(id=a.id, force=force)), "removed app")
    if failed:
        fail(f"{failed} of {len(targets)} apps not removed")


def _each(items: list[Any], action: Any, done: str) -> int:
    """Apply `action` to every item; report each failure on stderr; count failures."""
    from balsam_grpc.cli.errors import print_error

    failed = 0
    for item in items:
        try:
            action(item)
        except BalsamError as err:
            failed += 1
            print_error(f"{getattr(item, 'name', '') or item.id}: {describe(err)}")
        else:
            out.write(f"{done} {getattr(item, 'name', '') or item.id}")
    return failed
