"""End-to-end harness for the site daemon: a server process with its own BALSAM_HOME, a
site made by `balsamctl site init`, the daemon started by `balsamctl site start`, and
synchronous stubs to create jobs and watch them. Everything runs as real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import textwrap
import uuid
from pathlib import Path
from typing import Any

import grpc
import yaml

from balsam_grpc.core.channel import auth_metadata, make_channel
from balsam_grpc.v1 import (
    batch_job_pb2,
    batch_job_service_pb2,
    batch_job_service_pb2_grpc,
    event_pb2,
    event_service_pb2,
    event_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    site_service_pb2,
    site_service_pb2_grpc,
)
from tests.support.cli_fork import BALSAMCTL, shared_cli_forker
from tests.support.server_fork import ForkedServer, shared_forker
from tests.support.server_proc import free_port
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
BJ = batch_job_pb2
J = job_pb2

HOOK_APPS = textwrap.dedent('''
    import time
    from pathlib import Path
    from balsam_grpc.core.appdef import ApplicationDefinition

    class Echo(ApplicationDefinition):
        """Plain shell app."""
        command_template = "echo hello {{ who }} > out.txt"
        shell = True
        parameters = {"who": {"default": "world"}}
        cleanup_files = ["*.tmp"]

    class Post(ApplicationDefinition):
        """Shell app whose postprocess reads the output into the job's data."""
        command_template = "echo 42 > answer.txt; echo junk > scratch.tmp"
        shell = True
        parameters = {"delay": {"default": "0"}}
        cleanup_files = ["*.tmp"]

        def postprocess(self):
            Path("hook-started").write_text("yes")
            time.sleep(float(self.job.parameters.get("delay", "0")))
            answer = int(Path("answer.txt").read_text())
            self.job.data = {**self.job.data, "answer": answer}
            print("postprocess read", answer)
''')


class SiteKit:
    def __init__(self, tmp: Path, database_url: str = "") -> None:
        self.tmp = tmp
        self.home = tmp / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.site_dir = tmp / "site"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.database_url = database_url or f"sqlite:///{tmp / 'balsam.db'}"
        self.env = {**os.environ, "BALSAM_HOME": str(self.home), "BALSAM_LOG_FORMAT": "json"}
        self.env.pop("BALSAM_SERVER", None)
        self.env.pop("BALSAM_TOKEN", None)
        self.server: ForkedServer | None = None
        self.channel: grpc.Channel | None = None
        self.site_id = 0

    # ----- processes ---------------------------------------------------------------
    def start_server(self) -> None:
        # Forked from a process that has imported the server (tests/support/server_fork.py).
        self.server = shared_forker().spawn(["--address", self.address, "--database", self.database_url], self.env,
                                            self.tmp / "server.log", cwd=self.tmp, new_session=True)
        profile = self.home / "profile.json"

        def ready() -> bool:
            if self.server.poll() is not None:
                raise AssertionError(f"server exited: {(self.tmp / 'server.log').read_text()[-2000:]}")
            if not profile.exists():
                return False
            import json

            return json.loads(profile.read_text()).get("server") == self.address
        wait_until(ready, "the server to start", 30)
        import json

        self.token = json.loads(profile.read_text())["token"]
        self.metadata = auth_metadata(self.token)
        self.channel = make_channel(self.address)
        grpc.channel_ready_future(self.channel).result(timeout=20)

    def kill_server(self) -> None:
        assert self.server is not None
        self.server.kill()
        self.server.wait(10)
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def balsamctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        # Forked from a process that has imported the CLI (tests/support/cli_fork.py).
        res = shared_cli_forker().run(BALSAMCTL, args, env=self.env, timeout=timeout, cwd=self.tmp)
        if check and res.returncode != 0:
            raise AssertionError(f"balsamctl {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def init_site(self, *, platform: str = "local", apps: str = HOOK_APPS, **changes: Any) -> None:
        out = self.balsamctl("site", "init", str(self.site_dir), "--platform", platform, "--name",
                             f"e2e-{uuid.uuid4().hex[:6]}")
        assert "created site" in out.stdout
        settings = yaml.safe_load((self.site_dir / "settings.yml").read_text())
        self.site_id = settings["site_id"]
        for dotted, value in changes.items():
            node = settings
            *parents, last = dotted.split("__")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
        (self.site_dir / "settings.yml").write_text(yaml.safe_dump(settings, sort_keys=False))
        (self.site_dir / "apps" / "apps.py").write_text(apps)

    def start_daemon(self) -> int:
        out = self.balsamctl("site", "start", str(self.site_dir), "--wait", "30")
        assert "connected" in out.stdout, out.stdout
        return self.daemon_pid()

    def daemon_pid(self) -> int:
        text = (self.site_dir / ".site.lock").read_text().strip()
        return int(text)

    def kill_daemon(self) -> None:
        pid = self.daemon_pid()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not _alive(pid), "the daemon to die", 10)

    def stop(self) -> None:
        if self.site_dir.exists() and (self.site_dir / ".site.lock").exists():
            self.balsamctl("site", "stop", str(self.site_dir), "--force", "--timeout", "10", check=False)
        # Pilots of the local scheduler are process groups of their own: end them.
        state = self.site_dir / "state" / "local-scheduler"
        if state.exists():
            import json

            for rec in state.glob("*.json"):
                try:
                    pgid = json.loads(rec.read_text()).get("pgid") or json.loads(rec.read_text()).get("pid")
                    if pgid:
                        os.killpg(int(pgid), signal.SIGKILL)
                except (ValueError, OSError):
                    pass
        if self.channel is not None:
            self.channel.close()
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            try:
                self.server.wait(10)
            except subprocess.TimeoutExpired:
                self.server.kill()

    # ----- API ---------------------------------------------------------------------
    def stub(self, cls: Any) -> Any:
        return cls(self.channel)

    def create_jobs(self, app: str, n: int, *, prefix: str = "j", params: dict[str, str] | None = None,
                    **resources: Any) -> list[int]:
        jobs = [J.Job(app_name=app, site_id=self.site_id, workdir=f"{prefix}/{i}-{uuid.uuid4().hex[:6]}",
                      parameters=params or {}, resources=J.JobResources(**resources)) for i in range(n)]
        resp = self.stub(job_service_pb2_grpc.JobServiceStub).BatchCreateJobs(
            job_service_pb2.BatchCreateJobsRequest(jobs=jobs, request_id=str(uuid.uuid4())),
            metadata=self.metadata, timeout=30)
        return [j.id for j in resp.jobs]

    def jobs(self, ids: list[int]) -> list[J.Job]:
        resp = self.stub(job_service_pb2_grpc.JobServiceStub).ListJobs(
            job_service_pb2.ListJobsRequest(filter=J.JobFilter(ids=ids), page_size=1000),
            metadata=self.metadata, timeout=30)
        return list(resp.jobs)

    def wait_jobs(self, ids: list[int], state: int, timeout: float) -> list[J.Job]:
        def done() -> list[J.Job] | None:
            jobs = self.jobs(ids)
            failed = [j for j in jobs if j.state in (J.JOB_STATE_FAILED, J.JOB_STATE_KILLED)]
            if failed:
                raise AssertionError(f"jobs failed: {[(j.id, j.state_message[-500:]) for j in failed]}")
            return jobs if len(jobs) == len(ids) and all(j.state == state for j in jobs) else None
        try:
            return wait_until(done, f"jobs {ids} to reach {J.JobState.Name(state)}", timeout, interval=0.3)
        except AssertionError:
            print(self.debug())
            raise

    def batch_jobs(self) -> list[BJ.BatchJob]:
        resp = self.stub(batch_job_service_pb2_grpc.BatchJobServiceStub).ListBatchJobs(
            batch_job_service_pb2.ListBatchJobsRequest(filter=batch_job_service_pb2.BatchJobFilter(
                site_ids=[self.site_id])), metadata=self.metadata, timeout=30)
        return list(resp.batch_jobs)

    def update_batch_job_state(self, bid: int, state: int) -> None:
        from google.protobuf import field_mask_pb2

        self.stub(batch_job_service_pb2_grpc.BatchJobServiceStub).UpdateBatchJob(
            batch_job_service_pb2.UpdateBatchJobRequest(batch_job=BJ.BatchJob(id=bid, state=state),
                                                        update_mask=field_mask_pb2.FieldMask(paths=["state"])),
            metadata=self.metadata, timeout=30)

    def site(self) -> Any:
        return self.stub(site_service_pb2_grpc.SiteServiceStub).GetSite(
            site_service_pb2.GetSiteRequest(id=self.site_id), metadata=self.metadata, timeout=30).site

    def job_events(self, job_id: int) -> list[event_pb2.Event]:
        resp = self.stub(event_service_pb2_grpc.EventServiceStub).ListEvents(
            event_service_pb2.ListEventsRequest(filter=event_service_pb2.EventFilter(job_ids=[job_id])),
            metadata=self.metadata, timeout=30)
        return list(resp.events)

    def latency_to_running(self, job_id: int) -> float:
        events = self.job_events(job_id)
        created = min(e.time.ToDatetime() for e in events)
        running = min(e.time.ToDatetime() for e in events
                      if e.WhichOneof("change") == "job_state" and e.job_state.to_state == J.JOB_STATE_RUNNING)
        return (running - created).total_seconds()

    def debug(self) -> str:
        lines = [f"--- batch jobs: {[(b.id, BJ.BatchJobState.Name(b.state), b.status_info) for b in self.batch_jobs()]}"]
        for name in ("logs/site.log",):
            path = self.site_dir / name
            if path.exists():
                lines.append(f"--- {name}:\n" + "\n".join(path.read_text(errors='replace').splitlines()[-40:]))
        for out in sorted((self.site_dir / "qsubmit").glob("*.out"))[-2:]:
            lines.append(f"--- {out.name}:\n" + "\n".join(out.read_text(errors='replace').splitlines()[-30:]))
        return "\n".join(lines)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as dead
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
