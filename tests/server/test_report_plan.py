"""Plans of the statements run for every launcher report, every batch of finished jobs
and every transfer report on SQLite: they must not walk all of an owner's or a site's jobs. Without statistics
(jobs created a few at a time are never analyzed) SQLite chose
ix_jobs_owner_id_state_id_site_id on a report's owner term and read every job of the owner
for each report (store/leases.report_rows_statement); with statistics, the site stream's
cleanup query walked every finished job of the site, cleaned ones too, and without
them (or with statistics taken before the jobs finished) every finished job of the site
not cleaned, of apps without globs too (store/site_work._cleanups_statements)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, text

from balsam_grpc.server.store import migrate
from balsam_grpc.server.store.db import make_engine
from balsam_grpc.server.store.leases import report_rows_statement
from balsam_grpc.server.store.site_work import _BACKLOG_SQL, _cleanups_statements
from balsam_grpc.server.store.tables import apps, jobs, sites, transfer_items, users
from balsam_grpc.server.store.transfers import reported_items_statement

NOW = datetime.now(UTC)


def _planned(tmp_path: Path, app_rows: list[dict[str, Any]], job_rows: list[dict[str, Any]], *, analyze: bool,
             statement: Any, values: dict[str, Any] | None = None,
             item_rows: list[dict[str, Any]] = ()) -> tuple[list[str], list[Any]]:
    """A fresh SQLite database of one user and site with these apps, jobs and transfer
    items (analyzed or not), and `statement`'s plan there (the EXPLAIN QUERY PLAN steps)
    and rows."""
    url = f"sqlite:///{tmp_path / 'plan.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(insert(users), [{"username": "u", "password_hash": "x", "create_time": NOW}])
            conn.execute(insert(sites), [{"owner_id": 1, "name": "s", "create_time": NOW, "update_time": NOW}])
            conn.execute(insert(apps), [{"owner_id": 1, "site_id": 1, "create_time": NOW, "update_time": NOW, **a}
                                        for a in app_rows])
            if job_rows:
                conn.execute(insert(jobs), [{"owner_id": 1, "site_id": 1, "create_time": NOW, "update_time": NOW,
                                             "state_time": NOW, **j} for j in job_rows])
            if item_rows:
                conn.execute(insert(transfer_items), [{"owner_id": 1, "site_id": 1, "create_time": NOW,
                                                       "update_time": NOW, **i} for i in item_rows])
            if analyze:
                conn.exec_driver_sql("ANALYZE")
        with engine.connect() as conn:
            assert analyze or not conn.exec_driver_sql("SELECT 1 FROM sqlite_master WHERE name = 'sqlite_stat1'").all()
            # Expanded: an IN list's values become parameters of their own.
            expanded = statement.compile(dialect=engine.dialect).construct_expanded_state(values or {})
            args = tuple(expanded.parameters[name] for name in expanded.positiontup)
            plan = [r[3] for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + expanded.statement, args)]
            return plan, conn.exec_driver_sql(expanded.statement, args).all()
    finally:
        engine.dispose()


def _job_steps(plan: list[str]) -> list[str]:
    return [step for step in plan if " jobs " in f" {step} "]


def test_a_reports_jobs_are_looked_up_by_id_without_statistics(tmp_path: Path) -> None:
    plan, rows = _planned(tmp_path, [{"name": "a"}],
                          [{"app_id": 1, "workdir": f"w{i}", "state": "RUNNING"} for i in range(200)],
                          analyze=False, statement=report_rows_statement("sqlite"),
                          values={"b_owner": 1, "b_ids": json.dumps([5, 6])})
    assert [r.id for r in rows] == [5, 6]
    assert _job_steps(plan) == ["SEARCH jobs USING INTEGER PRIMARY KEY (rowid=?)"], plan


@pytest.mark.parametrize("analyze", [True, False])
def test_the_cleanup_query_reads_only_jobs_still_to_clean(tmp_path: Path, analyze: bool) -> None:
    """Without statistics the joined query searched ix_jobs_cleanup_due by site alone: every
    finished job of the site not cleaned, of the apps without globs too."""
    apps_with_globs, due = _cleanups_statements("sqlite")
    plan, rows = _planned(tmp_path, [{"name": "a", "cleanup_globs": ["*.tmp"]}, {"name": "b", "cleanup_globs": []}],
                          [{"app_id": 1 + i % 2, "workdir": f"w{i}", "state": "JOB_FINISHED",
                            "cleaned_time": None if i % 50 < 2 else NOW} for i in range(1000)],
                          analyze=analyze, statement=due,
                          values={"w_site": 1, "w_owner": 1, "w_apps": [1], "w_limit": 100})
    assert [r[0] for r in rows] == [i + 1 for i in range(0, 1000, 50)]  # app a's, not yet cleaned
    assert _job_steps(plan) == ["SEARCH jobs USING INDEX ix_jobs_cleanup_due (site_id=? AND app_id=?)"], plan
    (tmp_path / "apps").mkdir()
    _, found = _planned(tmp_path / "apps", [{"name": "a", "cleanup_globs": ["*.tmp"]},
                                            {"name": "b", "cleanup_globs": []}], [], analyze=False,
                        statement=apps_with_globs, values={"w_site": 1})
    assert [(r[0], json.loads(r[1])) for r in found] == [(1, ["*.tmp"])]


def test_a_transfer_reports_items_are_looked_up_by_id_without_statistics(tmp_path: Path) -> None:
    """Without statistics SQLite searched ix_transfer_items_site_id_state on the site term:
    every item of the site, for each report of a few."""
    plan, rows = _planned(tmp_path, [{"name": "a"}],
                          [{"app_id": 1, "workdir": f"w{i}", "state": "READY"} for i in range(500)],
                          item_rows=[{"job_id": i + 1, "direction": "IN", "slot": "d", "state": "ACTIVE",
                                      "location_alias": "aps", "remote_path": "r", "local_path": "l"}
                                     for i in range(500)],
                          analyze=False, statement=reported_items_statement("sqlite", [5, 6], 1, 1))
    assert [r.id for r in rows] == [5, 6]
    assert [step for step in plan if "transfer_items" in step] == [
        "SEARCH transfer_items USING INTEGER PRIMARY KEY (rowid=?)"], plan


@pytest.mark.parametrize("analyze", [True, False])
def test_a_sites_backlog_walks_the_state_index(tmp_path: Path, analyze: bool) -> None:
    """The site stream reads its backlog up to 5 times a second. With statistics taken after
    a bulk create at one site (every job of one owner and site: the index's owner and site
    terms rate as useless), an ungrouped count scanned the whole table (20 ms at 100,000
    jobs); grouped by state it walks ix_jobs_owner_id_state_id_site_id's backlog states."""
    plan, rows = _planned(tmp_path, [{"name": "a"}],
                          [{"app_id": 1, "workdir": f"w{i}", "state": "JOB_FINISHED" if i % 100 else "PREPROCESSED"}
                           for i in range(3000)],
                          analyze=analyze, statement=text(_BACKLOG_SQL["sqlite"]),
                          values={"w_owner": 1, "w_site": 1})
    assert [(r[0], r[1]) for r in rows] == [("PREPROCESSED", 30)]
    steps = _job_steps(plan)
    assert steps and all(step.startswith("SEARCH jobs USING") and "ix_jobs_owner_id_state_id_site_id" in step
                         for step in steps), plan
