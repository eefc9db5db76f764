"""Every RPC is checked for isolation between users and between sites.

`COVERAGE` names, for each method of every service (walked from the descriptors), the
tests that prove another user cannot see or change the caller's objects through it and
a site-scoped token cannot act for another site; `EXEMPT` lists the methods with nothing
to isolate, with the reason. `test_every_rpc_has_isolation_coverage` fails when an RPC is
added without being listed, or when a listed test disappears.

The tests below fill what tests/server/test_isolation.py, test_jobs.py, test_auth.py,
test_site_stream.py, test_session_stream.py and test_site_stats.py do not cover: every
JobService method and the event log (list and watch) under a site token of another site
and under another user, and resuming another user's or another site's launcher session.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from seckit import StreamClient, make_app, make_site

from balsam_grpc.core.channel import _service_descriptors
from balsam_grpc.v1 import (
    event_service_pb2,
    event_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    session_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
)
from tests.support.waiting import wait_until

Code = grpc.StatusCode
TESTS = Path(__file__).resolve().parent.parent
HERE = "security/test_rpc_isolation.py"
ISO = "server/test_isolation.py"

_BY_ID = [f"{ISO}::test_other_user_gets_not_found_by_id", f"{ISO}::test_site_token_cannot_read_or_change_another_site",
          f"{ISO}::test_other_users_site_token_gets_not_found"]
_LIST = [f"{ISO}::test_other_user_lists_none_of_them", f"{ISO}::test_site_token_cannot_read_or_change_another_site"]
_REFERENCE = [f"{ISO}::test_other_user_cannot_reference_alices_objects",
              f"{ISO}::test_site_token_acts_for_its_own_site"]
_JOBS = [f"{HERE}::test_jobs_site_token_of_another_site", f"{HERE}::test_jobs_other_user",
         "server/test_jobs.py::test_jobs_are_invisible_to_other_users"]
_EVENTS = [f"{HERE}::test_events_site_token_of_another_site", f"{HERE}::test_events_other_user"]

COVERAGE: dict[str, list[str]] = {
    "SiteService.GetSite": _BY_ID,
    "SiteService.ListSites": _LIST,
    "SiteService.CreateSite": [f"{ISO}::test_other_user_may_reuse_names_and_request_ids",
                               f"{ISO}::test_site_token_cannot_create_or_delete_sites"],
    "SiteService.UpdateSite": _BY_ID,
    "SiteService.DeleteSite": [*_BY_ID, f"{ISO}::test_site_token_cannot_create_or_delete_sites"],
    "SiteService.Connect": ["server/test_site_stream.py::test_hello_is_validated",
                            "server/test_site_stream.py::test_work_stays_with_its_site"],
    "SiteService.ListSiteStatistics": ["server/test_site_stats.py::test_scoping_and_bad_window"],
    "AppService.GetApp": _BY_ID,
    "AppService.ListApps": _LIST,
    "AppService.CreateApp": _REFERENCE,
    "AppService.UpdateApp": _BY_ID,
    "AppService.DeleteApp": _BY_ID,
    "JobService.GetJob": _JOBS,
    "JobService.ListJobs": _JOBS,
    "JobService.CountJobs": _JOBS,
    "JobService.CreateJob": _JOBS,
    "JobService.BatchCreateJobs": _JOBS,
    "JobService.UpdateJob": _JOBS,
    "JobService.BatchUpdateJobs": _JOBS,
    "JobService.DeleteJob": _JOBS,
    "JobService.BatchDeleteJobs": _JOBS,
    "JobService.RetryJobs": _JOBS,
    "BatchJobService.GetBatchJob": _BY_ID,
    "BatchJobService.ListBatchJobs": _LIST,
    "BatchJobService.CreateBatchJob": _REFERENCE,
    "BatchJobService.UpdateBatchJob": _BY_ID,
    "BatchJobService.DeleteBatchJob": _BY_ID,
    "TransferService.GetTransferItem": _BY_ID,
    "TransferService.ListTransferItems": _LIST,
    "TransferService.UpdateTransferItem": _BY_ID,
    "SessionService.GetSession": _BY_ID,
    "SessionService.ListSessions": _LIST,
    "SessionService.DeleteSession": [*_BY_ID, f"{ISO}::test_other_user_cannot_close_a_session_or_touch_its_jobs"],
    "SessionService.Connect": [f"{HERE}::test_session_connect_isolation",
                               "server/test_session_stream.py::test_site_token_of_another_site_is_refused"],
    "EventService.ListEvents": _EVENTS,
    "EventService.WatchEvents": _EVENTS,
    "AuthService.Login": ["server/test_auth.py::test_wrong_password_and_unknown_user_look_the_same",
                          "security/test_login_limits.py::test_login_is_refused_after_failures"],
    "AuthService.CreateUser": ["server/test_auth.py::test_non_admin_cannot_create_users",
                               "server/test_auth.py::test_site_token_cannot_mint_tokens_or_users"],
    "AuthService.CreateToken": ["server/test_auth.py::test_site_token_needs_an_owned_site",
                                "server/test_auth.py::test_site_token_cannot_mint_tokens_or_users"],
    "AuthService.ListTokens": ["server/test_auth.py::test_list_tokens_own_only_and_no_secrets",
                               "server/test_auth.py::test_site_token_cannot_mint_tokens_or_users"],
    "AuthService.RevokeToken": ["server/test_auth.py::test_revoking_another_users_token_is_not_found",
                                "server/test_auth.py::test_site_token_cannot_mint_tokens_or_users"],
    "AuthService.ListUsers": ["server/test_auth.py::test_only_admins_list_users"],
    "AuthService.SetPassword": ["server/test_auth.py::test_set_password_own_or_as_admin"],
    "AuthService.DisableUser": ["server/test_auth.py::test_disabling_a_user_revokes_its_tokens_and_login"],
}

EXEMPT: dict[str, str] = {
    "AuthService.GetCurrentUser": "takes no id: it answers only about the caller's own token "
                                  "(server/test_auth.py::test_current_user)",
}


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_rpc_has_isolation_coverage() -> None:
    methods = {f"{svc.name}.{m.name}" for svc in _service_descriptors() for m in svc.methods}
    listed = set(COVERAGE) | set(EXEMPT)
    assert not set(COVERAGE) & set(EXEMPT)
    missing = sorted(methods - listed)
    assert not missing, f"RPCs without an isolation test or exemption: {missing} (add them to COVERAGE)"
    assert not sorted(listed - methods), f"listed but not an RPC: {sorted(listed - methods)}"
    names: dict[Path, set[str]] = {}
    for method, refs in COVERAGE.items():
        assert refs, method
        for ref in refs:
            file, _, test = ref.partition("::")
            path = TESTS / file
            assert path.exists(), f"{method}: {file} does not exist"
            found = names.setdefault(path, _test_names(path))
            assert test in found, f"{method}: {ref} does not exist"


# -- jobs ------------------------------------------------------------------------------------

@dataclass
class Jobs:
    own_site: int
    other_site: int
    own_app: int
    other_app: int
    own_job: int
    other_job: int


def _job(stub: Any, app_id: int, tag: str) -> job_pb2.Job:
    return stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
        app_id=app_id, workdir=f"iso/{tag}", parameters={"x": "1"}, tags={"iso": tag}))).job


@pytest.fixture
def jobs_world(alice: Any) -> Jobs:
    stub = alice.stub(job_service_pb2_grpc.JobServiceStub)
    s1, s2 = make_site(alice).id, make_site(alice).id
    a1, a2 = make_app(alice, s1).id, make_app(alice, s2).id
    return Jobs(s1, s2, a1, a2, _job(stub, a1, "one").id, _job(stub, a2, "two").id)


def _refused(call: Callable[[], Any], *codes: grpc.StatusCode) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() in codes, caught.value.details()


def _alice_view(alice: Any, w: Jobs) -> list[job_pb2.Job]:
    stub = alice.stub(job_service_pb2_grpc.JobServiceStub)
    return list(stub.ListJobs(job_service_pb2.ListJobsRequest(
        filter=job_pb2.JobFilter(site_ids=[w.own_site, w.other_site]))).jobs)


def _probe_jobs(stub: Any, w: Jobs, target: int, app_id: int, *codes: grpc.StatusCode) -> None:
    """Every JobService method aimed at `target` (a job the caller must not reach) and at
    `app_id` (an app it must not use) is refused or finds nothing."""
    _refused(lambda: stub.GetJob(job_service_pb2.GetJobRequest(id=target)), *codes)
    _refused(lambda: stub.UpdateJob(job_service_pb2.UpdateJobRequest(
        job=job_pb2.Job(id=target, tags={"x": "y"}), update_mask={"paths": ["tags"]})), *codes)
    _refused(lambda: stub.DeleteJob(job_service_pb2.DeleteJobRequest(id=target)), *codes)
    _refused(lambda: stub.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
        app_id=app_id, workdir="iso/intruder", parameters={"x": "1"}))), *codes)
    _refused(lambda: stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[job_pb2.Job(
        app_id=app_id, workdir="iso/intruder-bulk", parameters={"x": "1"})])), *codes)
    by_id = job_pb2.JobFilter(ids=[target])
    assert list(stub.ListJobs(job_service_pb2.ListJobsRequest(filter=by_id)).jobs) == []
    assert stub.CountJobs(job_service_pb2.CountJobsRequest(filter=by_id)).total == 0
    updated = stub.BatchUpdateJobs(job_service_pb2.BatchUpdateJobsRequest(
        filter=by_id, patch=job_pb2.Job(state=job_pb2.JOB_STATE_KILLED), update_mask={"paths": ["state"]}))
    assert updated.updated_count == 0 and not updated.outcomes
    deleted = stub.BatchDeleteJobs(job_service_pb2.BatchDeleteJobsRequest(filter=by_id))
    assert deleted.deleted_count == 0
    retried = stub.RetryJobs(job_service_pb2.RetryJobsRequest(filter=by_id))
    assert retried.retried_count == 0 and not retried.outcomes


def test_jobs_site_token_of_another_site(harness: Any, alice: Any, jobs_world: Jobs) -> None:
    w = jobs_world
    before = _alice_view(alice, w)
    scoped = harness.user(alice.username, scope="SITE", site_id=w.own_site)
    stub = scoped.stub(job_service_pb2_grpc.JobServiceStub)
    _probe_jobs(stub, w, w.other_job, w.other_app, Code.NOT_FOUND, Code.PERMISSION_DENIED)
    # Everything it lists or counts is of its own site; its own job is reachable.
    listed = list(stub.ListJobs(job_service_pb2.ListJobsRequest(page_size=1000)).jobs)
    assert {j.site_id for j in listed} == {w.own_site} and w.own_job in {j.id for j in listed}
    assert stub.CountJobs(job_service_pb2.CountJobsRequest()).total == len(listed)
    assert list(stub.ListJobs(job_service_pb2.ListJobsRequest(
        filter=job_pb2.JobFilter(site_ids=[w.other_site]))).jobs) == []
    assert stub.GetJob(job_service_pb2.GetJobRequest(id=w.own_job)).job.id == w.own_job
    assert _alice_view(alice, w) == before


def test_jobs_other_user(harness: Any, alice: Any, bob: Any, jobs_world: Jobs) -> None:
    w = jobs_world
    before = _alice_view(alice, w)
    stub = bob.stub(job_service_pb2_grpc.JobServiceStub)
    for job_id, app_id in ((w.own_job, w.own_app), (w.other_job, w.other_app)):
        _probe_jobs(stub, w, job_id, app_id, Code.NOT_FOUND)
    assert list(stub.ListJobs(job_service_pb2.ListJobsRequest(
        filter=job_pb2.JobFilter(site_ids=[w.own_site, w.other_site]))).jobs) == []
    bobs_site = make_site(bob).id
    bobs_token = harness.user(bob.username, scope="SITE", site_id=bobs_site)
    _probe_jobs(bobs_token.stub(job_service_pb2_grpc.JobServiceStub), w, w.own_job, w.own_app,
                Code.NOT_FOUND, Code.PERMISSION_DENIED)
    assert _alice_view(alice, w) == before


# -- events ----------------------------------------------------------------------------------

def _watch_until(harness: Any, caller: Any, marker_job: int, request: Any) -> list[Any]:
    """Events a watch (replaying from the start) delivers up to the marker job's first event:
    events are delivered in id order, so anything older it could see came before."""
    s = StreamClient(event_service_pb2_grpc.EventServiceStub(harness.channel).WatchEvents, caller.metadata,
                     request=request)
    seen: list[Any] = []
    try:
        def marker_seen() -> bool:
            while not s.incoming.empty():
                seen.extend(s.next().events)
            assert not s.ended.is_set() or s.incoming.qsize(), s.error
            return any(e.job_id == marker_job for e in seen)

        wait_until(marker_seen, "the marker job's event on the watch")
    finally:
        s.close()
    return seen


def test_events_site_token_of_another_site(harness: Any, alice: Any, jobs_world: Jobs) -> None:
    w = jobs_world
    scoped = harness.user(alice.username, scope="SITE", site_id=w.own_site)
    stub = scoped.stub(event_service_pb2_grpc.EventServiceStub)
    listed = list(stub.ListEvents(event_service_pb2.ListEventsRequest(page_size=1000)).events)
    assert listed and {e.site_id for e in listed} == {w.own_site}
    assert w.other_job not in {e.job_id for e in listed}
    by_job = stub.ListEvents(event_service_pb2.ListEventsRequest(
        filter=event_service_pb2.EventFilter(job_ids=[w.other_job])))
    assert list(by_job.events) == []
    _refused(lambda: stub.ListEvents(event_service_pb2.ListEventsRequest(
        filter=event_service_pb2.EventFilter(site_ids=[w.other_site]))), Code.PERMISSION_DENIED)
    # Watching from the start: only its own site's events, up to a fresh job at its site.
    marker = _job(alice.stub(job_service_pb2_grpc.JobServiceStub), w.own_app, "marker-site").id
    seen = _watch_until(harness, scoped, marker, event_service_pb2.WatchEventsRequest(replay_from_start=True))
    assert {e.site_id for e in seen} == {w.own_site} and w.other_job not in {e.job_id for e in seen}
    other_site_watch = StreamClient(event_service_pb2_grpc.EventServiceStub(harness.channel).WatchEvents,
                                    scoped.metadata, request=event_service_pb2.WatchEventsRequest(
                                        filter=event_service_pb2.EventFilter(site_ids=[w.other_site])))
    assert other_site_watch.wait_ended().code() == Code.PERMISSION_DENIED


def test_events_other_user(harness: Any, alice: Any, bob: Any, jobs_world: Jobs) -> None:
    w = jobs_world
    stub = bob.stub(event_service_pb2_grpc.EventServiceStub)
    for f in (event_service_pb2.EventFilter(), event_service_pb2.EventFilter(job_ids=[w.own_job, w.other_job]),
              event_service_pb2.EventFilter(site_ids=[w.own_site])):
        events = stub.ListEvents(event_service_pb2.ListEventsRequest(filter=f, page_size=1000)).events
        assert not {e.job_id for e in events} & {w.own_job, w.other_job}
    bobs_app = make_app(bob, make_site(bob).id)
    marker = _job(bob.stub(job_service_pb2_grpc.JobServiceStub), bobs_app.id, "marker-bob").id
    seen = _watch_until(harness, bob, marker, event_service_pb2.WatchEventsRequest(replay_from_start=True))
    assert not {e.job_id for e in seen} & {w.own_job, w.other_job}
    assert not {e.site_id for e in seen} & {w.own_site, w.other_site}


# -- launcher sessions -----------------------------------------------------------------------

def _connect(harness: Any, caller: Any, **open_fields: Any) -> grpc.RpcError:
    s = StreamClient(session_service_pb2_grpc.SessionServiceStub(harness.channel).Connect, caller.metadata)
    s.send(session_service_pb2.SessionServiceConnectRequest(open=session_service_pb2.SessionOpen(
        hostname="nid0001", nodes=[session_pb2.NodeInfo(hostname="nid0001", cpus=4)], **open_fields)))
    try:
        return s.wait_ended()
    finally:
        s.close()


def test_session_connect_isolation(harness: Any, alice: Any, bob: Any, jobs_world: Jobs) -> None:
    w = jobs_world
    s = StreamClient(session_service_pb2_grpc.SessionServiceStub(harness.channel).Connect, alice.metadata)
    s.send(session_service_pb2.SessionServiceConnectRequest(open=session_service_pb2.SessionOpen(
        site_id=w.other_site, hostname="nid0001", nodes=[session_pb2.NodeInfo(hostname="nid0001", cpus=4)])))
    session_id = s.next().opened.session.id
    s.close()
    assert session_id
    # Another user can neither open a session at alice's site nor resume hers.
    assert _connect(harness, bob, site_id=w.own_site).code() == Code.NOT_FOUND
    assert _connect(harness, bob, resume_session_id=session_id).code() == Code.NOT_FOUND
    # A token of another site of hers can do neither for that site.
    scoped = harness.user(alice.username, scope="SITE", site_id=w.own_site)
    assert _connect(harness, scoped, site_id=w.other_site).code() == Code.PERMISSION_DENIED
    assert _connect(harness, scoped, resume_session_id=session_id).code() == Code.PERMISSION_DENIED
