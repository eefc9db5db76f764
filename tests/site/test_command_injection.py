"""Hostile parameter values through a real server, site daemon and launcher (issue 12,
item 5): every value reaches the program as one literal argument and nothing in it runs.
One site run carries every value of the corpus as jobs of three apps: an argv app, a
shell app (the value is its "$1") and the right form of handing a value to `sh -c`. The
form that used to inject, a placeholder inside the quoted script of `sh -c`, is refused
at registration; if a server accepted it, its jobs run too, and the checks below catch
what they do."""

from __future__ import annotations

import textwrap
import uuid

import grpc
import pytest

from balsam_grpc.v1 import app_pb2, app_service_pb2, app_service_pb2_grpc, job_service_pb2, job_service_pb2_grpc
from sitekit import J, SiteKit
from tests.support.hostile import HOSTILE, RIGHT_FORM
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(240)

APPS = textwrap.dedent('''
    from balsam_grpc.core.appdef import ApplicationDefinition

    class Argv(ApplicationDefinition):
        """No shell: printf gets the value as one argument and writes it NUL-terminated."""
        command_template = "printf '%s\\\\0' {{ v }}"
        parameters = {"v": {"required": True}}

    class Script(ApplicationDefinition):
        """A bash script: the value is its only positional parameter ("$#" is 1)."""
        command_template = "printf '%s\\\\0' {{ v }} \\"$#\\" > argv.bin"
        shell = True
        parameters = {"v": {"required": True}}
''')

FAST = dict(scheduler__poll_seconds=1, launcher__idle_timeout_s=3, elastic_queue__enabled=True,
            elastic_queue__min_wall_time_min=5, elastic_queue__check_seconds=1, elastic_queue__max_nodes=1)


@pytest.mark.edge("hostile parameter values (; $() ` newline quotes globs --option) through a real site",
                   "each value is one literal argument; quoted placeholders refused")
def test_hostile_values_reach_the_program_as_one_literal_argument(tmp_path, record_property):
    kit = SiteKit(tmp_path)  # the database plays no part here: SQLite only
    kit.start_server()
    try:
        kit.init_site(apps=APPS, **FAST)
        apps = kit.stub(app_service_pb2_grpc.AppServiceStub)

        def create(name: str, template: str) -> app_pb2.App:
            return apps.CreateApp(app_service_pb2.CreateAppRequest(app=app_pb2.App(
                site_id=kit.site_id, name=name, command_template=template,
                parameters=[app_pb2.AppParameter(name="v", required=True)])), metadata=kit.metadata, timeout=30).app

        runs = {"Argv": "job.out", "Script": "argv.bin", "RightForm": "argv.bin"}
        create("RightForm", "sh -c 'printf \"%s\\0\" \"$1\" > argv.bin' sh {{ v }}")
        try:
            create("Quoted", "sh -c 'printf \"%s\\0\" \"{{ v }}\" > argv.bin'")
            runs["Quoted"] = "argv.bin"  # accepted: run it, so what it does is seen below
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "app.command_template" in err.details()
            assert "inside quotes" in err.details() and RIGHT_FORM in err.details(), err.details()
        kit.start_daemon()

        jobs = [J.Job(app_name=app, site_id=kit.site_id, workdir=f"{app}/{i}-{uuid.uuid4().hex[:6]}",
                      parameters={"v": value}, resources=J.JobResources(node_packing_count=16))
                for app in runs for i, value in enumerate(HOSTILE)]
        created = kit.stub(job_service_pb2_grpc.JobServiceStub).BatchCreateJobs(
            job_service_pb2.BatchCreateJobsRequest(jobs=jobs, request_id=str(uuid.uuid4())),
            metadata=kit.metadata, timeout=30).jobs
        ids = [j.id for j in created]

        def settled() -> list[J.Job] | None:
            got = kit.jobs(ids)
            final = (J.JOB_STATE_JOB_FINISHED, J.JOB_STATE_FAILED, J.JOB_STATE_RUN_ERROR, J.JOB_STATE_KILLED)
            return got if len(got) == len(ids) and all(j.state in final for j in got) else None

        done = wait_until(settled, "every job to finish or fail", 150)
        wrong = []
        for job in done:
            app, value = job.workdir.split("/")[0], dict(job.parameters)["v"]
            out = kit.site_dir / "data" / job.workdir / runs[app]
            got = out.read_bytes().decode(errors="replace").split("\0") if out.exists() else None
            want = [value, "1", ""] if app == "Script" else [value, ""]
            if job.state != J.JOB_STATE_JOB_FINISHED or got != want:
                wrong.append((app, value, J.JobState.Name(job.state), got, job.state_message[-200:]))
        ran = sorted(str(p.relative_to(kit.site_dir)) for p in kit.site_dir.rglob("PWNED*"))
        record_property("observed", f"{len(done) - len(wrong)} of {len(done)} jobs got one literal argument; "
                        f"{len(ran)} ran code")
        assert not ran, f"hostile values ran code: {ran}"
        assert not wrong, f"{len(wrong)} of {len(done)} jobs did not get their value as one literal argument: {wrong}"
    finally:
        kit.stop()
