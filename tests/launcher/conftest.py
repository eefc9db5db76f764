"""Launcher tests: an embedded server with a short lease timeout (SQLite, and PostgreSQL
in a database of our own), a user token, stubs, and launchers started as real processes."""

from __future__ import annotations

import itertools
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from balsam_grpc.v1 import (
    app_pb2,
    app_service_pb2,
    app_service_pb2_grpc,
    event_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    job_service_pb2_grpc,
    session_service_pb2_grpc,
    site_pb2,
    site_service_pb2,
    site_service_pb2_grpc,
)
from tests.conftest import POSTGRES_URL, database_params
from tests.support.databases import fresh_postgres

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
LEASE_TIMEOUT = 3
WAIT = 20.0
S = job_pb2


class Server:
    """An embedded server plus one user's token and stubs."""

    def __init__(self, url: str) -> None:
        from balsam_grpc.server.embedded import EmbeddedServer
        from balsam_grpc.server.state import ServerSettings

        self.embedded = EmbeddedServer(ServerSettings(address="127.0.0.1:0", database_url=url, grace_seconds=0.5,
                                                      lease_timeout_seconds=LEASE_TIMEOUT))
        self.address = self.embedded.address
        self.channel = grpc.insecure_channel(self.address)
        self.token = self._token()
        md = (("authorization", f"Bearer {self.token}"),)
        self.metadata = md
        self.sites = site_service_pb2_grpc.SiteServiceStub(self.channel)
        self.apps = app_service_pb2_grpc.AppServiceStub(self.channel)
        self.jobs = job_service_pb2_grpc.JobServiceStub(self.channel)
        self.events = event_service_pb2_grpc.EventServiceStub(self.channel)
        self.sessions = session_service_pb2_grpc.SessionServiceStub(self.channel)

    def _token(self) -> str:
        from balsam_grpc.server.auth import hash_password
        from balsam_grpc.server.convert import utcnow
        from balsam_grpc.server.store import users as user_store

        name = f"launcher-{secrets.token_hex(4)}"

        def work(conn: Any) -> str:
            user = user_store.create_user(conn, name, hash_password("correct horse battery"), admin=False,
                                          now=utcnow())
            secret, _ = user_store.issue_token(conn, user["id"], scope="USER", site_id=None, ttl=timedelta(hours=2),
                                               description="launcher tests", now=utcnow())
            return secret

        return self.embedded.db.write_sync(work)

    def call(self, method: Callable[..., Any], request: Any) -> Any:
        return method(request, metadata=self.metadata, timeout=30)

    def close(self) -> None:
        self.channel.close()
        self.embedded.stop()


@pytest.fixture(scope="module", params=database_params())
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if request.param == "postgres":
        url = fresh_postgres(POSTGRES_URL, "launcher")
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('launcher-db') / 'balsam.db'}"
    srv = Server(url)
    yield srv
    srv.close()


class Site:
    """A site with a folder (data/, apps/) on disk and helpers to create apps and jobs."""

    def __init__(self, server: Server, path: Path) -> None:
        self.server = server
        self.path = path
        (path / "apps").mkdir(parents=True, exist_ok=True)
        (path / "data").mkdir(exist_ok=True)
        self.site = server.call(server.sites.CreateSite, site_service_pb2.CreateSiteRequest(
            site=site_pb2.Site(name=f"site-{secrets.token_hex(4)}", hostname="localhost", path=str(path)))).site
        self.id = self.site.id
        (path / "settings.yml").write_text(f"site_id: {self.id}\n")

    def app(self, name: str, command_template: str = "", params: tuple[str, ...] = (), **kw: Any) -> app_pb2.App:
        app = app_pb2.App(site_id=self.id, name=name, command_template=command_template,
                          parameters=[app_pb2.AppParameter(name=p, required=True) for p in params], **kw)
        return self.server.call(self.server.apps.CreateApp, app_service_pb2.CreateAppRequest(app=app)).app

    def jobs(self, app: app_pb2.App, n: int = 1, **kw: Any) -> list[job_pb2.Job]:
        resources = kw.pop("resources", None)
        out = []
        for i in range(n):
            j = job_pb2.Job(app_id=app.id, workdir=f"{app.name}/{secrets.token_hex(4)}-{i}", **kw)
            if resources is not None:
                j.resources.CopyFrom(job_pb2.JobResources(**resources))
            out.append(j)
        return list(self.server.call(self.server.jobs.BatchCreateJobs,
                                     job_service_pb2.BatchCreateJobsRequest(jobs=out)).jobs)

    def get(self, job_id: int) -> job_pb2.Job:
        return self.server.call(self.server.jobs.GetJob, job_service_pb2.GetJobRequest(id=job_id)).job

    def states(self, ids: list[int]) -> dict[int, int]:
        got = self.server.call(self.server.jobs.ListJobs, job_service_pb2.ListJobsRequest(
            filter=job_pb2.JobFilter(ids=ids), page_size=len(ids) + 1)).jobs
        return {j.id: j.state for j in got}

    def wait_states(self, ids: list[int], want: set[int] | int, timeout: float = WAIT,
                    proc: subprocess.Popen | None = None) -> dict[int, int]:
        want = {want} if isinstance(want, int) else want
        deadline = time.monotonic() + timeout
        states: dict[int, int] = {}
        while time.monotonic() < deadline:
            states = self.states(ids)
            if all(states.get(i) in want for i in ids):
                return states
            time.sleep(0.1)
        names = {i: S.JobState.Name(s) for i, s in states.items()}
        extra = ""
        if proc is not None and proc.poll() is not None:
            extra = f"; launcher exited with {proc.returncode}"
            log_path = getattr(proc, "log_path", None)
            if log_path is not None:
                extra += "; launcher log:\n" + Path(log_path).read_text(errors="replace")[-3000:]
        raise AssertionError(f"jobs did not reach {[S.JobState.Name(w) for w in want]}: {names}{extra}")

    def events_of(self, job_id: int) -> list[tuple[str, str]]:
        from balsam_grpc.v1 import event_service_pb2

        got = self.server.call(self.server.events.ListEvents, event_service_pb2.ListEventsRequest(
            filter=event_service_pb2.EventFilter(job_ids=[job_id]), page_size=1000))
        pairs = []
        for e in got.events:
            if e.WhichOneof("change") != "job_state":
                continue
            # The server records automatic steps in one event, with the states passed in data["via"].
            path = [S.JobState.Name(e.job_state.from_state).removeprefix("JOB_STATE_")]
            path += [str(v).removeprefix("JOB_STATE_") for v in (e.data["via"] if "via" in e.data else [])]
            path.append(S.JobState.Name(e.job_state.to_state).removeprefix("JOB_STATE_"))
            pairs += list(itertools.pairwise(path))
        return pairs


@pytest.fixture
def site(server: Server, tmp_path: Path) -> Site:
    return Site(server, tmp_path / "site")


class Launcher:
    """A launcher started as a real process (optionally under mpiexec)."""

    def __init__(self, site: Site, *args: str, ranks: int = 0, log_path: Path | None = None,
                 server_address: str = "") -> None:
        env = dict(os.environ)
        env.update(BALSAM_SERVER=server_address or site.server.address, BALSAM_TOKEN=site.server.token,
                   PATH=f"{VENV_BIN}:{env.get('PATH', '')}", PYTHONPATH=str(REPO), BALSAM_LOG_LEVEL="INFO")
        argv = [sys.executable, "-m", "balsam_grpc.launcher", "--site-dir", str(site.path), "--progress-interval",
                "1", *args]
        if ranks:
            argv = [str(VENV_BIN / "mpiexec"), "-n", str(ranks), *argv]
        self.log_path = log_path or site.path / f"launcher-{secrets.token_hex(3)}.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=site.path, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.proc.log_path = self.log_path  # type: ignore[attr-defined]

    def wait(self, timeout: float = WAIT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"launcher did not exit within {timeout} s; log:\n{self.text()[-4000:]}") from None

    def text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(10)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        self.log.close()


@pytest.fixture
def launchers() -> Iterator[list[Launcher]]:
    started: list[Launcher] = []
    yield started
    for launcher in started:
        launcher.stop()
