"""Shared fixtures: an in-process server on 127.0.0.1:0 per database backend, and users
with tokens to call it through the generated stubs."""

from __future__ import annotations

import functools
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog

_HOME = tempfile.mkdtemp(prefix="balsam-test-home-")
os.environ["BALSAM_HOME"] = _HOME  # never touch the developer's real profile or database
os.environ.pop("BALSAM_SERVER", None)
os.environ.pop("BALSAM_TOKEN", None)


def _database_of_this_worker() -> None:
    """Under pytest-xdist (scripts/run_tests.sh runs two workers), each worker takes a
    PostgreSQL database of its own, `<shared name>_<worker>`: the session harness resets
    its schema, and every database a test makes is named after it, so two workers never
    share one. Set in the environment before any test module reads it; once per process
    (test modules that import `tests.conftest` run this file a second time)."""
    worker, url = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("BALSAM_TEST_DATABASE_URL")
    if not worker or not url or os.environ.get("BALSAM_TEST_WORKER") == worker:
        return
    from tests.support.databases import fresh_postgres

    os.environ["BALSAM_TEST_DATABASE_URL"] = fresh_postgres(url, worker)
    os.environ["BALSAM_TEST_WORKER"] = worker


_database_of_this_worker()
POSTGRES_URL = os.environ.get("BALSAM_TEST_DATABASE_URL", "")

# The edge-probe table (issue 12) printed at the end of a run.
pytest_plugins = ["tests.support.edge_table"]

# In-process servers and daemons log with structlog, which prints to stdout by default:
# lines from their background threads landed between pytest's dots. Through stdlib
# logging instead, pytest captures them per test and shows them only with a failure.
logging.getLogger().setLevel(logging.INFO)
structlog.configure(
    processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True), structlog.processors.format_exc_info,
                structlog.dev.ConsoleRenderer(colors=False)],
    wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
    logger_factory=structlog.stdlib.LoggerFactory(),
)


def database_params() -> list[Any]:
    pg_skip = pytest.mark.skipif(
        not POSTGRES_URL, reason="BALSAM_TEST_DATABASE_URL not set (CI sets it; scripts/run_tests.sh does too)")
    return [pytest.param("sqlite", id="sqlite"), pytest.param("postgres", id="postgres", marks=pg_skip)]


def _reset_postgres(url: str) -> None:
    from sqlalchemy import text

    from balsam_grpc.server.store.db import make_engine

    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


@functools.cache
def harness_password_hash() -> str:
    """The stored hash of "correct horse battery", every harness user's password. It is
    computed once: a scrypt per user (~50 ms of CPU; the tests make hundreds of users)
    proved nothing the one does not; tests that log in with the password still can."""
    from balsam_grpc.server.auth import hash_password

    return hash_password("correct horse battery")


@dataclass
class Caller:
    """A user and a token, with stubs bound to them."""

    harness: Harness
    user_id: int
    username: str
    token: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)

    def stub(self, stub_cls: type) -> Any:
        return _AuthStub(stub_cls(self.harness.channel), self.metadata)


class _AuthStub:
    """Wraps a generated stub so every call carries the caller's token."""

    def __init__(self, stub: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        self._stub = stub
        self._metadata = metadata

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)

        def call(request: Any, **kw: Any) -> Any:
            kw.setdefault("metadata", self._metadata)
            kw.setdefault("timeout", 60)
            return method(request, **kw)

        call.with_call = lambda request, **kw: method.with_call(request, metadata=self._metadata, **kw)  # type: ignore[attr-defined]
        return call


class Harness:
    def __init__(self, backend: str, url: str) -> None:
        from balsam_grpc.server.embedded import EmbeddedServer
        from balsam_grpc.server.state import ServerSettings

        self.backend = backend
        self.url = url
        self.embedded = EmbeddedServer(ServerSettings(address="127.0.0.1:0", database_url=url, grace_seconds=0.5))
        self.server = self.embedded.server
        self.port = self.embedded.port
        self.address = self.embedded.address
        self.channel = grpc.insecure_channel(self.address)

    @property
    def db(self) -> Any:
        return self.server.db

    def user(self, name: str | None = None, *, scope: str = "USER", site_id: int | None = None,
             admin: bool = False, ttl: timedelta = timedelta(hours=1)) -> Caller:
        from balsam_grpc.server.convert import utcnow
        from balsam_grpc.server.store import users as user_store

        name = name or f"user-{secrets.token_hex(4)}"

        def work(conn: Any) -> tuple[int, str]:
            user = user_store.get_user_by_name(conn, name) or user_store.create_user(
                conn, name, harness_password_hash(), admin=admin, now=utcnow())
            secret, _ = user_store.issue_token(conn, user["id"], scope=scope, site_id=site_id, ttl=ttl,
                                               description="test", now=utcnow())
            return user["id"], secret

        user_id, token = self.db.write_sync(work)
        return Caller(self, user_id, name, token)

    def close(self) -> None:
        self.channel.close()
        self.embedded.stop()


@pytest.fixture(scope="session", params=database_params())
def harness(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    if request.param == "postgres":
        _reset_postgres(POSTGRES_URL)
        url = POSTGRES_URL
    else:
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'balsam.db'}"
    h = Harness(request.param, url)
    yield h
    h.close()


@pytest.fixture(scope="session")
def cli_forker() -> Any:
    """`balsamctl` forked from a process that has imported it (tests/support/cli_fork.py):
    half a second of CPU less per command. Streaming commands (popen) and the tests of
    the console script itself still start `balsamctl` as a program."""
    from tests.support.cli_fork import shared_cli_forker

    return shared_cli_forker()


@pytest.fixture
def alice(harness: Harness) -> Caller:
    return harness.user()


@pytest.fixture
def bob(harness: Harness) -> Caller:
    return harness.user()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Drop the databases tests made for themselves (fixtures of module scope that leave
    theirs to the end); a test run leaves only the shared one, which run_tests.sh drops."""
    from tests.support.databases import drop_created

    drop_created()


# What an MPICH process removes only when it exits, left by the ones tests kill -9 (a
# launcher's mpiexec and ranks): mpiexec's topology file (in /tmp, whatever TMPDIR says)
# and a rank's shared-memory segment.
MPICH_DEBRIS = (("/tmp", "hydra_hwloc_xmlfile_*"), ("/dev/shm", "mpich_shm_*"))


def _mpich_debris() -> set[Path]:
    return {path for folder, pattern in MPICH_DEBRIS for path in Path(folder).glob(pattern)}


def _controls_the_run(config: pytest.Config) -> bool:
    return not hasattr(config, "workerinput")  # not a pytest-xdist worker


# Test files that must run on one pytest-xdist worker, one after another: the install
# tests share one build of the wheel (two builds at once in the same source tree fail),
# the real-Slurm tests share one Slurm. By path, because the controller sees only node
# ids: pytest-xdist's xdist_group mark worked by appending "@group" to a test's node id,
# and since pytest 9.2 (which derives node ids afresh) that rewrite changes nothing, so
# the marked files were handed to different workers.
SHARED_WORKER = {
    "install": ("tests/install/",),
    "slurm": ("tests/site/test_slurm_real.py", "tests/site/test_daemon_slurm.py"),
}


def work_unit(nodeid: str) -> str:
    """What goes to one worker whole: the SHARED_WORKER group of the test's file, or else
    its file (module-scoped servers, and the XPCS demo's run, are made once)."""
    path = nodeid.split("::", 1)[0]
    for group, prefixes in SHARED_WORKER.items():
        if path.startswith(prefixes):
            return group
    return path


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, which a run may leave out (-p no:xdist)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """Under pytest-xdist, each work_unit goes to one worker whole."""
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

        def _assign_work_unit(self, node: Any) -> None:
            # xdist hands out the units with the most tests first; these few tests take a
            # minute or more each and, handed out last, left one worker idle at the end.
            for scope in reversed(STARTS_FIRST):
                if scope in self.workqueue:
                    self.workqueue.move_to_end(scope, last=False)
            super()._assign_work_unit(node)

    return ByWorkUnit(config, log)


# Work units of a minute or more: under pytest-xdist they start first, so that the run
# does not end waiting on one of them alone (the system-MPI and client installs build a
# wheel and two venvs; the XPCS demo runs twice).
STARTS_FIRST = ("install", "tests/e2e/test_xpcs_demo.py")


_DEBRIS_BEFORE = pytest.StashKey[set[Path]]()


def pytest_configure(config: pytest.Config) -> None:
    if _controls_the_run(config):
        config.stash[_DEBRIS_BEFORE] = _mpich_debris()


def pytest_unconfigure(config: pytest.Config) -> None:
    """The run's BALSAM_HOME goes with it (every run made one in /tmp and left it there).
    The last hook, in the pytest process only: forked servers never run it. Test modules
    that import `tests.conftest` run this file a second time, which made a second home
    and pointed BALSAM_HOME at it: both go. Once every worker is done, so are the MPICH
    files the run left."""
    for home in {_HOME, os.environ.get("BALSAM_HOME", "")}:
        if os.path.basename(home).startswith("balsam-test-home-"):
            shutil.rmtree(home, ignore_errors=True)
    if _DEBRIS_BEFORE in config.stash:
        for path in _mpich_debris() - config.stash[_DEBRIS_BEFORE]:
            path.unlink(missing_ok=True)
