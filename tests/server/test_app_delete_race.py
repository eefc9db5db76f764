"""jobs.app_id has no foreign key on PostgreSQL (revision 0011): a statement trigger on
jobs checks and locks the new jobs' apps FOR KEY SHARE once per INSERT, and a trigger on
apps deletes a deleted app's jobs. No job may be left pointing at no app: an app deleted
while a create of its jobs is under way waits for it and takes the new jobs along; one
deleted (and committed) after the create read it fails the create; an INSERT naming no
app is refused as the key refused it."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import delete, func, select, text
from sqlalchemy.exc import IntegrityError

from balsam_grpc.server.convert import utcnow
from balsam_grpc.server.services.jobs import _DEFAULT_RESOURCES
from balsam_grpc.server.store import jobs as job_store
from balsam_grpc.server.store.tables import apps, jobs
from tests.support.records import make_site_app


@pytest.fixture(autouse=True)
def postgres_only(harness) -> None:
    if harness.backend != "postgres":
        pytest.skip("SQLite keeps the foreign key, and has one writer")


def spec(app_id: int, workdir: str) -> dict:
    return {"name": "", "app_id": app_id, "app_name": "", "site_id": 0, "workdir": workdir, "tags": {},
            "parameters": {"x": "1"}, "data": {}, "parent_ids": [], "transfers": {}, "priority": 0,
            "on_parent_failure": "FAIL", **_DEFAULT_RESOURCES, "launch_params": {}}


def jobs_of(engine, app_id: int) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(jobs).where(jobs.c.app_id == app_id)).scalar_one()


@pytest.mark.parametrize("size", [3, 100])  # one INSERT, or COPY
def test_an_app_deleted_during_a_create_takes_the_new_jobs_along(harness, alice, size):
    _, app = make_site_app(alice)
    engine = harness.db.engine
    created = threading.Event()
    deleted: list[float] = []

    def delete_app() -> None:
        created.wait(10)
        with engine.begin() as conn:
            conn.execute(delete(apps).where(apps.c.id == app.id))
        deleted.append(time.monotonic())

    deleter = threading.Thread(target=delete_app)
    deleter.start()
    with engine.begin() as conn:
        job_store.create_jobs(conn, alice.user_id, None, [spec(app.id, f"race/{i}") for i in range(size)], utcnow())
        created.set()
        time.sleep(0.5)  # the delete is waiting for this transaction now
        assert not deleted
        committed = time.monotonic()
    deleter.join(10)
    assert deleted and deleted[0] >= committed
    assert jobs_of(engine, app.id) == 0


@pytest.mark.parametrize("size", [3, 100])
def test_an_app_deleted_after_the_create_read_it_fails_the_create(harness, alice, size, monkeypatch):
    _, app = make_site_app(alice)
    engine = harness.db.engine
    read = job_store._lookups

    def read_then_lose_the_app(*args, **kwargs):
        found = read(*args, **kwargs)
        with engine.begin() as other:
            other.execute(delete(apps).where(apps.c.id == app.id))
        return found

    monkeypatch.setattr(job_store, "_lookups", read_then_lose_the_app)
    import psycopg

    with pytest.raises((IntegrityError, psycopg.errors.ForeignKeyViolation)), engine.begin() as conn:
        job_store.create_jobs(conn, alice.user_id, None, [spec(app.id, f"late/{i}") for i in range(size)], utcnow())
    assert jobs_of(engine, app.id) == 0


def test_an_insert_naming_no_app_is_refused(harness, alice):
    site, app = make_site_app(alice)
    with pytest.raises(IntegrityError, match="no such app"), harness.db.engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO jobs (owner_id, site_id, app_id, name, workdir, tags, parameters, data, transfers, "
            "num_nodes, ranks_per_node, threads_per_rank, threads_per_core, gpus_per_rank, node_packing_count, "
            "wall_time_min, launch_params, priority, state, state_message, error_tail, lease_generation, "
            "on_parent_failure, run_count, pending_parents, parent_ids, create_time, update_time, state_time) "
            "SELECT :owner, :site, id, '', 'w' || id, '{}', '{}', '{}', '{}', 1, 1, 1, 1, 0, 1, 0, '{}', 0, 'READY', "
            "'', '', 0, 'FAIL', 0, 0, '[]', now(), now(), now() FROM (VALUES (:app), (:app + 100000)) AS v(id)"),
            {"owner": alice.user_id, "site": site.id, "app": app.id})
