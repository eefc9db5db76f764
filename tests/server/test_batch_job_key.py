"""jobs.batch_job_id has no foreign key on PostgreSQL (revision 0013): row triggers check
a job that names a batch job (but those a lease links to the batch job it locked itself,
revision 0015), and a trigger on batch_jobs clears a deleted batch job from its jobs. A
job without one (every new job) queues no check at all."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import insert, select, text, update
from sqlalchemy.exc import IntegrityError, OperationalError

from balsam_grpc.server.convert import utcnow
from balsam_grpc.server.store import jobs as job_store
from balsam_grpc.server.store import leases
from balsam_grpc.server.store import sessions as session_store
from balsam_grpc.server.store.tables import batch_jobs, jobs
from tests.server.test_app_delete_race import spec
from tests.support.records import make_site_app


@pytest.fixture(autouse=True)
def postgres_only(harness) -> None:
    if harness.backend != "postgres":
        pytest.skip("SQLite keeps the foreign key")


def new_batch_job(conn, owner_id: int, site_id: int) -> int:
    now = utcnow()
    return conn.execute(insert(batch_jobs).values(
        owner_id=owner_id, site_id=site_id, num_nodes=1, wall_time_min=10, state="QUEUED", partitions=[],
        filter_tags={}, optional_params={}, create_time=now, update_time=now).returning(batch_jobs.c.id)).scalar_one()


def new_jobs(conn, owner_id: int, app_id: int, n: int, prefix: str) -> list[int]:
    rows = job_store.create_jobs(conn, owner_id, None, [spec(app_id, f"{prefix}/{i}") for i in range(n)], utcnow())
    return [r["id"] for r in rows]


def test_inserting_jobs_without_a_batch_job_fires_no_trigger_per_job(harness, alice):
    """The foreign key queued a check per inserted job and found its NULL only then."""
    site, app = make_site_app(alice)
    with harness.db.engine.connect() as conn, conn.begin():
        plan = conn.execute(text(
            "EXPLAIN (ANALYZE, TIMING OFF, COSTS OFF) INSERT INTO jobs (owner_id, site_id, app_id, workdir, tags, "
            "parameters, state, create_time, update_time, state_time) SELECT :owner, :site, :app, 'noq/' || g, '{}', "
            "'{}', 'READY', now(), now(), now() FROM generate_series(1, 50) AS g"),
            {"owner": alice.user_id, "site": site.id, "app": app.id}).scalars().all()
        conn.rollback()
    fired = [line for line in plan if line.startswith("Trigger")]
    assert fired and all("calls=1" in line for line in fired), plan


def test_a_job_naming_no_batch_job_is_refused(harness, alice):
    site, app = make_site_app(alice)
    engine = harness.db.engine

    def insert_job(conn, workdir, batch_job_id):
        conn.execute(text(
            "INSERT INTO jobs (owner_id, site_id, app_id, workdir, tags, parameters, state, create_time, update_time, "
            "state_time, batch_job_id) VALUES (:owner, :site, :app, :workdir, '{}', '{}', 'READY', now(), now(), "
            "now(), :bj)"), {"owner": alice.user_id, "site": site.id, "app": app.id, "workdir": workdir,
                             "bj": batch_job_id})

    with engine.begin() as conn:
        (job_id,) = new_jobs(conn, alice.user_id, app.id, 1, "refused")
        batch_job_id = new_batch_job(conn, alice.user_id, site.id)
    with pytest.raises(IntegrityError, match="no such batch job"), engine.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(batch_job_id=batch_job_id + 100000))
    with pytest.raises(IntegrityError, match="no such batch job"), engine.begin() as conn:
        insert_job(conn, "refused/x", batch_job_id + 100000)
    with engine.begin() as conn:  # an existing one is taken, by UPDATE and by INSERT
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(batch_job_id=batch_job_id))
        insert_job(conn, "taken/x", batch_job_id)
        linked = conn.execute(select(jobs.c.id).where(jobs.c.batch_job_id == batch_job_id)).scalars().all()
    assert len(linked) == 2 and job_id in linked


def test_a_deleted_batch_job_is_cleared_from_its_jobs(harness, alice):
    site, app = make_site_app(alice)
    engine = harness.db.engine
    with engine.begin() as conn:
        ids = new_jobs(conn, alice.user_id, app.id, 3, "cleared")
        gone, kept = new_batch_job(conn, alice.user_id, site.id), new_batch_job(conn, alice.user_id, site.id)
        conn.execute(update(jobs).where(jobs.c.id.in_(ids[:2])).values(batch_job_id=gone))
        conn.execute(update(jobs).where(jobs.c.id == ids[2]).values(batch_job_id=kept))
    with engine.begin() as conn:
        conn.execute(batch_jobs.delete().where(batch_jobs.c.id == gone))
    with engine.connect() as conn:
        got = dict(conn.execute(select(jobs.c.id, jobs.c.batch_job_id).where(jobs.c.id.in_(ids))).all())
    assert got == {ids[0]: None, ids[1]: None, ids[2]: kept}


def test_a_batch_job_deleted_while_a_job_is_being_linked_to_it_waits_and_clears_it(harness, alice):
    site, app = make_site_app(alice)
    engine = harness.db.engine
    with engine.begin() as conn:
        (job_id,) = new_jobs(conn, alice.user_id, app.id, 1, "race")
        batch_job_id = new_batch_job(conn, alice.user_id, site.id)
    linked = threading.Event()
    deleted: list[float] = []

    def delete_batch_job() -> None:
        linked.wait(10)
        with engine.begin() as conn:
            conn.execute(batch_jobs.delete().where(batch_jobs.c.id == batch_job_id))
        deleted.append(time.monotonic())

    deleter = threading.Thread(target=delete_batch_job)
    deleter.start()
    with engine.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(batch_job_id=batch_job_id))
        linked.set()
        time.sleep(0.5)  # the delete waits for this transaction's lock on the batch job
        assert not deleted
        committed = time.monotonic()
    deleter.join(10)
    assert deleted and deleted[0] >= committed
    with engine.connect() as conn:
        assert conn.execute(select(jobs.c.batch_job_id).where(jobs.c.id == job_id)).scalar_one() is None


def _check_calls(conn) -> int:
    """Calls of the per-row batch-job check in this transaction (track_functions on)."""
    return conn.execute(text(
        "SELECT coalesce(pg_stat_get_xact_function_calls('balsam_jobs_batch_job_exists'::regproc), 0)")).scalar_one()


def test_a_lease_locks_its_batch_job_once_instead_of_checking_each_job(harness, alice):
    """A lease links every job it takes to its session's batch job: revision 0013's row
    trigger checked (and locked the batch job) once per job; since revision 0015 the lease
    locks it once (leases.LOCK_BATCH_JOB) and the trigger skips its rows."""
    site, app = make_site_app(alice)
    engine = harness.db.engine
    with engine.begin() as conn:
        ids = new_jobs(conn, alice.user_id, app.id, 30, "lease")
        batch_job_id = new_batch_job(conn, alice.user_id, site.id)
        session = session_store.open_session(conn, alice.user_id, site.id, batch_job_id, "SERIAL", [], "h",
                                             utcnow(), utcnow() + timedelta(hours=1))
    ref = leases.SessionRef(session["id"], alice.user_id, site.id, "SERIAL", batch_job_id)
    credit = leases.Credit(max_jobs=10, free_nodes=10.0, reserve_jobs=20, reserve_nodes=20.0)
    with engine.connect() as conn, conn.begin():
        conn.exec_driver_sql("SET LOCAL track_functions = 'pl'")
        got = leases.acquire(conn, ref, credit, utcnow())
        assert _check_calls(conn) == 0
        with engine.connect() as other, other.begin():  # the lease holds the batch job against a delete
            with pytest.raises(OperationalError, match="could not obtain lock"):
                other.execute(select(batch_jobs.c.id).where(batch_jobs.c.id == batch_job_id)
                              .with_for_update(nowait=True))
    assert len(got.jobs) == 30 and {r["batch_job_id"] for r in got.jobs} == {batch_job_id}
    with engine.connect() as conn:
        linked = conn.execute(select(jobs.c.id).where(jobs.c.batch_job_id == batch_job_id)).scalars().all()
    assert sorted(linked) == sorted(ids)


def test_links_to_a_batch_job_the_transaction_did_not_lock_are_still_checked(harness, alice):
    """The skip is for the batch job the transaction locked and named, nothing else: a
    link to another is checked per row, and so is one made after the named batch job was
    deleted in the same transaction."""
    site, app = make_site_app(alice)
    engine = harness.db.engine
    with engine.begin() as conn:
        (job_id,) = new_jobs(conn, alice.user_id, app.id, 1, "checked")
        locked, other = new_batch_job(conn, alice.user_id, site.id), new_batch_job(conn, alice.user_id, site.id)
    with engine.connect() as conn, conn.begin():
        conn.exec_driver_sql("SET LOCAL track_functions = 'pl'")
        conn.execute(leases.LOCK_BATCH_JOB, {"b_bj": locked})
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(batch_job_id=other))
        assert _check_calls(conn) == 1
        with pytest.raises(IntegrityError, match="no such batch job"), conn.begin_nested():
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(batch_job_id=other + 100000))
        conn.execute(batch_jobs.delete().where(batch_jobs.c.id == locked))
        with pytest.raises(IntegrityError, match="no such batch job"), conn.begin_nested():
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(batch_job_id=locked))
        conn.rollback()
    with engine.connect() as conn, conn.begin():  # a missing batch job sets nothing: its links fail
        conn.execute(leases.LOCK_BATCH_JOB, {"b_bj": other + 100000})
        with pytest.raises(IntegrityError, match="no such batch job"):
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(batch_job_id=other + 100000))

def test_an_update_that_keeps_a_jobs_batch_job_does_not_lock_it(harness, alice):
    """Only a link the statement makes is checked (as revision 0013's WHEN clause did): a
    report that moves a leased job must not wait on (nor fail for) its batch job, which
    another transaction holds locked to delete it."""
    site, app = make_site_app(alice)
    engine = harness.db.engine
    with engine.begin() as conn:
        (job_id,) = new_jobs(conn, alice.user_id, app.id, 1, "kept")
        batch_job_id = new_batch_job(conn, alice.user_id, site.id)
        conn.execute(update(jobs).where(jobs.c.id == job_id).values(batch_job_id=batch_job_id))
    with engine.connect() as holder, holder.begin():
        holder.execute(select(batch_jobs.c.id).where(batch_jobs.c.id == batch_job_id).with_for_update())
        with engine.connect() as conn, conn.begin():
            conn.exec_driver_sql("SET LOCAL lock_timeout = '2s'")
            conn.execute(update(jobs).where(jobs.c.id == job_id).values(state_message="moved", batch_job_id=batch_job_id))
            with pytest.raises(IntegrityError, match="no such batch job"):  # a new link is still checked
                with conn.begin_nested():
                    conn.execute(update(jobs).where(jobs.c.id == job_id).values(batch_job_id=batch_job_id + 100000))
