#!/usr/bin/env python3
"""A scripted session against a running server, using only the profile the server wrote
at first start: a site, an app, a thousand jobs, a small workflow, and the event log."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from balsam_grpc.core.channel import auth_metadata, make_channel  # noqa: E402
from balsam_grpc.core.settings import Profile  # noqa: E402
from balsam_grpc.v1 import (  # noqa: E402
    app_pb2,
    app_service_pb2,
    app_service_pb2_grpc,
    event_service_pb2,
    event_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    site_pb2,
    site_service_pb2,
    site_service_pb2_grpc,
)

STATE = job_pb2.JobState.Name


def wait_for_profile(port: int) -> Profile:
    deadline = time.time() + 60
    while time.time() < deadline:
        profile = Profile.load()
        if profile.token and profile.server.endswith(f":{port}"):
            return profile
        time.sleep(0.2)
    raise SystemExit("server did not write its profile within 60 s (see server.log in BALSAM_HOME)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--wait-for-port", type=int, required=True)
    args = parser.parse_args()
    profile = wait_for_profile(args.wait_for_port)
    channel = make_channel(profile)
    md = auth_metadata(profile.token)
    sites = site_service_pb2_grpc.SiteServiceStub(channel)
    apps = app_service_pb2_grpc.AppServiceStub(channel)
    jobs = job_service_pb2_grpc.JobServiceStub(channel)
    events = event_service_pb2_grpc.EventServiceStub(channel)

    site = sites.CreateSite(site_service_pb2.CreateSiteRequest(site=site_pb2.Site(
        name="laptop", hostname="localhost", scheduler="local")), metadata=md).site
    app = apps.CreateApp(app_service_pb2.CreateAppRequest(app=app_pb2.App(
        site_id=site.id, name="xpcs.reduce", command_template="python reduce.py --dataset {{ dataset }}",
        parameters=[app_pb2.AppParameter(name="dataset", required=True, help="dataset id")])), metadata=md).app
    print(f"site {site.id} {site.name!r}, app {app.id} {app.name!r}")

    watcher_events = []
    stream = events.WatchEvents(event_service_pb2.WatchEventsRequest(), metadata=md)

    def watch() -> None:
        try:
            for response in stream:
                watcher_events.extend(response.events)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                raise

    threading.Thread(target=watch, daemon=True).start()

    t0 = time.perf_counter()
    created = jobs.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[
        job_pb2.Job(app_id=app.id, workdir=f"scan-7/dataset-{i:04d}", parameters={"dataset": str(i)},
                    tags={"experiment": "scan-7", "detector": "A" if i % 2 else "B"}) for i in range(1000)]),
        metadata=md).jobs
    print(f"created {len(created)} jobs in one call in {time.perf_counter() - t0:.2f} s")
    counts = jobs.CountJobs(job_service_pb2.CountJobsRequest(
        filter=job_pb2.JobFilter(tags={"detector": "A"}), group_by=[job_service_pb2.JOB_GROUP_BY_STATE]), metadata=md)
    print("detector A by state:", {STATE(g.state): g.count for g in counts.groups})

    merge = jobs.CreateJob(job_service_pb2.CreateJobRequest(job=job_pb2.Job(
        app_id=app.id, workdir="scan-7/merge", parameters={"dataset": "all"},
        parent_ids=[created[0].id, created[1].id])), metadata=md).job
    print(f"merge job {merge.id} waits for its parents: {STATE(merge.state)}")
    for parent in (created[0].id, created[1].id):
        for state in (job_pb2.JOB_STATE_RUNNING, job_pb2.JOB_STATE_RUN_DONE):
            jobs.UpdateJob(job_service_pb2.UpdateJobRequest(job=job_pb2.Job(id=parent, state=state),
                                                            update_mask={"paths": ["state"]}), metadata=md)
    merge = jobs.GetJob(job_service_pb2.GetJobRequest(id=merge.id), metadata=md).job
    print(f"parents finished; merge job is now {STATE(merge.state)}")
    try:
        jobs.UpdateJob(job_service_pb2.UpdateJobRequest(job=job_pb2.Job(id=created[5].id,
                       state=job_pb2.JOB_STATE_JOB_FINISHED), update_mask={"paths": ["state"]}), metadata=md)
    except grpc.RpcError as err:
        print(f"an illegal transition is refused: {err.code().name}: {err.details()}")

    history = events.ListEvents(event_service_pb2.ListEventsRequest(
        filter=event_service_pb2.EventFilter(job_ids=[merge.id])), metadata=md).events
    print(f"history of job {merge.id}:")
    for e in history:
        via = " via " + ",".join(e.data["via"]) if "via" in e.data else ""
        print(f"  {e.time.ToDatetime():%H:%M:%S.%f} {STATE(e.job_state.from_state)} -> "
              f"{STATE(e.job_state.to_state)}{via}")
    time.sleep(0.5)  # let the watcher drain what the server already pushed
    stream.cancel()
    print(f"a live watcher received {len(watcher_events)} events while this ran")


if __name__ == "__main__":
    main()
