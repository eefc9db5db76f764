"""What the store guarantees below every RPC: ids are never handed out twice (issue 13
item 8), also on a database migrated from before revision 0005 with data in it; SQLite
savepoints nest inside their transaction (issue 12 item 1); the database files and what
the server writes under BALSAM_HOME are owner-only (issue 12 item 6)."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import DateTime, MetaData, Table, bindparam, func, insert, inspect, select, text

from balsam_grpc.core.errors import ResourceExhausted
from balsam_grpc.server.store import migrate, tables
from balsam_grpc.server.store.db import Database, make_engine
from balsam_grpc.server.store.driver import driver_executemany, driver_rows, driver_statement
from balsam_grpc.server.store.tables import (
    apps,
    batch_jobs,
    events,
    job_parents,
    jobs,
    sites,
    transfer_items,
    users,
)
from balsam_grpc.v1 import (
    app_service_pb2,
    app_service_pb2_grpc,
    job_pb2,
    job_service_pb2,
    site_service_pb2,
    site_service_pb2_grpc,
)
from tests.conftest import POSTGRES_URL, Harness, database_params
from tests.support.records import jobs_stub, make_site_app
from tests.support.databases import drop_postgres, fresh_postgres
from tests.support.server_proc import REPO


@pytest.mark.edge("delete a job, create the next", "a new id, never a deleted one")
def test_deleted_ids_are_never_handed_out_again(alice):
    site, app = make_site_app(alice)
    stub = jobs_stub(alice)

    def job(workdir: str) -> job_pb2.Job:
        return job_pb2.Job(app_id=app.id, workdir=workdir, parameters={"x": "1"})

    newest = stub.CreateJob(job_service_pb2.CreateJobRequest(job=job("a"))).job.id
    stub.DeleteJob(job_service_pb2.DeleteJobRequest(id=newest))
    again = stub.CreateJob(job_service_pb2.CreateJobRequest(job=job("b"))).job.id
    assert again > newest
    batch = stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[job(f"c{i}") for i in range(3)])).jobs
    stub.DeleteJob(job_service_pb2.DeleteJobRequest(id=batch[-1].id))
    after = stub.BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[job("d")])).jobs
    assert after[0].id > batch[-1].id

    apps_stub = alice.stub(app_service_pb2_grpc.AppServiceStub)
    apps_stub.DeleteApp(app_service_pb2.DeleteAppRequest(id=app.id, force=True))
    other_site, other_app = make_site_app(alice)
    assert other_app.id > app.id
    sites_stub = alice.stub(site_service_pb2_grpc.SiteServiceStub)
    sites_stub.DeleteSite(site_service_pb2.DeleteSiteRequest(id=other_site.id))
    assert make_site_app(alice)[0].id > other_site.id


def _as_on_disk(conn: Any, table: Table) -> Table:
    """`table` with only the columns the database has (later revisions add columns)."""
    present = {c["name"] for c in inspect(conn).get_columns(table.name)}
    return Table(table.name, MetaData(), *(c._copy() for c in table.columns if c.name in present))


def _fill_before_0005(url: str) -> dict[str, int]:
    """A database at revision 0004 (the one before 0005) with a little of everything; the
    newest job, batch job and site deleted (their ids only in the event log). Returns the
    highest id each table ever had."""
    now = datetime.now(UTC)
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            users, sites, apps, batch_jobs, jobs, job_parents, transfer_items, events = (
                _as_on_disk(conn, t) for t in (
                    tables.users, tables.sites, tables.apps, tables.batch_jobs, tables.jobs, tables.job_parents,
                    tables.transfer_items, tables.events))
            conn.execute(insert(users), [{"username": "u", "password_hash": "x", "create_time": now}])
            conn.execute(insert(sites), [{"owner_id": 1, "name": f"s{i}", "create_time": now, "update_time": now}
                                         for i in (1, 2)])
            conn.execute(insert(apps), [{"owner_id": 1, "site_id": 1, "name": "a", "create_time": now,
                                         "update_time": now}])
            conn.execute(insert(batch_jobs), [{"owner_id": 1, "site_id": 1, "num_nodes": 1, "wall_time_min": 5,
                                               "state": "FINISHED", "create_time": now, "update_time": now}
                                              for _ in (1, 2)])
            conn.execute(insert(jobs), [{"owner_id": 1, "site_id": 1, "app_id": 1, "workdir": f"w{i}",
                                         "state": "JOB_FINISHED", "create_time": now, "update_time": now,
                                         "state_time": now, "batch_job_id": 1} for i in (1, 2, 3)])
            conn.execute(insert(job_parents), [{"child_id": 2, "parent_id": 1}])
            conn.execute(insert(transfer_items), [{"owner_id": 1, "site_id": 1, "job_id": 2, "direction": "IN",
                                                   "slot": "in", "location_alias": "here", "remote_path": "/x",
                                                   "local_path": "x", "state": "DONE", "create_time": now,
                                                   "update_time": now}])
            conn.execute(insert(events), [
                *({"owner_id": 1, "site_id": 1, "job_id": j, "subject_id": None, "kind": "job_state",
                   "to_state": "READY", "time": now} for j in (1, 2, 3)),
                {"owner_id": 1, "site_id": 2, "job_id": None, "subject_id": 2, "kind": "batch_job_state",
                 "to_state": "QUEUED", "time": now},
                {"owner_id": 1, "site_id": 1, "job_id": None, "subject_id": 1, "kind": "transfer_state",
                 "to_state": "DONE", "time": now}])
            conn.execute(jobs.delete().where(jobs.c.id == 3))
            conn.execute(batch_jobs.delete().where(batch_jobs.c.id == 2))
            conn.execute(sites.delete().where(sites.c.id == 2))
    finally:
        engine.dispose()
    return {"jobs": 3, "batch_jobs": 2, "sites": 2, "transfer_items": 1, "events": 5, "users": 1, "apps": 1}


def _counts(url: str) -> dict[str, int]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return {t.name: conn.execute(select(func.count()).select_from(t)).scalar_one()
                    for t in (users, sites, apps, batch_jobs, jobs, job_parents, transfer_items, events)}
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", database_params())
def test_migration_keeps_the_data_and_ends_id_reuse(backend: str, tmp_path: Path) -> None:
    if backend == "postgres":
        url = fresh_postgres(POSTGRES_URL, f"ids_{secrets.token_hex(3)}")
    else:
        url = f"sqlite:///{tmp_path / 'old.db'}"
    try:
        assert migrate.upgrade(url, "0004") == "0004"
        highest = _fill_before_0005(url)
        before = _counts(url)
        assert migrate.upgrade(url) == migrate.head_revision()
        assert _counts(url) == before  # nothing lost, nothing cascaded
        harness = Harness(backend, url)
        try:
            caller = harness.user("u")  # the user of the old rows
            assert caller.user_id == 1
            site, app = make_site_app(caller)
            assert site.id > highest["sites"]
            created = jobs_stub(caller).BatchCreateJobs(job_service_pb2.BatchCreateJobsRequest(jobs=[
                job_pb2.Job(app_id=app.id, workdir="new", parameters={"x": "1"})])).jobs
            assert created[0].id > highest["jobs"]
            with harness.db.engine.connect() as conn:
                parents = conn.execute(select(job_parents.c.parent_id).where(job_parents.c.child_id == 2)).all()
                assert [p.parent_id for p in parents] == [1]
                assert conn.execute(select(jobs.c.batch_job_id).where(jobs.c.id == 1)).scalar_one() == 1
                if backend == "sqlite":
                    indexes = set(conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'index'")).scalars())
                    assert {"ix_jobs_session_id", "ix_jobs_lease_order", "ix_jobs_cleanup_due"} <= indexes
                    sequences = dict(conn.execute(text("SELECT name, seq FROM sqlite_sequence")).all())
                    for table in ("batch_jobs", "transfer_items", "users", "apps"):
                        assert sequences[table] >= highest[table], table
        finally:
            harness.close()
    finally:
        if backend == "postgres":
            drop_postgres(url)


@pytest.mark.edge("SQLite: a savepoint released, then its transaction fails",
                  "the savepoint's rows roll back with it (nested transactions really nest)")
def test_sqlite_savepoint_nests_inside_its_transaction(tmp_path: Path) -> None:
    """A savepoint released before the transaction's first other write commits nothing
    by itself: when the transaction rolls back, the savepoint's rows go with it."""
    db = Database(f"sqlite:///{tmp_path / 'nest.db'}", workers=1)
    try:
        migrate.upgrade(db.url)
        now = datetime.now(UTC)

        def work(conn) -> None:  # type: ignore[no-untyped-def]
            with conn.begin_nested():
                conn.execute(insert(users).values(username="inner", password_hash="x", create_time=now))
            raise RuntimeError("the transaction fails after its savepoint was released")

        with pytest.raises(RuntimeError):
            db.write_sync(work)
        assert db.read_sync(lambda conn: conn.execute(select(users.c.username)).all()) == []
    finally:
        db.dispose()


def test_transaction_sqlite_rolled_back_itself_runs_and_commits_nothing_more(tmp_path: Path) -> None:
    """SQLITE_FULL (here from a page limit) rolls back the whole transaction: code that
    catches the error (as a per-item savepoint does) cannot go on writing outside any
    transaction, and the write answers STORAGE_FULL having written nothing."""
    db = Database(f"sqlite:///{tmp_path / 'full.db'}", workers=1)
    try:
        migrate.upgrade(db.url)
        now = datetime.now(UTC)

        def work(conn) -> None:  # type: ignore[no-untyped-def]
            conn.execute(insert(users).values(username="first", password_hash="x", create_time=now))
            pages = conn.exec_driver_sql("PRAGMA page_count").scalar_one()
            conn.exec_driver_sql(f"PRAGMA max_page_count = {pages + 2}")
            with contextlib.suppress(Exception), conn.begin_nested():
                conn.execute(insert(users), [{"username": f"u{i}", "password_hash": "x" * 200, "create_time": now}
                                             for i in range(2000)])
            conn.execute(insert(users).values(username="after", password_hash="x", create_time=now))

        with pytest.raises(ResourceExhausted) as refused:
            db.write_sync(work)
        assert refused.value.reason == "STORAGE_FULL" and str(tmp_path / "full.db") in refused.value.message
        assert db.read_sync(lambda conn: conn.execute(select(users.c.username)).all()) == []
    finally:
        db.dispose()


def test_transaction_sqlite_rolled_back_itself_runs_no_driver_statement_more(tmp_path: Path) -> None:
    """As above, with the statements on the driver's cursor (store.driver, the launcher
    report path): the error that rolled the transaction back is noted, the next
    statement is refused instead of committing on its own, and nothing is written."""
    db = Database(f"sqlite:///{tmp_path / 'full.db'}", workers=1)
    try:
        migrate.upgrade(db.url)
        now = datetime.now(UTC)
        add = driver_statement(("test", "add_user"), lambda: insert(users).values(
            username=bindparam("name"), password_hash=bindparam("hash"), admin=False,
            create_time=bindparam("at", type_=DateTime())),
            db.engine.dialect)

        def work(conn) -> None:  # type: ignore[no-untyped-def]
            driver_rows(conn, add, {"name": "first", "hash": "x", "at": now})
            pages = conn.exec_driver_sql("PRAGMA page_count").scalar_one()
            conn.exec_driver_sql(f"PRAGMA max_page_count = {pages + 2}")
            with contextlib.suppress(Exception), conn.begin_nested():
                driver_executemany(conn, add, [{"name": f"u{i}", "hash": "x" * 200, "at": now} for i in range(2000)])
            driver_rows(conn, add, {"name": "after", "hash": "x", "at": now})

        with pytest.raises(ResourceExhausted) as refused:
            db.write_sync(work)
        assert refused.value.reason == "STORAGE_FULL"
        assert db.read_sync(lambda conn: conn.execute(select(users.c.username)).all()) == []
    finally:
        db.dispose()


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.edge("SQLite database, WAL and SHM files under umask 022", "0600, their folder 0700")
def test_sqlite_files_are_owner_only_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        db = Database(f"sqlite:///{tmp_path / 'new' / 'balsam.db'}", workers=1)
        try:
            migrate.upgrade(db.url)
            db.write_sync(lambda conn: conn.execute(insert(users).values(
                username="m", password_hash="x", create_time=datetime.now(UTC))))
            files = {p.name: _mode(p) for p in (tmp_path / "new").iterdir()}
        finally:
            db.dispose()
        # An older version's world-readable database is narrowed when it is opened.
        legacy = tmp_path / "legacy.db"
        legacy.touch(mode=0o644)
        make_engine(f"sqlite:///{legacy}").dispose()
        legacy_mode = _mode(legacy)
    finally:
        os.umask(old)
    assert {"balsam.db", "balsam.db-wal", "balsam.db-shm"} <= set(files)
    assert files == dict.fromkeys(files, 0o600), files
    assert _mode(tmp_path / "new") == 0o700
    assert legacy_mode == 0o600


def test_server_writes_balsam_home_owner_only(tmp_path: Path) -> None:
    """`python -m balsam_grpc.server --migrate-only` under umask 022: BALSAM_HOME, the
    database directory and the database are created owner-only by the server itself."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALSAM_")}
    env["BALSAM_HOME"] = str(home)
    database = home / "db" / "balsam.db"
    subprocess.run(["sh", "-c", 'umask 022 && exec "$0" -m balsam_grpc.server --migrate-only --database "$1"',
                    sys.executable, f"sqlite:///{database}"], cwd=REPO, env=env, check=True, capture_output=True,
                   timeout=120)
    assert (_mode(home), _mode(database.parent), _mode(database)) == (0o700, 0o700, 0o600)
