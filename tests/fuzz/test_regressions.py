"""The bugs the fuzzers found, pinned as plain examples (SQLite and PostgreSQL): each
was answered UNKNOWN or INTERNAL before its fix."""

from __future__ import annotations

import time
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from balsam_grpc.v1 import (
    auth_service_pb2,
    batch_job_service_pb2,
    common_pb2,
    event_service_pb2,
    job_pb2,
    job_service_pb2,
    session_service_pb2,
    site_pb2,
    site_service_pb2,
)

Code = grpc.StatusCode


def call(caller: Any, path: str, request: Any, response_cls: Any = None, *,
         raw: bool = False) -> tuple[Code, str, dict]:
    method = caller.harness.channel.unary_unary(
        path, request_serializer=None if raw else type(request).SerializeToString,
        response_deserializer=response_cls.FromString if response_cls else None)
    try:
        method(request, metadata=caller.metadata, timeout=30)
    except grpc.RpcError as err:
        status = rpc_status.from_call(err)
        info = error_details_pb2.ErrorInfo()
        if status is not None and status.details:
            status.details[0].Unpack(info)
        return err.code(), err.details(), dict(info.metadata)
    return Code.OK, "", {}


@pytest.mark.parametrize(("path", "payload", "type_name"), [
    ("/balsam.v1.JobService/GetJob", b"\xff\xff\xff", "balsam.v1.GetJobRequest"),
    ("/balsam.v1.AuthService/Login", b"\x0a\x03\xff\xfe\xfd", "balsam.v1.LoginRequest"),  # bad UTF-8
    ("/balsam.v1.EventService/ListEvents", b"\x0a\x05abc", "balsam.v1.ListEventsRequest"),  # truncated
])
def test_undecodable_request_is_invalid_argument(alice: Any, path: str, payload: bytes, type_name: str) -> None:
    code, details, meta = call(alice, path, payload, raw=True)
    assert code == Code.INVALID_ARGUMENT, (code, details)
    assert type_name in details and meta["message_type"] == type_name


def test_struct_nested_beyond_the_parse_limit_is_invalid_argument(alice: Any) -> None:
    value: Any = "x"
    for _ in range(120):
        value = [value]
    request = job_service_pb2.CreateJobRequest(job=job_pb2.Job(app_id=1, workdir="w/deep"))
    request.job.data.update({"deep": value})
    code, details, _ = call(alice, "/balsam.v1.JobService/CreateJob", request, job_service_pb2.CreateJobResponse)
    assert code == Code.INVALID_ARGUMENT and "CreateJobRequest" in details


def test_bidi_stream_with_undecodable_message_is_invalid_argument(alice: Any) -> None:
    method = alice.harness.channel.stream_stream("/balsam.v1.SessionService/Connect")
    with pytest.raises(grpc.RpcError) as caught:
        list(method(iter([b"\xff\xff"]), metadata=alice.metadata, timeout=10))
    assert caught.value.code() == Code.INVALID_ARGUMENT
    assert "SessionServiceConnectRequest" in caught.value.details()


@pytest.mark.parametrize(("path", "request_", "response_cls", "field"), [
    ("/balsam.v1.JobService/ListJobs", job_service_pb2.ListJobsRequest(filter=job_pb2.JobFilter(
        create_time=common_pb2.TimeRange(end={"seconds": -62135596801}))), job_service_pb2.ListJobsResponse,
     "filter.create_time.end"),
    ("/balsam.v1.EventService/ListEvents", event_service_pb2.ListEventsRequest(filter=event_service_pb2.EventFilter(
        time=common_pb2.TimeRange(start={"seconds": 253402300800}))), event_service_pb2.ListEventsResponse,
     "filter.time.start"),
    ("/balsam.v1.BatchJobService/ListBatchJobs", batch_job_service_pb2.ListBatchJobsRequest(
        filter=batch_job_service_pb2.BatchJobFilter(create_time=common_pb2.TimeRange(start={"nanos": -1}))),
     batch_job_service_pb2.ListBatchJobsResponse, "filter.create_time.start"),
])
def test_time_outside_the_calendar_is_invalid_argument(alice: Any, path: str, request_: Any, response_cls: Any,
                                                        field: str) -> None:
    code, details, meta = call(alice, path, request_, response_cls)
    assert code == Code.INVALID_ARGUMENT and meta.get("field") == field, (code, details)


@pytest.mark.parametrize(("path", "request_", "response_cls", "field"), [
    ("/balsam.v1.SessionService/GetSession", session_service_pb2.GetSessionRequest(id="a\x00b"),
     session_service_pb2.GetSessionResponse, "id"),
    ("/balsam.v1.AuthService/RevokeToken", auth_service_pb2.RevokeTokenRequest(id="a\x00b"),
     auth_service_pb2.RevokeTokenResponse, "id"),
    ("/balsam.v1.SiteService/ListSites", site_service_pb2.ListSitesRequest(
        filter=site_service_pb2.SiteFilter(names=["ok", "a\x00b"])), site_service_pb2.ListSitesResponse,
     "filter.names[1]"),
])
def test_nul_in_a_string(alice: Any, path: str, request_: Any, response_cls: Any, field: str) -> None:
    """PostgreSQL cannot store NUL: INVALID_ARGUMENT naming the field. SQLite can: the
    lookup simply finds nothing."""
    code, details, meta = call(alice, path, request_, response_cls)
    if alice.harness.backend == "postgres":
        assert code == Code.INVALID_ARGUMENT and meta.get("field") == field, (code, details)
        assert "NUL" in details
    else:
        assert code in (Code.OK, Code.NOT_FOUND), (code, details)


@pytest.mark.parametrize(("flt", "field"), [
    (job_pb2.JobFilter(exclude_tags={'a"b': "1"}), "filter.exclude_tags"),
    (job_pb2.JobFilter(exclude_tags={f"k{i}": "v" for i in range(10_000)}), "filter.exclude_tags"),
])
def test_exclude_tags_are_checked_like_tags(alice: Any, flt: job_pb2.JobFilter, field: str) -> None:
    code, details, meta = call(alice, "/balsam.v1.JobService/ListJobs", job_service_pb2.ListJobsRequest(filter=flt),
                               job_service_pb2.ListJobsResponse)
    assert code == Code.INVALID_ARGUMENT and meta.get("field") == field, (code, details)


def test_event_filter_tags_are_checked(alice: Any) -> None:
    request = event_service_pb2.ListEventsRequest(filter=event_service_pb2.EventFilter(tags={'a"b': "1"}))
    code, details, meta = call(alice, "/balsam.v1.EventService/ListEvents", request,
                               event_service_pb2.ListEventsResponse)
    assert code == Code.INVALID_ARGUMENT and meta.get("field") == "filter.tags", (code, details)


@pytest.mark.parametrize("cursor", ["²", "9" * 30, "9" * 5000, "١٢"])
def test_watch_cursor_that_is_no_cursor_is_invalid_argument(alice: Any, cursor: str) -> None:
    method = alice.harness.channel.unary_stream(
        "/balsam.v1.EventService/WatchEvents",
        request_serializer=event_service_pb2.WatchEventsRequest.SerializeToString,
        response_deserializer=event_service_pb2.WatchEventsResponse.FromString)
    call = method(event_service_pb2.WatchEventsRequest(cursor=cursor), metadata=alice.metadata, timeout=10)
    with pytest.raises(grpc.RpcError) as caught:
        next(call)
    assert caught.value.code() == Code.INVALID_ARGUMENT and "cursor" in caught.value.details()


def test_count_jobs_grouped_twice_by_the_same_dimension(alice: Any) -> None:
    request = job_service_pb2.CountJobsRequest(group_by=[job_service_pb2.JOB_GROUP_BY_STATE] * 2)
    code, details, _ = call(alice, "/balsam.v1.JobService/CountJobs", request, job_service_pb2.CountJobsResponse)
    assert code == Code.OK, (code, details)


@pytest.mark.parametrize("number", [float("nan"), float("inf")])
def test_job_data_that_json_cannot_hold(alice: Any, number: float) -> None:
    request = job_service_pb2.CreateJobRequest(job=job_pb2.Job(app_id=1, workdir="w/nan"))
    request.job.data.fields["x"].number_value = number
    code, details, meta = call(alice, "/balsam.v1.JobService/CreateJob", request, job_service_pb2.CreateJobResponse)
    assert code == Code.INVALID_ARGUMENT and meta.get("field", "").endswith(".data"), (code, details)
    assert "NaN or Infinity" in details


def test_site_snapshot_with_a_time_outside_the_calendar(alice: Any) -> None:
    """The stream ends INVALID_ARGUMENT naming the snapshot, not INTERNAL."""
    create = alice.harness.channel.unary_unary(
        "/balsam.v1.SiteService/CreateSite", request_serializer=site_service_pb2.CreateSiteRequest.SerializeToString,
        response_deserializer=site_service_pb2.CreateSiteResponse.FromString)
    site = create(site_service_pb2.CreateSiteRequest(site=site_pb2.Site(name="snap", hostname="h", path="/p")),
                  metadata=alice.metadata, timeout=10).site
    hello = site_service_pb2.SiteServiceConnectRequest(hello=site_service_pb2.SiteHello(site_id=site.id, hostname="h"))
    snapshot = site_service_pb2.SiteServiceConnectRequest(snapshot={"time": {"seconds": 100, "nanos": 2**31 - 1}})

    def requests() -> Any:
        yield hello
        yield snapshot
        time.sleep(2)

    connect = alice.harness.channel.stream_stream(
        "/balsam.v1.SiteService/Connect",
        request_serializer=site_service_pb2.SiteServiceConnectRequest.SerializeToString,
        response_deserializer=site_service_pb2.SiteServiceConnectResponse.FromString)
    with pytest.raises(grpc.RpcError) as caught:
        list(connect(requests(), metadata=alice.metadata, timeout=10))
    assert caught.value.code() == Code.INVALID_ARGUMENT and "snapshot" in caught.value.details()
