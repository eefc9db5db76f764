"""The SDK query API against the real server on SQLite and PostgreSQL: filters,
exclude, order, slicing, paging across pages, count, group_by, bulk update/delete,
bulk_create in chunks, model save/refresh/delete, and checks made before sending."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from balsam_grpc.core import channel
from balsam_grpc.sdk import (
    App,
    BatchJob,
    Client,
    Event,
    FailedPrecondition,
    InvalidArgument,
    Job,
    MultipleObjectsReturned,
    NotFound,
    Site,
    TransferItem,
)
from tests.sdk.conftest import make_client


def make_jobs(client: Client, app: App, n: int, **tags: str) -> list[Job]:
    """n jobs under a fresh workdir prefix (their batch: select them with batch_of)."""
    batch = f"b{secrets.token_hex(4)}"
    jobs = [Job(workdir=f"{batch}/{i:05d}", app=app, parameters={"word": f"w{i}"},
                tags={"batch": batch, "mod": str(i % 3), **tags}, priority=i % 5) for i in range(n)]
    return client.jobs.bulk_create(jobs, chunk_size=max(1, n // 3))


def batch_of(client: Client, jobs: list[Job]) -> Any:
    # By workdir, so the tag filters have a test of their own (test_tag_filters_and_update_by_tag).
    return client.jobs.filter(workdir__contains=jobs[0].tags["batch"] + "/")


def test_bulk_create_thousands_in_chunks_and_page_through(client: Client, app: App) -> None:
    jobs = make_jobs(client, app, 3000)
    assert all(j.id for j in jobs) and len({j.id for j in jobs}) == 3000
    assert {j.state for j in jobs} == {"PREPROCESSED"}  # no transfers, no hooks: straight to runnable
    query = batch_of(client, jobs)
    assert query.count() == 3000
    # Pages of 400 force eight round trips with page tokens; nothing lost or repeated.
    ids = [j.id for j in query.page_size(400)]
    assert ids == sorted(j.id for j in jobs)
    assert query.group_by("state") == {"PREPROCESSED": 3000}


def test_bulk_create_halves_a_chunk_the_server_refuses_as_too_many(client: Client, app: App, harness: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # bulk_create sends the server's default max_jobs_per_call per call; a server set to
    # take fewer refuses such a chunk whole (INVALID_ARGUMENT, TOO_LARGE), and the SDK
    # then sends it in halves, in order, instead of failing the create.
    monkeypatch.setattr(harness.server.settings, "max_jobs_per_call", 5)
    batch = f"b{secrets.token_hex(4)}"
    jobs = client.jobs.bulk_create([Job(workdir=f"{batch}/{i:02d}", app=app, parameters={"word": f"w{i}"})
                                    for i in range(23)], chunk_size=23)
    assert all(j.id for j in jobs) and [j.id for j in jobs] == sorted(j.id for j in jobs)
    assert client.jobs.filter(workdir__contains=f"{batch}/").count() == 23
    # A refusal for another reason is not retried.
    with pytest.raises(InvalidArgument, match="repeats"):
        client.jobs.bulk_create([Job(workdir=f"{batch}/x", app=app, parameters={"word": "w"}) for _ in range(2)])


def test_bulk_create_halves_a_chunk_over_the_channels_message_limit(app: App, harness: Any, alice: Any,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # gRPC refuses a request over the channel's send limit itself (RESOURCE_EXHAUSTED with
    # no reason): jobs carrying much data, 10,000 to a call. The SDK sends such a chunk in halves.
    monkeypatch.setattr(channel, "MAX_MESSAGE_BYTES", 16 * 1024)
    small = make_client(harness, alice)
    try:
        batch = f"b{secrets.token_hex(4)}"
        jobs = small.jobs.bulk_create([Job(workdir=f"{batch}/{i:02d}", app_id=app.id, parameters={"word": f"w{i}"},
                                           data={"blob": "x" * 2000}) for i in range(23)])
        assert all(j.id for j in jobs) and [j.id for j in jobs] == sorted(j.id for j in jobs)
        assert small.jobs.filter(workdir__contains=f"{batch}/").count() == 23
    finally:
        small.close()


def test_filters_exclude_order_and_slices(client: Client, app: App) -> None:
    jobs = make_jobs(client, app, 30)
    mine = batch_of(client, jobs)
    assert mine.count() == 30
    assert mine.filter(id=[jobs[0].id, jobs[1].id, 10**9]).count() == 2
    prefix = jobs[0].tags["batch"]
    assert client.jobs.filter(workdir__contains=f"{prefix}/0001").count() == 10  # 00010..00019
    with pytest.raises(ValueError, match="workdir__contains given twice"):
        mine.filter(workdir__contains="other").count()
    assert mine.filter(app=app).count() == 30 and mine.filter(app="echo").count() == 30
    assert mine.filter(site=app.site_id).count() == 30
    site_name = client.sites.get(id=app.site_id).name
    assert mine.filter(site=site_name).count() == 30
    assert mine.filter(since=timedelta(hours=1)).count() == 30
    assert mine.filter(since=datetime.now(UTC) + timedelta(hours=1)).count() == 0
    # Chained filters are ANDed: contradicting "in" lists match nothing, without a call.
    assert list(mine.filter(state="RUNNING").filter(state="FAILED")) == []
    assert mine.filter(id=[jobs[0].id, jobs[1].id]).filter(id=jobs[1].id).count() == 1

    by_priority = list(mine.order_by("-priority", "id"))
    assert [j.priority for j in by_priority] == sorted((j.priority for j in jobs), reverse=True)
    window = list(mine.order_by("id")[10:20])
    assert [j.id for j in window] == sorted(j.id for j in jobs)[10:20]
    assert list(mine.order_by("id")[10:20][2:4]) == window[2:4]
    assert mine[:5].count() == 5 and mine[25:].count() == 5
    assert mine.order_by("-id").first().id == max(j.id for j in jobs)
    assert mine.order_by("id")[3].id == sorted(j.id for j in jobs)[3]


def test_state_filter_update_and_delete(client: Client, app: App) -> None:
    jobs = make_jobs(client, app, 12)
    mine = batch_of(client, jobs)
    first_four = mine.order_by("id")[:4]

    preview = first_four.update(state="KILLED", dry_run=True)
    assert preview.succeeded == 4 and mine.filter(state="KILLED").count() == 0

    result = first_four.update(state="KILLED", state_message="stop")
    assert result.ok and result.succeeded == 4 and len(result.outcomes) == 4
    assert mine.filter(state="KILLED").count() == 4
    assert {j.state_message for j in mine.filter(state="KILLED")} == {"stop"}
    assert mine.exclude(state=["KILLED"]).count() == 8
    assert mine.group_by("state") == {"KILLED": 4, "PREPROCESSED": 8}

    # Leaving a final state is illegal per job: reported per item, not raised.
    again = mine.filter(state="KILLED").update(state="RUNNING")
    assert again.failed == 4 and {o.reason for o in again.failures} == {"ILLEGAL_TRANSITION"}
    assert {o.code for o in again.failures} == {"FAILED_PRECONDITION"}

    deleted = mine.filter(state="KILLED").delete()
    assert deleted.succeeded == 4 and mine.count() == 8
    # A sliced query is pinned to the ids it selects.
    assert mine.order_by("id")[:3].delete().succeeded == 3 and mine.count() == 5


def test_tag_filters_and_update_by_tag(client: Client, app: App) -> None:
    jobs = make_jobs(client, app, 12)
    batch = jobs[0].tags["batch"]
    mine = client.jobs.filter(tags={"batch": batch})
    assert mine.count() == 12
    assert mine.filter(tags={"mod": "1"}).count() == 4
    assert {j.id for j in mine.exclude(tags={"mod": "1"})} == {j.id for j in jobs if j.tags["mod"] != "1"}
    result = mine.filter(tags={"mod": "0"}).update(state="KILLED", tags={"killed": "yes"})
    assert result.succeeded == 4
    assert mine.filter(tags={"killed": "yes"}).count() == 4
    assert mine.filter(tags={"killed": "yes"}, state="KILLED").count() == 4
    # Chained tag filters merge; a contradiction matches nothing without a call.
    assert mine.filter(tags={"mod": "0"}).filter(tags={"mod": "1"}).count() == 0


def test_model_save_refresh_delete_and_get(client: Client, other_client: Client, app: App) -> None:
    job = app.submit("single/1", word="hello", tags={"k": "v"}, num_nodes=1, ranks_per_node=2)
    assert job.id and job.parameters["word"] == "hello" and job.ranks_per_node == 2
    same = other_client.jobs.get(id=job.id)
    same.tags = {"k": "v", "extra": "1"}
    same.priority = 7
    same.save()
    assert job.priority == 0
    job.refresh_from_db()
    assert job.priority == 7 and job.tags == {"k": "v", "extra": "1"}
    assert client.jobs.get(workdir__contains="single/1", id=job.id).id == job.id

    with pytest.raises(ValueError, match="workdir"):
        job.workdir = "elsewhere"
        job.save()
    job.refresh_from_db()
    job.delete()
    with pytest.raises(NotFound) as caught:
        client.jobs.get(id=job.id)
    assert caught.value.reason == "NOT_FOUND"
    with pytest.raises(NotFound):
        client.jobs.get(workdir__contains="no-such-workdir")
    dup = make_jobs(client, app, 2)
    with pytest.raises(MultipleObjectsReturned):
        batch_of(client, dup).get()


def test_bad_keywords_and_states_refused_before_sending(client: Client) -> None:
    with pytest.raises(TypeError, match="valid keywords:.*state.*tags"):
        client.jobs.filter(stat="RUNNING")
    with pytest.raises(ValueError, match="valid: CREATED, .*JOB_FINISHED, FAILED, KILLED"):
        client.jobs.filter(state="RUNING")
    with pytest.raises(TypeError, match="exclude.*valid keywords: state, tags"):
        client.jobs.exclude(app=1)
    with pytest.raises(ValueError, match="cannot be ordered by 'size'"):
        client.jobs.order_by("size")
    with pytest.raises(ValueError, match="unknown Job.state 'DONE'"):
        Job(state="DONE")
    with pytest.raises(AttributeError, match="no field 'wrkdir'"):
        Job(wrkdir="x")
    with pytest.raises(ValueError, match="batch job state"):
        client.batch_jobs.filter(state="SLEEPING")
    with pytest.raises(ValueError, match="not be negative|cannot be negative"):
        client.jobs.all()[-1:]
    with pytest.raises(ValueError, match="replace all of a job's resources"):
        client.jobs.filter(state="READY").update(num_nodes=2)


def test_server_errors_carry_reason_and_field(client: Client, app: App, site: Site) -> None:
    with pytest.raises(InvalidArgument) as caught:
        client.jobs.create(workdir="../escape", app=app)
    assert caught.value.field.endswith("workdir") and caught.value.reason == "INVALID_FIELD"
    with pytest.raises(NotFound) as missing:
        client.jobs.create(workdir="ok/1", app_id=10**9)
    assert missing.value.reason == "REFERENCE_NOT_FOUND"
    with pytest.raises(InvalidArgument) as param:
        app.submit("p/1")  # "word" is required: refused before anything is sent
    assert param.value.field == "parameters.word"
    assert client.jobs.filter(workdir__contains="p/1").count() == 0
    job = app.submit("f/1", word="x")
    job.kill()
    with pytest.raises(FailedPrecondition) as illegal:
        job.state = "RUNNING"
        job.save()
    assert illegal.value.reason == "ILLEGAL_TRANSITION"


def test_retried_create_is_answered_not_duplicated(client: Client, app: App) -> None:
    from balsam_grpc.v1 import job_pb2, job_service_pb2

    request = job_service_pb2.CreateJobRequest(job=job_pb2.Job(workdir="idem/1", app_id=app.id,
                                                                               parameters={"word": "x"}),
                                               request_id="fixed-" + secrets.token_hex(4))
    first = client.call("JobService", "CreateJob", request).job
    again = client.call("JobService", "CreateJob", request).job
    assert first.id == again.id and client.jobs.filter(workdir__contains="idem/1").count() == 1


def test_other_resources(client: Client, site: Site, app: App) -> None:
    assert client.sites.get(name=site.name).id == site.id
    assert [s.id for s in client.sites.filter(id=site.id)] == [site.id]
    site.hostname = "login2"
    site.save()
    assert client.sites.get(id=site.id).hostname == "login2"
    assert client.apps.filter(site=site).count() == 1 and client.apps.get(name="echo", site_id=site.id).id == app.id

    bj = client.batch_jobs.create(site=site, num_nodes=2, wall_time_min=30)
    assert bj.state == "PENDING_SUBMISSION"
    assert client.batch_jobs.filter(site=site, state="PENDING_SUBMISSION").count() == 1
    outcome = client.batch_jobs.filter(site=site).update(state="PENDING_DELETION")
    assert outcome.succeeded == 1 and client.batch_jobs.get(id=bj.id).state == "PENDING_DELETION"

    job = app.submit("ev/1", word="x")
    job.kill()
    events = list(client.events.filter(job=job.id))
    assert [(e.from_state, e.to_state) for e in events][-1] == ("PREPROCESSED", "KILLED")
    assert all(isinstance(e, Event) and e.kind == "JOB_STATE" for e in events)
    newest_first = list(client.events.filter(job=job.id).order_by("-id"))
    assert [e.id for e in newest_first] == sorted((e.id for e in events), reverse=True)
    assert job.history()[-1].to_state == "KILLED"
    assert client.transfer_items.filter(job=job.id).count() == 0
    with pytest.raises(TypeError):
        client.events.all().delete()
    with pytest.raises(TypeError, match="events cannot be read one by one"):
        events[0].refresh_from_db()
    assert isinstance(TransferItem.objects.all(), object) and BatchJob.resource.name == "batch job"


def test_objects_uses_the_default_client(harness: Any, alice: Any, app: App, monkeypatch: pytest.MonkeyPatch) -> None:
    from balsam_grpc.sdk import client as client_module

    monkeypatch.setenv("BALSAM_SERVER", harness.address)
    monkeypatch.setenv("BALSAM_TOKEN", alice.token)
    monkeypatch.setattr(client_module, "_default", None)
    try:
        assert Site.objects.get(id=app.site_id).id == app.site_id
        assert Job.objects.filter(app=app.id).count() >= 0
    finally:
        default = client_module._default
        if default is not None:
            default.close()
