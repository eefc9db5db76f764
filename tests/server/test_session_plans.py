"""The plans PostgreSQL keeps for a launcher session's statements (store/leases.GENERIC_PLANS).

A report of a few jobs binds id arrays of a few elements; left to itself the plan cache
rated the generic plan (10 elements guessed per array) against custom plans for 4 and
planned four statements afresh at every report. The session's transactions now use
generic plans built with sequential scans off. Such a plan is kept as the table grows
(nothing rebuilds it without an ANALYZE), so it must read jobs through an index when it
was built on a small table as well as on a large one: a sequential scan of jobs per
report built while the table held a dozen jobs would stay when it holds millions.

Each case runs bench_load's pattern (4 jobs RUNNING, their RUN_DONE with the credit for 4
more) or bench_e2e's (jobs held ahead) on one connection of a database of its own, then
reads that connection's prepared
statements: none is planned per execution, and every generic plan of a statement over
jobs reads it through pk_jobs or ix_jobs_lease_order (EXPLAIN EXECUTE shows the cached
generic plan). Plans and counts, never timings."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Connection

from balsam_grpc.server.store import leases, migrate
from balsam_grpc.server.store import sessions as session_store
from balsam_grpc.server.store.db import make_engine
from tests.conftest import POSTGRES_URL
from tests.support.databases import drop_postgres, fresh_postgres
from tests.support.leases import seed_runnable

pytestmark = pytest.mark.skipif(not POSTGRES_URL, reason="PostgreSQL's plan cache")

NOW = datetime.now(UTC)


@pytest.fixture
def plan_db() -> Iterator[str]:
    url = fresh_postgres(POSTGRES_URL, "plans")
    migrate.upgrade(url)
    yield url
    drop_postgres(url)


def _seed(conn: Connection, n_jobs: int) -> tuple[int, int, int]:
    return seed_runnable(conn, n_jobs, "plans")


def _generic_plans(conn: Connection) -> dict[str, str]:
    """Each prepared statement of this connection over jobs: its cached generic plan."""
    plans = {}
    with conn.begin():
        prepared = conn.exec_driver_sql(
            "SELECT name, statement, cardinality(parameter_types), custom_plans, generic_plans "
            "FROM pg_prepared_statements WHERE statement ~ '(FROM|UPDATE) jobs\\M'").all()
        conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")  # show the cached one
        for name, statement, n_params, custom, generic in prepared:
            assert custom == 0 and generic > 0, (custom, generic, statement)
            args = ", ".join(["NULL"] * n_params)
            plan = [r[0] for r in conn.exec_driver_sql(f"EXPLAIN EXECUTE {name}({args})")]
            plans[" ".join(statement.split())] = "\n".join(plan)
        conn.rollback()
    return plans


@pytest.mark.parametrize("held_ahead", [False, True], ids=["started", "held"])
@pytest.mark.parametrize(("n_jobs", "analyze"), [(60, False), (10_000, True)], ids=["small", "large"])
def test_a_sessions_statements_keep_index_plans(plan_db: str, n_jobs: int, analyze: bool, held_ahead: bool) -> None:
    """`started`: bench_load's pattern; `held`: bench_e2e's (4 jobs held ahead, each started
    and ended in one report, with the credit to hold 4 more)."""
    engine = make_engine(plan_db)
    try:
        with engine.connect() as conn:
            with conn.begin():
                uid, sid, bj = _seed(conn, n_jobs)
            if analyze:
                with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as other:
                    other.exec_driver_sql("VACUUM ANALYZE")
            with conn.begin():
                session = session_store.open_session(conn, uid, sid, bj, "MPI", [], "plans", NOW,
                                                     NOW + timedelta(hours=1))
            ref = leases.SessionRef(session["id"], uid, sid, "MPI", bj)
            credit = leases.Credit(reserve_jobs=4, reserve_nodes=4.0) if held_ahead else \
                leases.Credit(max_jobs=4, free_nodes=4.0)
            with conn.begin():
                held = leases.acquire(conn, ref, credit, datetime.now(UTC)).jobs
            seq = 0
            for _ in range(12):  # past psycopg's 5 executions before it prepares
                transitions: list[Any] = []
                for row in held:
                    if held_ahead:
                        seq += 1
                        transitions.append(leases.Transition(seq, row["id"], row["lease_generation"], "RUNNING",
                                                             time=datetime.now(UTC)))
                    seq += 1
                    transitions.append(leases.Transition(seq, row["id"], row["lease_generation"], "RUN_DONE", 0,
                                                         time=datetime.now(UTC) - timedelta(microseconds=row["id"])))
                with conn.begin():
                    result, got = leases.report_and_acquire(conn, ref, transitions, credit, datetime.now(UTC))
                assert not result.rejections and len(result.released) == 4
                held = got.jobs
                assert len(held) == 4
            plans = _generic_plans(conn)
    finally:
        engine.dispose()
    # The session lock and advance, the report's rows, the ends' UPDATE (per-job times: the
    # unnest form), the pick, the leases' UPDATE.
    assert len(plans) >= 4, plans
    for statement, plan in plans.items():
        assert "Seq Scan on jobs" not in plan, (statement, plan)
        assert "pk_jobs" in plan or "ix_jobs_lease_order" in plan, (statement, plan)
    ends = [plan for statement, plan in plans.items() if "FROM unnest" in statement and "UPDATE jobs" in statement]
    assert ends and all("pk_jobs" in plan for plan in ends), plans
