"""Sites, apps, batch jobs, transfer items and sessions through the generated stubs, on
SQLite and PostgreSQL: CRUD, validation (right code, field named, nothing written),
domain rules, request ids, and keyset pagination."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from sqlalchemy import select, update

from balsam_grpc.server.convert import utcnow
from balsam_grpc.server.store.tables import batch_jobs, events, jobs, sites
from balsam_grpc.v1 import (
    app_pb2,
    app_service_pb2,
    batch_job_pb2,
    batch_job_service_pb2,
    common_pb2,
    session_pb2,
    session_service_pb2,
    site_pb2,
    site_service_pb2,
    transfer_item_pb2,
    transfer_item_service_pb2,
)
from tests.support.resources import Api, expect_error, insert_job, insert_session, insert_transfer

Code = grpc.StatusCode
Mask = field_mask_pb2.FieldMask
BJ = batch_job_pb2
TS = transfer_item_pb2


def set_column(harness: Any, table: Any, row_id: Any, **values: Any) -> None:
    harness.db.write_sync(lambda conn: conn.execute(update(table).where(table.c.id == row_id).values(**values)))


def event_rows(harness: Any, owner_id: int, kind: str) -> list[dict[str, Any]]:
    def read(conn: Any) -> list[dict[str, Any]]:
        rows = conn.execute(select(events).where(events.c.owner_id == owner_id, events.c.kind == kind)
                            .order_by(events.c.id))
        return [dict(r._mapping) for r in rows]

    return harness.db.read_sync(read)


@pytest.fixture
def api(alice: Any) -> Api:
    return Api(alice)


# -- sites -------------------------------------------------------------------------------

def test_site_crud(api: Api) -> None:
    created = api.site(
        "theta", scheduler="cobalt", allowed_queues=["default", "debug"], allowed_projects=["datascience"],
        optional_batch_job_params={"mig": "0"},
        transfer_locations=[site_pb2.TransferLocation(alias="aps", url="globus://abc")],
        elastic_queue=site_pb2.ElasticQueueSettings(enabled=True, min_nodes=1, max_nodes=8, queue="debug"))
    assert created.id > 0 and created.owner == api.caller.username and created.scheduler == "cobalt"
    assert created.create_time.seconds > 0 and not created.liveness.connected
    assert created.elastic_queue.enabled and created.elastic_queue.max_nodes == 8
    got = api.sites.GetSite(site_service_pb2.GetSiteRequest(id=created.id)).site
    assert got == created
    assert [s.id for s in api.list_sites()] == [created.id]

    change = site_pb2.Site(id=created.id, hostname="login2", allowed_queues=["prod"], name="ignored-not-in-mask")
    updated = api.sites.UpdateSite(site_service_pb2.UpdateSiteRequest(
        site=change, update_mask=Mask(paths=["hostname", "allowed_queues"]))).site
    assert updated.hostname == "login2" and list(updated.allowed_queues) == ["prod"]
    assert updated.name == "theta" and updated.path == created.path
    assert updated.update_time.ToDatetime() >= created.update_time.ToDatetime()

    assert api.sites.DeleteSite(site_service_pb2.DeleteSiteRequest(id=created.id)).id == created.id
    expect_error(lambda: api.sites.GetSite(site_service_pb2.GetSiteRequest(id=created.id)), Code.NOT_FOUND)
    assert api.list_sites() == []


def test_site_scheduler_defaults_to_local(api: Api) -> None:
    assert api.site().scheduler == "local"


@pytest.mark.parametrize(("site", "code", "field"), [
    (site_pb2.Site(name=""), Code.INVALID_ARGUMENT, "site.name"),
    (site_pb2.Site(name="x" * 201), Code.INVALID_ARGUMENT, "site.name"),
    (site_pb2.Site(name="ok", scheduler="condor"), Code.INVALID_ARGUMENT, "site.scheduler"),
    (site_pb2.Site(name="ok", path="relative/dir"), Code.INVALID_ARGUMENT, "site.path"),
    (site_pb2.Site(name="ok", transfer_locations=[site_pb2.TransferLocation(alias="", url="file:///x")]),
     Code.INVALID_ARGUMENT, "site.transfer_locations"),
    (site_pb2.Site(name="ok", transfer_locations=[site_pb2.TransferLocation(alias="a", url="nourl")]),
     Code.INVALID_ARGUMENT, "site.transfer_locations"),
    (site_pb2.Site(name="ok", optional_batch_job_params={f"k{i}": "v" for i in range(100)}),
     Code.INVALID_ARGUMENT, "site.optional_batch_job_params"),
    (site_pb2.Site(name="ok", elastic_queue=site_pb2.ElasticQueueSettings(min_nodes=5, max_nodes=2)),
     Code.INVALID_ARGUMENT, "site.elastic_queue.min_nodes"),
])
def test_site_validation_writes_nothing(api: Api, site: site_pb2.Site, code: grpc.StatusCode, field: str) -> None:
    expect_error(lambda: api.sites.CreateSite(site_service_pb2.CreateSiteRequest(site=site)), code, field=field)
    assert api.list_sites() == []


def test_site_name_unique_per_owner(api: Api, bob: Any) -> None:
    api.site("polaris")
    expect_error(lambda: api.site("polaris"), Code.ALREADY_EXISTS, field="site.name")
    assert len(api.list_sites()) == 1
    assert Api(bob).site("polaris").name == "polaris"  # another owner may use the name
    other = api.site("aurora")
    expect_error(lambda: api.sites.UpdateSite(site_service_pb2.UpdateSiteRequest(
        site=site_pb2.Site(id=other.id, name="polaris"), update_mask=Mask(paths=["name"]))),
        Code.ALREADY_EXISTS, field="site.name")
    assert api.sites.GetSite(site_service_pb2.GetSiteRequest(id=other.id)).site.name == "aurora"


@pytest.mark.parametrize(("paths", "named"), [
    (["hostnme"], "hostnme"),
    (["liveness"], "liveness"),
    (["id"], "site.id"),
    (["hostname", "scheduler_snapshot"], "scheduler_snapshot"),
    ([], "")
])
def test_site_update_mask_is_checked(api: Api, paths: list[str], named: str) -> None:
    site = api.site()
    err = expect_error(lambda: api.sites.UpdateSite(site_service_pb2.UpdateSiteRequest(
        site=site_pb2.Site(id=site.id, hostname="changed"), update_mask=Mask(paths=paths))),
        Code.INVALID_ARGUMENT, field="update_mask")
    assert named in err.details()
    assert api.sites.GetSite(site_service_pb2.GetSiteRequest(id=site.id)).site.hostname == "login1"


def test_site_update_validates_values(api: Api) -> None:
    site = api.site()
    expect_error(lambda: api.sites.UpdateSite(site_service_pb2.UpdateSiteRequest(
        site=site_pb2.Site(id=site.id, scheduler="nope"), update_mask=Mask(paths=["scheduler"]))),
        Code.INVALID_ARGUMENT, field="site.scheduler")
    expect_error(lambda: api.sites.UpdateSite(site_service_pb2.UpdateSiteRequest(
        site=site_pb2.Site(id=site.id), update_mask=Mask(paths=["name"]))), Code.INVALID_ARGUMENT, field="site.name")
    assert api.sites.GetSite(site_service_pb2.GetSiteRequest(id=site.id)).site == site


# What the name check let through (it refused only characters below 32, though it said
# "control characters"): DEL, the C1 controls and the bidirectional controls.
CONTROL_NAMES = [("a\x7fb", "\\u007f (DEL)"), ("x\u009by", "\\u009b (a C1 control)"),
                 ("x\u0085y", "\\u0085 (a C1 control)"), ("ab\u202ecd", "\\u202e (a bidirectional control)"),
                 ("a\u2066b", "\\u2066 (a bidirectional control)"), ("a\u200fb", "\\u200f (a bidirectional control)"),
                 ("a\u061cb", "\\u061c (a bidirectional control)"), ("a\x1bb", "\\u001b (ESC)"),
                 ("a\nb", "\\u000a (a newline)")]


@pytest.mark.parametrize(("name", "named"), CONTROL_NAMES)
def test_site_and_app_names_with_control_characters_are_refused(api: Api, name: str, named: str) -> None:
    """A site or app name is printed by every listing: U+202E reversed the rest of the
    line on screen and U+009B is a terminal's one-byte CSI. Refused on create and rename,
    naming the field and the character as \\uXXXX (the message itself holds none)."""
    err = expect_error(lambda: api.site(name), Code.INVALID_ARGUMENT, field="site.name")
    assert named in err.details() and "remove it" in err.details()
    assert all(ch.isprintable() for ch in err.details()), err.details()
    site = api.site("fine")
    expect_error(lambda: api.sites.UpdateSite(site_service_pb2.UpdateSiteRequest(
        site=site_pb2.Site(id=site.id, name=name), update_mask=Mask(paths=["name"]))),
        Code.INVALID_ARGUMENT, field="site.name")
    assert [s.name for s in api.list_sites()] == ["fine"]
    err = expect_error(lambda: api.app(site.id, name), Code.INVALID_ARGUMENT, field="app.name")
    assert named in err.details()
    app = api.app(site.id, "fine-app")
    expect_error(lambda: api.apps.UpdateApp(app_service_pb2.UpdateAppRequest(
        app=app_pb2.App(id=app.id, name=name), update_mask=Mask(paths=["name"]))),
        Code.INVALID_ARGUMENT, field="app.name")
    assert [a.name for a in api.list_apps()] == ["fine-app"]


@pytest.mark.parametrize("name", ["1", "007", "12345678901234567890"])
def test_all_digit_site_and_app_names_are_refused(api: Api, name: str) -> None:
    """balsamctl reads an all-ASCII-digit --site/--app as an id: a site named "1" was
    created, and `--site 1` then always meant the site with id 1. The message says why."""
    err = expect_error(lambda: api.site(name), Code.INVALID_ARGUMENT, field="site.name")
    assert "all digits" in err.details() and "reads as an id" in err.details()
    site = api.site("digits")
    expect_error(lambda: api.sites.UpdateSite(site_service_pb2.UpdateSiteRequest(
        site=site_pb2.Site(id=site.id, name=name), update_mask=Mask(paths=["name"]))),
        Code.INVALID_ARGUMENT, field="site.name")
    err = expect_error(lambda: api.app(site.id, name), Code.INVALID_ARGUMENT, field="app.name")
    assert f"--app {name} means the app with id {name}" in err.details()
    # Names that only look like numbers to other eyes stay names (balsamctl reads them so).
    assert api.site(f"{name}a").name == f"{name}a" and api.site(f"²{name}").name == f"²{name}"
    assert api.app(site.id, f"v{name}").name == f"v{name}"


def test_an_empty_update_mask_is_refused_with_an_example(harness: Any, api: Api) -> None:
    site = api.site()
    bj = api.batch_job(site.id)
    job = insert_job(harness, api.caller.user_id, site.id, api.app(site.id).id)
    item = insert_transfer(harness, api.caller.user_id, site.id, job)
    for call, example in [
        (lambda: api.sites.UpdateSite(site_service_pb2.UpdateSiteRequest(site=site_pb2.Site(id=site.id))),
         "'hostname'"),
        (lambda: api.batch.UpdateBatchJob(batch_job_service_pb2.UpdateBatchJobRequest(batch_job=BJ.BatchJob(id=bj.id))),
         "'state' with state PENDING_DELETION to cancel"),
        (lambda: api.transfers.UpdateTransferItem(transfer_item_service_pb2.UpdateTransferItemRequest(
            transfer_item=TS.TransferItem(id=item))), "'state' with state PENDING to retry a failed transfer"),
    ]:
        err = expect_error(call, Code.INVALID_ARGUMENT, field="update_mask")
        assert err.details() == f"update_mask is required: name the fields to change (for example {example})"


def test_site_delete_refused_while_a_job_runs_then_cascades(harness: Any, api: Api) -> None:
    site = api.site()
    app = api.app(site.id)
    bj = api.batch_job(site.id)
    job = insert_job(harness, api.caller.user_id, site.id, app.id, state="RUNNING")
    item = insert_transfer(harness, api.caller.user_id, site.id, job)
    expect_error(lambda: api.sites.DeleteSite(site_service_pb2.DeleteSiteRequest(id=site.id)),
                 Code.FAILED_PRECONDITION)
    assert api.sites.GetSite(site_service_pb2.GetSiteRequest(id=site.id)).site.id == site.id
    assert [a.id for a in api.list_apps()] == [app.id]

    set_column(harness, jobs, job, state="RUN_DONE")
    api.sites.DeleteSite(site_service_pb2.DeleteSiteRequest(id=site.id))
    assert api.list_sites() == [] and api.list_apps() == [] and api.list_batch_jobs() == []
    assert api.list_transfers() == []
    expect_error(lambda: api.batch.GetBatchJob(batch_job_service_pb2.GetBatchJobRequest(id=bj.id)), Code.NOT_FOUND)
    expect_error(lambda: api.transfers.GetTransferItem(transfer_item_service_pb2.GetTransferItemRequest(id=item)),
                 Code.NOT_FOUND)


def test_create_site_request_id_replays_the_first_answer(api: Api) -> None:
    req = site_service_pb2.CreateSiteRequest(site=site_pb2.Site(name="retry-me"), request_id="req-1")
    first = api.sites.CreateSite(req).site
    again = api.sites.CreateSite(req).site
    assert again == first and len(api.list_sites()) == 1
    other = site_service_pb2.CreateSiteRequest(site=site_pb2.Site(name="different"), request_id="req-1")
    expect_error(lambda: api.sites.CreateSite(other), Code.INVALID_ARGUMENT, reason="REQUEST_ID_REUSED")
    assert len(api.list_sites()) == 1


def test_list_sites_filters(api: Api) -> None:
    a, b = api.site("a-site"), api.site("b-site")
    assert [s.id for s in api.list_sites(names=["b-site"])] == [b.id]
    assert [s.id for s in api.list_sites(ids=[a.id])] == [a.id]
    assert [s.id for s in api.list_sites(connected=False)] == [a.id, b.id]
    assert api.list_sites(connected=True) == []


# -- apps --------------------------------------------------------------------------------

def _full_app(site_id: int) -> app_pb2.App:
    return app_pb2.App(
        site_id=site_id, name="xpcs.EigenCorr", description="correlate", command_template="corr {{ h5 }} -n {{ n }}",
        parameters=[app_pb2.AppParameter(name="h5", required=True, type=app_pb2.PARAMETER_TYPE_PATH, help="input"),
                    app_pb2.AppParameter(name="n", default_value="4", type=app_pb2.PARAMETER_TYPE_INT)],
        transfers=[app_pb2.TransferSlot(name="h5_in", direction=common_pb2.TRANSFER_DIRECTION_IN,
                                        local_path="input.h5", required=True),
                   app_pb2.TransferSlot(name="result", direction=common_pb2.TRANSFER_DIRECTION_OUT,
                                        local_path="out", recursive=True)],
        environment={"OMP_NUM_THREADS": "4"}, preamble="module load conda", cleanup_globs=["*.tmp"],
        retry_policy=app_pb2.RetryPolicy(max_retries=2, on_error=app_pb2.RETRY_ACTION_RESTART),
        hooks=app_pb2.AppHooks(preprocess=True), kind=app_pb2.APP_KIND_SHELL, class_path="xpcs:EigenCorr")


def test_app_crud(api: Api) -> None:
    site = api.site()
    created = api.apps.CreateApp(app_service_pb2.CreateAppRequest(app=_full_app(site.id))).app
    expected = _full_app(site.id)
    expected.id = created.id
    expected.create_time.CopyFrom(created.create_time)
    expected.update_time.CopyFrom(created.update_time)
    assert created == expected
    assert api.apps.GetApp(app_service_pb2.GetAppRequest(id=created.id)).app == created
    assert [a.id for a in api.list_apps(site_ids=[site.id])] == [created.id]
    assert [a.id for a in api.list_apps(names=["xpcs.EigenCorr"])] == [created.id]

    updated = api.apps.UpdateApp(app_service_pb2.UpdateAppRequest(
        app=app_pb2.App(id=created.id, description="new", environment={"A": "1"}),
        update_mask=Mask(paths=["description", "environment"]))).app
    assert updated.description == "new" and dict(updated.environment) == {"A": "1"}
    assert updated.command_template == created.command_template and len(updated.parameters) == 2

    # An empty mask replaces every mutable field (app sync).
    synced = api.apps.UpdateApp(app_service_pb2.UpdateAppRequest(
        app=app_pb2.App(id=created.id, site_id=site.id, name="xpcs.EigenCorr", command_template="corr2"))).app
    assert synced.command_template == "corr2" and list(synced.parameters) == [] and synced.description == ""

    api.apps.DeleteApp(app_service_pb2.DeleteAppRequest(id=created.id))
    expect_error(lambda: api.apps.GetApp(app_service_pb2.GetAppRequest(id=created.id)), Code.NOT_FOUND)
    assert api.list_apps() == []


def _bad(**kw: Any) -> app_pb2.App:
    return app_pb2.App(**{"name": "bad", "command_template": "x", **kw})


@pytest.mark.parametrize(("app", "field"), [
    (_bad(name=""), "app.name"),
    (_bad(parameters=[app_pb2.AppParameter(name="not-an-id")]), "app.parameters[0].name"),
    (_bad(parameters=[app_pb2.AppParameter(name="a"), app_pb2.AppParameter(name="a")]), "app.parameters[1].name"),
    (_bad(parameters=[app_pb2.AppParameter(name="n", type=app_pb2.PARAMETER_TYPE_INT, default_value="x")]),
     "app.parameters[0].default_value"),
    (_bad(parameters=[app_pb2.AppParameter(name="n", type=42)]), "app.parameters[0].type"),
    (_bad(transfers=[app_pb2.TransferSlot(name="s", local_path="f")]), "app.transfers[0].direction"),
    (_bad(transfers=[app_pb2.TransferSlot(name="s", local_path="f", direction=1),
                     app_pb2.TransferSlot(name="s", local_path="g", direction=2)]), "app.transfers[1].name"),
    (_bad(transfers=[app_pb2.TransferSlot(name="s", local_path="../escape", direction=1)]),
     "app.transfers[0].local_path"),
    (_bad(retry_policy=app_pb2.RetryPolicy(max_retries=-1)), "app.retry_policy.max_retries"),
    (_bad(retry_policy=app_pb2.RetryPolicy(quick_failure_seconds=-5)), "app.retry_policy.quick_failure_seconds"),
    (_bad(environment={"BAD-NAME": "1"}), "app.environment"),
    (_bad(command_template="run {{ steps }}", parameters=[app_pb2.AppParameter(name="step")]),
     "app.command_template"),
])
def test_app_validation_writes_nothing(api: Api, app: app_pb2.App, field: str) -> None:
    site = api.site()
    app.site_id = site.id
    expect_error(lambda: api.apps.CreateApp(app_service_pb2.CreateAppRequest(app=app)), Code.INVALID_ARGUMENT,
                 field=field)
    assert api.list_apps() == []


def test_app_needs_an_own_site_and_unique_name(api: Api, bob: Any) -> None:
    site, other = api.site(), api.site()
    expect_error(lambda: api.app(10**12), Code.NOT_FOUND, field="app.site_id", reason="REFERENCE_NOT_FOUND")
    bobs = Api(bob).site()
    expect_error(lambda: api.app(bobs.id), Code.NOT_FOUND, field="app.site_id")
    expect_error(lambda: api.app(0), Code.INVALID_ARGUMENT, field="app.site_id")
    api.app(site.id, "same")
    expect_error(lambda: api.app(site.id, "same"), Code.ALREADY_EXISTS, field="app.name")
    api.app(other.id, "same")  # unique per site only
    assert len(api.list_apps()) == 2


def test_app_update_rules(api: Api) -> None:
    site, other = api.site(), api.site()
    app = api.app(site.id, "one")
    api.app(site.id, "two")
    expect_error(lambda: api.apps.UpdateApp(app_service_pb2.UpdateAppRequest(
        app=app_pb2.App(id=app.id, site_id=other.id), update_mask=Mask(paths=["site_id"]))),
        Code.INVALID_ARGUMENT, field="update_mask")
    expect_error(lambda: api.apps.UpdateApp(app_service_pb2.UpdateAppRequest(
        app=app_pb2.App(id=app.id, name="two"), update_mask=Mask(paths=["name"]))), Code.ALREADY_EXISTS)
    expect_error(lambda: api.apps.UpdateApp(app_service_pb2.UpdateAppRequest(
        app=app_pb2.App(id=app.id), update_mask=Mask(paths=["create_time"]))),
        Code.INVALID_ARGUMENT, field="update_mask")
    expect_error(lambda: api.apps.UpdateApp(app_service_pb2.UpdateAppRequest(
        app=app_pb2.App(id=app.id, retry_policy=app_pb2.RetryPolicy(max_retries=-2)),
        update_mask=Mask(paths=["retry_policy"]))), Code.INVALID_ARGUMENT, field="app.retry_policy.max_retries")
    # A template change is checked against the parameters the app already has.
    expect_error(lambda: api.apps.UpdateApp(app_service_pb2.UpdateAppRequest(
        app=app_pb2.App(id=app.id, command_template="go {{ nope }}"), update_mask=Mask(paths=["command_template"]))),
        Code.INVALID_ARGUMENT, field="app.command_template")
    assert api.apps.GetApp(app_service_pb2.GetAppRequest(id=app.id)).app == app


def test_app_delete_with_jobs(harness: Any, api: Api) -> None:
    site = api.site()
    app = api.app(site.id)
    owner = api.caller.user_id
    done = insert_job(harness, owner, site.id, app.id, state="JOB_FINISHED")
    insert_transfer(harness, owner, site.id, done)
    running = insert_job(harness, owner, site.id, app.id, state="RUNNING")
    delete = lambda force: api.apps.DeleteApp(app_service_pb2.DeleteAppRequest(id=app.id, force=force))  # noqa: E731
    err = expect_error(lambda: delete(False), Code.FAILED_PRECONDITION)
    assert "running" in err.details()
    expect_error(lambda: delete(True), Code.FAILED_PRECONDITION)
    set_column(harness, jobs, running, state="RUN_DONE")
    err = expect_error(lambda: delete(False), Code.FAILED_PRECONDITION)
    assert "force" in err.details()
    assert api.apps.GetApp(app_service_pb2.GetAppRequest(id=app.id)).app.id == app.id
    delete(True)
    assert api.list_apps() == [] and api.list_transfers() == []
    left = harness.db.read_sync(lambda conn: conn.execute(select(jobs.c.id).where(jobs.c.app_id == app.id)).all())
    assert left == []


def test_app_request_id(api: Api) -> None:
    site = api.site()
    req = app_service_pb2.CreateAppRequest(app=app_pb2.App(site_id=site.id, name="once"), request_id="app-req")
    assert api.apps.CreateApp(req).app == api.apps.CreateApp(req).app
    assert len(api.list_apps()) == 1


# -- batch jobs --------------------------------------------------------------------------

def test_batch_job_crud_and_events(harness: Any, api: Api) -> None:
    site = api.site(allowed_queues=["debug", "prod"], allowed_projects=["p1"], optional_batch_job_params={"mig": ""})
    bj = api.batch_job(site.id, queue="debug", project="p1", job_mode=common_pb2.JOB_MODE_MPI,
                       optional_params={"mig": "3g"}, filter_tags={"exp": "x1"},
                       partitions=[BJ.Partition(job_mode=common_pb2.JOB_MODE_SERIAL, num_nodes=1,
                                                filter_tags={"k": "v"}),
                                   BJ.Partition(job_mode=common_pb2.JOB_MODE_MPI, num_nodes=1)])
    assert bj.state == BJ.BATCH_JOB_STATE_PENDING_SUBMISSION and bj.num_nodes == 2 and bj.wall_time_min == 30
    assert bj.job_mode == common_pb2.JOB_MODE_MPI and dict(bj.optional_params) == {"mig": "3g"}
    assert [p.num_nodes for p in bj.partitions] == [1, 1] and dict(bj.partitions[0].filter_tags) == {"k": "v"}
    assert api.batch.GetBatchJob(batch_job_service_pb2.GetBatchJobRequest(id=bj.id)).batch_job == bj
    assert api.batch_job(site.id, queue="prod", project="p1").job_mode == common_pb2.JOB_MODE_SERIAL
    evs = event_rows(harness, api.caller.user_id, "batch_job_state")
    assert [(e["subject_id"], e["from_state"], e["to_state"]) for e in evs][0] == (bj.id, "", "PENDING_SUBMISSION")

    edited = api.batch.UpdateBatchJob(batch_job_service_pb2.UpdateBatchJobRequest(
        batch_job=BJ.BatchJob(id=bj.id, num_nodes=4, queue="prod"), update_mask=Mask(paths=["num_nodes", "queue"])
    )).batch_job
    assert edited.num_nodes == 4 and edited.queue == "prod" and edited.state == bj.state

    cancelled = api.batch.UpdateBatchJob(batch_job_service_pb2.UpdateBatchJobRequest(
        batch_job=BJ.BatchJob(id=bj.id, state=BJ.BATCH_JOB_STATE_PENDING_DELETION), update_mask=Mask(paths=["state"])
    )).batch_job
    assert cancelled.state == BJ.BATCH_JOB_STATE_PENDING_DELETION
    evs = [e for e in event_rows(harness, api.caller.user_id, "batch_job_state") if e["subject_id"] == bj.id]
    assert [(e["from_state"], e["to_state"]) for e in evs] == [
        ("", "PENDING_SUBMISSION"), ("PENDING_SUBMISSION", "PENDING_DELETION")]
    assert all(e["site_id"] == site.id for e in evs)

    set_column(harness, batch_jobs, bj.id, state="FINISHED")
    api.batch.DeleteBatchJob(batch_job_service_pb2.DeleteBatchJobRequest(id=bj.id))
    expect_error(lambda: api.batch.GetBatchJob(batch_job_service_pb2.GetBatchJobRequest(id=bj.id)), Code.NOT_FOUND)
    assert len(api.list_batch_jobs()) == 1


@pytest.mark.parametrize(("kw", "field"), [
    ({"num_nodes": 0}, "batch_job.num_nodes"),
    ({"wall_time_min": 0}, "batch_job.wall_time_min"),
    ({"wall_time_min": -5}, "batch_job.wall_time_min"),
    ({"queue": "bigmem"}, "batch_job.queue"),
    ({"queue": ""}, "batch_job.queue"),
    ({"project": "other"}, "batch_job.project"),
    ({"optional_params": {"gpus": "1"}}, "batch_job.optional_params"),
    ({"partitions": [BJ.Partition(num_nodes=2), BJ.Partition(num_nodes=1)]}, "batch_job.partitions"),
    ({"partitions": [BJ.Partition(num_nodes=0)]}, "batch_job.partitions[0].num_nodes"),
    ({"job_mode": 7}, "batch_job.job_mode"),
])
def test_batch_job_validation_writes_nothing(harness: Any, api: Api, kw: dict[str, Any], field: str) -> None:
    site = api.site(allowed_queues=["debug"], allowed_projects=["p1"], optional_batch_job_params={"mig": ""})
    kw = {"queue": "debug", "project": "p1", **kw}
    expect_error(lambda: api.batch_job(site.id, **kw), Code.INVALID_ARGUMENT, field=field)
    assert api.list_batch_jobs() == []
    assert event_rows(harness, api.caller.user_id, "batch_job_state") == []


def test_batch_job_open_site_accepts_any_queue_but_no_unknown_params(api: Api) -> None:
    site = api.site()
    assert api.batch_job(site.id, queue="anything", project="any").queue == "anything"
    expect_error(lambda: api.batch_job(site.id, optional_params={"x": "1"}), Code.INVALID_ARGUMENT,
                 field="batch_job.optional_params")
    expect_error(lambda: api.batch_job(10**12), Code.NOT_FOUND, field="batch_job.site_id",
                 reason="REFERENCE_NOT_FOUND")


def test_pending_batch_job_of_a_connected_site_is_cancelled_not_deleted(harness: Any, api: Api) -> None:
    """Its daemon may be submitting it: deleting the row would orphan the pilot."""
    site = api.site()
    bj = api.batch_job(site.id)
    set_column(harness, sites, site.id, connected=True)
    expect_error(lambda: api.batch.DeleteBatchJob(batch_job_service_pb2.DeleteBatchJobRequest(id=bj.id)),
                 Code.FAILED_PRECONDITION, reason="BATCH_JOB_SUBMITTING")
    got = api.batch.GetBatchJob(batch_job_service_pb2.GetBatchJobRequest(id=bj.id)).batch_job
    assert got.state == BJ.BATCH_JOB_STATE_PENDING_SUBMISSION
    set_column(harness, sites, site.id, connected=False)  # no daemon: nothing can be submitting it
    api.batch.DeleteBatchJob(batch_job_service_pb2.DeleteBatchJobRequest(id=bj.id))
    expect_error(lambda: api.batch.GetBatchJob(batch_job_service_pb2.GetBatchJobRequest(id=bj.id)), Code.NOT_FOUND)


def test_batch_job_state_rules(harness: Any, api: Api) -> None:
    site = api.site()
    bj = api.batch_job(site.id)

    def set_state(state: int) -> BJ.BatchJob:
        return api.batch.UpdateBatchJob(batch_job_service_pb2.UpdateBatchJobRequest(
            batch_job=BJ.BatchJob(id=bj.id, state=state), update_mask=Mask(paths=["state"]))).batch_job

    def edit(**kw: Any) -> BJ.BatchJob:
        return api.batch.UpdateBatchJob(batch_job_service_pb2.UpdateBatchJobRequest(
            batch_job=BJ.BatchJob(id=bj.id, **kw), update_mask=Mask(paths=list(kw)))).batch_job

    for state in (BJ.BATCH_JOB_STATE_QUEUED, BJ.BATCH_JOB_STATE_RUNNING, BJ.BATCH_JOB_STATE_FINISHED,
                  BJ.BATCH_JOB_STATE_SUBMIT_FAILED):
        expect_error(lambda: set_state(state), Code.FAILED_PRECONDITION, field="batch_job.state",
                     reason="ILLEGAL_TRANSITION")
    expect_error(lambda: set_state(0), Code.INVALID_ARGUMENT, field="batch_job.state")
    expect_error(lambda: edit(num_nodes=0), Code.INVALID_ARGUMENT, field="batch_job.num_nodes")
    expect_error(lambda: api.batch.UpdateBatchJob(batch_job_service_pb2.UpdateBatchJobRequest(
        batch_job=BJ.BatchJob(id=bj.id, scheduler_id="123"), update_mask=Mask(paths=["scheduler_id"]))),
        Code.INVALID_ARGUMENT, field="update_mask")

    set_column(harness, batch_jobs, bj.id, state="QUEUED")
    expect_error(lambda: edit(num_nodes=8), Code.FAILED_PRECONDITION, field="batch_job.num_nodes")
    expect_error(lambda: api.batch.DeleteBatchJob(batch_job_service_pb2.DeleteBatchJobRequest(id=bj.id)),
                 Code.FAILED_PRECONDITION)
    got = api.batch.GetBatchJob(batch_job_service_pb2.GetBatchJobRequest(id=bj.id)).batch_job
    assert got.num_nodes == 2 and got.state == BJ.BATCH_JOB_STATE_QUEUED
    assert set_state(BJ.BATCH_JOB_STATE_PENDING_DELETION).state == BJ.BATCH_JOB_STATE_PENDING_DELETION
    expect_error(lambda: api.batch.DeleteBatchJob(batch_job_service_pb2.DeleteBatchJobRequest(id=bj.id)),
                 Code.FAILED_PRECONDITION)

    set_column(harness, batch_jobs, bj.id, state="FINISHED")
    expect_error(lambda: set_state(BJ.BATCH_JOB_STATE_PENDING_DELETION), Code.FAILED_PRECONDITION,
                 reason="ILLEGAL_TRANSITION")
    set_column(harness, batch_jobs, bj.id, state="SUBMIT_FAILED")
    api.batch.DeleteBatchJob(batch_job_service_pb2.DeleteBatchJobRequest(id=bj.id))
    assert api.list_batch_jobs() == []


def test_batch_job_edit_revalidated_against_site(api: Api) -> None:
    site = api.site(allowed_queues=["debug"])
    bj = api.batch_job(site.id, queue="debug")
    expect_error(lambda: api.batch.UpdateBatchJob(batch_job_service_pb2.UpdateBatchJobRequest(
        batch_job=BJ.BatchJob(id=bj.id, queue="prod"), update_mask=Mask(paths=["queue"]))),
        Code.INVALID_ARGUMENT, field="batch_job.queue")
    assert api.batch.GetBatchJob(batch_job_service_pb2.GetBatchJobRequest(id=bj.id)).batch_job.queue == "debug"


def test_batch_job_list_filters(harness: Any, api: Api) -> None:
    s1, s2 = api.site(), api.site()
    a = api.batch_job(s1.id, queue="q1")
    b = api.batch_job(s2.id, queue="q2")
    set_column(harness, batch_jobs, b.id, state="QUEUED", scheduler_id="4242")
    assert [x.id for x in api.list_batch_jobs(site_ids=[s2.id])] == [b.id]
    assert [x.id for x in api.list_batch_jobs(states=[BJ.BATCH_JOB_STATE_PENDING_SUBMISSION])] == [a.id]
    assert [x.id for x in api.list_batch_jobs(queue="q1")] == [a.id]
    assert [x.id for x in api.list_batch_jobs(scheduler_id="4242")] == [b.id]
    future = common_pb2.TimeRange()
    future.start.FromDatetime(utcnow() + timedelta(hours=1))
    assert api.list_batch_jobs(create_time=future) == []
    past = common_pb2.TimeRange()
    past.start.FromDatetime(utcnow() - timedelta(hours=1))
    assert len(api.list_batch_jobs(create_time=past)) == 2
    expect_error(lambda: api.list_batch_jobs(states=[99]), Code.INVALID_ARGUMENT, field="filter.states")


def test_batch_job_request_id(harness: Any, api: Api) -> None:
    site = api.site()
    req = batch_job_service_pb2.CreateBatchJobRequest(
        batch_job=BJ.BatchJob(site_id=site.id, num_nodes=1, wall_time_min=5), request_id="bj-1")
    assert api.batch.CreateBatchJob(req).batch_job == api.batch.CreateBatchJob(req).batch_job
    assert len(api.list_batch_jobs()) == 1
    assert len(event_rows(harness, api.caller.user_id, "batch_job_state")) == 1


# -- transfer items ----------------------------------------------------------------------

@pytest.fixture
def job_world(harness: Any, api: Api) -> dict[str, Any]:
    site = api.site()
    app = api.app(site.id)
    job = insert_job(harness, api.caller.user_id, site.id, app.id)
    return {"site": site, "app": app, "job": job}


def test_transfer_get_list_filters(harness: Any, api: Api, job_world: dict[str, Any]) -> None:
    owner, site, job = api.caller.user_id, job_world["site"].id, job_world["job"]
    other_job = insert_job(harness, owner, site, job_world["app"].id)
    a = insert_transfer(harness, owner, site, job, state="PENDING", direction="IN")
    b = insert_transfer(harness, owner, site, job, state="ERROR", direction="OUT", task_id="t-1", error="denied")
    c = insert_transfer(harness, owner, site, other_job, state="DONE", direction="IN", task_id="t-1")
    item = api.transfers.GetTransferItem(transfer_item_service_pb2.GetTransferItemRequest(id=b)).transfer_item
    assert item.job_id == job and item.site_id == site and item.direction == common_pb2.TRANSFER_DIRECTION_OUT
    assert item.state == TS.TRANSFER_STATE_ERROR and item.error == "denied" and item.location_alias == "aps"
    assert [t.id for t in api.list_transfers()] == [a, b, c]
    assert [t.id for t in api.list_transfers(job_ids=[job])] == [a, b]
    assert [t.id for t in api.list_transfers(states=[TS.TRANSFER_STATE_ERROR, TS.TRANSFER_STATE_DONE])] == [b, c]
    assert [t.id for t in api.list_transfers(direction=common_pb2.TRANSFER_DIRECTION_IN)] == [a, c]
    assert [t.id for t in api.list_transfers(task_id="t-1")] == [b, c]
    assert [t.id for t in api.list_transfers(site_ids=[site], ids=[c])] == [c]


def test_transfer_retry_and_rules(harness: Any, api: Api, job_world: dict[str, Any]) -> None:
    owner, site, job = api.caller.user_id, job_world["site"].id, job_world["job"]
    failed = insert_transfer(harness, owner, site, job, state="ERROR", task_id="t-9", error="permission denied")
    pending = insert_transfer(harness, owner, site, job, state="PENDING")

    def upd(item_id: int, paths: list[str], **kw: Any) -> TS.TransferItem:
        return api.transfers.UpdateTransferItem(transfer_item_service_pb2.UpdateTransferItemRequest(
            transfer_item=TS.TransferItem(id=item_id, **kw), update_mask=Mask(paths=paths))).transfer_item

    expect_error(lambda: upd(pending, ["state"], state=TS.TRANSFER_STATE_DONE), Code.FAILED_PRECONDITION,
                 field="transfer_item.state", reason="ILLEGAL_TRANSITION")
    expect_error(lambda: upd(failed, ["state"], state=TS.TRANSFER_STATE_DONE), Code.FAILED_PRECONDITION)
    err = expect_error(lambda: upd(failed, ["remote_path"], remote_path="/x"), Code.INVALID_ARGUMENT,
                       field="update_mask")
    assert "remote_path" in err.details()
    err = expect_error(lambda: upd(failed, ["bogus"]), Code.INVALID_ARGUMENT, field="update_mask")
    assert "bogus" in err.details()
    expect_error(lambda: upd(failed, []), Code.INVALID_ARGUMENT, field="update_mask")
    expect_error(lambda: upd(failed, ["metrics"], metrics=TS.TransferMetrics(bytes=-1)), Code.INVALID_ARGUMENT,
                 field="transfer_item.metrics.bytes")
    assert event_rows(harness, owner, "transfer_state") == []

    retried = upd(failed, ["state"], state=TS.TRANSFER_STATE_PENDING)
    assert retried.state == TS.TRANSFER_STATE_PENDING and retried.error == "" and retried.task_id == ""
    evs = event_rows(harness, owner, "transfer_state")
    assert [(e["subject_id"], e["job_id"], e["from_state"], e["to_state"]) for e in evs] == [
        (failed, job, "ERROR", "PENDING")]

    measured = upd(pending, ["task_id", "metrics"], task_id="t-10",
                   metrics=TS.TransferMetrics(bytes=10, files=2, duration_seconds=1.5))
    assert measured.task_id == "t-10" and measured.metrics.files == 2 and measured.state == TS.TRANSFER_STATE_PENDING
    assert len(event_rows(harness, owner, "transfer_state")) == 1


# -- sessions ----------------------------------------------------------------------------

def test_sessions_get_list_newest_first_and_close(harness: Any, api: Api, job_world: dict[str, Any]) -> None:
    owner, site, app = api.caller.user_id, job_world["site"].id, job_world["app"].id
    now = utcnow()
    old = insert_session(harness, owner, site, created=now - timedelta(minutes=5))
    new = insert_session(harness, owner, site, created=now)
    closed = insert_session(harness, owner, site, state="CLOSED", created=now - timedelta(minutes=10))
    held = insert_job(harness, owner, site, app, state="RUNNING", session_id=new)
    done = insert_job(harness, owner, site, app, state="RUN_DONE", session_id=new)

    assert [s.id for s in api.list_sessions()] == [new, old, closed]
    assert [s.id for s in api.list_sessions(states=[session_pb2.SESSION_STATE_ACTIVE])] == [new, old]
    got = api.sessions.GetSession(session_service_pb2.GetSessionRequest(id=new)).session
    assert got.state == session_pb2.SESSION_STATE_ACTIVE and got.leased_jobs == 1 and got.site_id == site
    assert got.nodes[0].hostname == "nid0001" and got.nodes[0].gpus == 4 and got.job_mode == common_pb2.JOB_MODE_SERIAL
    expect_error(lambda: api.sessions.GetSession(session_service_pb2.GetSessionRequest(id="")),
                 Code.INVALID_ARGUMENT, field="id")

    before = harness.db.read_sync(lambda conn: conn.execute(
        select(jobs.c.lease_generation).where(jobs.c.id == held)).scalar_one())
    assert api.sessions.DeleteSession(session_service_pb2.DeleteSessionRequest(id=new)).id == new
    got = api.sessions.GetSession(session_service_pb2.GetSessionRequest(id=new)).session
    assert got.state == session_pb2.SESSION_STATE_CLOSED and got.leased_jobs == 0
    row = harness.db.read_sync(lambda conn: conn.execute(select(jobs).where(jobs.c.id == held)).one()._mapping)
    # The timeout follows the app's policy (no timeout hook, default restart) in the same transaction.
    assert row["state"] == "RESTART_READY" and row["session_id"] is None and row["lease_generation"] == before + 1
    untouched = harness.db.read_sync(lambda conn: conn.execute(select(jobs.c.state).where(jobs.c.id == done)).one())
    assert untouched[0] == "RUN_DONE"
    evs = event_rows(harness, owner, "job_state")
    assert [(e["job_id"], e["from_state"], e["to_state"]) for e in evs] == [(held, "RUNNING", "RESTART_READY")]
    assert evs[0]["data"]["via"] == ["RUN_TIMEOUT"]
    # Closing again changes nothing.
    api.sessions.DeleteSession(session_service_pb2.DeleteSessionRequest(id=new))
    assert len(event_rows(harness, owner, "job_state")) == 1
    expect_error(lambda: api.sessions.DeleteSession(session_service_pb2.DeleteSessionRequest(id="nope")),
                 Code.NOT_FOUND)


# -- pagination --------------------------------------------------------------------------

def _walk(list_call: Callable[[str, int], tuple[list[Any], str]], page: int) -> list[Any]:
    seen: list[Any] = []
    token = ""
    for _ in range(100):
        items, token = list_call(token, page)
        assert len(items) <= page
        seen += items
        if not token:
            return seen
    raise AssertionError("pagination did not end")


def test_pagination_of_every_resource(harness: Any, api: Api) -> None:
    owner = api.caller.user_id
    site_ids = [api.site(f"s{i}").id for i in range(7)]
    app_ids = [api.app(site_ids[0], f"app{i}").id for i in range(7)]
    bj_ids = [api.batch_job(site_ids[1]).id for _ in range(7)]
    job = insert_job(harness, owner, site_ids[0], app_ids[0])
    item_ids = [insert_transfer(harness, owner, site_ids[0], job) for _ in range(7)]
    now = utcnow()
    session_ids = [insert_session(harness, owner, site_ids[0], created=now - timedelta(seconds=i)) for i in range(7)]

    def page_of(stub_call: Callable[..., Any], req_cls: Any, filt: Any, attr: str) -> Callable[[str, int], Any]:
        def call(token: str, size: int) -> tuple[list[Any], str]:
            resp = stub_call(req_cls(filter=filt, page_size=size, page_token=token))
            return [x.id for x in getattr(resp, attr)], resp.next_page_token
        return call

    cases = [
        (api.sites.ListSites, site_service_pb2.ListSitesRequest, site_service_pb2.SiteFilter(), "sites", site_ids,
         site_service_pb2.SiteFilter(ids=site_ids[:2])),
        (api.apps.ListApps, app_service_pb2.ListAppsRequest, app_service_pb2.AppFilter(site_ids=[site_ids[0]]),
         "apps", app_ids, app_service_pb2.AppFilter()),
        (api.batch.ListBatchJobs, batch_job_service_pb2.ListBatchJobsRequest, batch_job_service_pb2.BatchJobFilter(),
         "batch_jobs", bj_ids, batch_job_service_pb2.BatchJobFilter(queue="x")),
        (api.transfers.ListTransferItems, transfer_item_service_pb2.ListTransferItemsRequest,
         transfer_item_service_pb2.TransferItemFilter(job_ids=[job]), "transfer_items", item_ids,
         transfer_item_service_pb2.TransferItemFilter()),
        (api.sessions.ListSessions, session_service_pb2.ListSessionsRequest, session_service_pb2.SessionFilter(),
         "sessions", session_ids, session_service_pb2.SessionFilter(site_ids=[site_ids[0]])),
    ]
    for call, req_cls, filt, attr, expected, other_filter in cases:
        walker = page_of(call, req_cls, filt, attr)
        assert _walk(walker, 3) == expected, attr
        assert _walk(walker, 7) == expected, attr
        _, token = walker("", 2)
        assert token
        expect_error(lambda: call(req_cls(filter=other_filter, page_size=2, page_token=token)),
                     Code.INVALID_ARGUMENT, field="page_token", reason="INVALID_PAGE_TOKEN")
        expect_error(lambda: call(req_cls(filter=filt, page_size=2, page_token="garbage!")),
                     Code.INVALID_ARGUMENT, field="page_token", reason="INVALID_PAGE_TOKEN")
        expect_error(lambda: call(req_cls(filter=filt, page_size=-1)), Code.INVALID_ARGUMENT, field="page_size")


def test_page_token_of_another_resource_is_refused(api: Api) -> None:
    for i in range(3):
        api.site(f"p{i}")
    token = api.sites.ListSites(site_service_pb2.ListSitesRequest(page_size=1)).next_page_token
    assert token
    expect_error(lambda: api.apps.ListApps(app_service_pb2.ListAppsRequest(page_token=token)),
                 Code.INVALID_ARGUMENT, reason="INVALID_PAGE_TOKEN")
