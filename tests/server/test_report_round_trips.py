"""How many times a launcher's report transaction waits for PostgreSQL (a count, never a
timing). A report with the credit it frees (leases.report_and_acquire, what a session
stream runs for every report) is a handful of exchanges however many jobs it carries:
the session's lock and the jobs' rows together, the ends' UPDATE (it says which jobs have
children), the pick, and one last exchange with the leases' writes, the apps and the
events. A statement that adds an exchange per report costs every session the same again
(bench_load's 100 sessions report 4 jobs at a time); this test says so when one does."""

from __future__ import annotations

import sys
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, select

from balsam_grpc.server.convert import utcnow
from balsam_grpc.server.store import leases
from balsam_grpc.server.store import sessions as session_store
from balsam_grpc.server.store.tables import jobs
from tests.conftest import Caller, Harness
from tests.support.records import make_batch_job, make_jobs, make_site_app

_DRIVER_CALLS = ("driver_batch", "driver_rows", "driver_executemany")


class Exchanges:
    """Round trips of a transaction: each driver call (store/driver.py; a batch is one) and
    each statement SQLAlchemy runs itself (BEGIN and COMMIT not counted)."""

    def __init__(self) -> None:
        self.count = 0
        self.inside_driver = 0


@pytest.fixture
def exchanges(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> Exchanges:
    if not harness.db.is_postgres:
        pytest.skip("round trips to a database server: PostgreSQL")
    from balsam_grpc.server.store import driver

    seen = Exchanges()
    for name in _DRIVER_CALLS:
        original = getattr(driver, name)

        def counted(*args: Any, _original: Any = original, **kw: Any) -> Any:
            seen.count += 1
            seen.inside_driver += 1
            try:
                return _original(*args, **kw)
            finally:
                seen.inside_driver -= 1

        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith("balsam_grpc.server") \
                    and getattr(module, name, None) is original:
                monkeypatch.setattr(module, name, counted)

    def statement(*_: Any) -> None:
        if not seen.inside_driver:
            seen.count += 1

    event.listen(harness.db.engine, "before_cursor_execute", statement)
    yield seen
    event.remove(harness.db.engine, "before_cursor_execute", statement)


def _session(harness: Harness, caller: Caller, n_jobs: int) -> tuple[leases.SessionRef, list[int]]:
    site, app = make_site_app(caller, command_template="true", parameters=[])
    bj = make_batch_job(caller, site.id)
    ids = [j.id for j in make_jobs(caller, app, n_jobs)]
    now = utcnow()
    row = harness.db.write_sync(lambda conn: session_store.open_session(
        conn, caller.user_id, site.id, bj.id, "MPI", [], "test", now, now + timedelta(hours=1)))
    return leases.SessionRef(row["id"], caller.user_id, site.id, "MPI", bj.id), ids


def _generations(harness: Harness, ids: list[int]) -> dict[int, int]:
    return dict(harness.db.read_sync(lambda conn: conn.execute(
        select(jobs.c.id, jobs.c.lease_generation).where(jobs.c.id.in_(ids))).all()))


def _report(harness: Harness, ref: leases.SessionRef, transitions: list[leases.Transition],
            credit: leases.Credit, exchanges: Exchanges) -> tuple[int, leases.ReportResult, leases.Acquired]:
    before = exchanges.count
    result, got = harness.db.write_sync(leases.report_and_acquire, ref, transitions, credit, utcnow())
    assert not result.rejections, result.rejections
    return exchanges.count - before, result, got


def test_a_report_of_started_jobs_with_credit_is_five_exchanges(harness: Harness, alice: Caller,
                                                                 exchanges: Exchanges) -> None:
    """bench_load's sessions: 4 jobs RUNNING, their RUN_DONE with the credit for 4 more."""
    ref, ids = _session(harness, alice, 12)
    credit = leases.Credit(max_jobs=4, free_nodes=4.0)
    got = harness.db.write_sync(leases.acquire, ref, credit, utcnow())
    seq = 0
    for _ in range(2):
        held = [(r["id"], r["lease_generation"]) for r in got.jobs]
        assert len(held) == 4
        transitions = []
        for job_id, generation in held:
            seq += 1
            transitions.append(leases.Transition(seq, job_id, generation, "RUN_DONE", 0,
                                                 time=utcnow() - timedelta(microseconds=job_id)))
        n, result, got = _report(harness, ref, transitions, credit, exchanges)
        assert len(result.released) == 4
        # session lock + rows | ends' UPDATE | sort off + pick | leases, apps, events
        assert n == 4, n


@pytest.mark.parametrize(("held_ahead", "expected"), [(20, 4), (40, 5)])
def test_a_report_of_jobs_held_ahead_started_and_ended_is_a_few_exchanges(harness: Harness, alice: Caller,
                                                                           exchanges: Exchanges,
                                                                           held_ahead: int, expected: int) -> None:
    """bench_e2e's launcher: jobs held ahead, each started and ended in one report (written
    once, two events each), with the credit to hold as many again: 40 events, and 80."""
    ref, ids = _session(harness, alice, 2 * held_ahead)
    credit = leases.Credit(reserve_jobs=held_ahead, reserve_nodes=float(held_ahead))
    got = harness.db.write_sync(leases.acquire, ref, credit, utcnow())
    held = [(r["id"], r["lease_generation"]) for r in got.jobs]
    assert len(held) == held_ahead
    transitions = []
    seq = 0
    for job_id, generation in held:
        transitions.append(leases.Transition(seq + 1, job_id, generation, "RUNNING", time=utcnow()))
        transitions.append(leases.Transition(seq + 2, job_id, generation, "RUN_DONE", 0, time=utcnow()))
        seq += 2
    n, result, got = _report(harness, ref, transitions, credit, exchanges)
    assert len(result.released) == held_ahead and result.started == held_ahead and len(got.jobs) == held_ahead
    assert set(_generations(harness, [r["id"] for r in got.jobs]).values()) == {1}
    # session lock + rows | ends' UPDATE | sort off + pick | lock of the batch job, held
    # ahead, apps and the events (40 of them: one INSERT); 80 events go by COPY (bulk.
    # COPY_MIN_ROWS, cheaper per row than the INSERT for both processes): the marker and
    # the notification with the writes before it, then the COPY (not counted here) and
    # the highest id (currval). Before, the marker and the notification were one each.
    assert n == expected, n
