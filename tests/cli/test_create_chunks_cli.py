"""`balsamctl job create --file` against a server whose request size limit a chunk of
jobs exceeds: the chunk goes in halves (as the SDK's bulk_create does), and a job too
large on its own fails naming its line, with the jobs before it created and none after.

The server runs in this process (an EmbeddedServer with a small max_message_bytes, which
the server's command line does not offer); `balsamctl` is a process of its own.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from balsam_grpc.v1 import app_pb2, app_service_pb2, job_pb2, job_service_pb2, site_pb2, site_service_pb2
from tests.cli.conftest import one_error_line
from tests.support.cli_fork import BALSAMCTL

LIMIT = 128 * 1024  # bytes per request message: about 80 of the jobs below
WORD = "x" * 1500


class SmallServer:
    def __init__(self, home: Path, forker: Any) -> None:
        from balsam_grpc.sdk.client import Client
        from balsam_grpc.server.embedded import EmbeddedServer
        from balsam_grpc.server.state import ServerSettings
        from balsam_grpc.server.convert import utcnow
        from balsam_grpc.server.store import users as user_store
        from tests.conftest import harness_password_hash

        self.forker = forker
        self.embedded = EmbeddedServer(ServerSettings(address="127.0.0.1:0", database_url=f"sqlite:///{home / 'db'}",
                                                      grace_seconds=0.2, max_message_bytes=LIMIT))

        def user(conn: Any) -> str:
            row = user_store.create_user(conn, "carol", harness_password_hash(), admin=False, now=utcnow())
            return str(user_store.issue_token(conn, row["id"], scope="USER", site_id=None, ttl=timedelta(hours=1),
                                              description="test", now=utcnow())[0])

        self.token = self.embedded.db.write_sync(user)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BALSAM_")}
        self.env.update(BALSAM_HOME=str(home), BALSAM_SERVER=self.embedded.address, BALSAM_TOKEN=self.token,
                        NO_COLOR="1", COLUMNS="200")
        self.client = Client(self.embedded.address, token=self.token)

    def run(self, *args: str) -> Any:
        return self.forker.run(BALSAMCTL, args, env=self.env, timeout=120)

    def workdirs(self, prefix: str) -> list[str]:
        # Basic views, in pages: answers are held to the small limit too.
        request = job_service_pb2.ListJobsRequest(filter=job_pb2.JobFilter(workdir_contains=prefix), page_size=500,
                                                  view=job_service_pb2.JOB_VIEW_BASIC)
        found: list[str] = []
        while True:
            response = self.client.call("JobService", "ListJobs", request)
            found += [j.workdir for j in response.jobs]
            if not response.next_page_token:
                return found
            request.page_token = response.next_page_token

    def close(self) -> None:
        self.client.close()
        self.embedded.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, cli_forker: Any) -> Iterator[SmallServer]:
    home = tmp_path_factory.mktemp("cli-small")
    s = SmallServer(home, cli_forker)
    try:
        site = s.client.call("SiteService", "CreateSite", site_service_pb2.CreateSiteRequest(
            site=site_pb2.Site(name="tiny", hostname="localhost", path=str(home / "site")))).site
        s.client.call("AppService", "CreateApp", app_service_pb2.CreateAppRequest(app=app_pb2.App(
            site_id=site.id, name="echo", command_template="echo {{ word }}",
            parameters=[app_pb2.AppParameter(name="word", required=True)])))
        yield s
    finally:
        s.close()


def write_jobs(path: Path, jobs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps({"app": "echo", **job}) + "\n" for job in jobs))
    return path


def test_a_chunk_over_the_request_limit_is_sent_in_halves(server: SmallServer, tmp_path: Path) -> None:
    # 400 jobs of ~1.5 KB: one default chunk, about 600 KB against a 128 KiB limit.
    workdirs = [f"halves/{i:03d}" for i in range(400)]
    path = write_jobs(tmp_path / "jobs.jsonl", [{"workdir": w, "parameters": {"word": WORD}} for w in workdirs])
    result = server.run("job", "create", "--file", str(path), "--site", "tiny")
    assert result.returncode == 0, result.stderr
    assert "created 400 jobs" in result.stdout
    assert sorted(server.workdirs("halves/")) == workdirs  # each once


def test_a_job_too_large_alone_fails_naming_its_line(server: SmallServer, tmp_path: Path) -> None:
    jobs = [{"workdir": f"alone/{i:02d}", "parameters": {"word": WORD}} for i in range(41)]
    jobs[30]["data"] = {"blob": "y" * 200_000}  # under the 256 KiB data limit, over the request limit
    path = write_jobs(tmp_path / "jobs.jsonl", jobs)
    result = server.run("job", "create", "--file", str(path), "--site", "tiny")
    assert result.returncode == 1
    error = one_error_line(result)
    assert f"{path}:31: " in error, error
    # gRPC's own limit (RESOURCE_EXHAUSTED) or the server's per-method one (REQUEST_TOO_LARGE).
    assert "make its data or parameters smaller" in error, error
    assert "(RESOURCE_EXHAUSTED)" in error or "(REQUEST_TOO_LARGE)" in error, error
    assert error.endswith("; 30 jobs created before it"), error
    # The calls are in order and each is atomic: the jobs before it, none of it or after.
    assert sorted(server.workdirs("alone/")) == [f"alone/{i:02d}" for i in range(30)]


def test_a_refusal_naming_one_job_is_not_halved(server: SmallServer, tmp_path: Path) -> None:
    # Too many tags is wrong however the jobs are sent: the chunk is refused whole.
    jobs = [{"workdir": f"tags/{i:02d}", "parameters": {"word": "w"}} for i in range(20)]
    jobs[12]["tags"] = {f"k{n}": "v" for n in range(100)}
    path = write_jobs(tmp_path / "jobs.jsonl", jobs)
    result = server.run("job", "create", "--file", str(path), "--site", "tiny")
    assert result.returncode == 1
    error = one_error_line(result)
    assert f"{path}:13: " in error and "(TOO_LARGE); nothing created" in error, error
    assert server.workdirs("tags/") == []
