"""jobs.app_id has no foreign key on PostgreSQL (revision 0011): a create reads its apps
FOR KEY SHARE instead, and a trigger on apps deletes a deleted app's jobs. An app
deleted while a create of its jobs is under way must not leave jobs behind that point
at no app: the delete waits for the create and then takes its jobs along."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import delete, func, select

from balsam_grpc.server.convert import utcnow
from balsam_grpc.server.services.jobs import _DEFAULT_RESOURCES
from balsam_grpc.server.store import jobs as job_store
from balsam_grpc.server.store.tables import apps, jobs
from tests.support.records import make_site_app


def spec(app_id: int, workdir: str) -> dict:
    return {"name": "", "app_id": app_id, "app_name": "", "site_id": 0, "workdir": workdir, "tags": {},
            "parameters": {"x": "1"}, "data": {}, "parent_ids": [], "transfers": {}, "priority": 0,
            "on_parent_failure": "FAIL", **_DEFAULT_RESOURCES, "launch_params": {}}


@pytest.mark.parametrize("size", [3, 100])  # one INSERT, or COPY
def test_an_app_deleted_during_a_create_takes_the_new_jobs_along(harness, alice, size):
    if harness.backend != "postgres":
        pytest.skip("SQLite has one writer: a create and a delete cannot overlap")
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
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(jobs).where(jobs.c.app_id == app.id)).scalar_one() == 0
